"""critical_weights.model.source: what `model.name` refers to, decided without loading, and the
names that are neither a local model nor a hub id refused with what is allowed. (Hub look-ups,
offline and unreachable, are in test_errors.py.)"""

from __future__ import annotations

import json
import shutil

import pytest

from critical_weights.core.errors import ModelError
from critical_weights.model.source import _check_causal, KINDS, resolve_source


def test_a_model_folder_is_a_directory_source_with_its_weight_files(tiny_model_dir):
    source = resolve_source(str(tiny_model_dir))
    assert source.kind == "directory" and source.location == str(tiny_model_dir) and source.gguf_file is None
    assert source.weight_files == [tiny_model_dir / "model.safetensors"]
    assert source.config["architectures"] == ["LlamaForCausalLM"]


def test_a_gguf_path_is_a_gguf_source(tmp_path):
    from _gguf import write_tiny_gguf

    path = write_tiny_gguf(tmp_path / "m.gguf")
    source = resolve_source(str(path))
    assert (source.kind, source.location, source.gguf_file) == ("gguf", str(tmp_path), "m.gguf")
    assert source.weight_files == [path]


@pytest.mark.parametrize("name, why", [
    ("./nowhere", "does not exist"),
    ("a/b/c", "does not exist"),
    ("plain-word", "does not exist"),
])
def test_names_that_are_neither_local_nor_a_hub_id(name, why):
    with pytest.raises(ModelError) as info:
        resolve_source(name)
    assert str(info.value) == f"model.name: {name!r} {why}; expected {KINDS}"


def test_a_folder_without_weights_or_with_an_encoder(tmp_path, tiny_model_dir):
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(tiny_model_dir / "config.json", folder / "config.json")
    with pytest.raises(ModelError, match=r"holds no weights \(no \*.safetensors or pytorch_model.bin\)$"):
        resolve_source(str(folder))
    (folder / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}), encoding="utf-8")
    with pytest.raises(ModelError, match=r"is a BertModel, not a causal language model"):
        resolve_source(str(folder))


@pytest.mark.parametrize("config, causal", [
    ({"architectures": ["LlamaForCausalLM"]}, True),
    ({"architectures": ["GPT2LMHeadModel"]}, True),
    ({"architectures": ["SomeNewForCausalLM"]}, True),  # by its suffix, even unknown to transformers
    ({"model_type": "llama"}, True),  # no architectures: the model type decides
    ({"architectures": ["X"], "auto_map": {"AutoModelForCausalLM": "m.X"}}, True),
    ({"architectures": ["BertForMaskedLM"], "model_type": "bert"}, False),
    ({"model_type": "t5"}, False),
])
def test_check_causal(config, causal):
    if causal:
        _check_causal("m", config)
    else:
        with pytest.raises(ModelError, match="not a causal language model"):
            _check_causal("m", config)
