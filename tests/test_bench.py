"""The benchmark harness (benchmarks/bench.py) runs on the CPU at the tiny size, so it cannot rot.

No wall-clock assertions: only that every phase is run and recorded.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "benchmarks" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(bench, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "record.json"
    args = ["--size", "tiny", "--device", "cpu", "--n-seq", "4", "--seq-len", "16", "--keep", "50", "--k", "5",
            "--work-dir", str(tmp_path / "work"), "--json", str(out), *extra]
    result = CliRunner().invoke(bench.main, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return json.loads(out.read_text())


def test_llama_3_1_8b_shapes(bench) -> None:
    """The 8B shape has the seed's 226 matrices and 8,029,995,008 weights (built on the meta device)."""
    model = bench.build_model("llama-3.1-8b", torch.device("meta"), torch.bfloat16, seed=0)
    assert bench.matrix_counts(model) == (226, 8_029_995_008, 8_029_995_008 - 128256 * 4096)


def test_tokenizer_round_trip(bench) -> None:
    ids = bench.random_ids(3, 7, 512, seed=1)
    tok = bench.build_tokenizer(512)
    assert [tok(bench.as_text(s))["input_ids"] for s in ids] == ids


def test_in_process_records_every_phase(bench, tmp_path: Path) -> None:
    record = _run(bench, tmp_path)
    phases = {p["phase"]: p for p in record["phases"]}
    assert list(phases) == ["build model", "forward+backward", "score and write",
                            "rank per_layer", "rank global", "export", "plot"]
    assert record["n_matrices"] == 16 and record["tokens"] == 64
    assert record["train_flop"] == 6 * record["n_weights_but_embedding"] * 64
    for p in phases.values():
        assert p["seconds"] > 0 and p["host_peak_bytes"] > 0
    assert phases["forward+backward"]["tokens_per_s"] > 0 and phases["forward+backward"]["tflops"] > 0
    for name in ("rank per_layer", "rank global", "export", "plot"):
        assert phases[name]["where"] == "subprocess"
        assert phases[name]["torch_imported"] is False  # stages after sensitivity stay torch-free
    work = tmp_path / "work"
    assert (work / "reports" / "critical_weights.csv").is_file()
    assert (work / "reports" / "plots" / "sensitivity_distribution.png").is_file()
    assert (work / "ranked_global" / "critical.parquet").is_file()


@pytest.mark.slow
def test_chain_records_every_stage(bench, tmp_path: Path) -> None:
    record = _run(bench, tmp_path, "--chain")
    names = [p["phase"] for p in record["phases"]]
    assert names == ["build and save model (not in the chain)", "stage prepare", "stage sensitivity",
                     "stage rank", "stage export", "stage plot"]
    sens = record["phases"][2]
    assert {"load model", "forward+backward", "score and write"} <= set(sens["stage_phases_s"])
    assert record["chain_excluding_load_s"] == pytest.approx(record["chain_s"] - record["chain_load_model_s"])
