"""The texts compress and quantize measure on (critical_weights.compression.measure): held-out
texts with in-sample ones beside, and the papers' windowed stream protocol, each set carrying
its protocol; every loss the stage reports equals validate's loss on those texts."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from critical_weights.artifacts import prepared_texts
from critical_weights.artifacts.prepared_texts import TOKENIZER_DIR
from critical_weights.compression.measure import check_context, text_sets
from critical_weights.compression.stage import Outputs, run_compress
from critical_weights.core.errors import ParamsError, TextsError
from critical_weights.core.progress import Timings
from critical_weights.texts import sources
from critical_weights.validation.evaluation import mean_loss


def _with(params, **compress):
    return dataclasses.replace(params, compress=dataclasses.replace(params.compress, **compress))


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory) -> Path:
    """A WikiText-like parquet: a `text` column whose rows include empty ones."""
    words = " ".join(f"w{i % 17}" for i in range(40))
    rows = ["", " = Title = \n", "", f" {words} \n", f" {words} {words} \n", ""] * 4
    path = tmp_path_factory.mktemp("stream") / "test.parquet"
    pq.write_table(pa.table({"text": rows}), path)
    return path


def test_held_out_first_then_the_in_sample_texts_beside(scored):
    params, _, prepared, _, ids = scored
    sets = text_sets(prepared, Path(params.texts.source), _with(params, in_sample_texts=3))
    assert [t.name for t in sets] == ["heldout", "in_sample"]
    assert sets[0].ids == ids and sets[0].protocol["windows"] is False
    input_ids, _ = prepared_texts.read_prepared(prepared)
    assert sets[1].ids == sources.in_sample(input_ids, 3, params.seed, "compress.in_sample_texts")
    assert sets[1].protocol["n_texts"] == 3 and sets[1].protocol["texts"] == "in_sample"
    assert [t.name for t in text_sets(prepared, Path(params.texts.source), _with(params, in_sample_texts=0))] == ["heldout"]


def test_the_stream_is_the_rows_joined_as_the_papers_join_them_in_windows(scored, rows_file):
    params, _, prepared, _, _ = scored
    windows, counts = sources.stream_windows(rows_file, prepared, 16, 0)
    rows = pq.read_table(rows_file).column("text").to_pylist()
    tokenizer = AutoTokenizer.from_pretrained(prepared / TOKENIZER_DIR)
    stream = tokenizer("\n\n".join(rows))["input_ids"]
    assert counts == {"n_stream_tokens": len(stream), "n_windows_full": len(stream) // 16,
                      "n_left_out": len(stream) % 16,
                      "text_sha256": hashlib.sha256("\n\n".join(rows).encode("utf-8")).hexdigest()}
    assert windows == [stream[i:i + 16] for i in range(0, len(stream) // 16 * 16, 16)]
    assert sources.stream_windows(rows_file, prepared, 16, 2)[0] == windows[:2]


def test_a_stream_shorter_than_one_window_is_one_line(scored, rows_file):
    params, _, prepared, _, _ = scored
    with pytest.raises(TextsError, match=r"compress.stream: .*test.parquet is \d+ tokens, less than one window of "
                                         r"compress.context 100000; lower compress.context to at most \d+"):
        sources.stream_windows(rows_file, prepared, 100000, 0)
    with pytest.raises(TextsError, match=r"compress.stream: .*missing.parquet does not exist"):
        sources.stream_windows(rows_file.with_name("missing.parquet"), prepared, 16, 0)


def test_a_window_past_the_models_positions_is_one_line(scored, rows_file, tiny_model):
    params, _, prepared, _, _ = scored
    sets = text_sets(prepared, Path(params.texts.source), _with(params, stream=str(rows_file), context=80))
    assert sets[0].name == "stream" and sets[0].protocol["stride"] == 80
    with pytest.raises(ParamsError, match="compress.context: 80 tokens per window exceeds the model's "
                                          "max_position_embeddings 64; use at most 64"):
        check_context(tiny_model, sets)


def test_compress_on_the_stream_reports_its_protocol_and_validates_loss(scored, rows_file, tmp_path):
    params, _, prepared, sens, _ = scored
    params = _with(params, stream=str(rows_file), context=16, max_windows=3, in_sample_texts=2,
                   sparsities=(0.5,), structures=("unstructured",), groups=("per_row",), mask_sparsity=0.0,
                   imatrix=False)
    out = Outputs(*(tmp_path / n for n in ("c.json", "r.json", "c.csv", "c.png")), tmp_path / "exports")
    report = run_compress(prepared, sens, Path(params.texts.source), params, out, Timings("compress"))
    p = report["protocol"]
    assert (p["texts"], p["windows"], p["context"], p["stride"], p["n_windows"], p["n_tokens"]) == \
        ("stream", True, 16, 16, 3, 3 * 15)
    assert [b["texts"] for b in p["beside"]] == ["in_sample"] and p["beside"][0]["n_texts"] == 2
    assert set(out.metrics.read_text().split('"')) >= {"loss_stream", "loss_in_sample"}
    windows, _ = sources.stream_windows(rows_file, prepared, 16, 3)
    model = AutoModelForCausalLM.from_pretrained(params.model.name).eval()
    assert mean_loss(model, windows, params.sensitivity.micro_batch_size, params.sensitivity.batch_tokens) == \
        report["baseline"]["loss"]
