"""Loading a model's tokenizer, without importing torch where its files allow.

transformers' auto classes import torch (about 1.5 s) even to read a tokenizer. A folder
whose tokenizer_config.json names the plain `TokenizersBackend` class, as a GGUF's converted
tokenizer and every folder `prepare` saved from one do, is read through that class itself,
exactly as `AutoTokenizer` would read it after looking the class up; any other folder goes
through `AutoTokenizer`. So `prepare` on a GGUF model whose tokenizer is in the cache (every
run after the first) never imports torch; converting it the first time does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from critical_weights.config.params import ModelParams
from critical_weights.core.errors import ModelError, first_line
from critical_weights.model import gguf_cache
from critical_weights.model.source import LOAD_ERRORS, ModelSource, pretrained_kwargs

PLAIN_CLASS = "TokenizersBackend"  # a tokenizer.json and nothing model-specific


def load_tokenizer(source: ModelSource, params: ModelParams) -> Any:
    """The model's own tokenizer; for a GGUF file, converted once and then read from the cache."""
    kwargs = pretrained_kwargs(source, params)

    def convert() -> Any:
        from transformers import AutoTokenizer

        gguf_cache.memoise_name_maps()
        try:
            return AutoTokenizer.from_pretrained(source.location, **kwargs)
        except LOAD_ERRORS as err:
            raise ModelError(f"model.name: cannot load a tokenizer from {source.name} ({first_line(err)})") from None

    if source.gguf_file is None:
        return convert()
    cached = gguf_cache.cached_part(source.weight_files[0], "tokenizer", lambda tmp: convert().save_pretrained(tmp))
    return load_saved(cached) if cached is not None else convert()


def load_saved(folder: Path) -> Any:
    """The tokenizer that `save_pretrained` wrote to `folder`."""
    if _saved_class(folder) == PLAIN_CLASS:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend

        return TokenizersBackend.from_pretrained(folder)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _saved_class(folder: Path) -> str | None:
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # AutoTokenizer says what is wrong
    return config.get("tokenizer_class") if isinstance(config, dict) else None
