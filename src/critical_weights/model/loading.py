"""Loading and identifying the causal language model that `critical_weights.model.source` found.

`resolve_source` (in `critical_weights.model.source`) says what `model.name` refers to; this
module loads the model on the asked device and dtype (`critical_weights.model.tokenization`
its tokenizer), checks the weights are finite and the special-token ids, and records the
model's identity and implementations for the outputs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from critical_weights.config.params import ModelParams
from critical_weights.core import kernels
from critical_weights.core.errors import ModelError, ParamsError, first_line
from critical_weights.model import gguf_cache, rows
from critical_weights.model.layout import is_experts_module
from critical_weights.model.source import LOAD_ERRORS, ModelSource, pretrained_kwargs

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(params: ModelParams) -> tuple[torch.device, torch.dtype]:
    """The device and dtype that `model.device` and `model.dtype` ask for on this machine.

    Raises ParamsError naming every setting this machine cannot honour; stages that need a
    device call it right after loading params, before any work."""
    cuda = torch.cuda.is_available()
    problems = []
    if params.device == "cuda" and not cuda:
        problems.append("model.device: 'cuda' but no CUDA device is visible on this machine; allowed here: auto, cpu")
    if params.device_map == "auto" and not cuda:
        problems.append("model.device_map: 'auto' spreads the model over GPUs, but no CUDA device is visible; allowed here: none")
    device = torch.device("cuda" if params.device == "cuda" or (params.device == "auto" and cuda) else "cpu")
    if params.dtype == "float16" and device.type == "cpu":
        problems.append("model.dtype: 'float16' is not supported on the CPU; allowed here: auto, float32, bfloat16")
    if problems:
        raise ParamsError(problems)
    if params.dtype == "auto":
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, DTYPES[params.dtype]


def load_model(source: ModelSource, params: ModelParams, device: torch.device, dtype: torch.dtype,
               whole_on_every_rank: bool = False) -> torch.nn.Module:
    """Load the causal LM in eval mode on `device` in `dtype`, with SDPA attention where the
    architecture supports it and its own default otherwise (Gemma-2 and gpt-oss refuse SDPA).

    With `model.parallel: fsdp`, a stage other than sensitivity holds the model whole: checked
    first (`rows.check_fits`); the sensitivity stage itself asks `whole_on_every_rank` where
    it must load the model whole before sharding it."""
    from transformers import AutoModelForCausalLM

    if params.parallel == "fsdp" and not whole_on_every_rank:
        rows.check_fits(source, device, dtype)

    location, kwargs = _cached_gguf_model(source, params)
    if params.device_map == "auto":
        kwargs["device_map"] = "auto"
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, attn_implementation="sdpa", **kwargs)
        except ValueError as err:
            if "scaled_dot_product_attention" not in str(err):
                raise
            log.info("%s does not support SDPA attention; using its default", source.name)
            model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **kwargs)
    except (*LOAD_ERRORS, RuntimeError) as err:
        raise ModelError(f"model.name: cannot load {source.name} as a causal LM ({first_line(err)})") from None
    log.info("attention implementation: %s", implementations(model))
    if params.device_map != "auto":
        model.to(device)
    model.eval()
    check_finite_weights(source.name, model)
    return model


def check_vocabulary(name: str, model: torch.nn.Module, input_ids: Sequence[Sequence[int]]) -> None:
    """Every token id fits the model's input embedding; else the texts were prepared for another model."""
    vocab = model.get_input_embeddings().weight.shape[0]
    if max(max(s) for s in input_ids) >= vocab:
        raise ModelError(f"model.name: the prepared token ids exceed {name}'s vocabulary of {vocab}; rerun prepare")


SPECIAL_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def special_tokens_outside(name: str, model: torch.nn.Module) -> dict[str, int]:
    """The config's special-token ids that no row of the input embedding holds, each warned
    about: a text that ended in such a token could not be embedded (this tool adds none, so the
    measurement stands; the manifest records them)."""
    vocab = model.get_input_embeddings().weight.shape[0]
    outside = {}
    for key in SPECIAL_TOKEN_IDS:
        value = getattr(model.config, key, None)
        for i, token in enumerate(value if isinstance(value, (list, tuple)) else [value]):
            if isinstance(token, int) and not 0 <= token < vocab:
                outside[key if not isinstance(value, (list, tuple)) else f"{key}[{i}]"] = token
    for key, token in outside.items():
        log.warning("model.name: %s: config %s = %d lies outside the vocabulary of %d; recorded in the manifest",
                    name, key, token, vocab)
    return outside


def check_finite_weights(name: str, model: torch.nn.Module, chunk: int = 1 << 24) -> None:
    """Every weight is finite; otherwise fail naming the first parameter that is not.

    One min/max reduction per parameter (NaN propagates through both, so finite extremes
    mean every weight is finite); only a failing parameter is counted, in chunks of `chunk`
    elements, so no full-size mask is ever allocated."""
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.device.type == "meta" or p.numel() == 0:
                continue  # offloaded by device_map; checked where it is loaded
            flat = p.detach().reshape(-1)  # (numel,) model dtype
            if bool(torch.isfinite(torch.stack(torch.aminmax(flat))).all()):
                continue
            bad = sum(int((~torch.isfinite(part)).sum()) for part in flat.split(chunk))
            if bad:
                raise ModelError(
                    f"model.name: {name}: parameter {pname} holds {bad} NaN or infinite weight(s) of {p.numel()}; "
                    "the checkpoint is corrupt"
                )


def identity(source: ModelSource, model: torch.nn.Module, device: torch.device) -> dict[str, Any]:
    """What exactly was measured: name, weight hashes or revision, architecture, dtype, device."""
    config = model.config
    files = {p.name: gguf_cache.sha256_file(p) for p in source.weight_files}  # hashed once per process
    return {
        "name": source.name,
        "kind": source.kind,
        "revision": getattr(config, "_commit_hash", None) if source.kind == "hub" else None,
        "weight_sha256": files,
        "architecture": (config.architectures or [type(model).__name__])[0],
        "model_type": config.model_type,
        "n_blocks": getattr(config, "num_hidden_layers", None),
        "hidden_size": getattr(config, "hidden_size", None),
        "vocab_size": getattr(config, "vocab_size", None),
        "special_tokens_outside_vocabulary": special_tokens_outside(source.name, model),
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "implementations": implementations(model),
        "device": device.type,
        "numerics": kernels.describe(),
    }


def implementations(model: torch.nn.Module) -> dict[str, str]:
    """The attention (and, for Mixture-of-Experts models, experts) implementation in use."""
    config = model.config
    out = {"attention": str(config._attn_implementation)}
    if getattr(config, "_experts_implementation", None) and any(is_experts_module(m) for m in model.modules()):
        out["experts"] = str(config._experts_implementation)
    return out


def use_implementations(model: torch.nn.Module, why: str, attention: str | None = None, experts: str | None = None) -> None:
    """Switch the attention and/or experts implementation for a metric that needs it, and log it."""
    before = implementations(model)
    if attention is not None and before["attention"] != attention:
        model.set_attn_implementation(attention)
    if experts is not None and before.get("experts") not in (None, experts):
        model.set_experts_implementation(experts)
    after = implementations(model)
    if after != before:
        log.info("%s: switching implementations %s -> %s", why, before, after)


def _cached_gguf_model(source: ModelSource, params: ModelParams) -> tuple[str, dict[str, Any]]:
    """Where from_pretrained should read the weights: for a GGUF file, the cached float32
    conversion (built on first use); otherwise the source itself."""
    from transformers import AutoModelForCausalLM

    kwargs = pretrained_kwargs(source, params)
    if source.gguf_file is None:
        return source.location, kwargs

    def convert(tmp: Path) -> None:
        gguf_cache.memoise_name_maps()
        try:
            model = AutoModelForCausalLM.from_pretrained(source.location, dtype=torch.float32, **kwargs)
        except (*LOAD_ERRORS, RuntimeError) as err:
            raise ModelError(f"model.name: cannot load {source.name} as a causal LM ({first_line(err)})") from None
        # the weights are already dequantised floats; only the GGUF marker blocks saving them
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            delattr(model.config, "quantization_config")
        model.save_pretrained(tmp, safe_serialization=True)

    cached = gguf_cache.cached_part(source.weight_files[0], "model", convert)
    if cached is None:
        gguf_cache.memoise_name_maps()
        return source.location, kwargs
    return str(cached), {"trust_remote_code": params.trust_remote_code, "use_safetensors": True}
