"""The domain_sensitivity stage (critical_weights.domains.gradients): each group scored by the
sensitivity stage's own code, and the whole's gradient, the token-weighted sum of the group
gradients, equal to one pass over every group's texts."""

from __future__ import annotations

import json
from dataclasses import replace

import torch

from _tiny import float32_tolerance, tiny_params
from critical_weights.artifacts import shards
from critical_weights.core.progress import Timings
from critical_weights.domains import gradients, groups
from critical_weights.domains.groups import WHOLE
from critical_weights.sensitivity.accumulate import accumulate, scored_parameters


def test_group_gradients_weighted_by_tokens_sum_to_the_whole_corpus_gradient(tiny_model):
    """L = sum_g n_g L_g / N, so dL/dW is the token-weighted sum of the groups' gradients; and
    the per-column sums of x² add."""
    rng = torch.Generator().manual_seed(3)
    ids = [torch.randint(0, 90, (n,), generator=rng).tolist() for n in (7, 12, 5, 16, 9, 11, 4)]
    parts = [ids[:3], ids[3:5], ids[5:]]
    params = scored_parameters(tiny_model, "weights")
    whole = gradients.Whole(sum(len(s) - 1 for s in ids))
    for part in parts:
        acc, _ = accumulate(tiny_model, part, params, ("grad_x_weight", "wanda"), 2)
        whole.add(acc)
    once, _ = accumulate(tiny_model, ids, params, ("grad_x_weight", "wanda"), 2)
    tol = float32_tolerance(tiny_model, sum(map(len, ids)))
    assert whole.acc.n_tokens == once.n_tokens and whole.acc.n_sequences == once.n_sequences
    assert abs(whole.acc.loss_sum - once.loss_sum) <= tol * abs(once.loss_sum)  # float32 sums per micro-batch
    for name, g in once.grad.items():
        assert torch.allclose(whole.acc.grad[name], g, rtol=0, atol=tol * float(g.abs().max())), name
    for name, s in once.act_sq.items():
        assert torch.allclose(whole.acc.act_sq[name], s, rtol=0, atol=tol * float(s.abs().max())), name


def test_the_whole_is_scored_by_the_metrics_one_extra_accumulator_gives():
    assert gradients.whole_metrics(("grad_x_weight", "fisher", "magnitude", "wanda", "taylor2", "hutchinson",
                                    "gradient")) == ("grad_x_weight", "magnitude", "wanda", "gradient")


def test_each_group_and_the_whole_have_shards_like_the_sensitivity_stage(grouped):
    report, _, _, _, folder = grouped
    shown, left_out = groups.read(folder)
    names = [g.name for g in shown]
    assert names == [g["name"] for g in report["groups"]["shown"]] == ["prose", "code", "math"]
    assert list(left_out) == ["poetry"]
    for i, g in enumerate(shown):
        meta = shards.read_meta(folder / gradients.folder_name(i, g.name))
        assert meta["group"] == g.name and meta["metrics"] == ["grad_x_weight", "magnitude", "wanda"]
        assert meta["n_sequences"] == len(g.in_sample) == 3 and len(g.heldout) == 3
    whole = shards.read_meta(folder / WHOLE)
    assert whole["metrics"] == ["grad_x_weight", "magnitude", "wanda"] and whole["n_sequences"] == 9
    assert whole["n_tokens"] == sum(report["groups"]["tokens"][n]["in_sample"] for n in names)


def test_no_field_means_no_grouped_run_and_a_folder_that_says_so(tmp_path, tiny_model_dir):
    params = tiny_params(tiny_model_dir)
    params = replace(params, domains=replace(params.domains, field="none"))
    gradients.run_domain_sensitivity(tmp_path / "unused", tmp_path / "unused.jsonl", params, tmp_path / "out",
                                     Timings("domain_sensitivity"))
    assert json.loads((tmp_path / "out" / gradients.NOT_RUN).read_text()) == {"run": False,
                                                                             "reason": "domains.field is none"}
