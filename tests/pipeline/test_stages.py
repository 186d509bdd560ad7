"""The Click stage scripts: one-line `Error: ...` messages with exit status 1 for problems the
user can fix, and the whole pipeline prepare -> sensitivity -> rank -> export -> plot."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from _cli import assert_error, invoke
from _tiny import CORPUS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CSV_HEADER = "global_rank,group_rank,parameter,block,component,expert,row,col,flat_index,score,weight,gradient,metric,token_id,token"
ALL_METRICS = "grad_x_weight, gradient, magnitude, fisher, taylor2, hutchinson, wanda"
STAGES = ("prepare", "sensitivity", "rank", "export", "plot", "superweights")


def small_params(model_dir: Path | str, **sections: dict) -> dict:
    """A params.yaml body for a quick run of the tiny model; `sections` update it."""
    raw = {
        "seed": 42,
        "texts": {"source": str(CORPUS), "n_texts": 8, "max_length": 24},
        "model": {"name": str(model_dir), "device": "cpu", "dtype": "float32"},
        "sensitivity": {"metrics": ["grad_x_weight", "magnitude"], "micro_batch_size": 4, "keep": 20},
        "rank": {"metric": "grad_x_weight", "mode": "per_tensor", "k": 5},
        "plot": {"dpi": 40},
        "validate": {"k_values": [1, 5]},
        "domains": {"top_n": 10, "per_tensor_k": 5},
    }
    for section, fields in sections.items():
        raw[section] = {**raw.get(section, {}), **fields}
    return raw


@pytest.mark.parametrize("name", STAGES)
def test_help_shows_an_example(name):
    result = invoke(name, "--help")
    assert result.exit_code == 0
    assert "Example" in result.output and f"stages/{name}.py" in result.output


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name", STAGES)
def test_bad_params_file_is_one_error_line(name, tmp_path, write_params):
    params = write_params(small_params("x", sensitivity={"metrics": ["grad_x_weight", "bogus"]}))
    folder = tmp_path / "in"
    folder.mkdir()
    (tmp_path / "overlap.json").write_text("{}", encoding="utf-8")
    args = {
        "prepare": ["--source", CORPUS, "--out", tmp_path / "out"],
        "sensitivity": ["--prepared", folder, "--out", tmp_path / "out"],
        "rank": ["--sensitivity", folder, "--out", tmp_path / "out"],
        "export": ["--prepared", folder, "--sensitivity", folder, "--ranked", folder, "--reports", tmp_path / "out"],
        "plot": ["--sensitivity", folder, "--ranked", folder, "--overlap", tmp_path / "overlap.json",
                 "--out", tmp_path / "out"],
        "superweights": ["--prepared", folder, "--sensitivity", folder, "--report", tmp_path / "out" / "s.json",
                         "--plot", tmp_path / "out" / "s.png", "--table", tmp_path / "out" / "s.csv"],
    }[name]
    result = invoke(name, "--params", params, *args)
    assert_error(result, f"invalid params.yaml: sensitivity.metrics: 'bogus' not one of {ALL_METRICS}")
    assert not (tmp_path / "out").exists()


def test_every_params_problem_on_one_line(tmp_path, write_params):
    params = write_params(small_params("x", sensitivity={"keep": 100}, rank={"mode": "per_head", "k": 0, "kk": 1}))
    result = invoke("prepare", "--params", params, "--source", CORPUS, "--out", tmp_path / "out")
    assert_error(result, (
        "invalid params.yaml: rank.mode: 'per_head' is not one of per_tensor, per_block, per_component, global; "
        "rank.k: 0 must be an integer >= 1; "
        "rank.kk: unknown key (did you mean rank.k?); known keys here are exclude, include, k, metric, mode"))


def test_missing_texts_source(tmp_path, write_params, tiny_model_dir):
    params = write_params(small_params(tiny_model_dir))
    missing = tmp_path / "nowhere.jsonl"
    result = invoke("prepare", "--params", params, "--source", missing, "--out", tmp_path / "out")
    assert_error(result, f"texts.source: {missing} does not exist; expected .jsonl, .txt, .parquet, or a folder of .txt files")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", ["", "\n   \n\n"])
def test_empty_text_file(tmp_path, write_params, tiny_model_dir, content):
    params = write_params(small_params(tiny_model_dir))
    empty = tmp_path / "empty.txt"
    empty.write_text(content, encoding="utf-8")
    result = invoke("prepare", "--params", params, "--source", empty, "--out", tmp_path / "out")
    assert_error(result, f"texts.source: {empty} holds no non-empty text")


def test_unknown_model_path(tmp_path, write_params):
    name = str(tmp_path / "no" / "such" / "model")
    params = write_params(small_params(name))
    result = invoke("prepare", "--params", params, "--source", CORPUS, "--out", tmp_path / "out")
    assert_error(result, (f"model.name: {name!r} does not exist; expected smollm2-135m, a .gguf file, "
                          "a model folder in Hugging Face format, or a hub id owner/name"))


def test_model_folder_without_config(tmp_path, write_params):
    folder = tmp_path / "empty-model"
    folder.mkdir()
    params = write_params(small_params(folder))
    result = invoke("prepare", "--params", params, "--source", CORPUS, "--out", tmp_path / "out")
    assert_error(result, f"model.name: {folder} has no config.json; expected a model folder in Hugging Face format")


def test_rank_with_a_metric_missing_from_the_shards(tmp_path, write_params, dense_shards):
    sens, _ = dense_shards  # holds grad_x_weight, magnitude, fisher, wanda
    params = write_params(small_params("x", sensitivity={"metrics": ["grad_x_weight", "gradient"], "keep": 40},
                                       rank={"metric": "gradient"}))
    result = invoke("rank", "--params", params, "--sensitivity", sens, "--out", tmp_path / "ranked")
    assert_error(result, ("rank.metric: 'gradient' is not in the shards; they hold grad_x_weight, magnitude, fisher, "
                          "wanda (add it to sensitivity.metrics)"))
    assert not (tmp_path / "ranked").exists()


def test_rank_with_k_above_the_shards_keep(tmp_path, write_params, dense_shards):
    sens, _ = dense_shards  # keep 40
    params = write_params(small_params("x", sensitivity={"keep": 1000}, rank={"k": 41}))
    result = invoke("rank", "--params", params, "--sensitivity", sens, "--out", tmp_path / "ranked")
    assert_error(result, "rank.k: 41 exceeds the shards' sensitivity.keep 40; raise sensitivity.keep")


def test_rank_on_a_folder_without_shards(tmp_path, write_params):
    params = write_params(small_params("x"))
    (tmp_path / "empty").mkdir()
    result = invoke("rank", "--params", params, "--sensitivity", tmp_path / "empty", "--out", tmp_path / "ranked")
    assert_error(result, f"shard {tmp_path / 'empty' / 'meta.json'} is missing; rerun the sensitivity stage (dvc repro)")


def test_sensitivity_without_prepared_texts(tmp_path, write_params, tiny_model_dir):
    params = write_params(small_params(tiny_model_dir))
    (tmp_path / "prepared").mkdir()
    result = invoke("sensitivity", "--params", params, "--prepared", tmp_path / "prepared", "--out", tmp_path / "s")
    assert_error(result, (f"prepared texts {tmp_path / 'prepared' / 'texts.parquet'} are missing; "
                          "run the prepare stage (dvc repro)"))


# ----------------------------------------------------------------------------- the whole pipeline


def run_pipeline(tmp_path: Path, params: Path) -> Path:
    """prepare -> sensitivity -> rank -> export -> plot through the Click commands."""
    data, reports = tmp_path / "data", tmp_path / "reports"
    steps = [
        ("prepare", "--source", CORPUS, "--out", data / "prepared", "--timings", tmp_path / "logs" / "prepare.json"),
        ("sensitivity", "--prepared", data / "prepared", "--out", data / "sensitivity"),
        ("rank", "--sensitivity", data / "sensitivity", "--out", data / "ranked"),
        ("export", "--prepared", data / "prepared", "--sensitivity", data / "sensitivity", "--ranked", data / "ranked",
         "--reports", reports),
        ("plot", "--sensitivity", data / "sensitivity", "--ranked", data / "ranked",
         "--overlap", reports / "metric_overlap.json", "--out", reports / "plots"),
    ]
    for name, *args in steps:
        result = invoke(name, "--params", params, *args)
        assert result.exit_code == 0, f"{name}: {result.output}\n{result.exception!r}"
    return reports


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_pipeline_end_to_end_through_the_cli(tmp_path, write_params, request, tied):
    model_dir = request.getfixturevalue("tiny_tied_model_dir" if tied else "tiny_model_dir")
    k = 5
    params = write_params(small_params(model_dir, rank={"k": k}))
    reports = run_pipeline(tmp_path, params)

    text = (reports / "critical_weights.csv").read_text(encoding="utf-8")
    assert text.splitlines()[0] == CSV_HEADER
    with open(reports / "critical_weights.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    tensors = sorted(set(r["parameter"] for r in rows), key=lambda n: (n != "model.embed_tokens.weight", n == "lm_head.weight", n))
    expected_tensors = ["model.embed_tokens.weight",
                        *(f"model.layers.{b}.{m}.weight" for b in range(2)
                          for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))]
    if not tied:
        expected_tensors.append("lm_head.weight")
    assert tensors == sorted(expected_tensors, key=lambda n: (n != "model.embed_tokens.weight", n == "lm_head.weight", n))
    assert [int(r["global_rank"]) for r in rows] == list(range(1, len(rows) + 1))
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True), "best first over the whole file"
    assert len(rows) == k * len(expected_tensors)

    stats = json.loads((reports / "sensitivity_stats.json").read_text(encoding="utf-8"))["parameters"]
    for r in rows:
        assert r["metric"] == "grad_x_weight"
        weight, gradient, score = np.float32(r["weight"]), np.float32(r["gradient"]), np.float32(r["score"])
        np.testing.assert_allclose(score, np.abs(weight * gradient), rtol=1e-6)
        n_cols = stats[r["parameter"]]["shape"][1]
        assert int(r["flat_index"]) == int(r["row"]) * n_cols + int(r["col"])
        in_block = r["parameter"].startswith("model.layers.")
        assert r["block"] == (r["parameter"].split(".")[2] if in_block else "")
        path = r["parameter"].removesuffix(".weight").split(".")  # the module path inside the block
        assert r["component"] == ".".join(path[3:] if in_block else [p for p in path if p != "model"])
        assert r["expert"] == ""
        assert (r["token"] == "") == in_block  # decoded tokens for embedding and head rows only
        assert r["token_id"] == ("" if in_block else r["row"])
    for name in tensors:
        ranks = [int(r["group_rank"]) for r in rows if r["parameter"] == name]
        assert ranks == list(range(1, k + 1))  # best first within each tensor too
        scores = [float(r["score"]) for r in rows if r["parameter"] == name]
        assert scores == sorted(scores, reverse=True)

    for png in ("sensitivity_distribution.png", "layer_comparison.png", "sensitivity_heatmap.png"):
        data = (reports / "plots" / png).read_bytes()
        assert data[:8] == PNG_SIGNATURE, png
        assert len(data) > 1000
    for name in ("sensitivity_stats.json", "manifest.json", "metrics.json"):
        assert json.loads((reports / name).read_text(encoding="utf-8"))
    metrics = json.loads((reports / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["n_critical"] == len(rows)
    assert metrics["n_tensors"] == len(expected_tensors)
    assert set(metrics) == {"n_tensors", "n_weights", "n_texts", "n_tokens", "loss_prepared", "perplexity_prepared", "n_critical", "max_score"}
    stats = json.loads((reports / "sensitivity_stats.json").read_text(encoding="utf-8"))
    critical = stats["critical_set"]
    assert critical["n_critical"] == len(rows) and critical["min_score"] == pytest.approx(min(float(r["score"]) for r in rows))
    assert (tmp_path / "logs" / "prepare.json").is_file()
