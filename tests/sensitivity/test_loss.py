"""critical_weights.sensitivity.loss: L is the model's own mean next-token cross-entropy over every real
token, whatever the padding. (Every architecture against model(labels=...) is in
test_architectures.py; gradients against autograd by hand are in test_accumulate.py.)"""

from __future__ import annotations

import math

import pytest
import torch

from critical_weights.core.errors import ModelError, NumericalError
from critical_weights.sensitivity import loss

EPS32 = torch.finfo(torch.float32).eps


def test_pad_batch_pads_right_with_a_mask():
    ids, mask = loss.pad_batch([[5, 6, 7], [8]], torch.device("cpu"))
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert ids.dtype == mask.dtype == torch.int64


def test_token_loss_sum_is_the_models_own_loss_times_the_tokens(tiny_model, tiny_ids):
    ids, mask = loss.pad_batch(tiny_ids, torch.device("cpu"))
    with torch.no_grad():
        got = loss.token_loss_sum(tiny_model, ids, mask)
        labels = ids.masked_fill(mask == 0, -100)  # padding predicts nothing
        want = tiny_model(input_ids=ids, attention_mask=mask, labels=labels).loss.double()
    n = loss.predicted_tokens(tiny_ids)
    assert got.dtype == torch.float32
    # one float32 sum of n terms against the model's float32 mean: a few ulps of the total per term
    assert float(got) / n == pytest.approx(float(want), rel=8 * n * EPS32)


def test_padding_changes_nothing(tiny_model, tiny_ids):
    with torch.no_grad():
        alone = sum(float(loss.token_loss_sum(tiny_model, *loss.pad_batch([s], torch.device("cpu")))) for s in tiny_ids)
        padded = float(loss.token_loss_sum(tiny_model, *loss.pad_batch(tiny_ids, torch.device("cpu"))))
    assert padded == pytest.approx(alone, rel=8 * loss.predicted_tokens(tiny_ids) * EPS32)


def test_output_logits_are_the_models_logits(tiny_model, tiny_ids):
    ids = torch.tensor([tiny_ids[1]])
    with torch.no_grad():
        hidden = loss.base_model(tiny_model)(input_ids=ids)[0][0]  # (T, C)
        got = loss.output_logits(tiny_model, hidden)
        want = tiny_model(input_ids=ids).logits[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert loss.base_model(tiny_model) is tiny_model.model  # and it was put back


def test_a_model_without_a_base_model_is_named():
    with pytest.raises(ModelError, match="^Linear has no base model below its output head"):
        loss.base_model(torch.nn.Linear(2, 2))


def test_a_non_finite_loss_names_its_micro_batch():
    loss.check_finite_loss(torch.tensor(3.0), 0)
    with pytest.raises(NumericalError) as info:
        loss.check_finite_loss(torch.tensor(float("inf")), 4)
    assert str(info.value) == "the loss of micro-batch 4 is inf; try model.dtype float32"


def test_perplexity():
    assert loss.perplexity(0.0) == 1.0 and loss.perplexity(math.log(14.4)) == pytest.approx(14.4, rel=1e-15)
    assert loss.perplexity(800.0) == math.inf
