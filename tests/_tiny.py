"""The one place tests build what they run on: tiny seeded Llama models from a config, a
WordLevel tokenizer, a model folder on disk, params pointed at it, and a copy of the project.

Nothing here downloads anything: the tokenizer is a WordLevel vocabulary built offline from
the project's own corpus, and the weights come from `torch.manual_seed`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from critical_weights.config.params import Params

ROOT = Path(__file__).parents[1]
CORPUS = ROOT / "data" / "texts" / "corpus.jsonl"

VOCAB = 96  # vocabulary of the in-memory tiny models


def tiny_config(vocab_size: int = VOCAB, tie: bool = False, attn: str = "sdpa"):
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        tie_word_embeddings=tie, pad_token_id=None, bos_token_id=None, eos_token_id=None,
    )
    config._attn_implementation = attn
    return config


def build_tiny_model(vocab_size: int = VOCAB, tie: bool = False, attn: str = "sdpa", seed: int = 0):
    """A tiny Llama causal LM with seeded float32 weights, in eval mode."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(vocab_size, tie, attn)).to(torch.float32).eval()
    with torch.no_grad():
        # the default init leaves norms at 1 and uses a small std; spread the weights a little
        # so that scores differ clearly from one weight to the next
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.2)
    return model


def corpus_words() -> list[str]:
    """Every word of the corpus as the Whitespace pre-tokenizer splits it, sorted."""
    from tokenizers.pre_tokenizers import Whitespace

    pre = Whitespace()
    words: set[str] = set()
    with open(CORPUS, encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["text"]
            words.update(w for w, _ in pre.pre_tokenize_str(text))
    return sorted(words)


def build_tokenizer():
    """A WordLevel tokenizer over the corpus words, with [UNK] and [PAD], built offline."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1}
    for w in corpus_words():
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


def save_model_dir(folder: Path, model: torch.nn.Module | None = None, tie: bool = False) -> Path:
    """A Hugging Face model folder (safetensors + the corpus tokenizer) holding `model`, or
    a tiny Llama with the tokenizer's vocabulary (tied embeddings with `tie`)."""
    tokenizer = build_tokenizer()
    if model is None:
        model = build_tiny_model(vocab_size=len(tokenizer), tie=tie)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


EPS32 = float(np.finfo(np.float32).eps)


def float32_tolerance(model: torch.nn.Module, n_tokens: int) -> float:
    """How far a float32 run may be from float64, relative to a tensor's largest value.

    A float32 sum of m terms errs by at most about m * eps times the sum of their magnitudes
    (the standard bound for recursive summation). Every gradient entry is a sum over the
    predicted tokens of terms that went through reductions over the hidden size, the MLP width
    and the vocabulary, so m is at most their total. An entry near cancellation keeps the
    error of its larger summands, so the bound is relative to the tensor's scale, not to each
    entry: that is why an elementwise rtol fails on some CPUs and this does not."""
    c = model.config
    return (n_tokens + c.hidden_size + c.intermediate_size + c.vocab_size) * EPS32


def tiny_params(model_dir: Path, **sections) -> Params:
    """Params() defaults pointed at a tiny model folder and the project corpus, small enough for
    tests; `sections` replace fields section by section, e.g. rank={"k": 3}."""
    from dataclasses import replace

    from critical_weights.config.params import Params

    base = Params()
    base = replace(
        base,
        texts=replace(base.texts, source=str(CORPUS), n_texts=8, max_length=24),
        model=replace(base.model, name=str(model_dir), device="cpu", dtype="float32"),
        sensitivity=replace(base.sensitivity, keep=40, dense=True),
        rank=replace(base.rank, k=10),
        validate=replace(base.validate, k_values=(1, 10)),
        superweights=replace(base.superweights, top_k=10, n_texts=4),
        domains=replace(base.domains, top_n=10, per_tensor_k=5),
    )
    for section, fields in sections.items():
        if section == "seed":
            base = replace(base, seed=fields)
        else:
            base = replace(base, **{section: replace(getattr(base, section), **fields)})
    return base


def run_prepare_and_sensitivity(folder: Path, params) -> tuple[Path, Path]:
    """Run the two model stages through the library; return (prepared, sensitivity) folders."""
    from critical_weights.sensitivity.stage import run_sensitivity
    from critical_weights.texts.stage import run_prepare
    from critical_weights.core.progress import Timings

    prepared, sens = folder / "prepared", folder / "sensitivity"
    run_prepare(Path(params.texts.source), params, prepared, Timings("prepare"))
    run_sensitivity(prepared, params, sens, Timings("sensitivity"))
    return prepared, sens


SHARD_METRICS = ("grad_x_weight", "magnitude", "fisher", "wanda")


def copy_project(repo: Path) -> Path:
    """Copy what `dvc repro` needs of this project (pipeline, stages, library, corpus, DVC
    config) into a new folder `repo`; the caller sets params and makes it a git repo."""
    import shutil

    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, repo / name)
    for folder in ("stages", "src", "data/texts"):
        shutil.copytree(ROOT / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (repo / ".dvc").mkdir()
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    shutil.copytree(ROOT / ".dvc" / "plots", repo / ".dvc" / "plots")  # the project's plot templates
    (repo / ".gitignore").write_text("/logs/\n")
    return repo
