"""Validation and perturbation: perturbations change exactly the chosen weights, in the right
way; controls draw the right counts from the right tensors; everything is seeded; the model
comes back bit-exactly; bad input gives one `Error:` line."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from functools import cache
from pathlib import Path
from types import ModuleType

import numpy as np
import pyarrow as pa
import pytest
import torch
import yaml
from click.testing import CliRunner, Result

from conftest import ROOT, build_tiny_model, run_prepare_and_sensitivity, tiny_params
from critical_weights import models, shards, texts
from critical_weights.errors import ModelError, ParamsError, ShardError, TextsError
from critical_weights.params import Params, ValidateParams, load_params
from critical_weights.progress import Timings
from critical_weights.ranking import rank_metric
from critical_weights.perturbation import RestoreError, bit_index, digest, flip_bit, perturbed
from critical_weights.validation import (
    bottom_selection, choose_texts, heldout_ids, mean_loss, plan, random_selection, run_validate,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# float32 values whose every bit pattern class is covered: zero, -0, normal, tiny, huge, subnormal, inf, nan
SPECIAL = [0.0, -0.0, 1.5, -3.25e-3, 0.5, 7e30, -1e-40, float("inf"), float("nan")]


def uint_bits(t: torch.Tensor) -> np.ndarray:
    """The stored bits of a float32 or bfloat16 tensor as unsigned integers."""
    if t.dtype == torch.float32:
        return t.view(torch.int32).numpy().view(np.uint32)
    return t.view(torch.int16).numpy().view(np.uint16)


# ----------------------------------------------------------------------------- bit flips


@pytest.mark.parametrize("dtype, width", [(torch.float32, 32), (torch.bfloat16, 16)])
def test_bit_flip_xors_exactly_one_bit_for_every_bit_index(dtype, width):
    values = torch.tensor(SPECIAL, dtype=torch.float32).to(dtype)
    before = uint_bits(values).copy()
    for bit in range(width):
        out = flip_bit(values, bit)
        assert out.dtype == dtype
        diff = uint_bits(out) ^ before
        assert (diff == (1 << bit)).all(), (bit, diff)
    assert (uint_bits(values) == before).all(), "flip_bit changed its input"


@pytest.mark.parametrize("dtype, sign, exponent_msb", [
    (torch.float32, 31, 30), (torch.bfloat16, 15, 14), (torch.float16, 15, 14),
])
def test_named_bits(dtype, sign, exponent_msb):
    assert bit_index(dtype, "sign") == sign
    assert bit_index(dtype, "exponent_msb") == exponent_msb
    assert bit_index(dtype, 3) == 3
    half = torch.tensor([0.5, -2.0], dtype=dtype)
    assert flip_bit(half, sign).tolist() == [-0.5, 2.0]
    if dtype != torch.float16:  # 8 exponent bits: 0.5 = 2^-1 -> 2^127
        assert flip_bit(half[:1], exponent_msb).item() == 2.0**127


def test_bit_beyond_the_dtype_is_a_params_error():
    with pytest.raises(ParamsError) as info:
        bit_index(torch.bfloat16, 20)
    assert info.value.problems == ["validate.bit: 20 is beyond the 16 bits of bfloat16 weights; use sign, exponent_msb or 0..15"]
    with pytest.raises(ModelError, match="bit_flip needs float32, bfloat16 or float16 weights"):
        bit_index(torch.float64, "sign")


# ----------------------------------------------------------------------------- perturbing in place

SELECTION = {
    "model.layers.0.self_attn.q_proj.weight": np.array([0, 5, 17, 255], dtype=np.int64),
    "model.layers.1.mlp.down_proj.weight": np.array([3], dtype=np.int64),
    "lm_head.weight": np.array([2, 100, 1535], dtype=np.int64),
}


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def expected_values(kind: str, original: dict[str, torch.Tensor], vp: ValidateParams, seed: int) -> dict[str, torch.Tensor]:
    """What each selected weight must become, computed independently of the library."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, index in SELECTION.items():
        w = original[name].reshape(-1)[torch.from_numpy(index)]
        if kind == "zero":
            out[name] = torch.zeros_like(w)
        elif kind == "sign_flip":
            out[name] = -w
        elif kind == "gauss_noise":
            noise = torch.from_numpy(rng.standard_normal(len(index)))
            out[name] = (w.double() + noise * vp.noise_sigma * w.double().abs()).to(w.dtype)
        else:
            flipped = uint_bits(w) ^ (1 << bit_index(w.dtype, vp.bit))  # unsigned, numpy
            signed = np.int32 if w.dtype == torch.float32 else np.int16
            out[name] = torch.from_numpy(flipped.view(signed).copy()).view(w.dtype)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["zero", "sign_flip", "gauss_noise", "bit_flip"])
def test_each_perturbation_changes_exactly_the_chosen_weights_and_restores_them(kind, dtype):
    model = build_tiny_model().to(dtype)
    weights = dict(model.named_parameters())
    original = snapshot(model)
    before = {n: digest(weights[n]) for n in SELECTION}
    vp = ValidateParams(noise_sigma=0.5, bit="exponent_msb")
    want = expected_values(kind, original, vp, seed=7)
    # every selected weight changes, bar noise that rounds back to the same bfloat16 value
    moved = {n: idx[uint_bits(want[n].clone()) != uint_bits(original[n].reshape(-1)[torch.from_numpy(idx)].clone())]
             for n, idx in SELECTION.items()}
    if kind != "gauss_noise":
        assert all(len(moved[n]) == len(SELECTION[n]) for n in SELECTION)
    with perturbed(weights, SELECTION, kind, vp, np.random.default_rng(7), before) as n_changed:
        assert n_changed == sum(len(i) for i in moved.values()) >= 6
        for name, p in model.named_parameters():
            now, was = uint_bits(p.detach().reshape(-1).clone()), uint_bits(original[name].reshape(-1).clone())
            changed = np.flatnonzero(now != was)
            assert changed.tolist() == moved.get(name, np.empty(0)).tolist(), name
            if name in SELECTION:
                got = p.detach().reshape(-1)[torch.from_numpy(SELECTION[name])]
                assert (uint_bits(got.clone()) == uint_bits(want[name].clone())).all(), name
    for name, p in model.named_parameters():
        assert torch.equal(uint_bits_t(p), uint_bits_t(original[name])), f"{name} not restored"


def uint_bits_t(t: torch.Tensor) -> torch.Tensor:
    return t.detach().view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def test_bit_flip_on_bfloat16_flips_bit_14():
    model = build_tiny_model().to(torch.bfloat16)
    weights = dict(model.named_parameters())
    name = "lm_head.weight"
    sel = {name: np.array([7, 8], dtype=np.int64)}
    was = uint_bits(weights[name].detach().reshape(-1)[:10].clone())
    with perturbed(weights, sel, "bit_flip", ValidateParams(bit="exponent_msb"), np.random.default_rng(0),
                   {name: digest(weights[name])}):
        now = uint_bits(weights[name].detach().reshape(-1)[:10].clone())
        assert ((now ^ was) == np.array([0] * 7 + [1 << 14] * 2 + [0], dtype=np.uint16)).all()


def test_a_tensor_not_restored_bit_exactly_raises():
    model = build_tiny_model()
    weights = dict(model.named_parameters())
    before = {n: digest(weights[n]) for n in SELECTION}
    name = "model.layers.1.mlp.down_proj.weight"
    with pytest.raises(RestoreError, match=f"parameter {name}: not restored bit-exactly after zero"):
        with perturbed(weights, SELECTION, "zero", ValidateParams(), np.random.default_rng(0), before):
            with torch.no_grad():
                weights[name].view(-1)[4] += 1.0  # a weight outside the selection, in a touched tensor


def test_the_model_is_restored_when_the_measurement_fails():
    model = build_tiny_model()
    weights = dict(model.named_parameters())
    original = snapshot(model)
    with pytest.raises(KeyError):
        with perturbed(weights, SELECTION, "sign_flip", ValidateParams(), np.random.default_rng(0),
                       {n: digest(weights[n]) for n in SELECTION}):
            raise KeyError("boom")
    for name, p in model.named_parameters():
        assert torch.equal(uint_bits_t(p), uint_bits_t(original[name])), name


def test_gauss_noise_is_seeded():
    def run(seed: int) -> torch.Tensor:
        model = build_tiny_model()
        weights = dict(model.named_parameters())
        with perturbed(weights, SELECTION, "gauss_noise", ValidateParams(), np.random.default_rng(seed),
                       {n: digest(weights[n]) for n in SELECTION}):
            return weights["lm_head.weight"].detach().clone()

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


# ----------------------------------------------------------------------------- controls


def test_random_k_draws_the_same_counts_from_the_same_tensors_outside_the_critical_set():
    counts, sizes = {"a": 3, "b": 5}, {"a": 10, "b": 100_000}
    avoid = {"a": np.arange(5, dtype=np.int64), "b": np.array([7], dtype=np.int64)}
    sel = random_selection(counts, sizes, avoid, seed=42, k=8)
    assert list(sel) == ["a", "b"]
    for name, idx in sel.items():
        assert len(idx) == counts[name] == len(set(idx.tolist()))
        assert ((0 <= idx) & (idx < sizes[name])).all()
        assert not np.isin(idx, avoid[name]).any()
        assert (np.diff(idx) > 0).all()
    again = random_selection(counts, sizes, avoid, seed=42, k=8)
    assert all(np.array_equal(sel[n], again[n]) for n in sel)
    other = random_selection(counts, sizes, avoid, seed=43, k=8)
    assert not np.array_equal(sel["b"], other["b"])


def test_random_k_in_a_tensor_too_small_raises():
    with pytest.raises(ModelError, match="parameter a has 2 weights outside the critical set, fewer than 3"):
        random_selection({"a": 3}, {"a": 5}, {"a": np.arange(3, dtype=np.int64)}, seed=0, k=3)


def test_bottom_k_takes_the_least_sensitive_rows_of_each_tensor():
    bottom = pa.table({"parameter": ["a", "a", "a", "b", "b"], "rank": [2, 1, 3, 1, 2],
                       "flat_index": [40, 90, 10, 5, 6]})
    sel = bottom_selection(bottom, {"a": 2, "b": 1})
    assert {n: i.tolist() for n, i in sel.items()} == {"a": [40, 90], "b": [5]}
    with pytest.raises(ShardError, match="the bottom shard of b holds 2 weights, fewer than 3"):
        bottom_selection(bottom, {"b": 3})


def test_choose_texts():
    assert choose_texts(5, 0, 1) == [0, 1, 2, 3, 4]
    assert choose_texts(5, 9, 1) == [0, 1, 2, 3, 4]
    pick = choose_texts(100, 10, 1)
    assert len(pick) == 10 == len(set(pick)) and pick == sorted(pick) and pick == choose_texts(100, 10, 1)
    assert pick != choose_texts(100, 10, 2)


# ----------------------------------------------------------------------------- on real shards


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path, Params]:
    """Prepared texts and dense shards of the tiny model (8 texts, keep 40)."""
    params = tiny_params(tiny_model_dir, validate={"k_values": (1, 5, 20), "n_texts": 0})
    prepared, sens = run_prepare_and_sensitivity(tmp_path_factory.mktemp("validate"), params)
    return prepared, sens, params


def dense_scores(sens: Path, metric: str) -> dict[str, np.ndarray]:
    stats = shards.read_stats(sens)
    out = {}
    for row in stats.filter(pa.compute.equal(stats["metric"], metric)).to_pylist():
        t = shards.read_dense(sens, row["param_index"], row["parameter"])
        t = t.filter(pa.compute.equal(t["metric"], metric))
        out[row["parameter"]] = t["score"].to_numpy()
    return out


def test_plan_perturbs_the_global_top_k_and_controls_with_matching_counts(tiny_run):
    _, sens, params = tiny_run
    the_plan = plan(sens, params.rank, params.validate, params.seed)
    top = rank_metric(sens, dataclasses.replace(params.rank, mode="global", k=20))
    scores = dense_scores(sens, params.rank.metric)
    for k in (1, 5, 20):
        head = top.slice(0, k).to_pylist()
        critical = the_plan.sets[k]["critical"]
        assert sorted((n, int(i)) for n, idx in critical.items() for i in idx) == sorted(
            (r["parameter"], r["flat_index"]) for r in head)
        # the critical weights are the k highest scores of the whole model
        every = np.sort(np.concatenate(list(scores.values())))[::-1]
        chosen = np.sort([scores[n][i] for n, idx in critical.items() for i in idx])[::-1]
        assert np.array_equal(chosen, every[:k])
        for control in ("random_k", "bottom_k"):
            sel = the_plan.sets[k][control]
            assert {n: len(i) for n, i in sel.items()} == {n: len(i) for n, i in critical.items()}, control
        for name, idx in the_plan.sets[k]["random_k"].items():
            assert not np.isin(idx, critical[name]).any()
        for name, idx in the_plan.sets[k]["bottom_k"].items():
            assert np.array_equal(np.sort(scores[name][idx]), np.sort(scores[name])[: len(idx)]), name


def test_plan_is_deterministic_and_only_random_k_depends_on_the_seed(tiny_run):
    _, sens, params = tiny_run
    a = plan(sens, params.rank, params.validate, 42)
    b = plan(sens, params.rank, params.validate, 42)
    c = plan(sens, params.rank, params.validate, 43)
    for k in (1, 5, 20):
        for cond in ("critical", "random_k", "bottom_k"):
            assert {n: i.tolist() for n, i in a.sets[k][cond].items()} == {n: i.tolist() for n, i in b.sets[k][cond].items()}
        assert {n: i.tolist() for n, i in a.sets[k]["bottom_k"].items()} == {n: i.tolist() for n, i in c.sets[k]["bottom_k"].items()}
    assert {n: i.tolist() for n, i in a.sets[20]["random_k"].items()} != {n: i.tolist() for n, i in c.sets[20]["random_k"].items()}


def test_plan_respects_include_and_exclude(tiny_run):
    _, sens, params = tiny_run
    rank = dataclasses.replace(params.rank, include=("model.layers.*",), exclude=("*mlp*",))
    the_plan = plan(sens, rank, params.validate, params.seed)
    for by_cond in the_plan.sets.values():
        for sel in by_cond.values():
            assert all(n.startswith("model.layers.") and "mlp" not in n for n in sel)


def test_mean_loss_is_the_sensitivity_loss_whatever_the_batching(tiny_run, tiny_model_dir):
    prepared, sens, params = tiny_run
    ids, _ = texts.read_prepared(prepared)
    model = models.load_model(models.resolve_source(str(tiny_model_dir)), params.model, torch.device("cpu"), torch.float32)
    want = shards.read_meta(sens)["avg_loss"]
    for micro_batch in (1, 3, 8):
        torch.testing.assert_close(mean_loss(model, ids, micro_batch), want, rtol=1e-6, atol=0)


def run_twice(tiny_run, tmp_path: Path, **validate) -> tuple[dict, list[dict[str, bytes]]]:
    prepared, sens, params = tiny_run
    params = dataclasses.replace(params, validate=dataclasses.replace(params.validate, **validate))
    outputs = []
    for run in ("a", "b"):
        folder = tmp_path / run
        report = run_validate(prepared, sens, Path(params.texts.source), params, folder / "validation.json",
                              folder / "damage_curve.png", folder / "damage_curve.csv", Timings("validate"))
        outputs.append({p.name: p.read_bytes() for p in sorted(folder.iterdir())})
    return report, outputs


def test_run_validate_reports_the_damage_and_is_byte_deterministic(tiny_run, tmp_path):
    report, (a, b) = run_twice(tiny_run, tmp_path, perturbations=("zero", "gauss_noise"), k_values=(1, 5), holdout=0.5)
    assert a == b, "two runs gave different files"
    assert json.loads(a["validation.json"]) == report
    assert a["damage_curve.png"].startswith(PNG_SIGNATURE)
    csv_lines = a["damage_curve.csv"].decode().splitlines()
    assert csv_lines[0] == ("k,baseline,zero_critical,zero_random_k,zero_bottom_k,"
                            "sign_flip_critical,sign_flip_random_k,sign_flip_bottom_k,"
                            "gauss_noise_critical,gauss_noise_random_k,gauss_noise_bottom_k,"
                            "bit_flip_critical,bit_flip_random_k,bit_flip_bottom_k")
    rows = [line.split(",") for line in csv_lines[1:]]
    assert [r[0] for r in rows] == ["1", "5"]
    assert all(r[5:8] == ["", "", ""] and r[11:14] == ["", "", ""] for r in rows), "perturbations not run are empty"
    assert float(rows[1][2]) == report["damage"]["zero"]["k5"]["critical"]["loss"]
    base = report["baseline"]
    assert base["n_texts"] == 8
    torch.testing.assert_close(base["loss"], base["sensitivity_loss_all_texts"], rtol=1e-6, atol=0)
    assert report["heldout_baseline"]["n_texts"] == 4
    for kind in ("zero", "gauss_noise"):
        for k in (1, 5):
            entry = report["damage"][kind][f"k{k}"]
            assert entry["n_weights"] == k
            for cond in ("critical", "random_k", "bottom_k"):
                rec = entry[cond]
                assert rec["n_changed"] <= k and rec["finite"]
                torch.testing.assert_close(rec["loss_increase"], rec["loss"] - base["loss"])
                assert "heldout" in rec
            inc = entry["critical"]["loss_increase"], entry["random_k"]["loss_increase"]
            if inc[1] > 0:
                torch.testing.assert_close(entry["ratio_vs_random_k"], inc[0] / inc[1])
    assert report["damage"]["zero"]["k1"]["critical"]["n_changed"] == 1


def test_a_subset_of_texts_and_non_finite_losses(tiny_run, tmp_path):
    report, (a, b) = run_twice(tiny_run, tmp_path, perturbations=("bit_flip",), controls=("random_k",),
                               k_values=(5,), bit=30, n_texts=3)
    assert a == b
    assert report["baseline"]["n_texts"] == 3
    assert report["settings"]["bit_index"] == 30
    for rec in (report["damage"]["bit_flip"]["k5"][c] for c in ("critical", "random_k")):
        assert rec["n_changed"] == 5
        assert rec["finite"] == (rec["loss"] is not None) == (rec["loss_increase"] is not None)


# ----------------------------------------------------------------------------- held-out texts and errors


def test_heldout_texts_are_the_ones_prepare_did_not_choose(tiny_run):
    prepared, _, params = tiny_run
    ids = heldout_ids(Path(params.texts.source), prepared, 5, params.texts.max_length, params.seed)
    assert len(ids) == 5 and all(2 <= len(s) <= params.texts.max_length for s in ids)
    chosen, _ = texts.read_prepared(prepared)
    assert not {tuple(s) for s in ids} & {tuple(s) for s in chosen}
    assert ids == heldout_ids(Path(params.texts.source), prepared, 5, params.texts.max_length, params.seed)


def test_no_text_left_to_hold_out_is_a_texts_error(tmp_path):
    source = tmp_path / "three.txt"
    source.write_text("one text\nanother text\na third text\n", encoding="utf-8")
    prepared = tmp_path / "prepared"
    texts.write_prepared(prepared, texts.PreparedTexts([0, 1, 2], ["a", "b", "c"], [[1, 2]] * 3, 3), {"n_available": "3"})
    with pytest.raises(TextsError) as info:
        heldout_ids(source, prepared, 2, 16, 0)
    assert str(info.value) == (f"validate.holdout: prepare chose every text of {source}, so none is left to hold out; "
                               "lower texts.n_texts or set validate.holdout: 0")


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


def stage_args(params_file: Path, prepared: Path, sens: Path, out: Path) -> list[object]:
    return ["--params", params_file, "--prepared", prepared, "--sensitivity", sens, "--source", ROOT / "data/texts/corpus.jsonl",
            "--report", out / "validation.json", "--plot", out / "damage_curve.png", "--table", out / "damage_curve.csv"]


def test_stage_help_shows_an_example():
    result = invoke("--help")
    assert result.exit_code == 0 and "Example" in result.output and "stages/validate.py" in result.output


def test_stage_with_missing_shards_is_one_error_line(tmp_path, write_params):
    empty = tmp_path / "empty"
    empty.mkdir()
    params_file = write_params({"validate": {"k_values": [1, 5]}})
    result = invoke(*stage_args(params_file, empty, empty, tmp_path / "out"))
    assert_error(result, f"shard {empty / 'meta.json'} is missing; rerun the sensitivity stage (dvc repro)")
    assert not (tmp_path / "out").exists()


def test_stage_with_bad_validate_params_names_them_all(tmp_path, write_params):
    empty = tmp_path / "empty"
    empty.mkdir()
    params_file = write_params({"validate": {"perturbations": ["melt"], "bit": "mantissa", "n_texts": -1}})
    assert_error(invoke(*stage_args(params_file, empty, empty, tmp_path / "out")),
                 "invalid params.yaml: validate.bit: 'mantissa' is not one of sign, exponent_msb, or a bit index 0..31; "
                 "validate.perturbations: 'melt' not one of zero, sign_flip, gauss_noise, bit_flip; "
                 "validate.n_texts: -1 must be an integer >= 0")


def test_stage_with_shards_of_another_model_is_one_error_line(tiny_run, tmp_path, write_params):
    prepared, sens, params = tiny_run
    other = tmp_path / "other-model"
    build_tiny_model(vocab_size=texts_vocab(prepared), seed=5).save_pretrained(other, safe_serialization=True)
    raw = {"model": {"name": str(other), "device": "cpu", "dtype": "float32"},
           "sensitivity": {"keep": 40}, "rank": {"k": 10}, "validate": {"k_values": [1, 5]}}
    result = invoke(*stage_args(write_params(raw), prepared, sens, tmp_path / "out"))
    assert result.exit_code == 1, result.output
    assert result.output.splitlines()[-1].startswith("Error: parameter ")
    assert result.output.splitlines()[-1].endswith(
        "the model's weights differ from those the shards recorded; rerun the sensitivity stage (dvc repro)")


def texts_vocab(prepared: Path) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(prepared / texts.TOKENIZER_DIR))


def test_project_params_yaml_spells_every_validate_default():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    assert set(raw["validate"]) == {f.name for f in dataclasses.fields(ValidateParams)}
    assert load_params(ROOT / "params.yaml").validate == ValidateParams()
