"""The compress stage on the tiny model: a row per set and mask with exact counts, each loss
equal to one measured independently, and masks that the README recipe applies to a freshly
loaded model to give the reported loss."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from _tiny import ROOT
from critical_weights.artifacts import shards
from critical_weights.compression.stage import configurations, sets_of, targets
from critical_weights.core.errors import ParamsError
from critical_weights.validation.evaluation import mean_loss


def test_every_set_gets_every_mask_with_exact_counts(compressed, tiny_model_dir):
    report, _, params, _ = compressed
    assert report["sets"] == ["grad_x_weight", "magnitude", "wanda", "random"]
    configs = configurations(params)
    assert configs == [("unstructured", "per_row", 0.25), ("unstructured", "per_row", 0.5),
                       ("unstructured", "per_tensor", 0.25), ("unstructured", "per_tensor", 0.5),
                       ("2:4", "per_row", 0.5), ("4:8", "per_row", 0.5)]
    assert [(r["metric"], r["structure"], r["group"], r["sparsity"]) for r in report["table"]] == \
        [(m, *c) for m in report["sets"] for c in configs]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    shapes = {n: p.shape for n, p in model.named_parameters() if n in report["pruned"]["tensors"]}
    assert set(shapes) == {n for n, p in model.named_parameters() if ".layers." in n and p.ndim >= 2}
    n_weights = sum(math.prod(s) for s in shapes.values())
    assert report["pruned"]["n_weights"] == n_weights
    for r in report["table"]:
        if r["group"] == "per_row" or r["structure"] != "unstructured":  # every linear here is (out, in)
            want = sum(s[0] * math.floor(s[1] * r["sparsity"]) for s in shapes.values())
        else:
            want = sum(math.floor(math.prod(s) * r["sparsity"]) for s in shapes.values())
        assert r["n_pruned"] == want, r
        assert r["sparsity_reached"] == r["n_zero"] / n_weights >= want / n_weights
    assert report["exported_masks"]["metric"] == "grad_x_weight" and report["exported_masks"]["sparsity"] == 0.5


def test_a_reported_loss_equals_pruning_by_hand_and_measuring_again(compressed, tiny_model_dir):
    report, _, params, ids = compressed
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in report["pruned"]["tensors"]:
                w = p.detach().abs().numpy()  # magnitude, per tensor: floor(numel / 2) lowest, ties by position
                order = np.argsort(w.reshape(-1), kind="stable")[: math.floor(w.size * 0.5)]
                p.view(-1)[torch.from_numpy(order)] = 0.0
    (row,) = [r for r in report["table"] if (r["metric"], r["group"], r["structure"], r["sparsity"])
              == ("magnitude", "per_tensor", "unstructured", 0.5)]
    assert mean_loss(model, ids, params.sensitivity.micro_batch_size, params.sensitivity.batch_tokens) == row["loss"]


def _readme_recipe() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("### Apply the masks in your own code", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_recipe_applies_the_masks_and_gives_the_reported_loss(compressed, tiny_model_dir):
    report, out, params, ids = compressed
    recipe = _readme_recipe()
    assert '"reports/exports/masks.safetensors"' in recipe
    recipe = recipe.replace('"reports/exports/masks.safetensors"', repr(str(out.exports / "masks.safetensors")))
    scope = {"MODEL": str(tiny_model_dir)}
    exec(compile(recipe, "README recipe", "exec"), scope)
    model = scope["model"]
    loss = mean_loss(model, ids, params.sensitivity.micro_batch_size, params.sensitivity.batch_tokens)
    assert loss == pytest.approx(report["exported_masks"]["loss"], rel=1e-6, abs=0)
    with safe_open(str(out.exports / "masks.safetensors"), framework="numpy") as f:
        meta = f.metadata()
        assert set(f.keys()) == set(report["pruned"]["tensors"])
        one = f.get_tensor("model.layers.0.mlp.down_proj.weight")
    assert {k: meta[k] for k in ("metric", "structure", "group", "sparsity")} == \
        {"metric": "grad_x_weight", "structure": "unstructured", "group": "per_row", "sparsity": "0.5"}
    assert one.dtype == np.uint8 and one.shape == (16, math.ceil(32 / 8))
    kept = np.unpackbits(one, axis=-1, count=32, bitorder="little")
    assert (kept.sum(axis=1) == 16).all(), "half of every row kept"


def test_the_sets_are_the_computed_metrics_then_the_controls():
    assert sets_of(["fisher", "magnitude"]) == ["fisher", "magnitude", "random"]
    assert sets_of(["grad_x_weight"]) == ["grad_x_weight", "magnitude", "random"]


def test_an_include_that_matches_nothing_names_an_example(compressed):
    _, out, _, _ = compressed
    stats = shards.read_stats(out.exports.parent / "sensitivity")
    with pytest.raises(ParamsError, match=r"compress.include: \['nothing\*'\] matches no weight tensor of ndim >= 2 "
                                          r"\(parameter names look like model\."):
        targets(stats, ("nothing*",))
    assert [t.name for t in targets(stats, ("*.layers.1.mlp.*",))] == [
        "model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight"]
