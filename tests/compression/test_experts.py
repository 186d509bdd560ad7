"""Dropping whole experts (critical_weights.compression.experts): the choices by importance and
at random, the drop zeroing exactly the chosen experts and nothing else, and the compress stage
measuring each drop on tiny MoE models, with the loss a hand-made drop gives."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from _tiny import build_tokenizer, run_prepare_and_sensitivity, save_model_dir, tiny_params
from architectures import build, one_thread  # noqa: F401 (autouse fixture)
from critical_weights.compression import experts
from critical_weights.compression.measure import text_sets
from critical_weights.compression.stage import Outputs, run_compress
from critical_weights.config.params import parse_params
from critical_weights.core.errors import ParamsError
from critical_weights.core.progress import Timings
from critical_weights.validation.evaluation import mean_loss


def _layer(values, block=0) -> experts.Layer:
    return experts.Layer(block, f"model.layers.{block}.mlp.experts", np.asarray(values, dtype=np.float64))


def test_least_and_most_follow_the_importance_ties_by_index():
    layer = _layer([3.0, 1.0, 1.0, 5.0, 0.5])
    assert experts.chosen(layer, "least", 2) == [1, 4]
    assert experts.chosen(layer, "least", 3) == [1, 2, 4]
    assert experts.chosen(layer, "most", 2) == [0, 3]


def test_random_draws_are_distinct_seeded_and_differ_between_draws():
    layer = _layer(np.arange(16.0))
    first = [experts.chosen(layer, "random", 3, seed=42, draw=d) for d in range(3)]
    assert first == [experts.chosen(layer, "random", 3, seed=42, draw=d) for d in range(3)]
    assert all(len(set(c)) == 3 for c in first) and len({tuple(c) for c in first}) > 1
    assert experts.chosen(layer, "random", 3, seed=43) != first[0] or experts.chosen(layer, "random", 3, seed=44) != first[0]


def test_the_plan_holds_least_most_and_every_random_draw_per_count():
    drops = experts.plan([_layer([1.0, 2.0, 3.0, 4.0]), _layer([4.0, 3.0, 2.0, 1.0], block=1)], (1, 2), 3, 7)
    assert [(d["n"], d["choice"], d["draw"]) for d in drops] == [
        (n, c, d) for n in (1, 2) for c, draws in (("least", 1), ("most", 1), ("random", 3)) for d in range(draws)]
    assert drops[0]["dropped"] == {"model.layers.0.mlp.experts": [0], "model.layers.1.mlp.experts": [3]}
    assert experts.plan([], (1, 2), 3, 7) == [], "a dense model: nothing to drop, nothing measured"


def test_a_count_that_drops_every_expert_is_one_line():
    with pytest.raises(ParamsError, match=r"compress.drop_experts: 4 would drop every expert of model.layers.0.mlp.experts "
                                          r"\(4 experts\); each count must be below 4"):
        experts.check_counts([_layer([1.0, 2.0, 3.0, 4.0])], (1, 4))
    experts.check_counts([], (9,))  # a dense model: nothing to drop, no error


def test_drop_experts_accepts_an_empty_list_and_refuses_zero():
    assert parse_params({"compress": {"drop_experts": []}}).compress.drop_experts == ()
    with pytest.raises(ParamsError, match=r"compress.drop_experts: \[0\] must be a list \(\[\] = none\) of integers >= 1"):
        parse_params({"compress": {"drop_experts": [0]}})


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])  # experts (E, out, in); (E, in, out) with biases
def test_the_dropper_zeroes_exactly_the_chosen_experts_and_restores(arch):
    model = build(arch)
    path = "model.layers.1.mlp.experts"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    dropper = experts.Dropper(model, [_layer([1.0, 2.0, 3.0, 4.0], block=1)])
    dropper.drop({path: [0, 2]})
    for name, p in model.named_parameters():
        if name.startswith(path + "."):
            assert p.shape[0] == 4
            assert not p[[0, 2]].any() and torch.equal(p[[1, 3]], before[name][[1, 3]]), name
        else:
            assert torch.equal(p, before[name]), name
    dropper.restore()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_the_stage_measures_each_drop_and_a_drop_by_hand_gives_its_loss(tmp_path):
    folder = save_model_dir(tmp_path / "mixtral", build("mixtral", vocab=len(build_tokenizer())))
    params = tiny_params(folder, sensitivity={"metrics": ("grad_x_weight",), "dense": False},
                         compress={"sparsities": (0.5,), "structures": ("unstructured",), "n_texts": 3,
                                   "in_sample_texts": 2, "drop_experts": (1, 2), "expert_draws": 2, "imatrix": False})
    prepared, sens = run_prepare_and_sensitivity(tmp_path / "run", params)
    out = Outputs(*(tmp_path / n for n in ("c.json", "r.json", "c.csv", "c.png")), tmp_path / "exports")
    report = run_compress(prepared, sens, Path(params.texts.source), params, out, Timings("compress"))
    section = report["experts"]
    assert section["measured"] and [layer["experts"] for layer in section["layers"]] == \
        ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert [(r["n"], r["choice"], r["draw"]) for r in section["rows"]] == [
        (n, c, d) for n in (1, 2) for c, draws in (("least", 1), ("most", 1), ("random", 2)) for d in range(draws)]
    assert all("in_sample_loss" in r for r in section["rows"])
    for layer in section["layers"]:  # least is the lowest sum of the layer
        least = next(r for r in section["rows"] if (r["n"], r["choice"]) == (1, "least"))["dropped"][layer["experts"]]
        assert least == [int(np.argmin(layer["importance"]))]
    (summary_1, _) = section["summary"]
    drawn = [r["loss_increase"] for r in section["rows"] if (r["n"], r["choice"]) == (1, "random")]
    assert summary_1["random_loss_increase_mean"] == pytest.approx(np.mean(drawn), rel=1e-12)
    assert summary_1["random_loss_increase_std"] == pytest.approx(np.std(drawn, ddof=1), rel=1e-12)
    head = out.metrics.read_text()
    assert '"drop_1_experts_least_loss_increase"' in head and '"loss_in_sample"' in head

    most = next(r for r in section["rows"] if (r["n"], r["choice"]) == (2, "most"))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        for path, chosen in most["dropped"].items():
            for p in model.get_submodule(path).parameters():
                p[chosen] = 0.0
    heldout = text_sets(prepared, Path(params.texts.source), params)[0]
    assert heldout.name == "heldout"
    assert mean_loss(model, heldout.ids, params.sensitivity.micro_batch_size,
                     params.sensitivity.batch_tokens) == most["loss"]


def test_a_dense_model_says_why_no_expert_was_dropped_and_measures_no_drop(compressed):
    report, out, *_ = compressed
    assert report["experts"] == {"measured": False, "reason": "the model has no Mixture-of-Experts layer"}
    assert not any(k.startswith("drop_") for k in json.loads(out.metrics.read_text()))
