"""The validate stage: held-out texts by default with the in-sample number beside it, several
random draws, ratios only above noise, the exported set, the predictiveness tables, byte-identical
outputs, and bad input as one `Error:` line."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
from functools import cache
from pathlib import Path
from types import ModuleType

import torch
import yaml
from click.testing import CliRunner, Result

from _tiny import ROOT, build_tiny_model
from critical_weights.artifacts import prepared_texts
from critical_weights.config.params import ValidateParams, load_params
from critical_weights.core.progress import Timings
from critical_weights.texts import sources
from critical_weights.validation.stage import Outputs, run_validate, text_sets

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def outputs(folder: Path) -> Outputs:
    return Outputs(folder / "validation.json", folder / "validation_report.json", folder / "damage_curve.png",
                   folder / "damage_curve.csv", folder / "metric_predictiveness.png")


def run_twice(validate_run, tmp_path: Path, **validate) -> tuple[dict, list[dict[str, bytes]]]:
    prepared, sens, ranked, params = validate_run
    params = dataclasses.replace(params, validate=dataclasses.replace(params.validate, **validate))
    files = []
    for run in ("a", "b"):
        report = run_validate(prepared, sens, ranked, Path(params.texts.source), params, outputs(tmp_path / run),
                              Timings("validate"))
        files.append({p.name: p.read_bytes() for p in sorted((tmp_path / run).iterdir())})
    return report, files


def test_run_validate_on_heldout_texts_with_draws_exported_set_and_predictiveness(validate_run, tmp_path):
    report, (a, b) = run_twice(validate_run, tmp_path, perturbations=("zero", "gauss_noise"), k_values=(1, 5),
                               n_texts=4, single_weights=6)
    assert a == b, "two runs gave different files"
    assert json.loads(a["validation_report.json"]) == report
    assert a["damage_curve.png"].startswith(PNG_SIGNATURE) and a["metric_predictiveness.png"].startswith(PNG_SIGNATURE)
    t = report["texts"]
    assert t["primary"] == "heldout" and t["heldout"]["n_texts"] == 4 and t["in_sample"]["n_texts"] == 4
    floor = report["settings"]["noise_floor_nats"]
    torch.testing.assert_close(floor, 1e-5 * t["heldout"]["loss"])
    for kind in ("zero", "gauss_noise"):
        for name in ("k1", "k5", "exported"):
            e = report["damage"][kind][name]
            assert set(e["critical"]) >= {"heldout", "in_sample"}, "in-sample beside held-out"
            assert e["random_k"]["n_draws"] == 3 == len(e["random_k"]["draws"])
            for rec in [e["critical"], e["bottom_k"], *e["random_k"]["draws"]]:
                torch.testing.assert_close(rec["heldout"]["loss_increase"], rec["heldout"]["loss"] - t["heldout"]["loss"])
            ratio = e["vs_random_k"]["ratio"]
            assert (ratio is None) == (e["vs_random_k"]["reason"] is not None)
            if ratio is not None:
                assert e["random_k"]["mean_increase"] > floor
                torch.testing.assert_close(ratio, e["critical"]["heldout"]["loss_increase"] / e["random_k"]["mean_increase"])
    assert report["damage"]["zero"]["exported"]["n_weights"] == 3 * report["damage"]["zero"]["exported"]["n_tensors"]
    pred = report["predictiveness"]
    assert pred["single_weights"]["n_weights"] == 6 and len(pred["single_weights"]["weights"]) == 6
    assert set(pred["top_k"]["metrics"]) == {"grad_x_weight", "magnitude", "fisher"}
    for k in ("k1", "k5"):  # the rank metric's top-k is the critical set: the same number
        assert pred["top_k"]["metrics"]["grad_x_weight"][k]["loss_increase"] == \
            report["damage"]["zero"][k]["critical"]["heldout"]["loss_increase"]
    assert "predicted" in pred["top_k"]["metrics"]["grad_x_weight"]["k1"]
    assert "predicted" not in pred["top_k"]["metrics"]["magnitude"]["k1"]
    metrics = json.loads(a["validation.json"])
    assert metrics["text_set_heldout"] is True and metrics["loss_heldout"] == t["heldout"]["loss"]
    assert metrics["zero_top5_loss_increase"] == report["damage"]["zero"]["k5"]["critical"]["heldout"]["loss_increase"]
    assert metrics["zero_exported_vs_random"] == report["damage"]["zero"]["exported"]["vs_random_k"]["ratio"]
    assert set(k for k in metrics if k.startswith("spearman_")) == {"spearman_grad_x_weight", "spearman_magnitude", "spearman_fisher"}
    assert metrics["zero_exported_vs_random_z"] == report["damage"]["zero"]["exported"]["vs_random_k"]["z"]
    assert metrics["loss_in_sample"] == t["in_sample"]["loss"] and metrics["ln_vocab"] == t["ln_vocab"]
    assert metrics["zero_top5_top1_agreement"] == report["damage"]["zero"]["k5"]["critical"]["heldout"]["top1_agreement"]
    assert len(metrics) == 4 + 2 * 3 * 4 + 3, \
        "text set, 2 losses, ln V; 2 perturbations x (k1, k5, exported) x (increase, agreement, ratio, z); 3 metrics"
    losses = [rec for g in report["damage"]["zero"].values() for rec in (g["critical"]["heldout"], g["critical"]["in_sample"])]
    assert all(rec["saturated"] == (rec["loss"] is None or rec["loss"] > t["ln_vocab"]) for rec in losses)


def test_non_finite_losses_are_null(validate_run, tmp_path):
    report, (a, b) = run_twice(validate_run, tmp_path, perturbations=("bit_flip",), controls=("random_k",),
                               k_values=(5,), bit=30, n_texts=3, exported=False, single_weights=0, random_draws=2)
    assert a == b
    assert report["settings"]["bit_index"] == 30 and "exported" not in report["damage"]["bit_flip"]
    e = report["damage"]["bit_flip"]["k5"]
    for rec in (e["critical"], *e["random_k"]["draws"]):
        assert rec["n_changed"] == 5
        assert rec["heldout"]["finite"] == (rec["heldout"]["loss"] is not None) == (rec["heldout"]["loss_increase"] is not None)


def test_heldout_texts_are_the_ones_prepare_did_not_choose(validate_run):
    prepared, _, _, params = validate_run
    sets = text_sets(prepared, Path(params.texts.source), dataclasses.replace(params, validate=ValidateParams(n_texts=5)))
    chosen, _ = prepared_texts.read_prepared(prepared)
    assert len(sets.heldout) == 5 and all(2 <= len(s) <= params.texts.max_length for s in sets.heldout)
    assert not {tuple(s) for s in sets.heldout} & {tuple(s) for s in chosen}
    assert len(sets.in_sample) == 5 and all(s in chosen for s in sets.in_sample)
    again = text_sets(prepared, Path(params.texts.source), dataclasses.replace(params, validate=ValidateParams(n_texts=5)))
    assert again == sets and sets.primary == "heldout"


def test_no_text_left_to_hold_out_measures_in_sample_and_says_why(tmp_path, caplog):
    source = tmp_path / "three.txt"
    source.write_text("one text\nanother text\na third text\n", encoding="utf-8")
    prepared = tmp_path / "prepared"
    prepared_texts.write_prepared(prepared, sources.PreparedTexts([0, 1, 2], ["a", "b", "c"], [[1, 2]] * 3, 3), {"n_available": "3"})
    from critical_weights.config.params import Params

    sets = text_sets(prepared, source, Params())
    assert sets.heldout == [] and sets.primary == "in_sample"
    assert sets.heldout_missing == f"prepare chose every text of {source}, so none is left to hold out (lower texts.n_texts)"
    assert "no held-out texts" in caplog.text


@cache
def stage() -> ModuleType:
    spec = importlib.util.spec_from_file_location("stage_validate", ROOT / "stages" / "validate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def invoke(*args: object) -> Result:
    return CliRunner().invoke(stage().main, [str(a) for a in args])


def assert_error(result: Result, message: str) -> None:
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    assert result.output.rstrip("\n").splitlines()[-1] == f"Error: {message}"


def stage_args(params_file: Path, prepared: Path, sens: Path, ranked: Path, out: Path) -> list[object]:
    return ["--params", params_file, "--prepared", prepared, "--sensitivity", sens, "--ranked", ranked,
            "--source", ROOT / "data/texts/corpus.jsonl", "--metrics", out / "validation.json",
            "--report", out / "validation_report.json", "--plot", out / "damage_curve.png",
            "--table", out / "damage_curve.csv", "--predictiveness-plot", out / "metric_predictiveness.png"]


def test_stage_help_shows_an_example():
    result = invoke("--help")
    assert result.exit_code == 0 and "Example" in result.output and "stages/validate.py" in result.output


def test_stage_with_missing_shards_is_one_error_line(tmp_path, write_params, validate_run):
    empty = tmp_path / "empty"
    empty.mkdir()
    params_file = write_params({"validate": {"k_values": [1, 5], "exported": False}})
    result = invoke(*stage_args(params_file, empty, empty, validate_run[2], tmp_path / "out"))
    assert_error(result, f"shard {empty / 'meta.json'} is missing; rerun the sensitivity stage (dvc repro)")
    assert not (tmp_path / "out").exists()


def test_stage_with_bad_validate_params_names_them_all(tmp_path, write_params):
    empty = tmp_path / "empty"
    empty.mkdir()
    params_file = write_params({"validate": {"perturbations": ["melt"], "bit": "mantissa", "n_texts": -1, "random_draws": 0}})
    assert_error(invoke(*stage_args(params_file, empty, empty, empty, tmp_path / "out")),
                 "invalid params.yaml: validate.bit: 'mantissa' is not one of sign, exponent_msb, or a bit index 0..31; "
                 "validate.perturbations: 'melt' not one of zero, sign_flip, gauss_noise, bit_flip; "
                 "validate.random_draws: 0 must be an integer >= 1; "
                 "validate.n_texts: -1 must be an integer >= 0")


def test_stage_with_shards_of_another_model_is_one_error_line(validate_run, tmp_path, write_params):
    prepared, sens, ranked, params = validate_run
    other = tmp_path / "other-model"
    build_tiny_model(vocab_size=texts_vocab(prepared), seed=5).save_pretrained(other, safe_serialization=True)
    raw = {"model": {"name": str(other), "device": "cpu", "dtype": "float32"},
           "sensitivity": {"keep": 40, "metrics": ["grad_x_weight", "magnitude", "fisher"]},
           "rank": {"k": 3}, "validate": {"k_values": [1, 5]}, "domains": {"top_n": 10, "per_tensor_k": 10}}
    result = invoke(*stage_args(write_params(raw), prepared, sens, ranked, tmp_path / "out"))
    assert result.exit_code == 1, result.output
    assert result.output.splitlines()[-1].startswith("Error: parameter ")
    assert result.output.splitlines()[-1].endswith(
        "the model's weights differ from those the shards recorded; rerun the sensitivity stage (dvc repro)")


def texts_vocab(prepared: Path) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(prepared / prepared_texts.TOKENIZER_DIR))


def test_project_params_yaml_spells_every_validate_default():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    assert set(raw["validate"]) == {f.name for f in dataclasses.fields(ValidateParams)}
    assert load_params(ROOT / "params.yaml").validate == ValidateParams()


def test_the_planned_evaluations_are_logged_and_each_one_is_counted(validate_run, tmp_path, caplog):
    prepared, sens, ranked, params = validate_run
    params = dataclasses.replace(params, validate=dataclasses.replace(
        params.validate, k_values=(1, 5), single_weights=2, random_draws=2))
    with caplog.at_level(logging.INFO, logger="critical_weights"):
        report = run_validate(prepared, sens, ranked, Path(params.texts.source), params, outputs(tmp_path), Timings("validate"))
    # 2 baselines; 2 sets (k1, k5, exported: 3) x (2 text sets + 2 draws + bottom_k); 2 single weights;
    # 2 other metrics x 2 k (grad_x_weight's top-k is the zero set already measured)
    planned = 2 + 3 * (2 + 2 + 1) + 2 + 2 * 2
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("validate: loss evaluations: ")]
    assert lines[0] == f"validate: loss evaluations: {planned} planned"
    groups = report["damage"]["zero"].values()
    assert all(e["measured"] for g in groups for e in [g["critical"], *g["random_k"]["draws"], g["bottom_k"]]), \
        "the tiny model has no zero weight, so every perturbation changes bits and is measured"
    assert lines[-1].startswith(f"validate: loss evaluations: {planned}/{planned} done in ")
