"""critical_weights.reports.experts: per MoE layer and expert, its share of the scores and of the
critical set and its router's picks, on real MoE architectures; a dense model gives a header-only
table."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import architectures
from _tiny import tiny_params
from architectures import MOE, VOCAB, build, one_thread  # noqa: F401 (autouse fixture)
from critical_weights.artifacts import shards
from critical_weights.core.progress import Timings
from critical_weights.config.params import RankParams
from critical_weights.model import layout
from critical_weights.ranking.stage import run_rank
from critical_weights.reports import experts, plots
from critical_weights.sensitivity.stage import compute_shards

EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def ids() -> list[list[int]]:
    rng = np.random.default_rng(11)
    return [rng.integers(0, VOCAB, size=n).tolist() for n in (5, 12, 9, 16)]


@pytest.mark.parametrize("arch", ["olmoe", "gpt_oss", "llama"])
def test_expert_importance_report_and_heatmap(arch, ids, tmp_path):
    """Per MoE layer and expert: sum and max of its scores over the layer's expert tensors
    (from the dense scores), its count in the critical set, and its router picks; the heatmap
    is drawn for MoE models only, the CSV always (header only for a dense model)."""
    model = build(arch)
    params = tiny_params("unused", sensitivity={"metrics": ("grad_x_weight",), "dense": True, "keep": 40})
    compute_shards(model, architectures.tokenizer(), ids, params, tmp_path / "s", Timings("t"), {})
    # MoE: rank the expert tensors only, so that the critical set is all experts' weights
    run_rank(tmp_path / "s", RankParams(mode="global", k=30, include=("*experts*",) if arch in MOE else ()),
             tmp_path / "r")
    meta, stats = shards.read_meta(tmp_path / "s"), shards.read_stats(tmp_path / "s")
    ranked = pq.read_table(tmp_path / "r" / "critical.parquet")
    layers = experts.expert_importance(meta, stats, ranked, "grad_x_weight")
    plots.write_experts(tmp_path / "experts", layers, "grad_x_weight", dpi=30)
    lines = (tmp_path / "experts" / "expert_importance.csv").read_text().splitlines()
    assert lines[0] == ",".join(experts.CSV_HEADER)
    if arch not in MOE:
        assert layers == [] and len(lines) == 1 and not (tmp_path / "experts" / "expert_heatmap.png").exists()
        return
    assert (tmp_path / "experts" / "expert_heatmap.png").read_bytes()[:4] == b"\x89PNG"
    assert len(lines) == 1 + 2 * 4
    places = layout.describe(model)
    index = dict(zip(stats["parameter"].to_pylist(), stats["param_index"].to_pylist()))
    for layer in layers:
        assert set(layer["tensors"]) == {n for n, t in places.items()
                                          if n.startswith(layer["experts"] + ".") and t.n_experts and n in index}
        per = {e["expert"]: e for e in layer["per_expert"]}
        for e in range(4):
            scores = []
            for name in layer["tensors"]:
                dense = shards.read_dense(tmp_path / "s", index[name], name)["score"].to_numpy().astype(np.float64)
                expert, _, _ = places[name].coordinates(np.arange(dense.size))
                scores.append(dense[expert == e])
            scores = np.concatenate(scores)
            assert per[e]["sum"] == pytest.approx(scores.sum(), rel=scores.size * EPS32)
            assert per[e]["max"] == scores.max()
            want = sum(1 for r in ranked.to_pylist() if r["parameter"] in layer["tensors"] and r["expert"] == e)
            assert per[e]["critical"] == want and per[e]["critical_share"] == want / 30
        in_layer = sum(1 for r in ranked.to_pylist() if r["parameter"] in layer["tensors"])
        assert [e["critical_share_in_layer"] for e in layer["per_expert"]] == \
            [(e["critical"] / in_layer if in_layer else 0.0) for e in layer["per_expert"]]
    assert sum(e["critical"] for layer in layers for e in layer["per_expert"]) == 30
    for layer in layers:
        assert sum(e["router_picks"] for e in layer["per_expert"]) == 2 * layer["tokens"]
        assert sum(e["router_share"] for e in layer["per_expert"]) == pytest.approx(2.0)
