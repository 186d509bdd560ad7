"""Data parallelism: `torchrun --nproc_per_node 2` on the CPU (gloo) gives one process's scores."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[2]
METRICS = ["grad_x_weight", "gradient", "fisher", "taylor2", "hutchinson", "wanda", "magnitude"]


def _run(args: list[str], cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"


def _dense(folder: Path) -> dict[tuple[str, str], np.ndarray]:
    out = {}
    for path in sorted((folder / "dense").glob("*.parquet")):
        table = pq.read_table(path).to_pandas()
        for (param, metric), part in table.groupby(["parameter", "metric"], sort=False):
            out[param, metric] = part.sort_values("flat_index")["score"].to_numpy()
    return out


@pytest.fixture
def prepared(tmp_path: Path, tiny_model_dir: Path, write_params) -> tuple[Path, Path]:
    params = write_params({
        "texts": {"n_texts": 9, "max_length": 20},
        "model": {"name": str(tiny_model_dir)},
        "sensitivity": {"metrics": METRICS, "micro_batch_size": 2, "keep": 50, "dense": True,
                        "hutchinson_probes": 3},
        "rank": {"k": 10},
        "validate": {"k_values": [1, 10]},
        "domains": {"top_n": 10, "per_tensor_k": 10},
    })
    _run([sys.executable, "stages/prepare.py", "--params", str(params),
          "--source", "data/texts/corpus.jsonl", "--out", str(tmp_path / "prepared")], ROOT)
    return params, tmp_path / "prepared"


def test_torchrun_two_processes_equal_one(tmp_path: Path, prepared: tuple[Path, Path]) -> None:
    params, prep = prepared
    stage = ["stages/sensitivity.py", "--params", str(params), "--prepared", str(prep)]
    _run([sys.executable, *stage, "--out", str(tmp_path / "one")], ROOT)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          *stage, "--out", str(tmp_path / "two")], ROOT)
    one, two = _dense(tmp_path / "one"), _dense(tmp_path / "two")
    assert one.keys() == two.keys()
    assert {m for _, m in one} == set(METRICS)
    for key in one:
        np.testing.assert_allclose(two[key], one[key], rtol=2e-4, atol=1e-9, err_msg=str(key))
    meta_one = pq.read_table(tmp_path / "one" / "stats.parquet").column("count").to_pylist()
    meta_two = pq.read_table(tmp_path / "two" / "stats.parquet").column("count").to_pylist()
    assert meta_one == meta_two
