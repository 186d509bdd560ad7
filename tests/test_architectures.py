"""Every architecture of the matrix is scored exactly: the loss is the model's own, and the
dense grad_x_weight is |w * dL/dw| from autograd of that loss for every weight of ndim >= 2.

Tolerances follow from float32 arithmetic: L is a mean of N cross-entropies, each a sum over
the vocabulary; two evaluations of it in different order differ by a few ulp of each term.
"""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pytest
import torch

import architectures
from architectures import ARCHITECTURES, VOCAB, build
from conftest import tiny_params
from critical_weights import sensitivity, shards
from critical_weights.pipeline import compute_shards
from critical_weights.progress import Timings
from critical_weights.sensitivity import pad_batch, scored_parameters, token_loss_sum

EPS32 = torch.finfo(torch.float32).eps
LENGTHS = (5, 12, 9, 16)


@pytest.fixture(scope="module")
def ids() -> list[list[int]]:
    rng = np.random.default_rng(11)
    return [rng.integers(0, VOCAB, size=n).tolist() for n in LENGTHS]


def _model_loss(model: torch.nn.Module, ids: list[list[int]]) -> torch.Tensor:
    """transformers' own loss: model(input_ids, labels=...) with padding labelled -100."""
    batch, mask = pad_batch(ids, torch.device("cpu"))
    return model(input_ids=batch, attention_mask=mask, labels=batch.masked_fill(mask == 0, -100)).loss


def _tol(loss: torch.Tensor) -> float:
    # each token's cross-entropy is a log-sum-exp over VOCAB logits: a few ulp of each, and
    # the mean over N tokens adds at most N ulp of the total
    n = sum(n - 1 for n in LENGTHS)
    return float(8 * (VOCAB + n) * EPS32 * max(1.0, abs(float(loss))))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_loss_is_the_models_own(arch, ids, monkeypatch):
    """L (one micro-batch, and in logit chunks of 3 positions) equals model(..., labels=...)."""
    model = build(arch)
    batch, mask = pad_batch(ids, torch.device("cpu"))
    n = int(mask[:, 1:].sum())
    with torch.no_grad():
        theirs = _model_loss(model, ids)
        ours = token_loss_sum(model, batch, mask) / n
        monkeypatch.setattr(sensitivity, "LOGITS_BUDGET_BYTES", 4 * VOCAB * 3)
        chunked = token_loss_sum(model, batch, mask) / n
    torch.testing.assert_close(ours, theirs, atol=_tol(theirs), rtol=0)
    torch.testing.assert_close(chunked, theirs, atol=_tol(theirs), rtol=0)


@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text", "granite", "cohere"])
def test_the_logit_transform_matters_in_these_fixtures(arch, ids):
    """The head alone (no soft-capping or scaling) gives another loss: the test above bites."""
    model = build(arch)
    batch, mask = pad_batch(ids, torch.device("cpu"))
    with torch.no_grad():
        hidden = model.base_model(input_ids=batch, attention_mask=mask)[0][:, :-1][mask[:, 1:].bool()]
        head_only = torch.nn.functional.cross_entropy(model.lm_head(hidden), batch[:, 1:][mask[:, 1:].bool()])
        theirs = _model_loss(model, ids)
    assert abs(float(head_only - theirs)) > 10 * _tol(theirs)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_dense_grad_x_weight_is_w_times_autograd_of_the_models_loss(arch, ids, tmp_path):
    """Every weight of ndim >= 2 is scored, every score is there, and each equals |w g| with g
    from autograd of transformers' own loss."""
    model = build(arch)
    loss = _model_loss(model, ids)
    expected = {n: (p.detach() * g).abs().reshape(-1)
                for (n, p), g in zip(model.named_parameters(), torch.autograd.grad(loss, list(model.parameters()),
                                                                                  allow_unused=True))
                if g is not None}
    weights = [n for n, p in model.named_parameters() if p.ndim >= 2 and not n.rpartition(".")[2].endswith("bias")]
    assert [n for n, _ in scored_parameters(model, "weights")] == weights
    model.zero_grad(set_to_none=True)
    params = tiny_params("unused", sensitivity={"metrics": ("grad_x_weight",), "dense": True, "micro_batch_size": 3})
    compute_shards(model, architectures.tokenizer(), ids, params, tmp_path / "s", Timings("t"), {})
    stats = shards.read_stats(tmp_path / "s")
    assert stats["parameter"].to_pylist() == weights
    for index, name in enumerate(weights):
        dense = shards.read_dense(tmp_path / "s", index, name)
        got = torch.tensor(dense.filter(pc.equal(dense["metric"], "grad_x_weight"))["score"].to_numpy())
        want = expected[name]
        assert got.numel() == want.numel() == dict(model.named_parameters())[name].numel()
        # two float32 backward passes over N tokens in other orders: each g is a sum of N
        # per-token terms, so they may differ by N ulp of the largest |w g| in the tensor
        scale = float(want.max())
        assert scale > 0, f"{name}: every gradient is zero"
        n_tokens = sum(n - 1 for n in LENGTHS)
        torch.testing.assert_close(got, want, atol=2 * n_tokens * EPS32 * scale, rtol=0, msg=name)
