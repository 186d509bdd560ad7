"""A model too big for one process: built empty, sharded, then each rank reads only its own
rows of every weight from the safetensors files.

`empty_model` builds the architecture on the meta device, buffers kept real (rotary
`inv_freq` and the like are computed, not stored), and ties the embeddings again (accelerate's
`init_empty_weights` leaves them untied). After FSDP2 has sharded it (`sensitivity.sharded`),
`fill` allocates each rank's shards (`to_empty` wipes buffers too, so they are put back) and
copies in rows `start .. start + n` of dim 0, read with safetensors' `get_slice`.

It needs the checkpoint's tensors under the model's own names and shapes. Where transformers
converts a checkpoint while loading it (per-expert tensors fused into 3-D ones, renamed keys),
or the weights are GGUF or pickle, `empty_model` says why and the caller loads the model whole
on every rank before sharding it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from critical_weights.config.params import ModelParams
from critical_weights.core.errors import ModelError, first_line
from critical_weights.model.source import LOAD_ERRORS, ModelSource, pretrained_kwargs

log = logging.getLogger(__name__)
FLOATS = ("F32", "F16", "BF16")  # safetensors dtypes read as they are


def checkpoint_index(source: ModelSource) -> dict[str, tuple[Path, tuple[int, ...], str]]:
    """Every tensor of the source's safetensors files: name -> (file, shape, safetensors dtype);
    only the files `model.safetensors.index.json` names, where there is one (a folder may also
    hold a consolidated copy); empty for a hub id, GGUF or pickle weights."""
    from safetensors import safe_open

    if source.gguf_file is not None or source.kind not in ("directory", "embedded"):
        return {}
    folder = Path(source.location)
    files = sorted(folder.glob("*.safetensors"))
    listing = folder / "model.safetensors.index.json"
    if listing.is_file():
        named = set(json.loads(listing.read_text(encoding="utf-8")).get("weight_map", {}).values())
        files = [f for f in files if f.name in named]
    index = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                held = f.get_slice(key)
                index[key] = (path, tuple(held.get_shape()), held.get_dtype())
    return index


def empty_model(source: ModelSource, params: ModelParams, dtype: torch.dtype
                ) -> tuple[torch.nn.Module | None, dict[str, tuple[Path, tuple[int, ...], str]], str]:
    """(model on the meta device with real buffers, the checkpoint index, "") when every
    parameter can be read by name and shape as plain floats; else (None, {}, why it must load whole)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    index = checkpoint_index(source)
    if not index:
        return None, {}, "its weights are not local safetensors files"
    kwargs = {k: v for k, v in pretrained_kwargs(source, params).items() if k in ("trust_remote_code", "revision")}
    try:
        config = AutoConfig.from_pretrained(source.location, **kwargs)
        if getattr(config, "quantization_config", None):
            return None, {}, "its checkpoint is quantised, and transformers dequantises it while loading"
        with init_empty_weights(include_buffers=False):
            try:
                model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa", **kwargs)
            except ValueError as err:
                if "scaled_dot_product_attention" not in str(err):
                    raise
                model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    except (*LOAD_ERRORS, RuntimeError) as err:
        raise ModelError(f"model.name: cannot build {source.name} from its config ({first_line(err)})") from None
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    for name, p in model.named_parameters():
        held = index.get(name)
        if held is None or held[1] != tuple(p.shape):
            why = "is not in its files" if held is None else f"is stored {held[1]}, the model has {tuple(p.shape)}"
            return None, {}, f"parameter {name} {why} (transformers converts this checkpoint while loading it)"
        if held[2] not in FLOATS:
            return None, {}, f"parameter {name} is stored as {held[2]}, which transformers converts while loading it"
    return model.eval(), index, ""


def dim0_range(p: torch.Tensor) -> tuple[int, int]:
    """(first index, length) along dim 0 of this rank's shard of a DTensor parameter, by torch's
    own helper (a private module of the pinned torch: tests/sensitivity/fsdp_worker.py checks
    every rank's rows against the whole tensor, so a change fails loudly)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return offset[0], shape[0]


def fill(module: torch.nn.Module, model: torch.nn.Module, index: dict[str, tuple[Path, tuple[int, ...], str]],
         device: torch.device) -> None:
    """Allocate the sharded `module` (holding `model`) on `device`, put back `model`'s buffers,
    and read each parameter's own rows from the checkpoint."""
    from safetensors import safe_open

    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    module.to_empty(device=device)
    with torch.no_grad(), contextlib.ExitStack() as files:
        handles: dict[Path, Any] = {}
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
        for name, p in model.named_parameters():
            path = index[name][0]
            if path not in handles:
                handles[path] = files.enter_context(safe_open(path, framework="pt"))
            start, n = dim0_range(p)
            local = p.to_local()
            if n:
                local.copy_(handles[path].get_slice(name)[start : start + n].to(local.dtype))
    log.info("read each rank's rows of %d parameters from %d safetensors file(s)",
             len(list(model.parameters())), len(handles))


def whole_bytes(source: ModelSource, dtype: torch.dtype) -> int | None:
    """Bytes of every tensor of the checkpoint in `dtype`; None where the files are not local safetensors."""
    index = checkpoint_index(source)
    if not index:
        return None
    size = torch.empty((), dtype=dtype).element_size()
    return sum(math.prod(shape) for _, shape, _ in index.values()) * size


def free_bytes(device: torch.device) -> int | None:
    """Free memory of a CUDA device, or the host's available memory for the CPU; None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_fits(source: ModelSource, device: torch.device, dtype: torch.dtype) -> None:
    """With `model.parallel: fsdp` only the sensitivity stage shards; a later stage holds the model
    whole in one process. Say so, and stop with one line where its weights alone exceed the
    memory free on `device`."""
    need, free = whole_bytes(source, dtype), free_bytes(device)
    size = f" ({need / 2**30:.1f} GiB in {str(dtype).removeprefix('torch.')})" if need else " (its size is not known beforehand)"
    log.info("model.parallel fsdp shards the sensitivity stage only; this stage holds %s whole in one process%s",
             source.name, size)
    if need is not None and free is not None and need > free:
        raise ModelError(
            f"model.name: {source.name} needs {need / 2**30:.1f} GiB of weights in {str(dtype).removeprefix('torch.')} "
            f"on one process, and {device.type} has {free / 2**30:.1f} GiB free; model.parallel fsdp shards only the "
            "sensitivity stage (docs/scale.md): run this stage on a machine whose device holds the model")
