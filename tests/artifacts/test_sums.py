"""The saved sums: a streaming writer that the safetensors library reads back bit for bit,
in any write order, and clear errors for a missing, incomplete or foreign file."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file
from safetensors import safe_open

from critical_weights.artifacts.sums import Sums, SumsWriter, path_of
from critical_weights.core.errors import ShardError


def _write(folder, tensors, order=None):
    writer = SumsWriter(path_of(folder, "grad"), {n: t.shape for n, t in tensors.items()}, {"kind": "grad"})
    for name in order or tensors:
        writer.write(name, tensors[name])
    writer.close()


def test_tensors_written_in_any_order_read_back_bit_for_bit_with_the_library(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"model.layers.0.mlp.down_proj.weight": rng.standard_normal((3, 5)).astype(np.float32),
               "model.layers.0.mlp.experts.down_proj": rng.standard_normal((2, 3, 4)).astype(np.float32),
               "model.layers.0.mlp.up_proj.act": rng.random(7).astype(np.float32)}
    tensors["model.layers.0.mlp.down_proj.weight"][0, 0] = -0.0
    _write(tmp_path, tensors, order=list(reversed(tensors)))
    back = load_file(str(path_of(tmp_path, "grad")))
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == np.float32 and back[name].shape == t.shape
        assert back[name].tobytes() == t.tobytes()
    with safe_open(str(path_of(tmp_path, "grad")), framework="numpy") as f:
        assert f.metadata() == {"kind": "grad"}
    sums = Sums(tmp_path)
    assert sums.kinds == ("grad",) and sums.has("grad", "model.layers.0.mlp.up_proj.act")
    assert sums.get("grad", "model.layers.0.mlp.experts.down_proj").tobytes() == tensors["model.layers.0.mlp.experts.down_proj"].tobytes()


def test_the_same_tensors_give_the_same_bytes(tmp_path):
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, dtype=np.float32)}
    _write(tmp_path / "one", tensors)
    _write(tmp_path / "two", tensors, order=["b", "a"])
    assert path_of(tmp_path / "one", "grad").read_bytes() == path_of(tmp_path / "two", "grad").read_bytes()


def test_a_tensor_never_written_fails_the_writer(tmp_path):
    writer = SumsWriter(path_of(tmp_path, "grad"), {"a": (2,), "b": (3,)}, {})
    writer.write("a", np.zeros(2, dtype=np.float32))
    with pytest.raises(RuntimeError, match="1 tensors never written, e.g. b"):
        writer.close()


def test_missing_or_foreign_sums_are_one_line_errors(tmp_path):
    with pytest.raises(ShardError, match="no saved sums; set sensitivity.save_sums true"):
        Sums(tmp_path)
    path_of(tmp_path, "grad").parent.mkdir()
    path_of(tmp_path, "grad").write_bytes(b"not a safetensors file")
    with pytest.raises(ShardError, match="not a readable safetensors file"):
        Sums(tmp_path)
    path_of(tmp_path, "grad").unlink()
    with pytest.raises(ShardError, match="grad.safetensors: missing"):
        Sums(tmp_path)
