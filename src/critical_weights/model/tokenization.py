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
from collections.abc import Sequence
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


def check_against_file(source: ModelSource, tokenizer: Any, texts: Sequence[str]) -> None:
    """A folder's tokenizer.json is what its tokenizer is: the class transformers picked for it
    must split `texts` into the same tokens (special tokens aside), or one line names both."""
    file = Path(source.location) / "tokenizer.json"
    if source.kind != "directory" or not file.is_file():
        return
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(file))
    differ = sum(raw.encode(t, add_special_tokens=False).ids != list(tokenizer(t, add_special_tokens=False)["input_ids"])
                 for t in texts)
    if differ:
        raise ModelError(f"model.name: {source.name}: transformers loads its tokenizer as {type(tokenizer).__name__}, "
                         f"which splits {differ} of {len(texts)} texts differently from the folder's tokenizer.json; "
                         f'set "tokenizer_class": "{PLAIN_CLASS}" in its tokenizer_config.json to use the file as it is')


def check_reloads(folder: Path, texts: Sequence[str], input_ids: Sequence[Sequence[int]], max_length: int) -> None:
    """The tokenizer saved in `folder`, loaded as later stages load it, gives `input_ids` again."""
    again = load_saved(folder)
    differ = sum(list(again(t)["input_ids"])[:max_length] != list(ids) for t, ids in zip(texts, input_ids))
    if differ:
        raise ModelError(f"prepare: the saved tokenizer reloads as {type(again).__name__} and tokenises {differ} of "
                         f"{len(texts)} texts differently from the tokenizer that prepared them; this model's tokenizer "
                         "does not survive save_pretrained")


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
