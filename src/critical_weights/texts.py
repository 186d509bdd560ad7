"""The evaluation texts: read a source, choose `n_texts` with the seed, tokenise, truncate.

Sources:
- `.jsonl`: one JSON object per line with a string field `text`;
- `.txt`: one text per non-empty line;
- `.parquet`: a string column `text`;
- a folder: every `*.txt` file in it, by name, is one text.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from critical_weights.errors import TextsError, first_line

log = logging.getLogger(__name__)

SOURCE_KINDS = ".jsonl, .txt, .parquet, or a folder of .txt files"


@dataclass(frozen=True)
class PreparedTexts:
    """Chosen texts and their token ids, in source order."""

    text_index: list[int]  # position of each text in the source
    texts: list[str]
    input_ids: list[list[int]]  # truncated at max_length, at least 2 tokens each
    n_available: int  # non-empty texts in the source


def _read_utf8(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise TextsError(f"texts.source: {path} cannot be read ({err.strerror or err})") from None
    if b"\x00" in data:
        raise TextsError(f"texts.source: {path} looks binary (it holds NUL bytes); expected UTF-8 text")
    try:
        return data.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark is not text
    except UnicodeDecodeError as err:
        raise TextsError(f"texts.source: {path} is not UTF-8 (bad byte at offset {err.start})") from None


def _read_jsonl(path: Path) -> list[str]:
    texts = []
    # split on newlines only: str.splitlines would also split inside a JSON string holding U+2028
    for number, line in enumerate(_read_utf8(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise TextsError(f"texts.source: {path} line {number} is not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise TextsError(f"texts.source: {path} line {number} has no string field 'text'")
        texts.append(record["text"])
    return texts


def _read_parquet(path: Path) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with pq.ParquetFile(path) as file:  # not read_table, which imports pyarrow.dataset (0.15 s)
            table = file.read()
    except (pa.ArrowException, OSError) as err:
        raise TextsError(f"texts.source: {path} is not a readable Parquet file ({first_line(err)})") from None
    kind = table.schema.field("text").type if "text" in table.column_names else None
    if kind is None or not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise TextsError(f"texts.source: {path} has no string column 'text' (columns: {', '.join(table.column_names)})")
    return [t for t in table.column("text").to_pylist() if t is not None]


def read_texts(path: Path) -> list[str]:
    """All non-empty texts of a source, in order."""
    if not path.exists():
        raise TextsError(f"texts.source: {path} does not exist; expected {SOURCE_KINDS}")
    if path.is_dir():
        texts = [_read_utf8(p) for p in sorted(path.glob("*.txt"))]
    elif path.suffix.lower() == ".jsonl":
        texts = _read_jsonl(path)
    elif path.suffix.lower() == ".txt":
        texts = _read_utf8(path).splitlines()
    elif path.suffix.lower() == ".parquet":
        texts = _read_parquet(path)
    else:
        raise TextsError(f"texts.source: {path} has an unsupported type; expected {SOURCE_KINDS}")
    texts = [t.strip() for t in texts if t.strip()]
    if not texts:
        raise TextsError(f"texts.source: {path} holds no non-empty text")
    return texts


def choose(n_available: int, n_texts: int, seed: int, stream: int | None = None,
           key: str = "texts.n_texts", what: str = "the source holds {n} texts") -> list[int]:
    """Indices of `n_texts` texts drawn without replacement by `seed`, ascending.

    `stream` gives an independent draw from the same seed (np.random.default_rng([seed,
    stream])), for choices other than prepare's. When fewer texts are available than asked
    for, all are used and a warning names `key`.
    """
    if n_texts >= n_available:
        if n_texts > n_available:
            log.warning("%s is %d but %s; using all %d", key, n_texts, what.format(n=n_available), n_available)
        return list(range(n_available))
    rng = np.random.default_rng(seed if stream is None else [seed, stream])
    return sorted(int(i) for i in rng.choice(n_available, size=n_texts, replace=False))


def prepare_texts(
    texts: Sequence[str], n_texts: int, max_length: int, seed: int,
    tokenize: Callable[[str], list[int]],
) -> PreparedTexts:
    """Choose, tokenise and truncate. Texts with fewer than 2 tokens predict nothing and are dropped."""
    from critical_weights.progress import progress

    index = choose(len(texts), n_texts, seed)
    kept_index, kept_texts, ids = [], [], []
    for i in progress(index, "tokenising"):
        tokens = tokenize(texts[i])[:max_length]
        if len(tokens) < 2:
            log.warning("text %d has %d token(s) and predicts nothing; dropped", i, len(tokens))
            continue
        kept_index.append(i)
        kept_texts.append(texts[i])
        ids.append(tokens)
    if not ids:
        raise TextsError(
            f"texts.source: all {len(index)} chosen texts are shorter than 2 tokens after tokenisation, "
            "so there is nothing to predict; use longer texts"
        )
    return PreparedTexts(kept_index, kept_texts, ids, len(texts))


def text_set_hash(input_ids: Sequence[Sequence[int]]) -> str:
    """sha256 of the token sequences, so two runs can tell whether they saw the same data."""
    h = hashlib.sha256()
    for seq in input_ids:
        h.update(np.asarray(seq, dtype="<i8").tobytes())
        h.update(b"|")
    return h.hexdigest()


PREPARED_FILE = "texts.parquet"
TOKENIZER_DIR = "tokenizer"


def write_prepared(folder: Path, prepared: PreparedTexts, meta: dict[str, str]) -> None:
    """`texts.parquet`: one row per sequence, with an `input_ids` list column; `meta` goes
    into the file's schema metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([
        ("text_index", pa.int64()),  # position in the source
        ("text", pa.string()),
        ("n_tokens", pa.int32()),
        ("input_ids", pa.list_(pa.int32())),
    ], metadata={k: v for k, v in meta.items()})
    table = pa.table({
        "text_index": prepared.text_index,
        "text": prepared.texts,
        "n_tokens": [len(s) for s in prepared.input_ids],
        "input_ids": prepared.input_ids,
    }, schema=schema)
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / PREPARED_FILE, compression="zstd")


def read_prepared(folder: Path) -> tuple[list[list[int]], dict[str, str]]:
    """Token sequences and the metadata `prepare` wrote."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = folder / PREPARED_FILE
    if not path.is_file():
        raise TextsError(f"prepared texts {path} are missing; run the prepare stage (dvc repro)")
    try:
        with pq.ParquetFile(path) as file:
            table = file.read()
    except (pa.ArrowException, OSError) as err:
        raise TextsError(f"prepared texts {path} are corrupt ({first_line(err)}); rerun dvc repro") from None
    if "input_ids" not in table.column_names or table.num_rows == 0:
        raise TextsError(f"prepared texts {path} hold no input_ids; rerun the prepare stage")
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    return table.column("input_ids").to_pylist(), meta


def read_prepared_index(folder: Path) -> list[int]:
    """Positions in the source of the texts `prepare` chose."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = folder / PREPARED_FILE
    try:
        with pq.ParquetFile(path) as file:
            return file.read(columns=["text_index"]).column("text_index").to_pylist()
    except (pa.ArrowException, OSError, KeyError) as err:
        raise TextsError(f"prepared texts {path} are missing or lack text_index ({first_line(err)}); rerun dvc repro") from None


def unchosen_ids(source: Path, prepared: Path, n: int, max_length: int, seed: int, stream: int) -> tuple[list[list[int]], str | None]:
    """Token ids of up to `n` source texts that `prepare` did not choose (held out from the
    gradients), drawn by (`seed`, `stream`), tokenised with the prepared tokenizer and
    truncated at `max_length` as `prepare` does; texts under 2 tokens are dropped.

    Returns the ids and, when none could be had, the reason (the caller says it)."""
    from transformers import AutoTokenizer

    all_texts = read_texts(source)
    n_seen = read_prepared_meta(prepared).get("n_available")
    if n_seen is not None and int(n_seen) != len(all_texts):
        raise TextsError(f"texts.source: {source} now holds {len(all_texts)} texts, but prepare saw {n_seen}; rerun dvc repro")
    unchosen = sorted(set(range(len(all_texts))) - set(read_prepared_index(prepared)))
    if not unchosen:
        return [], f"prepare chose every text of {source}, so none is left to hold out (lower texts.n_texts)"
    drawn = choose(len(unchosen), n, seed, stream, "validate.n_texts x validate.holdout",
                   "only {n} source texts are held out from prepare")
    pick = [unchosen[i] for i in drawn]
    tokenizer = AutoTokenizer.from_pretrained(prepared / TOKENIZER_DIR)
    ids = [s for s in (tokenizer(all_texts[i])["input_ids"][:max_length] for i in pick) if len(s) >= 2]
    return ids, (None if ids else "every held-out text is shorter than 2 tokens")


def read_prepared_meta(folder: Path) -> dict[str, str]:
    """Only the metadata `prepare` wrote (no token ids)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = folder / PREPARED_FILE
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as err:
        raise TextsError(f"prepared texts {path} are missing or corrupt ({first_line(err)}); rerun dvc repro") from None
    return {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
