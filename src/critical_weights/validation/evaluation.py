"""The loss and perplexity of a model on a set of texts, forward only.

This is the one place that measures a model: `validate` uses it for every perturbation, and
any other stage that needs "how good is the model on these texts" should call `evaluate`
rather than write its own loop. L is exactly the loss `sensitivity` differentiates: the mean
next-token cross-entropy over every predicted token of every text, so each token weighs
the same and padding weighs nothing. Micro-batching never changes it beyond float rounding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from critical_weights.sensitivity.batching import make_batches
from critical_weights.sensitivity.loss import loss_sum_and_top1, pad_batch, perplexity, predicted_tokens


@dataclass(frozen=True)
class Evaluation:
    """What `evaluate` measured."""

    loss: float  # mean next-token cross-entropy, nats; NaN or inf if the model gives that
    perplexity: float  # exp(loss); inf when loss is not finite or too large
    n_texts: int
    n_tokens: int  # predicted tokens: every position but the first of each text


def mean_loss(model: torch.nn.Module, input_ids: Sequence[Sequence[int]], micro_batch_size: int = 8,
              batch_tokens: int = 0) -> float:
    """L over `input_ids`: the summed token cross-entropies (float64 on the host) over the
    number of predicted tokens."""
    return loss_and_top1(model, input_ids, micro_batch_size, batch_tokens)[0]


def loss_and_top1(model: torch.nn.Module, input_ids: Sequence[Sequence[int]], micro_batch_size: int = 8,
                  batch_tokens: int = 0) -> tuple[float, torch.Tensor]:
    """L over `input_ids`, and the model's top-1 next token at every predicted position, (N,)
    int64 on the CPU, in batch order (the same for the same texts and batching, so two models'
    predictions compare position by position)."""
    device = model.get_input_embeddings().weight.device
    total, n, top1 = 0.0, 0, []
    with torch.no_grad():
        for batch in make_batches([len(s) for s in input_ids], micro_batch_size, batch_tokens):
            ids, mask = pad_batch([list(input_ids[i]) for i in batch], device)  # (B, T) int64
            part, top = loss_sum_and_top1(model, ids, mask)  # summed over real tokens; (n,)
            total += float(part.double())
            n += int(mask[:, 1:].sum())
            top1.append(top.cpu())
    return total / n, torch.cat(top1)


def evaluate(model: torch.nn.Module, input_ids: Sequence[Sequence[int]], micro_batch_size: int = 8,
             batch_tokens: int = 0) -> Evaluation:
    """Loss and perplexity of `model` on `input_ids` (token-id lists of at least 2 tokens)."""
    loss = mean_loss(model, input_ids, micro_batch_size, batch_tokens)
    return Evaluation(loss, perplexity(loss) if math.isfinite(loss) else math.inf,
                      len(input_ids), predicted_tokens(input_ids))


def loss_record(loss: float, baseline: float) -> dict[str, Any]:
    """Loss, perplexity and increase over `baseline`; a non-finite value becomes null."""
    finite = math.isfinite(loss)
    ppl = perplexity(loss) if finite else math.inf
    return {"loss": loss if finite else None, "perplexity": ppl if math.isfinite(ppl) else None,
            "loss_increase": loss - baseline if finite else None, "finite": finite}
