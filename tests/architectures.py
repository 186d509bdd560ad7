"""The test matrix: one tiny causal LM per architecture family, built from transformers' own
config classes with seeded weights (no download).

Sizes: hidden 16, 2 blocks, 2 heads, intermediate 24 (MoE: 4 experts, 2 per token), vocabulary
VOCAB. Every weight of ndim >= 2 is drawn from N(0, 0.2^2) and every 1-D parameter keeps its
initial value plus N(0, 0.05^2), so no gradient is pure float noise and norms are not all one.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

VOCAB = 96

_COMMON = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2,
               num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
               tie_word_embeddings=False, pad_token_id=None, bos_token_id=None, eos_token_id=None)
_MOE = dict(num_experts_per_tok=2)


def _configs(vocab: int = VOCAB) -> dict[str, Callable]:
    import transformers as T

    c = {**_COMMON, "vocab_size": vocab}
    return {
        "llama": lambda: T.LlamaConfig(**c),
        "qwen2": lambda: T.Qwen2Config(**c),
        "qwen3": lambda: T.Qwen3Config(**c, head_dim=8),
        "mistral": lambda: T.MistralConfig(**c),
        "olmo2": lambda: T.Olmo2Config(**c),
        "gemma2": lambda: T.Gemma2Config(**c, head_dim=8, final_logit_softcapping=1.0),
        "gemma3_text": lambda: T.Gemma3TextConfig(**c, head_dim=8, final_logit_softcapping=1.0),
        "phi3": lambda: T.Phi3Config(**c),
        "gpt2": lambda: T.GPT2Config(vocab_size=vocab, n_embd=16, n_layer=2, n_head=2, n_positions=64,
                                     bos_token_id=None, eos_token_id=None),
        "gpt_neox": lambda: T.GPTNeoXConfig(vocab_size=vocab, hidden_size=16, intermediate_size=24,
                                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64,
                                            tie_word_embeddings=False, bos_token_id=None, eos_token_id=None),
        "granite": lambda: T.GraniteConfig(**c, logits_scaling=4.0),
        "cohere": lambda: T.CohereConfig(**c, logit_scale=0.5),
        "mixtral": lambda: T.MixtralConfig(**c, **_MOE, num_local_experts=4),
        "qwen2_moe": lambda: T.Qwen2MoeConfig(**c, **_MOE, num_experts=4, moe_intermediate_size=12,
                                              shared_expert_intermediate_size=20),
        "qwen3_moe": lambda: T.Qwen3MoeConfig(**c, **_MOE, num_experts=4, moe_intermediate_size=12, head_dim=8),
        "olmoe": lambda: T.OlmoeConfig(**c, **_MOE, num_experts=4),
        "gpt_oss": lambda: T.GptOssConfig(**c, **_MOE, num_local_experts=4, head_dim=8),
    }


ARCHITECTURES = tuple(_configs())
MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss")


def build(arch: str, seed: int = 0, vocab: int = VOCAB) -> torch.nn.Module:
    """The tiny causal LM of `arch`, float32, eval mode, seeded weights."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_configs(vocab)[arch]()).to(torch.float32).eval()
    return redraw(model, vector_noise=0.05)


def redraw(model: torch.nn.Module, vector_noise: float = 0.0) -> torch.nn.Module:
    """Every weight of ndim >= 2 drawn anew from N(0, 0.2^2) from torch's global generator and,
    with `vector_noise`, N(0, vector_noise^2) added to the others (norms, biases), in
    parameter order, so the first forward already shows large, varied activations."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.2)
            elif vector_noise:
                p.add_(torch.randn_like(p), alpha=vector_noise)
    return model


def tokenizer():
    """A WordLevel tokenizer of VOCAB tokens `t0` .. `t95`, built offline (for decoding rows)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel(vocab={f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0")


def build_gemma3_multimodal(seed: int = 0) -> torch.nn.Module:
    """A tiny Gemma3ForConditionalGeneration: its blocks sit at `model.language_model.layers.N`
    beside a one-layer vision tower."""
    import transformers as T
    from transformers import AutoModelForCausalLM

    text = T.Gemma3TextConfig(**{**_COMMON, "vocab_size": VOCAB}, head_dim=8, final_logit_softcapping=1.0)
    vision = T.SiglipVisionConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=28, patch_size=14)
    config = T.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                            boi_token_index=VOCAB - 3, eoi_token_index=VOCAB - 2, image_token_index=VOCAB - 1)
    torch.manual_seed(seed)
    return redraw(AutoModelForCausalLM.from_config(config).to(torch.float32).eval())


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models have no work worth splitting between threads; one thread keeps these tests
    quick on a busy machine. Results do not depend on it (tolerances are float32 bounds)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
