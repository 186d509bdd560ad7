"""The superweights stage: a planted super weight is found at exactly its coordinate; recorded
activations equal hand-written hooks (dense and MoE); coordinates mean (output, input) in every
layout; ranks against the shards are exact or honest bounds; the stage runs on a dense, a
Conv1D and a MoE model; bad input gives one `Error:` line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from _cli import assert_error, invoke, write_params_file
from _planted import BLOCK, ROW, COL, PNG, plant, moe_model, conv1d_model
from _tiny import ROOT, build_tiny_model, build_tokenizer, run_prepare_and_sensitivity, save_model_dir, tiny_params
from critical_weights.config.params import SuperweightsParams
from critical_weights.model.projections import output_projections


# ----------------------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def vocab() -> int:
    return len(build_tokenizer())


def run_stage(folder: Path, model_dir: Path, **superweights) -> tuple[object, Path]:
    """prepare and sensitivity through the library, then the stage script through Click."""
    params = tiny_params(model_dir, sensitivity={"dense": False, "keep": 20},
                         superweights={"top_k": 10, "n_texts": 3, "threshold": 50.0, **superweights})
    prepared, sens = run_prepare_and_sensitivity(folder, params)
    write_params_file(folder / "params.yaml", params)
    out = folder / "reports"
    result = invoke("superweights", "--params", folder / "params.yaml", "--prepared", prepared, "--sensitivity", sens,
                    "--report", out / "superweights.json", "--metrics", out / "headline.json",
                    "--plot", out / "sw.png", "--table", out / "sw.csv")
    return result, out


@pytest.mark.parametrize("detect_on", ["prompt", "prepared"])
def test_stage_on_a_dense_model_with_a_planted_super_weight(tmp_path, vocab, detect_on):
    model_dir = save_model_dir(tmp_path / "model", plant(build_tiny_model(vocab_size=vocab)))
    result, out = run_stage(tmp_path / "run", model_dir, detect_on=detect_on)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "superweights.json").read_text())
    (c,) = report["candidates"]
    assert (c["parameter"], c["block"], c["row"], c["col"], c["weight"]) == (
        "model.layers.0.mlp.down_proj.weight", BLOCK, ROW, COL, 2.0)
    assert c["input_spike"]["token"] is not None and c["input_spike"]["position"] is not None
    assert report["detection"]["n_sequences"] == (1 if detect_on == "prompt" else 3)
    assert set(c["ranks"]) == {"grad_x_weight", "magnitude", "wanda"}
    mag = c["ranks"]["magnitude"]
    assert mag["rank_in_tensor"] == 1 and mag["score"] == 2.0  # the largest |w| of its tensor
    base = report["baseline"]["loss"]
    assert c["zeroed"]["n_changed"] == 1 and c["zeroed"]["loss"] != base
    assert abs(c["restored"]["loss"] - base) < abs(c["zeroed"]["loss"] - base)  # restoring undoes most of it
    controls = report["controls"]
    assert [t["n"] for t in controls["top_n"]] == [1] and controls["random"]["n_weights"] == 1
    assert controls["all_candidates"]["loss"] == c["zeroed"]["loss"]
    assert len(report["massive_activations"]) == 3 and report["massive_activations"][0]["top"][0]["token"]
    headline = json.loads((out / "headline.json").read_text())  # the DVC metrics: flat, from the report
    assert headline == {
        "n_candidates": 1, "search_exhausted": True, "loss_in_sample": base,
        "strongest": f"model.layers.0.mlp.down_proj.weight ({ROW}, {COL})",
        "strongest_zeroed_loss_increase": c["zeroed"]["loss_increase"],
        "strongest_restored_loss_increase": c["restored"]["loss_increase"],
        "strongest_rank_grad_x_weight": c["ranks"]["grad_x_weight"]["rank_global"],
        "all_candidates_zeroed_loss_increase": controls["all_candidates"]["loss_increase"],
        "top1_grad_x_weight_zeroed_loss_increase": controls["top_n"][0]["loss_increase"],
        "random1_zeroed_loss_increase": controls["random"]["loss_increase"],
        "max_massive_activation": max(t["abs"] for layer in report["massive_activations"] for t in layer["top"]),
    }
    assert all(not isinstance(v, (dict, list)) for v in headline.values())
    rows = (out / "sw.csv").read_text().splitlines()
    assert rows[0].startswith("block,mlp_input_max_abs") and len(rows) == 3
    assert (out / "sw.png").read_bytes()[:8] == PNG
    first = (out / "superweights.json").read_bytes()
    again = invoke("superweights", "--params", tmp_path / "run" / "params.yaml", "--prepared", tmp_path / "run" / "prepared",
                   "--sensitivity", tmp_path / "run" / "sensitivity", "--report", out / "superweights.json",
                   "--plot", out / "sw.png", "--table", out / "sw.csv")
    assert again.exit_code == 0 and (out / "superweights.json").read_bytes() == first


@pytest.mark.parametrize("kind", ["gpt2", "mixtral"])
def test_stage_runs_on_conv1d_and_moe_models(tmp_path, vocab, kind):
    model = conv1d_model(vocab) if kind == "gpt2" else moe_model(kind, vocab)
    with torch.no_grad():  # a spike the stage must find: one large output weight, fed by a large input
        proj = output_projections(model)[0][0]
        w = model.get_parameter(proj.parameter)
        w.view(-1)[proj.flat_index(0 if proj.n_experts else None, 2, 3)] = 40.0
    model_dir = save_model_dir(tmp_path / "model", model)
    result, out = run_stage(tmp_path / "run", model_dir, threshold=1.0, max_candidates=2)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "superweights.json").read_text())
    layouts = {r["parameter"] for r in report["projections"]}
    assert layouts == {p.parameter for p in output_projections(model)[0]}
    assert 1 <= report["n_candidates"] <= 2
    for c in report["candidates"]:
        assert c["layout"] == ("conv1d" if kind == "gpt2" else "experts")
        assert (c["expert"] is None) == (kind == "gpt2")
        assert len(c["restored"]) and c["zeroed"]["n_changed"] == 1
        mag = c["ranks"]["magnitude"]  # the shards score this tensor, at the same flat index
        assert mag["scored"]
        if mag["rank_in_tensor"] is not None:
            assert mag["score"] == abs(c["weight"])
    assert (out / "sw.png").read_bytes()[:8] == PNG


def test_prompt_of_one_token_and_bad_threshold_are_one_line_errors(tmp_path, vocab):
    model_dir = save_model_dir(tmp_path / "model", build_tiny_model(vocab_size=vocab))
    result, _ = run_stage(tmp_path / "run", model_dir, prompt="Apple")
    assert_error(result, "superweights.prompt: 'Apple' is 1 token(s) with this model's tokenizer; it needs at least 2")
    raw = yaml.safe_load((tmp_path / "run" / "params.yaml").read_text())
    raw["superweights"]["threshold"] = 0
    raw["superweights"]["top_k"] = 50
    path = write_params_file(tmp_path / "bad.yaml", raw)
    run = tmp_path / "run"
    args = ("--prepared", run / "prepared", "--sensitivity", run / "sensitivity", "--report", tmp_path / "r.json",
            "--plot", tmp_path / "p.png", "--table", tmp_path / "t.csv")
    assert_error(invoke("superweights", "--params", path, *args),
                 "invalid params.yaml: superweights.threshold: 0 must be a positive number (the Super Weight paper uses 50)")
    raw["superweights"]["threshold"] = 50
    assert_error(invoke("superweights", "--params", write_params_file(tmp_path / "k.yaml", raw), *args),
                 "superweights.top_k: 50 exceeds the shards' sensitivity.keep 20; lower superweights.top_k or raise sensitivity.keep")
    assert not (tmp_path / "r.json").exists()


def test_dvc_stage_reads_exactly_the_superweights_keys():
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["superweights"]
    assert {p for p in stage["params"] if p.startswith("superweights.")} == {
        f"superweights.{k}" for k in SuperweightsParams.__dataclass_fields__}
