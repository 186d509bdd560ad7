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
from pathlib import Path
from typing import Any

import numpy as np

from critical_weights.artifacts.prepared_texts import TOKENIZER_DIR, PreparedTexts, read_prepared_index, read_prepared_meta
from critical_weights.core.errors import TextsError, first_line
from critical_weights.core.progress import progress
from critical_weights.core.streams import STREAM_TEXTS
from critical_weights.model import tokenization

log = logging.getLogger(__name__)

SOURCE_KINDS = ".jsonl, .txt, .parquet, or a folder of .txt files"


def _read_utf8(path: Path, key: str = "texts.source") -> str:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise TextsError(f"{key}: {path} cannot be read ({err.strerror or err})") from None
    if b"\x00" in data:
        raise TextsError(f"{key}: {path} looks binary (it holds NUL bytes); expected UTF-8 text")
    try:
        return data.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark is not text
    except UnicodeDecodeError as err:
        raise TextsError(f"{key}: {path} is not UTF-8 (bad byte at offset {err.start})") from None


def _read_jsonl(path: Path, key: str = "texts.source", field: str | None = None) -> list[Any]:
    """Every record's `text`; with `field`, (text, str(record[field])) pairs."""
    out: list[Any] = []
    # split on newlines only: str.splitlines would also split inside a JSON string holding U+2028
    for number, line in enumerate(_read_utf8(path, key).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise TextsError(f"{key}: {path} line {number} is not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise TextsError(f"{key}: {path} line {number} has no string field 'text'")
        if field is None:
            out.append(record["text"])
            continue
        value = record.get(field)
        if value is None or isinstance(value, (dict, list)):
            fields = ", ".join(k for k in record if k != "text") or "none but text"
            raise TextsError(f"domains.field: {field!r} is {'missing from' if value is None else 'not a scalar in'} "
                             f"line {number} of {path} (its fields: {fields})")
        out.append((record["text"], str(value)))
    return out


def _read_parquet(path: Path, key: str = "texts.source", field: str | None = None) -> list[Any]:
    """The `text` column's non-null strings; with `field`, (text, str(field value)) pairs of the
    rows where both are set."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with pq.ParquetFile(path) as file:  # not read_table, which imports pyarrow.dataset (0.15 s)
            table = file.read()
    except (pa.ArrowException, OSError) as err:
        raise TextsError(f"{key}: {path} is not a readable Parquet file ({first_line(err)})") from None
    kind = table.schema.field("text").type if "text" in table.column_names else None
    if kind is None or not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise TextsError(f"{key}: {path} has no string column 'text' (columns: {', '.join(table.column_names)})")
    if field is None:
        return [t for t in table.column("text").to_pylist() if t is not None]
    if field not in table.column_names:
        raise TextsError(f"domains.field: {path} has no column {field!r} (columns: {', '.join(table.column_names)})")
    out = []
    for row, (t, g) in enumerate(zip(table.column("text").to_pylist(), table.column(field).to_pylist())):
        if t is not None and g is None:
            raise TextsError(f"domains.field: row {row} of {path} has a text but no {field!r}; give every text a group")
        if t is not None:
            out.append((t, str(g)))
    return out


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


def read_grouped(path: Path, field: str, key: str = "domains.source") -> list[tuple[str, str]]:
    """(text, group) of every non-empty text of a labelled source, in order: the group is the
    text's `field` (a `.jsonl` key or a `.parquet` column, any scalar read as a string); for a
    folder, the subfolder its `.txt` file lies in. Texts are stripped as `read_texts` strips them."""
    if not path.exists():
        raise TextsError(f"{key}: {path} does not exist; expected .jsonl, .parquet, or a folder of subfolders of .txt files")
    if path.is_dir():
        files = sorted(path.glob("*/*.txt"))
        if not files:
            raise TextsError(f"domains.field: {path} has no subfolder holding .txt files; put each group's texts in "
                             "a subfolder named after the group")
        pairs = [(_read_utf8(f, key), f.parent.name) for f in files]
    elif path.suffix.lower() == ".jsonl":
        pairs = _read_jsonl(path, key, field)
    elif path.suffix.lower() == ".parquet":
        pairs = _read_parquet(path, key, field)
    elif path.suffix.lower() == ".txt":
        raise TextsError(f"{key}: {path} is a .txt file, whose texts have no field to group by; use a .jsonl or "
                         ".parquet source, or a folder with a subfolder of .txt files per group")
    else:
        raise TextsError(f"{key}: {path} has an unsupported type; expected .jsonl, .parquet, or a folder of "
                         "subfolders of .txt files")
    pairs = [(t.strip(), g) for t, g in pairs if t.strip()]
    if not pairs:
        raise TextsError(f"{key}: {path} holds no non-empty text")
    return pairs


STREAM_JOIN = "\n\n"  # what the Wanda and SparseGPT code put between WikiText-2's rows


def read_stream(path: Path, key: str) -> str:
    """A source as one text, unstripped, for the windowed protocol: a `.txt` file as it is; the
    rows of a `.parquet` column `text` or of a `.jsonl` field `text` (empty rows included), or
    the `.txt` files of a folder, joined with a blank line, as the papers' code joins the rows
    of WikiText-2's `text` column."""
    if not path.exists():
        raise TextsError(f"{key}: {path} does not exist; expected {SOURCE_KINDS}")
    if path.is_dir():
        text = STREAM_JOIN.join(_read_utf8(p, key) for p in sorted(path.glob("*.txt")))
    elif path.suffix.lower() == ".txt":
        text = _read_utf8(path, key)
    elif path.suffix.lower() == ".jsonl":
        text = STREAM_JOIN.join(_read_jsonl(path, key))
    elif path.suffix.lower() == ".parquet":
        text = STREAM_JOIN.join(_read_parquet(path, key))
    else:
        raise TextsError(f"{key}: {path} has an unsupported type; expected {SOURCE_KINDS}")
    if not text.strip():
        raise TextsError(f"{key}: {path} holds no text")
    return text


def stream_windows(source: Path, prepared: Path, context: int, max_windows: int,
                   key: str = "compress.stream") -> tuple[list[list[int]], dict[str, int]]:
    """The papers' perplexity protocol: `source` as one text (`read_stream`), tokenised once by
    the prepared tokenizer, cut into non-overlapping windows of `context` tokens (stride =
    context); the tokens past the last full window are left out, as the papers' code leaves
    them. With `max_windows` > 0, the first that many windows.

    Returns the windows and {n_stream_tokens, n_windows_full, n_left_out, text_sha256}."""
    text = read_stream(source, key)
    tokenizer = tokenization.load_saved(prepared / TOKENIZER_DIR)  # the class prepare checked
    ids = tokenizer(text)["input_ids"]
    full = len(ids) // context
    if full == 0:
        raise TextsError(f"{key}: {source} is {len(ids)} tokens, less than one window of compress.context {context}; "
                         f"lower compress.context to at most {len(ids)}")
    n = min(full, max_windows) if max_windows else full
    windows = [ids[i * context:(i + 1) * context] for i in range(n)]
    return windows, {"n_stream_tokens": len(ids), "n_windows_full": full, "n_left_out": len(ids) - n * context,
                     "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}


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


def in_sample(input_ids: Sequence[Sequence[int]], n_texts: int, seed: int, key: str) -> list[list[int]]:
    """The in-sample texts a later stage measures on: `n_texts` of the prepared token
    sequences (all of them for 0), drawn by (`seed`, STREAM_TEXTS); `key` is the param that
    asked, named in the warning when it asks for more than `prepare` kept."""
    drawn = choose(len(input_ids), n_texts or len(input_ids), seed, STREAM_TEXTS, key, "prepare kept {n} texts")
    return [list(input_ids[i]) for i in drawn]


def prepare_texts(
    texts: Sequence[str], n_texts: int, max_length: int, seed: int,
    tokenize: Callable[[str], list[int]],
) -> PreparedTexts:
    """Choose, tokenise and truncate. Texts with fewer than 2 tokens predict nothing and are dropped."""
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


def unchosen_ids(source: Path, prepared: Path, n: int, max_length: int, seed: int, stream: int,
                 key: str = "validate.n_texts x validate.holdout") -> tuple[list[list[int]], str | None]:
    """Token ids of up to `n` source texts that `prepare` did not choose (held out from the
    gradients), drawn by (`seed`, `stream`), tokenised with the prepared tokenizer and
    truncated at `max_length` as `prepare` does; texts under 2 tokens are dropped. `key` names
    the param a warning blames when fewer are held out than asked for.

    Returns the ids and, when none could be had, the reason (the caller says it)."""
    from transformers import AutoTokenizer

    all_texts = read_texts(source)
    n_seen = read_prepared_meta(prepared).get("n_available")
    if n_seen is not None and int(n_seen) != len(all_texts):
        raise TextsError(f"texts.source: {source} now holds {len(all_texts)} texts, but prepare saw {n_seen}; rerun dvc repro")
    unchosen = sorted(set(range(len(all_texts))) - set(read_prepared_index(prepared)))
    if not unchosen:
        return [], f"prepare chose every text of {source}, so none is left to hold out (lower texts.n_texts)"
    drawn = choose(len(unchosen), n, seed, stream, key, "only {n} source texts are held out from prepare")
    pick = [unchosen[i] for i in drawn]
    tokenizer = AutoTokenizer.from_pretrained(prepared / TOKENIZER_DIR)
    ids = [s for s in (tokenizer(all_texts[i])["input_ids"][:max_length] for i in pick) if len(s) >= 2]
    return ids, (None if ids else "every held-out text is shorter than 2 tokens")


