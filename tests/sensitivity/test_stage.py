"""The sensitivity stage's library entry point: shards that agree with autograd done by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from _tiny import float32_tolerance, run_prepare_and_sensitivity, tiny_params
from critical_weights.artifacts import prepared_texts, shards
from critical_weights.core.progress import Timings
from critical_weights.sensitivity.stage import run_sensitivity
from critical_weights.texts import sources


def load_dir_model(model_dir: Path) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def reference(model: torch.nn.Module, ids: list[list[int]]) -> tuple[float, dict[str, torch.Tensor]]:
    """Mean token loss and its gradient for every 2-D parameter, one unpadded sequence at a time."""
    params = [(n, p) for n, p in model.named_parameters() if p.ndim == 2]
    for _, p in params:
        p.requires_grad_(True)
    total = torch.zeros(())
    for seq in ids:
        x = torch.tensor([seq])
        logits = model(input_ids=x).logits[0]
        total = total + F.cross_entropy(logits[:-1], x[0, 1:], reduction="sum")
    loss = total / sum(len(s) - 1 for s in ids)
    grads = torch.autograd.grad(loss, [p for _, p in params])
    return float(loss.detach()), {n: g for (n, _), g in zip(params, grads)}


def dense_by_metric(sens: Path, param_index: int, name: str) -> dict[str, np.ndarray]:
    table = shards.read_dense(sens, param_index, name).to_pandas()
    return {m: part.sort_values("flat_index")["score"].to_numpy() for m, part in table.groupby("metric", sort=False)}


def test_dense_shards_equal_autograd_by_hand(dense_shards, tiny_model_dir):
    sens, params = dense_shards
    prepared = sens.parent / "prepared"
    ids, _ = prepared_texts.read_prepared(prepared)
    model = load_dir_model(tiny_model_dir).double()  # the reference in float64: its own error is negligible
    loss, grads = reference(model, ids)
    meta = shards.read_meta(sens)
    assert meta["n_tokens"] == sum(len(s) - 1 for s in ids)
    assert meta["n_sequences"] == len(ids) == params.texts.n_texts
    tol = float32_tolerance(model, meta["n_tokens"])
    np.testing.assert_allclose(meta["avg_loss"], loss, rtol=tol)
    stats = shards.read_stats(sens).to_pylist()
    names = list(dict.fromkeys(r["parameter"] for r in stats))
    assert names == list(grads)  # every matrix, in named_parameters() order
    weights = dict(model.named_parameters())
    for r in stats:
        if r["metric"] != "grad_x_weight":
            continue
        w = weights[r["parameter"]].detach().numpy().reshape(-1)
        g = grads[r["parameter"]].numpy().reshape(-1)
        dense = dense_by_metric(sens, r["param_index"], r["parameter"])
        expected = np.abs(w * g)  # float64
        np.testing.assert_allclose(dense["grad_x_weight"], expected, rtol=tol, atol=tol * expected.max(),
                                   err_msg=r["parameter"])
        np.testing.assert_array_equal(dense["magnitude"], np.abs(w).astype(np.float32))


def test_candidates_are_the_top_of_the_dense_scores(dense_shards):
    sens, params = dense_shards
    keep = params.sensitivity.keep
    every = pq.read_table(sens / "candidates.parquet").to_pandas()
    for r in shards.read_stats(sens).to_pylist():
        dense = dense_by_metric(sens, r["param_index"], r["parameter"])[r["metric"]]
        cand = every[(every["parameter"] == r["parameter"]) & (every["metric"] == r["metric"])]
        order = np.lexsort((np.arange(dense.size), -dense.astype(np.float64)))[:keep]
        np.testing.assert_array_equal(cand["flat_index"].to_numpy(), order)
        np.testing.assert_array_equal(cand["score"].to_numpy(), dense[order])
        assert cand["rank"].tolist() == list(range(1, keep + 1))
        assert r["count"] == dense.size == r["n_rows"] * r["n_cols"]
        assert r["max"] == dense.max() and r["min"] == dense.min()


def test_wanda_skips_are_recorded_in_meta(dense_shards):
    sens, _ = dense_shards
    meta = shards.read_meta(sens)
    assert meta["wanda_skipped"] == {
        "model.embed_tokens.weight": "used as an embedding table, not only as a weight multiplying an input"}
    wanda = [r["parameter"] for r in shards.read_stats(sens).to_pylist() if r["metric"] == "wanda"]
    assert "model.embed_tokens.weight" not in wanda and "lm_head.weight" in wanda


def test_every_metric_runs_on_a_tied_model_loaded_with_sdpa(tmp_path, tiny_tied_model_dir):
    """hutchinson needs double backward, which SDPA lacks: the stage must still run it."""
    metrics = ("grad_x_weight", "gradient", "magnitude", "fisher", "taylor2", "hutchinson", "wanda")
    params = tiny_params(tiny_tied_model_dir, texts={"n_texts": 4, "max_length": 12},
                         sensitivity={"metrics": metrics, "hutchinson_probes": 1, "keep": 5, "dense": False})
    _, sens = run_prepare_and_sensitivity(tmp_path, params)
    stats = shards.read_stats(sens).to_pylist()
    names = list(dict.fromkeys(r["parameter"] for r in stats))
    assert names[0] == "model.embed_tokens.weight" and "lm_head.weight" not in names  # tied: counted once
    by_metric: dict[str, list] = {}
    for r in stats:
        by_metric.setdefault(r["metric"], []).append(r)
        assert all(np.isfinite([r["sum"], r["min"], r["max"], r["std"]])), (r["parameter"], r["metric"])
    assert set(by_metric) == set(metrics)
    assert len(by_metric["wanda"]) == len(names) - 1  # the tied embedding is skipped
    assert not (sens / "dense").exists()
    meta = shards.read_meta(sens)
    assert meta["metrics"] == list(metrics) and meta["keep"] == 5


def test_rerun_gives_byte_identical_shards(tmp_path, dense_shards):
    sens, params = dense_shards
    run_sensitivity(sens.parent / "prepared", params, tmp_path / "again", Timings("sensitivity"))
    first = sorted(p.relative_to(sens) for p in sens.rglob("*") if p.is_file())
    second = sorted(p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*") if p.is_file())
    assert first == second
    for rel in first:
        assert (sens / rel).read_bytes() == (tmp_path / "again" / rel).read_bytes(), rel


def test_meta_holds_no_timing_and_is_sorted_json(dense_shards):
    sens, _ = dense_shards
    text = (sens / "meta.json").read_text(encoding="utf-8")
    meta = json.loads(text)
    assert text == json.dumps(meta, indent=2, sort_keys=True) + "\n"
    assert not any("time" in k or "seconds" in k for k in meta)


def test_prepared_ids_beyond_the_vocabulary_raise_model_error(tmp_path, tiny_model_dir, dense_shards):
    from critical_weights.core.errors import ModelError

    sens, params = dense_shards
    prepared = sens.parent / "prepared"
    ids, meta = prepared_texts.read_prepared(prepared)
    big = sources.PreparedTexts(list(range(len(ids))), ["x"] * len(ids), [s[:-1] + [10**6] for s in ids], len(ids))
    prepared_texts.write_prepared(tmp_path / "prepared", big, meta)
    (tmp_path / "prepared" / "tokenizer").symlink_to(prepared / "tokenizer", target_is_directory=True)
    with pytest.raises(ModelError, match=r"the prepared token ids exceed .*'s vocabulary of \d+; rerun prepare$"):
        run_sensitivity(tmp_path / "prepared", params, tmp_path / "out", Timings("sensitivity"))
    assert not (tmp_path / "out").exists()
