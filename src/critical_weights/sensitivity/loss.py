"""The loss: L, the mean next-token cross-entropy over every predicted token of every sequence.

Each token weighs the same and padding weighs nothing. Micro-batch b contributes
(sum of its token losses) / N, where N is the number of predicted tokens in the whole set,
so summing the micro-batch gradients gives dL/dW exactly, whatever the batching. The logits
are the model's own, through its own output path (`output_logits`), so L equals what
`model(..., labels=...)` gives for the same tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from critical_weights.core.errors import ModelError, NumericalError

LOGITS_BUDGET_BYTES = 1 << 28  # float32 logits held at once; above this the head runs in chunks


def predicted_tokens(input_ids: Sequence[Sequence[int]]) -> int:
    """Every position but the first of each sequence is predicted."""
    return sum(len(s) - 1 for s in input_ids)


def pad_batch(seqs: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask, both (B, T) int64."""
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[b, : len(s)] = 1
    return ids.to(device), mask.to(device)


class _HiddenOnly:
    """Made into a transformers output class on first use (`_hidden_only`): only
    `last_hidden_state` is set, and every other field (router logits, attentions, cache, ...)
    reads None."""

    def __getattr__(self, name: str) -> None:
        if name.startswith("__"):
            raise AttributeError(name)
        return None


def _hidden_only() -> type:
    global _HIDDEN_ONLY
    if _HIDDEN_ONLY is None:
        from transformers.modeling_outputs import BaseModelOutputWithPast  # transformers loads lazily

        _HIDDEN_ONLY = type("HiddenOnly", (_HiddenOnly, BaseModelOutputWithPast), {})
    return _HIDDEN_ONLY


_HIDDEN_ONLY: type | None = None


class _GivenHidden(torch.nn.Module):
    """Stands in for the base model: hands back the hidden states it is given as inputs_embeds."""

    def forward(self, *args: Any, inputs_embeds: torch.Tensor | None = None, **kwargs: Any) -> Any:
        return _hidden_only()(last_hidden_state=inputs_embeds)


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model below the output head (`model.model`, `transformer`, `gpt_neox`, ...)."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if not isinstance(base, torch.nn.Module) or base is model:
        raise ModelError(f"{type(model).__name__} has no base model below its output head; cannot compute its logits")
    return base


def output_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The model's own logits for final hidden states (n, C) -> (n, V), model dtype.

    Runs the model's own forward with its base model swapped for one that returns `hidden`,
    so everything the model does after its blocks happens exactly as in `model(...)`: the
    output head, Gemma's final_logit_softcapping, Granite's logits_scaling, Cohere's
    logit_scale, and whatever a future architecture adds."""
    prefix = model.base_model_prefix
    base = base_model(model)
    setattr(model, prefix, _GivenHidden())
    try:
        out = model(inputs_embeds=hidden.unsqueeze(0), use_cache=False)
    finally:
        setattr(model, prefix, base)
    return out.logits[0]


def check_output_path(model: torch.nn.Module, ids: Sequence[int], max_tokens: int = 32,
                      dtype: torch.dtype | None = None) -> None:
    """The logits of the scoring path equal `model(input_ids).logits` on (the start of) one text.

    A guard for architectures whose forward does something after its base model that
    `output_logits` would miss. Tolerance: 1e-3 of the largest |logit| (at least 8 ulp of the
    model's dtype, or of `dtype` where the model computes in another than it stores, as under
    FSDP), far below what a skipped soft-capping or logit scale changes (percents)."""
    batch = torch.tensor([list(ids[:max_tokens])], device=model.get_input_embeddings().weight.device)  # (1, T)
    with torch.no_grad():
        theirs = model(input_ids=batch, use_cache=False).logits[0].float()  # (T, V)
        hidden = base_model(model)(input_ids=batch, use_cache=False)[0][0]  # (T, C)
        ours = output_logits(model, hidden).float()  # (T, V)
    scale = float(theirs.abs().max())
    tol = max(1e-3, 8 * torch.finfo(dtype or next(model.parameters()).dtype).eps) * scale
    worst = float((ours - theirs).abs().max())
    if not worst <= tol:
        raise ModelError(
            f"model.name: {type(model).__name__}: the logits through its output head differ from model(...).logits "
            f"by {worst:.3g} (largest |logit| {scale:.3g}); this architecture's output path is not supported"
        )


def _chunk_ce(model: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # hidden (n, C), targets (n,) -> summed cross-entropy, float32 scalar
    return F.cross_entropy(output_logits(model, hidden).float(), targets, reduction="sum")


def final_hidden(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The base model's final hidden states of a padded batch, (B, T, C) in the model's dtype."""
    return base_model(model)(input_ids=ids, attention_mask=mask, use_cache=False)[0]


def _predicting(hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden states of the real predicting positions (n, C) and their targets (n,)."""
    valid = mask[:, 1:].bool()  # (B, T-1): position t predicts token t+1
    return hidden[:, :-1][valid], ids[:, 1:][valid]


def _chunk_rows(model: torch.nn.Module) -> int:
    """Predicting positions per chunk: their float32 logits fit LOGITS_BUDGET_BYTES."""
    return max(1, LOGITS_BUDGET_BYTES // (4 * model.get_output_embeddings().weight.shape[0]))


def head_loss_sum(model: torch.nn.Module, hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies over the real tokens, from the final hidden states
    (float32 scalar, differentiable twice). The model's own output path (`output_logits`) runs
    on the real predicting positions only; past LOGITS_BUDGET_BYTES of float32 logits it runs
    in chunks that are recomputed in backward, so the full logits never exist at once."""
    h, y = _predicting(hidden, ids, mask)
    chunk = _chunk_rows(model)
    if h.shape[0] <= chunk:
        return _chunk_ce(model, h, y)
    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk):
        part = torch.utils.checkpoint.checkpoint(
            _chunk_ce, model, h[start : start + chunk], y[start : start + chunk], use_reentrant=False
        )
        total = total + part
    return total


def loss_sum_and_top1(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward only: `token_loss_sum`'s value (the same chunks, summed in the same order, so the
    same bits) and the model's top-1 next token at each real predicting position, (n,) int64 in
    the order of `mask`'s real positions."""
    h, y = _predicting(final_hidden(model, ids, mask), ids, mask)  # (n, C), (n,)
    chunk = _chunk_rows(model)
    total, top1 = None, []
    for start in range(0, h.shape[0], chunk):
        logits = output_logits(model, h[start : start + chunk]).float()  # (m, V) float32
        part = F.cross_entropy(logits, y[start : start + chunk], reduction="sum")
        total = part if total is None else total + part
        top1.append(logits.argmax(dim=-1))
    return total, torch.cat(top1)


def token_loss_sum(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies over the real tokens of a padded batch (float32 scalar)."""
    return head_loss_sum(model, final_hidden(model, ids, mask), ids, mask)


def head_parameters(model: torch.nn.Module) -> set[int]:
    """ids of the parameters the output path uses after the base model (the head's weight, which
    may be the tied input embedding): in `backward_in_two` their gradient comes in pieces."""
    prefix = model.base_model_prefix
    return {id(p) for path, m in model.named_modules() if path != prefix and not path.startswith(prefix + ".")
            for p in m.parameters(recurse=False)}


def backward_in_two(model: torch.nn.Module, hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """Backward of `scale` x the summed token loss, split at the final hidden states `hidden`
    (the graph of `final_hidden`); returns the summed loss (float32 scalar, no graph).

    First the output path, chunk by chunk of LOGITS_BUDGET_BYTES float32 logits, each chunk
    backward on its own into the head's weights and dL/dhidden; then one backward of the base
    model from dL/dhidden. The gradients are those of one backward of the whole loss; but the
    logits (several copies of n x vocabulary floats) are gone before the base model's backward
    starts, nothing is computed twice, and a weight used in both parts (a tied embedding) gets
    its gradient in two or more pieces, which the caller sums (`accumulate._GradSink`)."""
    h, y = _predicting(hidden.detach(), ids, mask)  # (n, C), (n,)
    h.requires_grad_(True)  # a leaf: the chunks' backward stops here
    chunk = _chunk_rows(model)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, h.shape[0], chunk):
        part = _chunk_ce(model, h[start : start + chunk], y[start : start + chunk])
        (part * scale).backward()
        total += part.detach()
    if h.grad is not None:
        grad = torch.zeros_like(hidden)  # (B, T, C): padding and the last positions predict nothing
        grad[:, :-1][mask[:, 1:].bool()] = h.grad
        hidden.backward(grad)
    return total


def check_finite_loss(loss: torch.Tensor, batch: int) -> None:
    if not torch.isfinite(loss):
        raise NumericalError(f"the loss of micro-batch {batch} is {loss.item()}; try model.dtype float32")


def perplexity(avg_loss: float) -> float:
    return math.exp(avg_loss) if avg_loss < 700 else math.inf
