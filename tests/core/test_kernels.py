"""CPU kernels and reproducibility: the sensitivity stage under pinned AVX2 kernels and under
this CPU's native ones (AVX-512 where it has them), each in a process of its own.

- Two pinned runs write byte-identical shards: the promise `dvc.lock` rests on.
- Pinned and native runs agree within what float32 arithmetic allows (see
  `conftest.float32_tolerance`): same code, other summation order.
- The shards record which kernels decided the rounding.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _cli import ROOT, write_params_file
from _tiny import float32_tolerance, tiny_params
from critical_weights.artifacts import shards
from critical_weights.core import kernels
from critical_weights.core.progress import Timings
from critical_weights.texts.stage import run_prepare

METRICS = ("grad_x_weight", "magnitude", "fisher")


def _env(kernel_setting: str | None) -> dict[str, str]:
    """This environment without the pins importing critical_weights put into it, so that the
    child decides its kernels itself; `kernel_setting` goes to CRITICAL_WEIGHTS_CPU_KERNELS."""
    env = {k: v for k, v in os.environ.items() if k not in kernels.PINNED and k != kernels.SWITCH}
    if kernel_setting is not None:
        env[kernels.SWITCH] = kernel_setting
    return env


def _sensitivity(folder: Path, prepared: Path, params_file: Path, kernel_setting: str | None) -> Path:
    out = folder / "sensitivity"
    done = subprocess.run(
        [sys.executable, str(ROOT / "stages" / "sensitivity.py"), "--params", str(params_file),
         "--prepared", str(prepared), "--out", str(out)],
        env=_env(kernel_setting), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return out


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _native_capability() -> str:
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    return subprocess.run([sys.executable, "-c", code], env=_env(None), capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("kernels")
    params = tiny_params(tiny_model_dir, sensitivity={"metrics": METRICS, "dense": True})
    params_file = write_params_file(folder / "params.yaml", params)
    prepared = folder / "prepared"
    run_prepare(Path(params.texts.source), params, prepared, Timings("prepare"))
    return {name: _sensitivity(folder / name, prepared, params_file, setting)
            for name, setting in (("pinned", None), ("pinned_again", "avx2"), ("native", "native"))}


def test_two_pinned_runs_are_byte_identical(runs):
    first, again = _files(runs["pinned"]), _files(runs["pinned_again"])
    assert list(first) == list(again)
    for name in first:
        assert first[name] == again[name], name


def test_the_shards_record_the_kernels(runs):
    pinned = shards.read_meta(runs["pinned"])["model"]["numerics"]
    native = shards.read_meta(runs["native"])["model"]["numerics"]
    assert pinned["cpu_kernels"] == "avx2" and pinned["cpu_capability"] == "AVX2"
    assert pinned["environment"] == kernels.PINNED
    assert native["cpu_kernels"] == "native" and native["cpu_capability"] == _native_capability()
    assert native["environment"] == {k: None for k in kernels.PINNED}
    for key in ("torch", "blas", "threads"):
        assert pinned[key] == native[key], key


def test_native_kernels_agree_within_float32_tolerance(runs, tiny_model_dir):
    from transformers import AutoConfig

    meta = shards.read_meta(runs["pinned"])
    native_meta = shards.read_meta(runs["native"])

    class _Config:  # float32_tolerance reads the model's config only
        config = AutoConfig.from_pretrained(tiny_model_dir)

    tol = float32_tolerance(_Config, meta["n_tokens"])
    np.testing.assert_allclose(native_meta["avg_loss"], meta["avg_loss"], rtol=tol)
    stats = shards.read_stats(runs["pinned"]).to_pylist()
    for index, name in dict.fromkeys((r["param_index"], r["parameter"]) for r in stats):
        ours = _dense(runs["pinned"], index, name)
        theirs = _dense(runs["native"], index, name)
        assert ours.keys() == theirs.keys() == set(METRICS)
        for metric, scores in ours.items():
            # fisher squares a gradient, so its relative error doubles
            t = 2 * tol if metric == "fisher" else tol
            np.testing.assert_allclose(theirs[metric], scores, rtol=t, atol=t * float(np.abs(scores).max()),
                                       err_msg=f"{name} {metric}")
        np.testing.assert_array_equal(theirs["magnitude"], ours["magnitude"])  # no arithmetic, no rounding


def _dense(folder: Path, index: int, name: str) -> dict[str, np.ndarray]:
    table = shards.read_dense(folder, index, name).to_pandas()
    return {m: part.sort_values("flat_index")["score"].to_numpy() for m, part in table.groupby("metric", sort=False)}
