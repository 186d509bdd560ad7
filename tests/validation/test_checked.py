"""critical_weights.validation.checked: the model is loaded only if it holds exactly the weights
the shards recorded, has the sizes they describe, and fits every token id it will be given."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from _tiny import tiny_params
from critical_weights.core.errors import ModelError, ShardError
from critical_weights.validation.checked import load_checked

NAME = "model.layers.0.mlp.down_proj.weight"  # (16, 32) in the tiny Llama


def expected(model_dir, flat: list[int], shift: float = 0.0) -> pa.Table:
    from safetensors.torch import load_file

    w = load_file(model_dir / "model.safetensors")[NAME].reshape(-1)
    return pa.table({"parameter": [NAME] * len(flat), "flat_index": flat,
                     "weight": pa.array([float(w[i]) + shift for i in flat], pa.float32())})


def test_the_model_that_holds_the_recorded_weights_loads(tiny_model_dir):
    params = tiny_params(tiny_model_dir)
    model, device = load_checked(params.model, {NAME: 512}, expected(tiny_model_dir, [0, 7, 511]), [[1, 2, 3]])
    assert device == torch.device("cpu") and model.get_parameter(NAME).shape == (16, 32)


def test_another_size_or_other_weights_say_rerun_sensitivity(tiny_model_dir):
    params = tiny_params(tiny_model_dir)
    with pytest.raises(ShardError, match=rf"parameter {NAME}: the shards describe 100 weights, the model 512; "
                                         r"rerun the sensitivity stage \(dvc repro\)"):
        load_checked(params.model, {NAME: 100}, expected(tiny_model_dir, [0]), [[1, 2]])
    with pytest.raises(ShardError, match=r"weights differ from those the shards recorded"):
        load_checked(params.model, {NAME: 512}, expected(tiny_model_dir, [0, 5], shift=1.0), [[1, 2]])
    with pytest.raises(ShardError, match=r"parameter missing.weight: the shards describe 4 weights, the model none"):
        load_checked(params.model, {"missing.weight": 4}, expected(tiny_model_dir, []), [[1, 2]])


def test_a_token_id_beyond_the_vocabulary_is_refused(tiny_model_dir):
    params = tiny_params(tiny_model_dir)
    with pytest.raises(ModelError):
        load_checked(params.model, {}, expected(tiny_model_dir, []), [[1, 10**6]])
