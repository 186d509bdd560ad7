"""Tiny models with a known super weight, and the helpers the superweights and projection tests
share."""

from __future__ import annotations

import numpy as np
import torch

import architectures


BLOCK, ROW, COL = 0, 5, 7  # the planted super weight: model.layers.0.mlp.down_proj (5, 7)


PNG = b"\x89PNG\r\n\x1a\n"


def plant(model: torch.nn.Module) -> torch.nn.Module:
    """Make residual channel 3 large (embeddings, untouched by block 0's attention), route it
    into down_proj input channel COL through gate and up, and make down_proj[ROW, COL] the
    only weight of that column: every token then spikes on input COL and output ROW."""
    layer = model.model.layers[BLOCK]
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 3] = 3.0
        layer.self_attn.o_proj.weight[3, :] = 0.0
        for proj in (layer.mlp.gate_proj, layer.mlp.up_proj):
            proj.weight[COL, :] = 0.0
            proj.weight[COL, 3] = 4.0
        layer.mlp.down_proj.weight[:, COL] = 0.0
        layer.mlp.down_proj.weight[ROW, COL] = 2.0
    return model


def ids(n: int = 3, vocab: int = 96) -> list[list[int]]:
    rng = np.random.default_rng(7)
    return [rng.integers(2, vocab, size=9 + i).tolist() for i in range(n)]


def moe_model(kind: str, vocab: int = 96) -> torch.nn.Module:
    """A tiny seeded MoE causal LM: mixtral (E, out, in) or gpt_oss (E, in, out)."""
    import transformers as tf

    torch.manual_seed(0)
    common = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  num_local_experts=4, num_experts_per_tok=2, vocab_size=vocab, max_position_embeddings=64,
                  pad_token_id=None, bos_token_id=None, eos_token_id=None)
    if kind == "mixtral":
        model = tf.MixtralForCausalLM(tf.MixtralConfig(intermediate_size=24, **common))
    else:
        model = tf.GptOssForCausalLM(tf.GptOssConfig(intermediate_size=24, head_dim=8, **common))
    return architectures.redraw(model).eval()


def conv1d_model(vocab: int = 96) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=vocab, n_positions=64,
                        bos_token_id=None, eos_token_id=None)
    model = GPT2LMHeadModel(config)
    return architectures.redraw(model).eval()
