"""The domains stage on the tiny model: each group scored by the sensitivity stage's own code,
the whole's gradient equal to one pass over every group's texts, and every output written."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from _tiny import float32_tolerance, tiny_params
from critical_weights.artifacts import shards
from critical_weights.core.errors import ParamsError
from critical_weights.core.progress import Timings
from critical_weights.domains import stage
from critical_weights.domains.groups import Group
from critical_weights.domains.sets import WHOLE
from critical_weights.sensitivity.accumulate import accumulate, scored_parameters


def test_group_gradients_weighted_by_tokens_sum_to_the_whole_corpus_gradient(tiny_model):
    """L = sum_g n_g L_g / N, so dL/dW is the token-weighted sum of the groups' gradients; and
    the per-column sums of x² add."""
    rng = torch.Generator().manual_seed(3)
    ids = [torch.randint(0, 90, (n,), generator=rng).tolist() for n in (7, 12, 5, 16, 9, 11, 4)]
    parts = [Group("a", 3, ids[:3], []), Group("b", 2, ids[3:5], []), Group("c", 2, ids[5:], [])]
    params = scored_parameters(tiny_model, "weights")
    whole = stage.Whole(("grad", "act_sq"), sum(len(s) - 1 for s in ids), len(ids))
    for g in parts:
        acc, _ = accumulate(tiny_model, g.in_sample, params, ("grad_x_weight", "wanda"), 2)
        whole.add(acc)
    once, _ = accumulate(tiny_model, ids, params, ("grad_x_weight", "wanda"), 2)
    tol = float32_tolerance(tiny_model, sum(map(len, ids)))
    assert whole.acc.n_tokens == once.n_tokens and whole.acc.n_sequences == once.n_sequences
    assert abs(whole.acc.loss_sum - once.loss_sum) <= tol * abs(once.loss_sum)  # float32 sums per micro-batch
    for name, g in once.grad.items():
        assert torch.allclose(whole.acc.grad[name], g, rtol=0, atol=tol * float(g.abs().max())), name
    for name, s in once.act_sq.items():
        assert torch.allclose(whole.acc.act_sq[name], s, rtol=0, atol=tol * float(s.abs().max())), name


def test_each_group_and_the_whole_have_shards_like_the_sensitivity_stage(grouped):
    report, out, params, _ = grouped
    names = [g["name"] for g in report["groups"]["shown"]]
    assert names == ["prose", "code", "math"] and list(report["groups"]["left_out"]) == ["poetry"]
    for i, name in enumerate(names):
        folder = out.shards / stage.folder_name(i, name)
        meta = shards.read_meta(folder)
        assert meta["group"] == name and meta["metrics"] == ["grad_x_weight", "magnitude", "wanda"]
        assert meta["n_sequences"] == 3
    whole = shards.read_meta(out.shards / WHOLE)
    assert whole["metrics"] == ["grad_x_weight"] and whole["n_sequences"] == 9
    assert whole["n_tokens"] == sum(report["groups"]["tokens"][n]["in_sample"] for n in names)


def test_every_output_is_written_and_the_headline_matches_the_report(grouped):
    report, out, _, _ = grouped
    head = json.loads(out.metrics.read_text())
    assert head["n_groups"] == 3
    assert head["mean_pairwise_jaccard"] == report["overlap"]["mean_pairwise_jaccard_top"]
    assert head["damage_diagonal_dominance_heldout"] == report["damage"]["heldout"]["dominance"]["row"]["mean"]
    for path in (out.critical, out.overlap_table, out.damage_table):
        assert path.read_text().count("\n") > 1
    for path in (out.overlap_plot, out.damage_plot, out.specific_plot):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_field_means_no_grouped_run_and_outputs_that_say_so(tmp_path, tiny_model_dir):
    params = tiny_params(tiny_model_dir)
    params = replace(params, domains=replace(params.domains, field="none"))
    out = stage.Outputs(*(tmp_path / n for n in ("shards", "m.json", "r.json", "c.csv", "o.csv", "d.csv", "o.png",
                                                  "d.png", "s.png")))
    made = stage.run_domains(tmp_path / "unused", params, out, Timings("domains"))
    assert made == {"run": False, "reason": "domains.field is none"}
    assert json.loads(out.metrics.read_text()) == {"n_groups": 0}
    assert out.damage_plot.exists() and out.critical.read_text().startswith("group,")
    assert json.loads((out.shards / "not_run.json").read_text()) == made


def test_a_top_n_above_keep_is_one_line_before_any_work(tmp_path, tiny_model_dir):
    params = tiny_params(tiny_model_dir)  # keep 40
    params = replace(params, domains=replace(params.domains, top_n=41))
    out = stage.Outputs(*(tmp_path / n for n in ("shards", "m.json", "r.json", "c.csv", "o.csv", "d.csv", "o.png",
                                                  "d.png", "s.png")))
    with pytest.raises(ParamsError, match=r"domains.top_n: 41 exceeds sensitivity.keep 40; each group's sets are exact "
                                          r"only up to keep \(raise sensitivity.keep or lower domains.top_n\)"):
        stage.run_domains(tmp_path / "unused", params, out, Timings("domains"))
    assert not out.shards.exists() and not out.metrics.exists()
