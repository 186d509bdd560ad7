"""FSDP2 (`model.parallel: fsdp`) on the CPU with gloo: `torchrun` with 2 and 3 ranks gives
the shards one process writes, for every metric that runs sharded, on tied and untied Llama,
GPT-2 (Conv1D) and Mixtral (3-D experts; 4 experts over 3 ranks leave one rank with none).

The micro-batch counts differ across ranks (5 batches over 2 or 3 ranks), and the shards are
uneven (16 rows over 3 ranks are 6, 6 and 4). Tolerance: the gradient sums add the same
float32 terms in another order (the ranks' partial sums, then their sum), so scores agree to
float32 rounding of the sums (rtol 1e-4, and 1e-6 of the tensor's largest score for the
smallest ones); flat indices agree wherever neighbouring scores differ by more than that.
Statistics merged over ranks agree to float32 rounding; counts exactly, and histograms but for
a score that rounds across a bin edge.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

import architectures
from critical_weights.artifacts import sums
from critical_weights.core.progress import Timings
from critical_weights.sensitivity import scoring, sharded
from critical_weights.sensitivity.stage import compute_shards
from sensitivity.fsdp_worker import build, params_of

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("fsdp_worker.py")
PLAIN = ["grad_x_weight", "gradient", "wanda", "magnitude"]  # micro-batches shared by the ranks
PER_SEQUENCE = ["fisher", "taylor2"]  # each sequence's own gradient, squared
MODELS = ["llama", "llama_tied", "gpt2", "mixtral"]


def torchrun(world: int, args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --standalone --nproc_per_node world ...` (`launched`)."""
    return launched([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world), *args],
                    timeout)


def launched(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    """Run `cmd` from the project root, one thread a process, in a process group of its own,
    which is killed whatever happens to the test; stdout and stderr together."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(cmd, proc.returncode, out, "")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _ids() -> list[list[int]]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, architectures.VOCAB, size=n).tolist() for n in (12, 20, 7, 15, 9, 18, 5, 11, 14)]


def _cases(tmp: Path) -> list[dict]:
    """Each model with the plain and the per-sequence metrics; and a Llama whose norms are
    scored too (1-D tensors), with wanda's input norms counted on one rank of the lockstep pass."""
    cases = [{"model": m, "metrics": metrics, "keep": 30, "micro_batch_size": 2, "out": str(tmp / f"{m}-{kind}")}
             for m in MODELS for kind, metrics in (("plain", PLAIN), ("per_sequence", PER_SEQUENCE))]
    return cases + [{"model": "llama", "metrics": ["grad_x_weight", "fisher", "wanda"], "parameters": "all", "keep": 30,
                     "micro_batch_size": 2, "out": str(tmp / "llama-all")}]


def assert_same_shards(one: Path, many: Path) -> None:
    """`many` holds the candidates and statistics of `one`, to the tolerance of the module doc."""
    stats = pq.read_table(one / "stats.parquet").to_pandas()
    largest = {(p, m): abs(v) for p, m, v in zip(stats.parameter, stats.metric, stats["max"])}
    for kind in ("candidates", "bottom"):
        a, b = (pq.read_table(d / f"{kind}.parquet").to_pandas() for d in (one, many))
        assert a[["parameter", "metric", "rank"]].equals(b[["parameter", "metric", "rank"]]), kind
        checked = 0
        for (param, metric), x in a.groupby(["parameter", "metric"], sort=False):
            y = b[(b.parameter == param) & (b.metric == metric)]
            sx, sy = x.score.to_numpy(np.float64), y.score.to_numpy(np.float64)
            tol = 1e-4 * np.abs(sx) + 1e-6 * largest[param, metric]
            np.testing.assert_array_less(np.abs(sx - sy), tol + 1e-30, err_msg=f"{kind} {param} {metric}")
            apart = np.ones(len(sx), bool)  # scores clear of both neighbours: the same weight must sit there
            gaps = np.abs(np.diff(sx)) > 2 * tol[1:]
            apart[1:] &= gaps
            apart[:-1] &= gaps
            assert (x.flat_index.to_numpy()[apart] == y.flat_index.to_numpy()[apart]).all(), f"{kind} {param} {metric}"
            np.testing.assert_array_equal(x.weight.to_numpy()[apart], y.weight.to_numpy()[apart])
            checked += int(apart.sum())
        # the least sensitive crowd near zero, where rounding decides their order; the top does not
        assert kind == "bottom" or checked > len(a) // 2, f"{kind}: only {checked} of {len(a)} ranks are clear of their neighbours"
    a, b = (pq.read_table(d / "stats.parquet").to_pandas() for d in (one, many))
    for col in ("parameter", "metric", "count", "zeros", "negatives", "shape", "grid_rows", "grid_cols"):
        assert [np.asarray(v).tolist() for v in a[col]] == [np.asarray(v).tolist() for v in b[col]], col
    for col in ("sum", "mean", "std", "min", "max"):
        np.testing.assert_allclose(b[col], a[col], rtol=1e-4, atol=1e-7 * float(np.abs(a["max"]).max()), err_msg=col)
    for x, y in zip(a["hist"], b["hist"]):
        assert np.abs(np.asarray(x) - np.asarray(y)).sum() <= 2  # a score on a bin edge may round across it
    for x, y, top in zip(a["grid"], b["grid"], a["max"]):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-6 * abs(top))


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp_ranks_write_the_shards_of_one_process(world: int, tmp_path: Path) -> None:
    ids = _ids()
    cases = _cases(tmp_path / "fsdp")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"ids": ids, "cases": cases}))
    result = torchrun(world, [str(WORKER), str(spec)])
    assert result.returncode == 0, result.stdout[-4000:]
    for case in cases:
        one = tmp_path / "one" / Path(case["out"]).name
        compute_shards(build(case), architectures.tokenizer(), ids, params_of(case, "none"), one, Timings("t"), {})
        assert_same_shards(one, Path(case["out"]))
        kinds = [k for k in ("grad", "act_sq", "fisher") if sums.path_of(one, k).exists()]
        metrics = set(case["metrics"])
        assert kinds == ["grad", *(["act_sq"] if "wanda" in metrics else []),
                         *(["fisher"] if metrics & {"fisher", "taylor2"} else [])]
        for kind in kinds:  # the whole sums, gathered from the ranks' rows
            x, y = load_file(sums.path_of(one, kind)), load_file(sums.path_of(Path(case["out"]), kind))
            assert list(x) == list(y)
            for name in x:
                torch.testing.assert_close(y[name], x[name], rtol=1e-4, atol=1e-6 * float(x[name].abs().max()))


def test_the_stage_launches_its_ranks_which_read_their_own_rows(tmp_path: Path, tiny_tied_model_dir: Path,
                                                                 write_params) -> None:
    """`stages/sensitivity.py` with model.parallel fsdp and model.processes 3, run as `dvc repro`
    runs it: it starts torchrun itself; the tied tiny Llama is built empty and each rank reads its
    own rows from the safetensors file; the shards equal one process's."""
    base = {"texts": {"n_texts": 9, "max_length": 20}, "model": {"name": str(tiny_tied_model_dir)},
            "sensitivity": {"metrics": PLAIN, "micro_batch_size": 2, "keep": 30},
            "rank": {"k": 10}, "validate": {"k_values": [1, 10]}, "domains": {"top_n": 10, "per_tensor_k": 10}}
    params = write_params(base)
    stage = [sys.executable, "stages/sensitivity.py", "--prepared", str(tmp_path / "prep")]
    for cmd in ([sys.executable, "stages/prepare.py", "--params", str(params), "--source", "data/texts/corpus.jsonl",
                 "--out", str(tmp_path / "prep")], [*stage, "--params", str(params), "--out", str(tmp_path / "one")]):
        result = launched(cmd)
        assert result.returncode == 0, result.stdout[-4000:]
    fsdp = write_params({**base, "model": {**base["model"], "parallel": "fsdp", "processes": 3}}, "fsdp.yaml")
    result = launched([*stage, "--params", str(fsdp), "--out", str(tmp_path / "three")])
    assert result.returncode == 0, result.stdout[-4000:]
    assert "starting 3 processes" in result.stdout and "read each rank's rows of" in result.stdout
    assert_same_shards(tmp_path / "one", tmp_path / "three")


def test_a_rank_that_fails_takes_the_others_with_it(tmp_path: Path) -> None:
    case = {**_cases(tmp_path)[0], "die_on_rank": 1}
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"ids": _ids(), "cases": [case]}))
    result = torchrun(2, [str(WORKER), str(spec)], timeout=120)
    assert result.returncode != 0
    assert "rank 1 stops here" in result.stdout
    assert not Path(case["out"]).exists()  # nothing half-written


def test_merged_summaries_equal_one_summary_of_the_whole() -> None:
    """`scoring.merge` of row ranges (uneven, one empty) is the one-range summary: exact top and
    bottom (ties by index), counts, extremes, histogram, grid and expert maxima; the sum, mean and
    std to float32 rounding, as each chunk sums its rows in float32."""
    from critical_weights.sensitivity.accumulate import Accumulators

    g = torch.Generator().manual_seed(3)
    w = torch.randn(4, 6, 5, generator=g)  # 4 experts of (6, 5): 24 stored rows
    grad = torch.randn(4, 6, 5, generator=g).round(decimals=1)  # ties
    acc = Accumulators(grad={"w": grad})
    whole = scoring.summarise("grad_x_weight", "w", w, acc, 17, n_experts=4)
    parts = []
    for start, stop in ((0, 2), (2, 4), (4, 4)):  # dim-0 ranges of experts, the last empty
        part = Accumulators(grad={"w": grad[start:stop]})
        parts.append(scoring.summarise("grad_x_weight", "w", w[start:stop], part, 17, n_experts=4,
                                       rows_of=(start * 6, 24)))
    assert parts[-1] is None
    merged = scoring.merge([p for p in parts if p is not None], 17)
    for field in ("top_index", "top_score", "bottom_index", "bottom_score", "hist", "grid", "expert_max"):
        np.testing.assert_array_equal(getattr(merged, field), getattr(whole, field), err_msg=field)
    assert (merged.count, merged.zeros, merged.negatives) == (whole.count, whole.zeros, whole.negatives)
    assert (merged.minimum, merged.maximum) == (whole.minimum, whole.maximum)
    for field in ("total", "mean", "std"):  # float32 sums within each row, float64 across rows and ranges
        assert getattr(merged, field) == pytest.approx(getattr(whole, field), rel=1e-6), field
    np.testing.assert_allclose(merged.expert_sum, whole.expert_sum, rtol=1e-12)


def test_one_process_asked_to_shard_is_refused() -> None:
    from critical_weights.core.errors import ParamsError

    with pytest.raises(ParamsError, match="torchrun --nproc_per_node N"):
        sharded.check_world()


def test_a_failing_rank_under_the_stages_own_launch_ends_in_lines_not_tracebacks(tmp_path: Path, tiny_model_dir: Path,
                                                                                  write_params) -> None:
    """A checkpoint with a NaN weight: every rank finds out together (the rank holding it and
    the one that does not), each says it in one line, then the launch says which rank stopped.
    Mistakes the stage can see before it starts the ranks (a wrong model name, no prepared
    texts) are one line, and no rank starts."""
    nan_dir = tmp_path / "nan-model"
    nan_dir.mkdir()
    for f in tiny_model_dir.iterdir():
        (nan_dir / f.name).write_bytes(f.read_bytes())
    tensors = load_file(tiny_model_dir / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"][-1, 0] = float("nan")  # the last rows: rank 1's
    save_file(tensors, nan_dir / "model.safetensors")
    base = {"texts": {"n_texts": 9, "max_length": 20}, "model": {"name": str(tiny_model_dir)},
            "sensitivity": {"metrics": PLAIN, "keep": 30},
            "rank": {"k": 10}, "validate": {"k_values": [1, 10]}, "domains": {"top_n": 10, "per_tensor_k": 10}}
    prep = tmp_path / "prep"
    result = launched([sys.executable, "stages/prepare.py", "--params", str(write_params(base)), "--source",
                       "data/texts/corpus.jsonl", "--out", str(prep)])
    assert result.returncode == 0, result.stdout[-4000:]
    nan = write_params({**base, "model": {"name": str(nan_dir), "parallel": "fsdp", "processes": 2}}, "nan.yaml")
    stage = [sys.executable, "stages/sensitivity.py", "--out", str(tmp_path / "out")]
    result = launched([*stage, "--params", str(nan), "--prepared", str(prep)])
    assert result.returncode == 1
    assert "Traceback" not in result.stdout
    lines = [line for line in result.stdout.splitlines() if line.startswith("Error: ")]
    assert lines[-1] == "Error: model.parallel fsdp: rank 0 of 2 stopped with exit status 1; its error is above" or \
        lines[-1] == "Error: model.parallel fsdp: rank 1 of 2 stopped with exit status 1; its error is above"
    assert "1 parameter shards hold NaN or infinite weights" in lines[0]
    assert not (tmp_path / "out").exists()
    (tmp_path / "empty").mkdir()
    wrong = write_params({**base, "model": {"name": str(tmp_path / "nowhere"), "parallel": "fsdp", "processes": 2}},
                         "wrong.yaml")
    for params, prepared, message in (
            (wrong, prep, f"Error: model.name: '{tmp_path / 'nowhere'}' does not exist; expected smollm2-135m, a .gguf "
                          "file, a model folder in Hugging Face format, or a hub id owner/name"),
            (nan, tmp_path / "empty", f"Error: prepared texts {tmp_path / 'empty' / 'texts.parquet'} are missing; run "
                                      "the prepare stage (dvc repro)")):
        result = launched([*stage, "--params", str(params), "--prepared", str(prepared)])
        assert result.returncode == 1 and "starting" not in result.stdout  # refused before any rank starts
        assert [line for line in result.stdout.splitlines() if line.startswith("Error: ")] == [message]
