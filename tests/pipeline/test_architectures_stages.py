"""Architectures through the stages, from model folders on disk: Gemma-2 and gpt-oss load
(they refuse SDPA), and validate perturbs expert weights by (expert, row, col) like any other."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
import torch

from architectures import build, one_thread  # noqa: F401 (autouse fixture)
from _tiny import build_tokenizer, run_prepare_and_sensitivity, save_model_dir, tiny_params
from critical_weights.config.params import Params
from critical_weights.core.progress import Timings
from critical_weights.model import layout, loading
from critical_weights.model.source import resolve_source
from critical_weights.ranking.stage import run_rank
from critical_weights.ranking.topk import rank_metric
from critical_weights.validation.selection import plan
from critical_weights.validation.stage import Outputs, run_validate


def save(folder: Path, arch: str) -> Path:
    return save_model_dir(folder, build(arch, vocab=len(build_tokenizer())))


@pytest.mark.parametrize("arch, attention", [("gemma2", "eager"), ("gpt_oss", "eager"), ("gpt2", "sdpa")])
def test_models_that_refuse_sdpa_load_with_their_default(arch, attention, tmp_path):
    folder = save(tmp_path / arch, arch)
    model = loading.load_model(resolve_source(str(folder)), tiny_params(folder).model,
                              torch.device("cpu"), torch.float32)
    assert loading.implementations(model)["attention"] == attention
    saved = build(arch, vocab=len(build_tokenizer()))
    for (name, p), (_, q) in zip(model.named_parameters(), saved.named_parameters()):
        assert torch.equal(p, q), name


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory) -> tuple[Path, Path, Params, Path]:
    """gpt-oss (experts stored (E, in, out)) ranked on its expert tensors only."""
    folder = save(tmp_path_factory.mktemp("gpt-oss"), "gpt_oss")
    params = tiny_params(folder, rank={"include": ("*experts.down_proj", "*experts.gate_up_proj"), "k": 5},
                         validate={"k_values": (1, 5), "n_texts": 0, "perturbations": ("zero",)})
    prepared, sens = run_prepare_and_sensitivity(tmp_path_factory.mktemp("run"), params)
    return prepared, sens, params, folder


def test_the_critical_experts_weights_sit_at_their_expert_row_col(moe_run):
    """Each ranked expert weight's (expert, row, col) gives back its flat index, and the model
    holds the recorded weight there."""
    _, sens, params, folder = moe_run
    ranked = rank_metric(sens, dataclasses.replace(params.rank, mode="global", k=5))
    model = loading.load_model(resolve_source(str(folder)), params.model, torch.device("cpu"), torch.float32)
    places = layout.describe(model)
    weights = dict(model.named_parameters())
    assert pc.count(ranked["expert"]).as_py() == 5  # every critical weight is an expert's
    for r in ranked.to_pylist():
        t = places[r["parameter"]]
        assert t.kind == "experts_in_out"
        assert t.flat_index(r["expert"], r["row"], r["col"]) == r["flat_index"]
        assert weights[r["parameter"]].detach().view(-1)[r["flat_index"]].item() == np.float32(r["weight"])
        e, i, o = r["expert"], r["col"], r["row"]  # stored (E, in, out)
        assert weights[r["parameter"]][e, i, o].item() == np.float32(r["weight"])


def test_validate_zeroes_expert_weights_by_expert_row_col(moe_run, tmp_path):
    prepared, sens, params, _ = moe_run
    the_plan = plan(sens, params.rank, params.validate, params.seed)
    assert all(".experts." in n for n in the_plan.touched)
    run_rank(sens, params.rank, tmp_path / "ranked")
    params = dataclasses.replace(params, validate=dataclasses.replace(params.validate, single_weights=2, random_draws=2))
    out = Outputs(tmp_path / "v.json", tmp_path / "r.json", tmp_path / "d.png", tmp_path / "d.csv", tmp_path / "p.png")
    report = run_validate(prepared, sens, tmp_path / "ranked", Path(params.texts.source), params, out, Timings("validate"))
    primary = report["texts"]["primary"]
    for k in (1, 5):
        entry = report["damage"]["zero"][f"k{k}"]
        assert entry["critical"]["n_changed"] == k
        assert entry["critical"][primary]["loss_increase"] != 0.0
