"""The loss and perplexity of a model on a set of texts, forward only; and the model to
measure, loaded fresh and checked against the shards (`load_checked`).

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

import numpy as np
import pyarrow.compute as pc
import torch

from critical_weights import models
from critical_weights.batching import make_batches
from critical_weights.errors import ShardError
from critical_weights.loss import pad_batch, perplexity, predicted_tokens, token_loss_sum
from critical_weights.params import Params
from critical_weights.perturbation import flat_view
from critical_weights.selection import Plan


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
    device = model.get_input_embeddings().weight.device
    total, n = 0.0, 0
    with torch.no_grad():
        for batch in make_batches([len(s) for s in input_ids], micro_batch_size, batch_tokens):
            ids, mask = pad_batch([list(input_ids[i]) for i in batch], device)  # (B, T) int64
            total += float(token_loss_sum(model, ids, mask).double())  # summed over real tokens
            n += int(mask[:, 1:].sum())
    return total / n


def evaluate(model: torch.nn.Module, input_ids: Sequence[Sequence[int]], micro_batch_size: int = 8,
             batch_tokens: int = 0) -> Evaluation:
    """Loss and perplexity of `model` on `input_ids` (token-id lists of at least 2 tokens)."""
    loss = mean_loss(model, input_ids, micro_batch_size, batch_tokens)
    return Evaluation(loss, perplexity(loss) if math.isfinite(loss) else math.inf,
                      len(input_ids), predicted_tokens(input_ids))


def load_checked(params: Params, the_plan: Plan, ids: Sequence[Sequence[int]]) -> tuple[torch.nn.Module, torch.device]:
    """A fresh copy of the model, checked against the shards (every weight the plan uses must
    hold the value the shards recorded) and against `ids`, the token ids it will be given."""
    source = models.resolve_source(params.model.name)
    device, dtype = models.resolve_device(params.model)
    model = models.load_model(source, params.model, device, dtype)
    models.check_vocabulary(source.name, model, ids)
    weights = dict(model.named_parameters())
    expected = the_plan.expected
    for name in the_plan.touched:
        w = weights.get(name)
        if w is None or w.numel() != the_plan.sizes[name]:
            raise ShardError(f"parameter {name}: the shards describe {the_plan.sizes[name]} weights, the model "
                             f"{'none' if w is None else w.numel()}; rerun the sensitivity stage (dvc repro)")
        rows = expected.filter(pc.equal(expected["parameter"], name))
        index = torch.from_numpy(np.array(rows["flat_index"].to_numpy())).to(w.device)  # (n,) int64
        got = flat_view(w)[index].float().cpu().numpy()  # (n,) float32
        if not np.array_equal(got, rows["weight"].to_numpy(), equal_nan=True):
            raise ShardError(f"parameter {name}: the model's weights differ from those the shards recorded; "
                             "rerun the sensitivity stage (dvc repro)")
    return model, device
