"""evaluate: the loss is the sensitivity stage's L, whatever the batching."""

from __future__ import annotations

import math

import torch

from _tiny import build_tiny_model
from critical_weights.artifacts import prepared_texts, shards
from critical_weights.model import loading
from critical_weights.model.source import resolve_source
from critical_weights.validation.evaluation import evaluate, mean_loss


def test_mean_loss_is_the_sensitivity_loss_whatever_the_batching(validate_run, tiny_model_dir):
    prepared, sens, _, params = validate_run
    ids, _ = prepared_texts.read_prepared(prepared)
    model = loading.load_model(resolve_source(str(tiny_model_dir)), params.model, torch.device("cpu"), torch.float32)
    want = shards.read_meta(sens)["avg_loss"]
    for micro_batch in (1, 3, 8):
        torch.testing.assert_close(mean_loss(model, ids, micro_batch), want, rtol=1e-6, atol=0)


def test_evaluate_is_the_models_own_loss_with_perplexity_and_counts(tiny_ids):
    model = build_tiny_model()
    got = evaluate(model, tiny_ids, micro_batch_size=4)
    with torch.no_grad():
        total = sum(float(model(torch.tensor([s]), labels=torch.tensor([s])).loss) * (len(s) - 1) for s in tiny_ids)
    n = sum(len(s) - 1 for s in tiny_ids)
    torch.testing.assert_close(got.loss, total / n, rtol=1e-5, atol=0)
    assert got.perplexity == math.exp(got.loss) and got.n_texts == 6 and got.n_tokens == n
