"""The damage measurement: ratios only above noise, z from the spread, unchanged selections not
re-measured, and every loss equal to one measured independently."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _tiny import build_tiny_model
from critical_weights.config.params import ValidateParams
from critical_weights.validation.damage import Context, TextSets, measure_group, perturb_and_measure, vs_bottom, vs_random
from critical_weights.validation.evaluation import mean_loss
from critical_weights.validation.perturbation import digest
from critical_weights.validation.selection import SetGroup


def test_ratio_needs_a_random_increase_above_the_floor_and_its_standard_error():
    floor = 1e-4
    out = vs_random(2.0, [1e-6, 2e-6, -1e-6], floor)
    assert out["ratio"] is None and out["reason"].startswith("random_k mean increase 6.67e-07 nats is not above the noise floor")
    assert out["z"] == pytest.approx((2.0 - np.mean([1e-6, 2e-6, -1e-6])) / np.std([1e-6, 2e-6, -1e-6], ddof=1))
    noisy = vs_random(2.0, [0.01, -0.008, 0.0005], floor)  # mean 8.3e-4 > floor, but sem 5.2e-3
    assert noisy["ratio"] is None and "within twice its standard error" in noisy["reason"]
    clear = vs_random(2.0, [0.01, 0.012, 0.011], floor)
    assert clear["ratio"] == pytest.approx(2.0 / 0.011) and clear["reason"] is None
    single = vs_random(2.0, [0.01], floor)
    assert single["ratio"] == pytest.approx(200.0) and single["z"] is None, "one draw: no spread, no z"
    assert vs_random(None, [0.01], floor)["reason"] == "a loss is NaN or infinite"


def test_bottom_ratio_is_null_when_nothing_changed_or_within_noise():
    rec = {"heldout": {"loss_increase": 0.0}, "n_changed": 0}
    assert vs_bottom(1.0, rec, "heldout", 1e-4)["reason"].startswith("no bottom_k weight changed")
    rec = {"heldout": {"loss_increase": 5e-5}, "n_changed": 3}
    assert "not above the noise floor" in vs_bottom(1.0, rec, "heldout", 1e-4)["reason"]
    rec = {"heldout": {"loss_increase": 0.5}, "n_changed": 3}
    assert vs_bottom(1.0, rec, "heldout", 1e-4) == {"ratio": 2.0, "reason": None}


@pytest.fixture
def ctx(tiny_ids) -> Context:
    model = build_tiny_model()
    sets = TextSets(in_sample=tiny_ids[:3], heldout=tiny_ids[3:], heldout_missing=None, micro_batch_size=2)
    measured = {w: sets.baseline(model, w) for w in ("in_sample", "heldout")}
    before = {n: digest(p) for n, p in model.named_parameters()}
    return Context(model, before, sets, {w: m[0] for w, m in measured.items()}, {w: m[1] for w, m in measured.items()},
                   ValidateParams(), seed=0)


def test_a_selection_that_changes_no_bit_is_not_measured_again(ctx):
    name = "model.layers.0.mlp.up_proj.weight"
    with torch.no_grad():
        dict(ctx.model.named_parameters())[name].view(-1)[[3, 4]] = 0.0
    ctx = Context(ctx.model, {n: digest(p) for n, p in ctx.model.named_parameters()}, ctx.sets, ctx.baseline, ctx.top1,
                  ctx.vp, 0)
    rec = perturb_and_measure(ctx, {name: np.array([3, 4])}, "zero", (0, 0, 0), ["heldout"])
    assert rec["n_changed"] == 0 and rec["measured"] is False
    assert rec["heldout"]["loss"] == ctx.baseline["heldout"] and rec["heldout"]["loss_increase"] == 0.0
    assert rec["heldout"]["top1_agreement"] == 1.0


def top1_by_hand(model: torch.nn.Module, seqs: list[list[int]]) -> list[int]:
    """The argmax logit at each predicting position of plain unbatched forward passes."""
    with torch.no_grad():
        return [int(t) for s in seqs for t in model(input_ids=torch.tensor([s])).logits[0, :-1].argmax(-1)]


def test_top1_agreement_is_the_share_of_positions_whose_prediction_stays(ctx):
    name = "model.layers.1.mlp.down_proj.weight"
    idx = np.arange(0, 512, 3, dtype=np.int64)  # a third of the tensor: some predictions move
    rec = perturb_and_measure(ctx, {name: idx}, "zero", (0, 0, 0), ["heldout"])
    one = TextSets(in_sample=[], heldout=ctx.sets.heldout, heldout_missing=None, micro_batch_size=1)
    base, zeroed = top1_by_hand(build_tiny_model(), one.heldout), top1_by_hand(model_zeroed(name, idx), one.heldout)
    # the same positions, in another order (one text per pass): compare as multisets of (position, token) pairs
    _, top1 = one.measure(model_zeroed(name, idx), "heldout")
    assert sorted(top1.tolist()) == sorted(zeroed)
    want = np.mean([a == b for a, b in zip(base, zeroed)])
    assert 0 < want < 1 and rec["heldout"]["top1_agreement"] == pytest.approx(want)


def test_measure_group_losses_equal_an_independent_measurement(ctx):
    name = "model.layers.1.mlp.down_proj.weight"
    crit, r1, r2 = (np.array(i, np.int64) for i in ([0, 9], [3, 30], [5, 50]))
    entry = measure_group(ctx, SetGroup({name: crit}, [{name: r1}, {name: r2}], None), "zero", 0)
    increases = []
    for idx in (crit, r1, r2):
        model = build_tiny_model()
        with torch.no_grad():
            dict(model.named_parameters())[name].view(-1)[torch.from_numpy(idx)] = 0.0
        increases.append(mean_loss(model, ctx.sets.heldout, 1) - ctx.baseline["heldout"])
    torch.testing.assert_close(entry["critical"]["heldout"]["loss_increase"], increases[0], rtol=1e-5, atol=1e-6)
    want_in = mean_loss(model_zeroed(name, crit), ctx.sets.in_sample, 1) - ctx.baseline["in_sample"]
    torch.testing.assert_close(entry["critical"]["in_sample"]["loss_increase"], want_in, rtol=1e-5, atol=1e-6)
    draws = [d["heldout"]["loss_increase"] for d in entry["random_k"]["draws"]]
    torch.testing.assert_close(draws, increases[1:], rtol=1e-5, atol=1e-6)
    assert entry["random_k"]["mean_increase"] == pytest.approx(np.mean(draws))
    assert entry["random_k"]["std_increase"] == pytest.approx(np.std(draws, ddof=1))
    assert entry["n_weights"] == 2 and entry["n_tensors"] == 1 and "bottom_k" not in entry


def model_zeroed(name: str, idx: np.ndarray) -> torch.nn.Module:
    model = build_tiny_model()
    with torch.no_grad():
        dict(model.named_parameters())[name].view(-1)[torch.from_numpy(idx)] = 0.0
    return model
