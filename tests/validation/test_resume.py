"""Resuming at a block: the same bits as a full forward pass on every architecture, the right
first block, a check that catches a wrong start, and a memory budget that keeps fewer blocks."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from architectures import ARCHITECTURES, build
from critical_weights.validation.evaluation import loss_and_top1
from critical_weights.validation.resume import Resumable, first_block


def _same_bits(got: tuple[float, torch.Tensor], want: tuple[float, torch.Tensor]) -> None:
    assert got[0] == want[0], f"loss {got[0]!r} != {want[0]!r}"
    assert torch.equal(got[1], want[1])


def _block_weight(model: torch.nn.Module, block: int) -> tuple[str, torch.Tensor]:
    """The first weight matrix inside `block`."""
    for name, p in model.named_parameters():
        if f".{block}." in name and p.ndim >= 2:
            return name, p
    raise AssertionError(f"no weight in block {block}")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_resuming_at_a_block_gives_the_bits_of_a_full_pass(arch, tiny_ids):
    model = build(arch)
    texts = Resumable(model, tiny_ids, 2)
    _same_bits(texts.baseline(), loss_and_top1(model, tiny_ids, 2))
    name, weight = _block_weight(model, 1)
    assert first_block(model, [name]) == 1
    with torch.no_grad():
        weight.mul_(-1.5)  # a large change, so a stale hidden state could not hide
    try:
        want = loss_and_top1(model, tiny_ids, 2)
        _same_bits(texts.measure(1), want)
        assert texts.checked == {1} and not texts.refused, "the measurement must really have resumed"
        _same_bits(texts.measure(1), want)
    finally:
        with torch.no_grad():
            weight.div_(-1.5)


def test_first_block_is_the_lowest_touched_block_and_zero_outside_the_blocks():
    model = build("llama")
    assert first_block(model, ["model.layers.1.mlp.down_proj.weight"]) == 1
    assert first_block(model, ["model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight"]) == 0
    assert first_block(model, ["model.layers.1.mlp.up_proj.weight", "model.embed_tokens.weight"]) == 0
    assert first_block(model, ["lm_head.weight"]) == 0, "the head sits after the blocks, but is not resumed past"
    assert first_block(model, ["model.norm.weight"]) == 0
    assert first_block(build("gpt2"), ["transformer.h.1.attn.c_attn.weight"]) == 1


def test_a_start_after_the_change_is_caught_and_measured_in_full(tiny_ids, caplog):
    model = build("llama")
    texts = Resumable(model, tiny_ids, 2)
    texts.baseline()
    name, weight = _block_weight(model, 0)
    with torch.no_grad():
        weight.mul_(-1.5)
    try:
        with caplog.at_level(logging.WARNING):
            got = texts.measure(1)  # wrong: the change is in block 0
        _same_bits(got, loss_and_top1(model, tiny_ids, 2))
    finally:
        with torch.no_grad():
            weight.div_(-1.5)
    assert texts.refused and "does not reproduce its full forward pass" in caplog.text
    _same_bits(texts.measure(1), loss_and_top1(model, tiny_ids, 2))  # refused: every block runs from then on


def test_past_the_memory_budget_every_rth_block_is_kept_and_resumed_from(tiny_ids):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=16, intermediate_size=24, num_hidden_layers=6,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         pad_token_id=None, bos_token_id=None, eos_token_id=None)
    model = LlamaForCausalLM(config).eval()
    padded = 2 * 20 + 2 * 14 + 2 * 7  # tiny_ids in micro-batches of 2, longest first: (20, 17) (14, 9) (7, 5)
    texts = Resumable(model, tiny_ids, 2, keep_bytes=padded * 16 * 4 * 2)  # two blocks' inputs fit
    assert texts.every == 3
    texts.baseline()
    assert sorted(texts.kept) == [3]
    assert [t.shape for t in texts.kept[3]] == [(2, 20, 16), (2, 14, 16), (2, 7, 16)]
    name, weight = _block_weight(model, 4)
    with torch.no_grad():
        weight.mul_(-1.5)
    _same_bits(texts.measure(first_block(model, [name])), loss_and_top1(model, tiny_ids, 2))
    assert texts.checked == {3}, "block 4 resumes from the nearest kept block, 3"
