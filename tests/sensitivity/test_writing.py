"""The shards folder: whole or not at all, and each metric's candidates carry the weight and the
gradient at their flat index, whether a process holds the whole tensor or some of its rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import architectures
from _tiny import tiny_params
from critical_weights.artifacts import sums
from critical_weights.core.progress import Timings
from critical_weights.sensitivity.accumulate import Accumulators, accumulate, scored_parameters
from critical_weights.sensitivity.writing import Writing, pick, scored_metrics, write_shards


def test_pick_of_some_rows_reads_values_at_their_global_index():
    g = torch.Generator().manual_seed(5)
    w, grad = torch.randn(10, 7, generator=g), torch.randn(10, 7, generator=g)
    whole = pick("grad_x_weight", "w", w, Accumulators(grad={"w": grad}), 6, 0)
    part = pick("grad_x_weight", "w", w[4:], Accumulators(grad={"w": grad[4:]}), 6, 0, rows_of=(4, 10))
    flat_w, flat_g = w.reshape(-1).numpy(), grad.reshape(-1).numpy()
    for p in (whole, part):
        np.testing.assert_array_equal(p.top_weight, flat_w[p.summary.top_index])
        np.testing.assert_array_equal(p.top_grad, flat_g[p.summary.top_index])
        np.testing.assert_array_equal(p.bottom_weight, flat_w[p.summary.bottom_index])
    assert (part.summary.top_index >= 4 * 7).all()  # the rows it holds, by their place in the whole
    assert pick("grad_x_weight", "w", w[:0], Accumulators(grad={"w": grad[:0]}), 6, 0, rows_of=(10, 10)) is None


def test_scored_metrics_leaves_wanda_out_where_it_has_no_input_norms():
    params = tiny_params("unused", sensitivity={"metrics": ("grad_x_weight", "wanda")})
    assert scored_metrics(params, "emb", {"emb": "an embedding"}) == ["grad_x_weight"]
    assert scored_metrics(params, "q", {}) == ["grad_x_weight", "wanda"]


def test_a_failure_midway_leaves_no_folder(tmp_path: Path):
    model = architectures.build("llama")
    ids = [[1, 2, 3, 4, 5], [6, 7, 8]]
    params = tiny_params("unused", sensitivity={"metrics": ("grad_x_weight",), "dense": False})
    plist = scored_parameters(model, "weights")
    acc, skipped = accumulate(model, ids, plist, ["grad_x_weight"], 2)
    out = tmp_path / "shards"
    with pytest.raises(RuntimeError, match="midway"):
        with Writing(model, architectures.tokenizer(), plist, acc, skipped, params, out, Timings("t"), {}) as writing:
            assert writing.folder.exists() and writing.folder != out
            raise RuntimeError("midway")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    acc, skipped = accumulate(model, ids, plist, ["grad_x_weight"], 2)
    write_shards(model, architectures.tokenizer(), plist, acc, skipped, params, out, Timings("t"), {})
    assert sorted(p.name for p in out.iterdir()) == ["bottom.parquet", "candidates.parquet", "meta.json",
                                                     "stats.parquet", "sums"]
    assert sums.path_of(out, "grad").is_file()
