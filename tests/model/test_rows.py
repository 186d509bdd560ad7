"""Loading without the whole model on every rank: the model built empty with real buffers and
tied weights, the checkpoint read by name and shape (or the reason it cannot be), and the check
that a later stage's whole model fits its process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from critical_weights.config.params import ModelParams
from critical_weights.core.errors import ModelError
from critical_weights.model import rows
from critical_weights.model.source import resolve_source


def test_empty_model_is_on_meta_with_real_buffers_and_tied_weights(tiny_tied_model_dir: Path):
    model, index, why = rows.empty_model(resolve_source(str(tiny_tied_model_dir)), ModelParams(), torch.float32)
    assert why == "" and model is not None
    assert all(p.device.type == "meta" for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    buffers = dict(model.named_buffers())
    assert buffers and all(b.device.type == "cpu" and torch.isfinite(b).all() for b in buffers.values())
    assert set(index) >= {n for n, _ in model.named_parameters()}
    assert all(index[n][1] == tuple(p.shape) for n, p in model.named_parameters())


def test_a_checkpoint_transformers_would_convert_loads_whole_with_the_reason(tmp_path: Path, tiny_model_dir: Path):
    folder = tmp_path / "renamed"
    folder.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.suffix != ".safetensors":
            (folder / f.name).write_bytes(f.read_bytes())
    tensors = load_file(tiny_model_dir / "model.safetensors")
    tensors["model.layers.0.mlp.fused_proj.weight"] = tensors.pop("model.layers.0.mlp.up_proj.weight")
    save_file(tensors, folder / "model.safetensors")
    model, index, why = rows.empty_model(resolve_source(str(folder)), ModelParams(), torch.float32)
    assert model is None and index == {}
    assert why == "parameter model.layers.0.mlp.up_proj.weight is not in its files (transformers converts this checkpoint while loading it)"


def test_whole_bytes_counts_every_tensor_in_the_dtype(tiny_model_dir: Path):
    source = resolve_source(str(tiny_model_dir))
    n = sum(t.numel() for t in load_file(tiny_model_dir / "model.safetensors").values())
    assert rows.whole_bytes(source, torch.float32) == 4 * n
    assert rows.whole_bytes(source, torch.bfloat16) == 2 * n


def test_a_model_too_big_for_one_process_stops_a_later_stage_in_one_line(tiny_model_dir: Path, monkeypatch):
    source = resolve_source(str(tiny_model_dir))
    monkeypatch.setattr(rows, "free_bytes", lambda device: 1000)
    with pytest.raises(ModelError) as info:
        rows.check_fits(source, torch.device("cpu"), torch.float32)
    message = str(info.value)
    assert "\n" not in message and "on one process, and cpu has 0.0 GiB free" in message
    assert "model.parallel fsdp shards only the sensitivity stage" in message
    monkeypatch.setattr(rows, "free_bytes", lambda device: 1 << 40)
    rows.check_fits(source, torch.device("cpu"), torch.float32)  # fits: says so in the log only
