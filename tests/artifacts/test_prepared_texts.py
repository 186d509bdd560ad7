"""critical_weights.artifacts.prepared_texts: the prepared texts read back exactly with their
metadata, the token-set hash sees sequence boundaries, and a missing file names the stage to run."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from critical_weights.artifacts import prepared_texts
from critical_weights.core.errors import TextsError
from critical_weights.texts import sources


def test_text_set_hash_is_sha256_of_int64_sequences_and_sees_the_boundaries():
    want = hashlib.sha256(np.array([1, 2], "<i8").tobytes() + b"|" + np.array([3], "<i8").tobytes() + b"|").hexdigest()
    assert prepared_texts.text_set_hash([[1, 2], [3]]) == want
    assert prepared_texts.text_set_hash([[1], [2, 3]]) != want


def test_prepared_texts_round_trip_with_their_meta(tmp_path):
    prepared = sources.PreparedTexts([3, 8], ["a b", "c d e"], [[5, 6], [7, 8, 9]], n_available=10)
    prepared_texts.write_prepared(tmp_path, prepared, {"seed": "42", "source": "corpus.jsonl"})
    ids, meta = prepared_texts.read_prepared(tmp_path)
    assert ids == [[5, 6], [7, 8, 9]]
    assert meta == {"seed": "42", "source": "corpus.jsonl"} == prepared_texts.read_prepared_meta(tmp_path)
    table = pq.read_table(tmp_path / prepared_texts.PREPARED_FILE)
    assert table.column("text_index").to_pylist() == [3, 8] and table.column("n_tokens").to_pylist() == [2, 3]
    assert table.schema.field("input_ids").type == pa.list_(pa.int32())


def test_missing_prepared_texts_say_which_stage_to_run(tmp_path):
    with pytest.raises(TextsError) as info:
        prepared_texts.read_prepared(tmp_path)
    assert str(info.value) == f"prepared texts {tmp_path / prepared_texts.PREPARED_FILE} are missing; run the prepare stage (dvc repro)"
