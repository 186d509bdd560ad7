"""A tiny Llama GGUF file written with the `gguf` package: float32, float16 and Q8_0 tensors,
and a byte-level BPE vocabulary, so that transformers dequantises and converts it exactly as
it does a real GGUF. Random weights from a seed; nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np

HIDDEN, INTER, BLOCKS, HEADS, KV_HEADS = 32, 64, 2, 2, 1  # Q8_0 needs rows that are multiples of 32


def byte_tokens() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in kept:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    import gguf

    rng = np.random.default_rng(seed)
    tokens = [*byte_tokens(), "<|endoftext|>"]
    vocab, head_dim = len(tokens), HIDDEN // HEADS
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(BLOCKS)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([1] * (vocab - 1) + [3])
    w.add_token_merges([])
    w.add_bos_token_id(vocab - 1)
    w.add_eos_token_id(vocab - 1)

    def tensor(name: str, shape: tuple[int, ...], kind: str = "f32") -> None:
        a = rng.normal(0.0, 0.2, size=shape).astype(np.float32)
        if kind == "f16":
            w.add_tensor(name, a.astype(np.float16))
        elif kind == "q8_0":
            q = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(name, gguf.quantize(a, q), raw_shape=gguf.quant_shape_to_byte_shape(a.shape, q), raw_dtype=q)
        else:
            w.add_tensor(name, a)

    tensor("token_embd.weight", (vocab, HIDDEN))
    for b in range(BLOCKS):
        tensor(f"blk.{b}.attn_norm.weight", (HIDDEN,))
        tensor(f"blk.{b}.attn_q.weight", (HIDDEN, HIDDEN), "q8_0")
        tensor(f"blk.{b}.attn_k.weight", (KV_HEADS * head_dim, HIDDEN), "f16")
        tensor(f"blk.{b}.attn_v.weight", (KV_HEADS * head_dim, HIDDEN))
        tensor(f"blk.{b}.attn_output.weight", (HIDDEN, HIDDEN), "q8_0")
        tensor(f"blk.{b}.ffn_norm.weight", (HIDDEN,))
        tensor(f"blk.{b}.ffn_gate.weight", (INTER, HIDDEN), "q8_0")
        tensor(f"blk.{b}.ffn_up.weight", (INTER, HIDDEN), "f16")
        tensor(f"blk.{b}.ffn_down.weight", (HIDDEN, INTER), "q8_0")
    tensor("output_norm.weight", (HIDDEN,))
    tensor("output.weight", (vocab, HIDDEN))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
