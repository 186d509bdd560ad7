"""sensitivity.checkpointing: blocks recomputed in backward give the same bits, count nothing twice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import architectures
from critical_weights.core.errors import ModelError
from critical_weights.sensitivity.accumulate import accumulate, scored_parameters
from critical_weights.sensitivity.recompute import checkpointed_blocks

STORES = ("grad", "fisher", "hutchinson", "act_sq", "router_picks", "router_tokens")


@pytest.fixture(scope="module")
def ids() -> list[list[int]]:
    rng = np.random.default_rng(5)
    return [rng.integers(0, architectures.VOCAB, n).tolist() for n in (6, 13, 9, 16)]


def _both(model, ids, metrics, micro_batch_size):
    params = scored_parameters(model, "weights")
    plain = accumulate(model, ids, params, metrics, micro_batch_size, hutchinson_probes=2)[0]
    with checkpointed_blocks(model) as n_blocks:
        recomputed = accumulate(model, ids, params, metrics, micro_batch_size, hutchinson_probes=2)[0]
    assert n_blocks == model.config.num_hidden_layers
    return plain, recomputed


@pytest.mark.parametrize("arch, metrics, micro_batch_size", [
    ("llama", ["grad_x_weight", "wanda"], 2),
    ("llama", ["fisher"], 1),
    ("gpt2", ["grad_x_weight", "wanda"], 3),
    ("mixtral", ["grad_x_weight", "wanda"], 2),  # router picks and expert norms: hooks inside the blocks
])
def test_recomputed_blocks_give_the_same_bits(ids, arch, metrics, micro_batch_size):
    plain, recomputed = _both(architectures.build(arch), ids, metrics, micro_batch_size)
    for store in STORES:
        ours, theirs = getattr(recomputed, store), getattr(plain, store)
        assert ours.keys() == theirs.keys(), store
        for name in theirs:
            assert torch.equal(ours[name], theirs[name]), f"{store} {name}"
    assert recomputed.loss_sum == plain.loss_sum
    assert plain.act_sq or metrics == ["fisher"]


def test_hutchinson_double_backward_goes_through_recomputed_blocks(ids):
    model = architectures.build("llama")
    model.config._attn_implementation = "eager"  # double backward
    plain, recomputed = _both(model, ids, ["hutchinson"], 2)
    for name, h in plain.hutchinson.items():
        assert torch.equal(recomputed.hutchinson[name], h), name
        assert bool(h.abs().sum() > 0)


def test_blocks_get_their_own_forward_back(ids):
    model = architectures.build("llama")
    block = model.model.layers[0]
    with pytest.raises(RuntimeError, match="boom"):
        with checkpointed_blocks(model):
            assert "forward" in vars(block)
            raise RuntimeError("boom")
    assert "forward" not in vars(block)


def test_a_forward_set_on_the_instance_is_put_back(ids):
    """accelerate (model.device_map auto) replaces a block's forward on the instance; it must
    survive the context, and run inside it."""
    model = architectures.build("llama")
    block = model.model.layers[1]
    calls = []
    original = block.forward

    def hooked(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    block.forward = hooked
    plain, recomputed = _both(model, ids, ["grad_x_weight"], 4)
    assert block.forward is hooked and calls
    for name, g in plain.grad.items():
        assert torch.equal(recomputed.grad[name], g), name


def test_a_model_without_a_block_list_is_one_line():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3))
    with pytest.raises(ModelError, match=r"^sensitivity.checkpointing: Sequential has no list of blocks to "
                                         r"checkpoint; set sensitivity.checkpointing false$"):
        with checkpointed_blocks(model):
            pass
