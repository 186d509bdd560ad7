"""The quantize stage on the tiny model: a row per width, set and share with exact counts, a
reported loss equal to quantising and keeping by hand, the originals of every kept weight,
whole input channels kept on Conv1D and expert tensors, and one-line errors for bad params."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from _tiny import build_tokenizer, run_prepare_and_sensitivity, save_model_dir, tiny_params
from architectures import build
from critical_weights.artifacts import shards
from critical_weights.artifacts.sums import Sums
from critical_weights.compression.quantization import ACTIVATION, Chooser, Outputs, run_quantize, stored_positions
from critical_weights.compression.rtn import quantized as rtn
from critical_weights.compression.stage import Target, targets
from critical_weights.core.progress import Timings
from critical_weights.config.params import parse_params
from critical_weights.core.errors import ParamsError
from critical_weights.validation.evaluation import mean_loss


def _model(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def test_every_width_gets_rtn_then_every_set_and_share_with_exact_counts(quantized, tiny_model_dir):
    report, _, params, _, _ = quantized
    sets = ["grad_x_weight", "magnitude", "wanda", "random"]
    assert report["sets"] == sets and report["channel_sets"] == [ACTIVATION, *sets]
    n = report["quantized"]["n_weights"]
    shapes = {name: p.shape for name, p in _model(tiny_model_dir).named_parameters() if name in report["quantized"]["tensors"]}
    assert n == sum(math.prod(s) for s in shapes.values())
    per_width = [("none", "rtn", 0.0, 0)] + [("weights", m, s, math.floor(s * n)) for m in sets for s in (0.02, 0.1)] \
        + [("channels", m, 0.25, sum(s[0] * math.floor(s[1] * 0.25) for s in shapes.values())) for m in [ACTIVATION, *sets]]
    assert [(r["bits"], r["protect"], r["metric"], r["share"], r["n_kept"]) for r in report["table"]] == \
        [(b, *row) for b in (2, 4) for row in per_width]
    # 16 and 32 inputs in groups of 12: every tensor has a smaller last group, and the report says so
    assert report["quantized"]["smaller_last_group"]["n_tensors"] == len(shapes)


def test_a_reported_loss_equals_quantising_and_keeping_by_hand(quantized, tiny_model_dir):
    report, _, params, ids, sens = quantized
    sums, model = Sums(sens), _model(tiny_model_dir)
    names = report["quantized"]["tensors"]
    weights = dict(model.named_parameters())
    scores = {name: (weights[name].detach().abs() * torch.from_numpy(np.sqrt(sums.get("act_sq", name)))) for name in names}
    everything = torch.cat([scores[name].reshape(-1) for name in names])
    k = math.floor(0.1 * everything.numel())
    kept = torch.zeros(everything.numel(), dtype=torch.bool)
    kept[torch.sort(-everything, stable=True).indices[:k]] = True  # wanda's global top 10%, ties by position
    start = 0
    with torch.no_grad():
        for name in names:
            p = weights[name]
            here = kept[start:start + p.numel()].reshape(p.shape)
            start += p.numel()
            p.copy_(torch.where(here, p, rtn(p.detach(), 2, 12, False)))
    (row,) = [r for r in report["table"] if (r["bits"], r["metric"], r["share"]) == (2, "wanda", 0.1)]
    assert mean_loss(model, ids, params.sensitivity.micro_batch_size, params.sensitivity.batch_tokens) == row["loss"]


def test_recovered_shares_follow_their_formula_and_rtn_hurts_at_2_bits(quantized):
    report, *_ = quantized
    dense = report["baseline"]["perplexity"]
    for bits in (2, 4):
        rtn_row = next(r for r in report["table"] if r["bits"] == bits and r["protect"] == "none")
        assert rtn_row["recovered"] is None
        for r in report["table"]:
            if r["bits"] == bits and r["protect"] != "none" and str(bits) not in report["unrecovered"]:
                want = (rtn_row["perplexity"] - r["perplexity"]) / (rtn_row["perplexity"] - dense)
                assert r["recovered"] == pytest.approx(want, rel=1e-12)


def test_stored_positions_turn_conv1d_and_experts_back():
    # Conv1D stores (in, out); experts_in_out stores (E, in, out); positions come in (out, in) order
    conv = Target("c", "conv1d", (3, 2))  # (out, in) = (2, 3): position 1 is out 0, in 1 -> stored (1, 0) = 2
    assert stored_positions(conv, torch.tensor([1, 5])).tolist() == [2, 5]
    experts = Target("e", "experts_in_out", (2, 3, 2))  # (E * out, in) = (4, 3); position 4 is expert 0, out 1, in 1
    assert stored_positions(experts, torch.tensor([4])).tolist() == [3]
    linear = Target("l", "linear", (2, 3))
    assert stored_positions(linear, torch.tensor([4])).tolist() == [4]


@pytest.mark.parametrize(("key", "value", "message"), [
    ("bits", [9], "quantize.bits: [9] must be a non-empty list of integers from 2 to 8"),
    ("bits", [1, 3], "quantize.bits: [1, 3] must be a non-empty list of integers from 2 to 8"),
    ("group_size", 0, "quantize.group_size: 0"),
    ("keep", [0.01, 1.0], "quantize.keep: [0.01, 1.0] must be a non-empty list of numbers strictly between 0 and 1"),
    ("channels", 0.6, "quantize.channels: 0.6 must be a number between 0.0 and 0.5"),
])
def test_bad_quantize_params_get_one_line_each(key, value, message):
    with pytest.raises(ParamsError) as caught:
        parse_params({"quantize": {key: value}})
    assert message in str(caught.value) and "\n" not in str(caught.value).strip()


@pytest.mark.parametrize("arch", ["gpt2", "mixtral", "gpt_oss"])  # Conv1D (in, out); experts (E, out, in); (E, in, out)
def test_turned_layouts_keep_whole_input_channels_of_each_expert(arch, tmp_path):
    params = tiny_params(save_model_dir(tmp_path / arch, build(arch, vocab=len(build_tokenizer()))),
                         sensitivity={"metrics": ("grad_x_weight", "wanda"), "dense": False},
                         compress={"n_texts": 2}, quantize={"bits": (3,), "group_size": 8, "keep": (0.05,), "channels": 0.25})
    prepared, sens = run_prepare_and_sensitivity(tmp_path / "run", params)
    out = Outputs(*(tmp_path / n for n in ("q.json", "r.json", "q.csv", "q.png")))
    report = run_quantize(prepared, sens, Path(params.texts.source), params, out, Timings("quantize"))
    assert all(r["finite"] for r in report["table"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / arch, dtype=torch.float32)
    tensors = targets(shards.read_stats(sens), ())
    kinds = {t.kind for t in tensors}
    assert {"gpt2": "conv1d", "mixtral": "experts", "gpt_oss": "experts_in_out"}[arch] in kinds
    weights = {n: p.detach() for n, p in model.named_parameters()}
    kept, n = Chooser(weights, tensors, Sums(sens), params.seed).channels(ACTIVATION, 0.25)
    assert n == next(r["n_kept"] for r in report["table"] if r["protect"] == "channels" and r["metric"] == ACTIVATION)
    for t, at in zip(tensors, kept):
        marked = torch.zeros(math.prod(t.shape), dtype=torch.bool)
        marked[at] = True
        marked = marked.reshape(t.shape)
        in_axis = {"conv1d": 0, "experts_in_out": 1}.get(t.kind, len(t.shape) - 1)
        units = [marked] if len(t.shape) == 2 else list(marked)
        for unit in units:  # each unit's kept weights are whole input channels: every output of floor(in / 4) inputs
            axis = in_axis if len(t.shape) == 2 else in_axis - 1
            columns = unit.all(dim=1 - axis)
            assert int(columns.sum()) == t.shape[in_axis] // 4, t.name
            assert torch.equal(unit, columns.unsqueeze(1 - axis).expand_as(unit)), t.name
