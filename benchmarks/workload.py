"""The benchmark's workload: Llama-shaped models with seeded random weights, random token ids,
and the tokenizer, prepared texts and params that the pipeline reads. Nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

# LlamaConfig keyword arguments per size. Every size has untied embeddings, like Llama-3.1-8B.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048),
    "small": dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048),
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                         rms_norm_eps=1e-5, rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    # Mixture-of-Experts, Qwen3-MoE-shaped (experts stored as 3-D tensors): Qwen3-30B-A3B's
    # widths and expert size, with half its blocks and experts, so it is about 8B weights
    "tiny-moe": dict(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     num_experts=4, num_experts_per_tok=2, max_position_embeddings=2048),
    "qwen3-moe-8b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                         num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                         num_experts=64, num_experts_per_tok=8, max_position_embeddings=32768,
                         rms_norm_eps=1e-6, rope_theta=1000000.0),
}
MOE_SIZES = ("tiny-moe", "qwen3-moe-8b")  # built with Qwen3MoeConfig; the others with LlamaConfig
# Llama-3.1-8B: 7 matrices per block x 32 blocks + embed_tokens + lm_head.
# qwen3-moe-8b: per block q, k, v, o, the router and two 3-D expert tensors, x 24, + embed_tokens + lm_head.
EXPECTED = {"llama-3.1-8b": (226, 8_029_995_008), "qwen3-moe-8b": (170, 8_326_217_728)}
DEFAULT_MICRO_BATCH = {"llama-3.1-8b": 4, "qwen3-moe-8b": 4}  # fit 72 GiB with fp32 sums by estimate; see RESULTS.md
INIT_STD = 0.02  # Llama's initializer_range


# ---------------------------------------------------------------- model, inputs, tokenizer

def build_config(size: str):
    from transformers import LlamaConfig, Qwen3MoeConfig

    config_class = Qwen3MoeConfig if size in MOE_SIZES else LlamaConfig
    config = config_class(tie_word_embeddings=False, pad_token_id=None, bos_token_id=None, eos_token_id=None,
                          **SIZES[size])
    config._attn_implementation = "sdpa"
    return config


def matrix_counts(model: torch.nn.Module) -> tuple[int, int, int]:
    """(weight tensors of ndim >= 2, weights in them, weights in them but the input embedding)."""
    embed = model.get_input_embeddings().weight
    mats = [p for p in model.parameters() if p.ndim >= 2]
    n = sum(p.numel() for p in mats)
    return len(mats), n, n - (embed.numel() if any(p is embed for p in mats) else 0)


def active_weights(model: torch.nn.Module) -> int:
    """Weights one token multiplies, but the input embedding: of each 3-D expert tensor only
    the share num_experts_per_tok / num_experts (all of every other tensor)."""
    _, _, n = matrix_counts(model)
    experts = sum(p.numel() for p in model.parameters() if p.ndim == 3)
    share = getattr(model.config, "num_experts_per_tok", 1) / getattr(model.config, "num_experts", 1)
    return n - experts + round(experts * share)


def build_model(size: str, device: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """The causal LM of `size`, built on `device` in `dtype`, weights of ndim >= 2 ~ N(0, 0.02) from `seed`.

    The parameters are created on the device itself (no CPU copy of an 8B model); on the
    meta device nothing is allocated, which checks shapes and counts for free."""
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(build_config(size), dtype=dtype)
    if device.type != "meta":
        gen = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            for _, p in model.named_parameters():  # fixed order, so the weights follow from the seed
                if p.ndim >= 2:
                    p.normal_(0.0, INIT_STD, generator=gen)
                else:
                    p.fill_(1.0)  # RMSNorm scales
    n_mats, n_weights, _ = matrix_counts(model)
    if size in EXPECTED and (n_mats, n_weights) != EXPECTED[size]:
        raise AssertionError(f"{size}: {n_mats} matrices holding {n_weights:,} weights, expected "
                             f"{EXPECTED[size][0]} holding {EXPECTED[size][1]:,}")
    return model.eval()


def random_ids(n_seq: int, seq_len: int, vocab: int, seed: int) -> list[list[int]]:
    """(n_seq, seq_len) token ids, uniform over the vocabulary, from `seed`."""
    return np.random.default_rng(seed).integers(0, vocab, size=(n_seq, seq_len)).tolist()


def build_tokenizer(vocab: int):
    """WordLevel tokenizer whose token i is the word `t<i>`, built offline; no special tokens."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel(vocab={f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0")


def as_text(ids: list[int]) -> str:
    """The text that `build_tokenizer` turns back into exactly `ids`."""
    return " ".join(f"t{i}" for i in ids)


def write_prepared(folder: Path, ids: list[list[int]], tokenizer: Any, seed: int, seq_len: int) -> dict[str, str]:
    """What the prepare stage would write for these ids: texts.parquet with its metadata, and the tokenizer."""
    from critical_weights.artifacts import prepared_texts
    from critical_weights.texts import sources

    prepared = sources.PreparedTexts(list(range(len(ids))), [as_text(s) for s in ids], ids, len(ids))
    meta = {
        "source": "benchmarks/bench.py random ids", "n_available": str(len(ids)), "n_texts": str(len(ids)),
        "n_tokens": str(sum(len(s) for s in ids)), "text_sha256": prepared_texts.text_set_hash(ids),
        "params": json.dumps({"seed": seed, "texts": {"source": "random", "n_texts": len(ids), "max_length": seq_len},
                              "model.name": "random"}, sort_keys=True),
    }
    prepared_texts.write_prepared(folder, prepared, meta)
    tokenizer.save_pretrained(folder / prepared_texts.TOKENIZER_DIR)
    return meta


def bench_params(n_seq: int, seq_len: int, micro_batch: int, batch_tokens: int, keep: int, k: int,
                 metrics: tuple[str, ...], seed: int, device: str, checkpointing: bool = False, model_name: str = "random",
                 texts_source: str = "") -> dict:
    """A params.yaml as a dict; parse_params validates it like the stages do."""
    return {
        "seed": seed,
        "texts": {"source": texts_source or "data/texts/corpus.jsonl", "n_texts": n_seq, "max_length": seq_len},
        "model": {"name": model_name, "dtype": "auto", "device": device},
        "sensitivity": {"metrics": list(metrics), "micro_batch_size": micro_batch, "batch_tokens": batch_tokens,
                        "keep": keep, "checkpointing": checkpointing},
        "rank": {"metric": metrics[0], "mode": "per_tensor", "k": k},
        "validate": {"k_values": sorted({1, min(k, keep), keep})},
        "domains": {"top_n": min(100, keep), "per_tensor_k": min(100, keep)},
    }
