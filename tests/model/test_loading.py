"""critical_weights.model.loading: the device and dtype, loading exactly the saved weights, and the
identity recorded in the outputs. (What `model.name` refers to: model/test_source.py.)"""

from __future__ import annotations

import hashlib
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file

from critical_weights.config.params import ModelParams
from critical_weights.core import kernels
from critical_weights.core.errors import ModelError, ParamsError
from critical_weights.model import loading
from critical_weights.model.source import ModelSource, pretrained_kwargs, resolve_source

CPU = ModelParams(device="cpu", dtype="float32")


def test_device_and_dtype_on_a_cpu_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert loading.resolve_device(ModelParams()) == (torch.device("cpu"), torch.float32)
    assert loading.resolve_device(ModelParams(dtype="bfloat16")) == (torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ParamsError) as info:
        loading.resolve_device(ModelParams(device="cuda", device_map="auto"))
    assert [p.split(":")[0] for p in info.value.problems] == ["model.device", "model.device_map"]
    with pytest.raises(ParamsError) as info:
        loading.resolve_device(ModelParams(dtype="float16"))
    assert info.value.problems == ["model.dtype: 'float16' is not supported on the CPU; allowed here: auto, float32, bfloat16"]


def test_load_model_gives_the_saved_weights_in_eval_mode(tiny_model_dir):
    source = resolve_source(str(tiny_model_dir))
    model = loading.load_model(source, CPU, torch.device("cpu"), torch.float32)
    assert not model.training
    assert model.config._attn_implementation == "sdpa"
    saved = load_file(str(tiny_model_dir / "model.safetensors"))
    params = dict(model.named_parameters())
    assert set(saved) <= set(params)
    for name, tensor in saved.items():
        assert torch.equal(params[name].detach(), tensor), name


def test_identity_names_the_files_by_sha256_and_the_architecture(tiny_model_dir):
    source = resolve_source(str(tiny_model_dir))
    model = loading.load_model(source, CPU, torch.device("cpu"), torch.float32)
    ident = loading.identity(source, model, torch.device("cpu"))
    weights = tiny_model_dir / "model.safetensors"
    assert ident["weight_sha256"] == {"model.safetensors": hashlib.sha256(weights.read_bytes()).hexdigest()}
    assert (ident["kind"], ident["architecture"], ident["model_type"]) == ("directory", "LlamaForCausalLM", "llama")
    assert (ident["n_blocks"], ident["hidden_size"], ident["dtype"], ident["device"]) == (2, 16, "float32", "cpu")
    assert ident["revision"] is None and ident["tie_word_embeddings"] is False
    assert ident["numerics"] == kernels.describe()


def test_non_finite_weights_are_counted_and_named(tiny_model):
    loading.check_finite_weights("m", tiny_model)
    with torch.no_grad():
        w = tiny_model.model.layers[1].mlp.down_proj.weight
        w[0, 0], w[3, 5] = float("nan"), float("inf")
    with pytest.raises(ModelError) as info:
        loading.check_finite_weights("m", tiny_model, chunk=7)  # the count crosses chunk borders
    assert str(info.value) == (f"model.name: m: parameter model.layers.1.mlp.down_proj.weight holds 2 NaN or infinite "
                               f"weight(s) of {w.numel()}; the checkpoint is corrupt")


def test_pickle_only_folders_need_allow_pickle(tmp_path, tiny_model_dir):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(tiny_model_dir / "config.json", folder / "config.json")
    torch.save({}, folder / "pytorch_model.bin")
    source = resolve_source(str(folder))
    with pytest.raises(ModelError, match="holds only pickle weights"):
        pretrained_kwargs(source, CPU)
    kwargs = pretrained_kwargs(source, ModelParams(allow_pickle=True))
    assert kwargs == {"trust_remote_code": False, "use_safetensors": False}


def test_custom_code_never_runs_unasked(tiny_model_dir):
    source = ModelSource("m", "directory", str(tiny_model_dir),
                                config={"model_type": "mine", "auto_map": {"AutoModelForCausalLM": "mine.Model"}})
    with pytest.raises(ModelError, match=r"needs its own Python code \(mine.Model"):
        pretrained_kwargs(source, CPU)
    assert pretrained_kwargs(source, ModelParams(trust_remote_code=True))["trust_remote_code"] is True


def test_special_token_ids_outside_the_vocabulary_are_warned_and_recorded(tiny_model, caplog):
    tiny_model.config.eos_token_id = 50256  # GPT-2's default, beyond the tiny model's 96 rows
    tiny_model.config.pad_token_id = 3
    with caplog.at_level(logging.WARNING, logger="critical_weights.model.loading"):
        assert loading.special_tokens_outside("tiny", tiny_model) == {"eos_token_id": 50256}
    assert "config eos_token_id = 50256 lies outside the vocabulary of 96" in caplog.text
    tiny_model.config.eos_token_id = [2, 99]
    assert loading.special_tokens_outside("tiny", tiny_model) == {"eos_token_id[1]": 99}
