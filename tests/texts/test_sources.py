"""critical_weights.texts.sources: every source kind reads the same texts, the draw follows the seed,
tokenising truncates and drops what predicts nothing, and prepared texts read back exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from critical_weights.core.errors import TextsError
from critical_weights.texts import sources

TEXTS = ["First text.", "Second, with a comma", "Third\u2028with a line separator", "fourth"]


def write_sources(folder: Path) -> dict[str, Path]:
    """The same four texts as .jsonl, .txt (no U+2028 there: it would split), .parquet and a folder."""
    jsonl = folder / "t.jsonl"
    jsonl.write_text("\ufeff" + "\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(TEXTS)) + "\n\n",
                     encoding="utf-8")
    txt = folder / "t.txt"
    txt.write_text("  First text.  \n\nSecond, with a comma\n", encoding="utf-8")
    parquet = folder / "t.parquet"
    pq.write_table(pa.table({"text": [*TEXTS, None, "   "]}), parquet)
    txt_dir = folder / "dir"
    txt_dir.mkdir()
    for i, t in enumerate(TEXTS):
        (txt_dir / f"{i:02d}.txt").write_text(t + "\n", encoding="utf-8")
    (txt_dir / "ignored.md").write_text("not a .txt", encoding="utf-8")
    return {"jsonl": jsonl, "txt": txt, "parquet": parquet, "dir": txt_dir}


def test_every_source_kind_reads_stripped_non_empty_texts_in_order(tmp_path):
    src = write_sources(tmp_path)
    assert sources.read_texts(src["jsonl"]) == TEXTS  # byte-order mark dropped, U+2028 kept inside a text
    assert sources.read_texts(src["parquet"]) == TEXTS  # null and blank rows dropped
    assert sources.read_texts(src["dir"]) == TEXTS  # *.txt only, by file name
    assert sources.read_texts(src["txt"]) == TEXTS[:2]


@pytest.mark.parametrize("content, message", [
    ('{"text": "a"}\n{"txt": "b"}\n', "line 2 has no string field 'text'"),
    ('{"text": "a"}\nnot json\n', "line 2 is not valid JSON (Expecting value)"),
    ("\n \n", "holds no non-empty text"),
])
def test_bad_jsonl_names_the_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(TextsError) as info:
        sources.read_texts(path)
    assert str(info.value) == f"texts.source: {path} {message}"


def test_choose_is_the_seeded_draw_sorted_and_all_when_short():
    picked = sources.choose(100, 10, seed=42)
    assert picked == sorted(int(i) for i in np.random.default_rng(42).choice(100, size=10, replace=False))
    assert len(set(picked)) == 10 and picked == sources.choose(100, 10, seed=42)
    assert picked != sources.choose(100, 10, seed=43)
    assert sources.choose(5, 10, seed=42) == [0, 1, 2, 3, 4]
    assert sources.choose(5, 5, seed=7) == [0, 1, 2, 3, 4]


def test_prepare_truncates_and_drops_texts_that_predict_nothing(caplog):
    source = ["a b c d e f", "x", "p q r"]
    prepared = sources.prepare_texts(source, n_texts=3, max_length=4, seed=0, tokenize=lambda t: [ord(w) for w in t.split()])
    assert prepared.text_index == [0, 2] and prepared.texts == ["a b c d e f", "p q r"]
    assert prepared.input_ids == [[97, 98, 99, 100], [112, 113, 114]]
    assert prepared.n_available == 3
    assert "text 1 has 1 token(s) and predicts nothing; dropped" in caplog.text


def test_prepare_with_nothing_left_to_predict_is_an_error():
    with pytest.raises(TextsError, match="all 2 chosen texts are shorter than 2 tokens"):
        sources.prepare_texts(["a", "b"], n_texts=2, max_length=8, seed=0, tokenize=lambda t: [1])


