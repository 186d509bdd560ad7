"""The benchmark harness (benchmarks/bench.py) runs on the CPU at the tiny size, so it cannot rot.

No wall-clock assertions: only that every phase is run and recorded.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]


BENCH = ROOT / "benchmarks"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))  # the harness modules import each other by name
    return _module("bench")


@pytest.fixture(scope="module")
def workload(bench):
    return sys.modules["workload"]


def _run(bench, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "record.json"
    args = ["--size", "tiny", "--device", "cpu", "--n-seq", "4", "--seq-len", "16", "--keep", "50", "--k", "5",
            "--work-dir", str(tmp_path / "work"), "--json", str(out), *extra]
    result = CliRunner().invoke(bench.main, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return json.loads(out.read_text())


def test_llama_3_1_8b_shapes(workload) -> None:
    """The 8B shape has Llama-3.1-8B's 226 matrices and 8,029,995,008 weights (built on the meta device)."""
    model = workload.build_model("llama-3.1-8b", torch.device("meta"), torch.bfloat16, seed=0)
    assert workload.matrix_counts(model) == (226, 8_029_995_008, 8_029_995_008 - 128256 * 4096)


def test_tokenizer_round_trip(workload) -> None:
    ids = workload.random_ids(3, 7, 512, seed=1)
    tok = workload.build_tokenizer(512)
    assert [tok(workload.as_text(s))["input_ids"] for s in ids] == ids


def test_in_process_records_every_phase(bench, tmp_path: Path) -> None:
    record = _run(bench, tmp_path)
    phases = {p["phase"]: p for p in record["phases"]}
    assert list(phases) == ["build model", "forward+backward", "score and write",
                            "rank per_tensor", "rank global", "export", "plot"]
    assert record["n_matrices"] == 16 and record["tokens"] == 64
    assert record["train_flop"] == 6 * record["n_weights_but_embedding"] * 64
    for p in phases.values():
        assert math.isfinite(p["seconds"]) and isinstance(p["host_peak_bytes"], int)
    fb = phases["forward+backward"]
    assert fb["tokens_per_s"] == pytest.approx(64 / fb["seconds"])
    assert fb["tflops"] == pytest.approx(record["train_flop"] / fb["seconds"] / 1e12)
    for name in ("rank per_tensor", "rank global", "export", "plot"):
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


def test_shards_only_writes_shards_the_stages_read(bench, tmp_path: Path) -> None:
    """Synthetic shards come from the library's own row builders, so rank, export and plot read them."""
    from critical_weights.artifacts import shards

    record = _run(bench, tmp_path, "--shards-only")
    assert [p["phase"] for p in record["phases"]] == [
        "write synthetic shards (host side of score and write)", "rank per_tensor", "rank global", "export", "plot"]
    sens = tmp_path / "work" / "sensitivity"
    stats = shards.read_stats(sens)
    assert stats.num_rows == 16 * 2  # every matrix of the tiny size, two metrics
    top = shards.read_candidates(sens, stats, "grad_x_weight")
    assert top.num_rows == 16 * 50 and (tmp_path / "work" / "reports" / "critical_weights.csv").is_file()


@pytest.fixture(scope="module")
def gpu(bench):
    return _module("gpu")


def _fake_run(phases: list[dict], **extra) -> dict:
    return {"name": "x", "record": {"phases": phases, **extra}}


def test_gpu_targets_are_judged_from_the_records(gpu) -> None:
    gib = 1 << 30
    dense = _fake_run([{"phase": "forward+backward", "seconds": 4.0, "tflops": 500.0, "gpu_peak_bytes": 60 * gib},
                       {"phase": "score and write", "seconds": 1.5, "gpu_peak_bytes": 70 * gib}])
    chain = _fake_run([], chain_excluding_load_s=29.0)
    got = {t["target"]: (t["measured"], t["met"]) for t in gpu.judge([dense, chain, {"name": "moe"}], dry_run=False)}
    assert got == {"tflops": (500.0, True), "score_and_write_s": (1.5, False), "gpu_peak_gib": (70.0, True),
                   "chain_without_load_s": (29.0, True)}
    failed = gpu.judge([{"name": "a", "error": "x"}, {"name": "b", "error": "y"}, {"name": "c"}], dry_run=False)
    assert all(t["measured"] is None and t["met"] is None for t in failed)  # unmeasured, never "met"
    dry = gpu.judge([dense, chain, {"name": "moe"}], dry_run=True)
    assert all(t["met"] is None for t in dry)


@pytest.mark.slow
def test_gpu_script_dry_run_on_the_cpu(tmp_path: Path) -> None:
    """The one-call GPU script, on the CPU at the tiny sizes: every run completes and both
    files are written; no target is judged."""
    import subprocess

    out = tmp_path / "gpu"
    done = subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((out / "gpu.json").read_text())
    assert [r["name"] for r in report["runs"]] == ["in-process tiny", "chain tiny", "in-process tiny-moe",
                                                   "chain tiny fsdp x2"]
    fsdp = report["runs"][3]["record"]
    assert fsdp["mode"] == "chain, fsdp over 2"
    assert all("record" in r for r in report["runs"])
    moe = report["runs"][2]["record"]
    assert moe["n_matrices"] == 16 and moe["n_active_weights_but_embedding"] < moe["n_weights_but_embedding"]
    assert {t["target"] for t in report["targets"]} == set(gpu_targets()) and all(t["met"] is None for t in report["targets"])
    md = (out / "gpu.md").read_text()
    assert "CPU dry run" in md and "### chain tiny" in md and "| forward+backward | in-process |" in md


def gpu_targets() -> tuple[str, ...]:
    return ("tflops", "score_and_write_s", "gpu_peak_gib", "chain_without_load_s")


@pytest.mark.slow
def test_memory_script_measures_every_setting_to_the_same_loss() -> None:
    """benchmarks/memory.py on the embedded default: one line per setting, the same loss for
    each, and recomputing the blocks lowers the peak (2 x 256 tokens: by hundreds of MiB)."""
    import re
    import subprocess

    done = subprocess.run([sys.executable, str(BENCH / "memory.py"), "--n-texts", "2"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 4
    assert len({line.rsplit("loss ", 1)[1] for line in lines}) == 1
    peak = {line.split(":")[0]: int(re.search(r"peak (\d+) MiB", line)[1]) for line in lines}
    assert peak["8 sequences, checkpointing"] < peak["8 sequences, no checkpointing (the old default)"] - 100


@pytest.fixture(scope="module")
def pruning_masks(bench):
    return _module("pruning_masks")


def test_pruning_masks_records_every_mask_and_the_peak(pruning_masks, tmp_path: Path) -> None:
    """benchmarks/pruning_masks.py at the tiny size, one of its two blocks, in a process of its
    own: every mask and RTN of every block tensor is recorded, each mask prunes its share, and
    the time of the measured block is scaled to both."""
    out = tmp_path / "masks.json"
    result = CliRunner().invoke(pruning_masks.main, ["--size", "tiny", "--blocks", "1", "--metric", "wanda",
                                                     "--json", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    (run,) = json.loads(out.read_text())["runs"]
    labels = ["per_row 0.1", "per_row 0.3", "per_row 0.5", "per_row 0.7", "2:4", "4:8", "per_tensor 0.5"]
    assert run["metric"] == "wanda" and run["masks"] == labels and list(run["steps"]) == [*labels, "RTN"]
    assert (run["n_tensors"], run["n_measured"], run["n_blocks"]) == (14, 7, 2)
    assert run["host_peak_is_own"] and 0 < run["runtime_bytes"] < run["peak_bytes"]
    assert run["peak_beside_model_bytes"] == run["peak_bytes"] - max(t["weight_bytes"] for t in run["tensors"])
    assert run["target_met"] is (run["peak_beside_model_bytes"] < 2 * 10**9)
    for t in run["tensors"]:
        rows, cols = t["shape"]
        assert t["weight_bytes"] == 4 * rows * cols and t["host_peak_bytes"] > 0
        shares = {k: m["pruned_share"] for k, m in t["masks"].items()}
        assert shares == {**{f"per_row {s:g}": math.floor(cols * s) / cols for s in (0.1, 0.3, 0.5, 0.7)},
                          "2:4": 0.5, "4:8": 0.5, "per_tensor 0.5": math.floor(rows * cols * 0.5) / (rows * cols)}
    components = [*(f"self_attn.{x}_proj" for x in "qkvo"), "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert {c: v["n_all_blocks"] for c, v in run["components"].items()} == dict.fromkeys(components, 2)
    assert run["all_blocks_s"] == pytest.approx(2 * run["measured_s"])
    assert "### wanda" in result.output and "under 2 GB" in result.output


@pytest.mark.parametrize("metric", ["grad_x_weight", "wanda", "random"])
def test_pruning_masks_are_the_compress_stages_own(pruning_masks, workload, tmp_path: Path, metric: str) -> None:
    """The benchmark builds each mask as the compress stage's Pruner.masks does, from sums
    written as the sensitivity stage writes them: the same bits, tensor by tensor."""
    from critical_weights.artifacts.sums import Sums
    from critical_weights.compression.stage import Pruner, Target

    model = workload.build_model("tiny", torch.device("cpu"), torch.float32, seed=3)
    targets = [Target(p.parameter, p.kind, p.shape) for p in pruning_masks.block_tensors("tiny")]
    pruning_masks.write_sums(tmp_path, list(enumerate(targets)), seed=3)
    sums = Sums(tmp_path)
    pruner = Pruner(model, targets, sums, seed=3)
    for config in pruning_masks.mask_configurations():
        for i, (t, expected) in enumerate(pruner.masks(metric, *config)):
            got, _, _ = pruning_masks.one_mask(metric, i, t, pruner.weights[t.name], sums, 3, config)
            assert torch.equal(got, expected), (t.name, config)


def test_fsdp_memory_counts_the_weights_transformers_builds() -> None:
    """benchmarks/fsdp_memory.py's shapes hold the weights transformers' Llama has (built on the
    meta device: no memory, no download), block by block."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fsdp_memory = _module("fsdp_memory")

    for shape in fsdp_memory.SHAPES:
        config = LlamaConfig(hidden_size=shape.hidden, num_hidden_layers=2, intermediate_size=shape.intermediate,
                             num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                             vocab_size=fsdp_memory.VOCAB, tie_word_embeddings=False)
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        block = sum(p.numel() for p in model.model.layers[0].parameters())
        assert block == shape.block, shape.name
        assert sum(p.numel() for p in model.parameters()) == 2 * block + 2 * fsdp_memory.VOCAB * shape.hidden + shape.hidden
    assert "| Llama-3.1-70B (70.6B) | 16 |" in fsdp_memory.table()
