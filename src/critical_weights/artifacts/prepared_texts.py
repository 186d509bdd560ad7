"""The prepared texts on disk: the contract between `prepare` and every stage after it.

`texts.parquet` holds one row per chosen text (its position in the source, the text, its
token count and its token ids); its schema metadata carries what `prepare` saw (source, counts,
the token sequences' sha256, the params). The tokenizer is saved beside it, so later stages
tokenise exactly as `prepare` did. Torch-free.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from critical_weights.core.errors import TextsError, first_line

PREPARED_FILE = "texts.parquet"
TOKENIZER_DIR = "tokenizer"


@dataclass(frozen=True)
class PreparedTexts:
    """Chosen texts and their token ids, in source order."""

    text_index: list[int]  # position of each text in the source
    texts: list[str]
    input_ids: list[list[int]]  # truncated at max_length, at least 2 tokens each
    n_available: int  # non-empty texts in the source


def text_set_hash(input_ids: Sequence[Sequence[int]]) -> str:
    """sha256 of the token sequences, so two runs can tell whether they saw the same data."""
    h = hashlib.sha256()
    for seq in input_ids:
        h.update(np.asarray(seq, dtype="<i8").tobytes())
        h.update(b"|")
    return h.hexdigest()


def write_prepared(folder: Path, prepared: PreparedTexts, meta: dict[str, str]) -> None:
    """`texts.parquet`: one row per sequence, with an `input_ids` list column; `meta` goes
    into the file's schema metadata."""
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

    path = folder / PREPARED_FILE
    try:
        with pq.ParquetFile(path) as file:
            return file.read(columns=["text_index"]).column("text_index").to_pylist()
    except (pa.ArrowException, OSError, KeyError) as err:
        raise TextsError(f"prepared texts {path} are missing or lack text_index ({first_line(err)}); rerun dvc repro") from None


def read_prepared_meta(folder: Path) -> dict[str, str]:
    """Only the metadata `prepare` wrote (no token ids)."""

    path = folder / PREPARED_FILE
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as err:
        raise TextsError(f"prepared texts {path} are missing or corrupt ({first_line(err)}); rerun dvc repro") from None
    return {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
