"""The loss, its gradient and the other accumulators, checked against autograd done by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _planted import ids
from _reference import assert_grads_close, exact_hessian_block, reference_fisher, reference_grads, reference_loss
from critical_weights.core.errors import ModelError, NumericalError
from critical_weights.sensitivity import accumulate as accumulate_module
from critical_weights.sensitivity import loss
from critical_weights.sensitivity.accumulate import accumulate, scored_parameters
from critical_weights.sensitivity.loss import predicted_tokens

SMALL = "model.layers.1.self_attn.k_proj.weight"  # (8, 16): 128 weights, cheap exact Hessian


# ----------------------------------------------------------------------------- references


# ----------------------------------------------------------------------------- scored_parameters


def test_scored_parameters_are_the_weights_in_named_parameters_order(tiny_model):
    chosen = scored_parameters(tiny_model, "weights")
    expected = [n for n, p in tiny_model.named_parameters() if p.ndim == 2]
    assert [n for n, _ in chosen] == expected
    assert all(p.ndim == 2 for _, p in chosen)
    assert "model.embed_tokens.weight" in expected and "lm_head.weight" in expected
    assert not any("norm" in n for n, _ in chosen)
    assert len(chosen) == 1 + 2 * 7 + 1  # embeddings, 7 matrices per block, head


def test_scored_parameters_count_tied_weights_once_under_their_first_name(tiny_tied_model):
    chosen = scored_parameters(tiny_tied_model, "weights")
    names = [n for n, _ in chosen]
    assert names[0] == "model.embed_tokens.weight"
    assert "lm_head.weight" not in names
    assert len({id(p) for _, p in chosen}) == len(chosen) == 1 + 2 * 7
    assert tiny_tied_model.lm_head.weight is chosen[0][1]


def test_scored_parameters_all_adds_norms(tiny_model):
    chosen = scored_parameters(tiny_model, "all")
    assert [n for n, _ in chosen] == [n for n, _ in tiny_model.named_parameters()]
    assert "model.norm.weight" in dict(chosen)


def test_scored_parameters_without_any_matrix_raises():
    with pytest.raises(ModelError, match=r"^sensitivity.parameters: 'weights' selects no parameter of this model$"):
        scored_parameters(torch.nn.LayerNorm(4), "weights")


def test_predicted_tokens_skips_the_first_position_of_each_sequence(tiny_ids):
    assert predicted_tokens(tiny_ids) == sum(len(s) for s in tiny_ids) - len(tiny_ids)


# ----------------------------------------------------------------------------- loss and gradient


@pytest.mark.parametrize("model_fixture", ["tiny_model", "tiny_tied_model"])
def test_gradient_equals_autograd_of_the_mean_token_loss(request, model_fixture, tiny_ids):
    model = request.getfixturevalue(model_fixture)
    params = scored_parameters(model, "weights")
    before = {n: p.detach().clone() for n, p in params}
    acc, skipped = accumulate(model, tiny_ids, params, ["grad_x_weight", "magnitude"], micro_batch_size=8)
    assert skipped == {}
    expected_loss = reference_loss(model, tiny_ids)
    assert_grads_close(acc.grad, reference_grads(model, tiny_ids, params))
    assert acc.n_tokens == predicted_tokens(tiny_ids)
    assert acc.n_sequences == len(tiny_ids)
    torch.testing.assert_close(acc.loss_sum / acc.n_tokens, expected_loss.item(), rtol=1e-5, atol=0)
    # the weights are untouched, and nothing is left on them
    for n, p in params:
        torch.testing.assert_close(p.detach(), before[n], rtol=0, atol=0)
        assert p.grad is None and not p.requires_grad
    assert acc.fisher == {} and acc.hutchinson == {} and acc.act_sq == {}


def test_micro_batching_never_changes_the_loss_or_gradient(tiny_model, tiny_ids):
    params = scored_parameters(tiny_model, "weights")
    runs = [
        accumulate(tiny_model, tiny_ids, params, ["grad_x_weight"], micro_batch_size=1)[0],
        accumulate(tiny_model, tiny_ids, params, ["grad_x_weight"], micro_batch_size=8)[0],
        accumulate(tiny_model, tiny_ids, params, ["grad_x_weight"], micro_batch_size=3)[0],
        accumulate(tiny_model, tiny_ids, params, ["grad_x_weight"], micro_batch_size=8, batch_tokens=40)[0],
    ]
    first = runs[0]
    for other in runs[1:]:
        assert_grads_close(other.grad, first.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(other.loss_sum, first.loss_sum, rtol=1e-6, atol=0)
        assert other.n_tokens == first.n_tokens


def test_chunked_cross_entropy_gives_the_same_gradient(tiny_model, tiny_ids, monkeypatch):
    """Past the logits budget the head runs in chunks, each with its own backward; the result is unchanged."""
    params = scored_parameters(tiny_model, "weights")
    whole = accumulate(tiny_model, tiny_ids, params, ["grad_x_weight", "wanda"], micro_batch_size=8)[0]
    monkeypatch.setattr(loss, "LOGITS_BUDGET_BYTES", 4 * 96 * 5)  # 5 positions per chunk
    chunked = accumulate(tiny_model, tiny_ids, params, ["grad_x_weight", "wanda"], micro_batch_size=8)[0]
    assert_grads_close(chunked.grad, whole.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(chunked.loss_sum, whole.loss_sum, rtol=1e-6, atol=0)
    # recomputation in backward must not count activations twice
    assert_grads_close(chunked.act_sq, whole.act_sq, rtol=1e-5, atol=1e-6)


def test_bfloat16_model_accumulates_float32_gradients(tiny_model, tiny_ids):
    params32 = scored_parameters(tiny_model, "weights")
    expected = reference_grads(tiny_model, tiny_ids, params32)
    model = tiny_model.to(torch.bfloat16)
    acc, _ = accumulate(model, tiny_ids, scored_parameters(model, "weights"), ["grad_x_weight"], micro_batch_size=2)
    for name, g in acc.grad.items():
        assert g.dtype == torch.float32
        # bf16 forward: only a loose agreement is possible
        cos = F.cosine_similarity(g.reshape(-1), expected[name].reshape(-1), dim=0)
        assert cos > 0.95, name


def test_non_finite_loss_raises_numerical_error(tiny_model, tiny_ids):
    with torch.no_grad():
        tiny_model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    params = scored_parameters(tiny_model, "weights")
    with pytest.raises(NumericalError, match=r"^the loss of micro-batch 0 is nan; try model.dtype float32$"):
        accumulate(tiny_model, tiny_ids, params, ["grad_x_weight"], micro_batch_size=8)
    assert all(p.grad is None for _, p in params)


# ----------------------------------------------------------------------------- fisher


@pytest.mark.parametrize("metric", ["fisher", "taylor2"])
def test_fisher_is_the_mean_of_per_sequence_squared_gradients(tiny_model, tiny_ids, metric):
    params = scored_parameters(tiny_model, "weights")
    acc, _ = accumulate(tiny_model, tiny_ids, params, [metric], micro_batch_size=8)
    assert_grads_close(acc.fisher, reference_fisher(tiny_model, tiny_ids, params), rtol=1e-4, atol=1e-9)
    # the per-sequence pass still yields the exact dL/dW
    assert_grads_close(acc.grad, reference_grads(tiny_model, tiny_ids, params))


@pytest.mark.parametrize("budget", [None, 4 * 96 * 5])  # the whole head at once, or 5 positions per chunk
def test_fisher_of_a_tied_head_squares_the_whole_gradient(tiny_tied_model, tiny_ids, monkeypatch, budget):
    """The tied embedding gets its per-sequence gradient in pieces (head chunks, then the base
    model); fisher must square their sum, not add the squares of the pieces."""
    if budget is not None:
        monkeypatch.setattr(loss, "LOGITS_BUDGET_BYTES", budget)
    params = scored_parameters(tiny_tied_model, "weights")
    acc, _ = accumulate(tiny_tied_model, tiny_ids, params, ["fisher"], micro_batch_size=1)
    assert tiny_tied_model.lm_head.weight is params[0][1]
    assert_grads_close(acc.fisher, reference_fisher(tiny_tied_model, tiny_ids, params), rtol=1e-4, atol=1e-9)
    assert_grads_close(acc.grad, reference_grads(tiny_tied_model, tiny_ids, params))
    assert all(p.grad is None for _, p in params)


# ----------------------------------------------------------------------------- hutchinson


def _small(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(SMALL, dict(model.named_parameters())[SMALL])]


def test_hutchinson_converges_to_the_exact_hessian_diagonal(tiny_eager_model, tiny_ids):
    params = _small(tiny_eager_model)
    hessian = exact_hessian_block(tiny_eager_model, tiny_ids, params[0][1])
    torch.testing.assert_close(hessian, hessian.T, rtol=1e-4, atol=1e-6)
    diag = hessian.diagonal().reshape(params[0][1].shape)
    errors = {}
    for probes in (4, 256):
        acc, _ = accumulate(tiny_eager_model, tiny_ids, params, ["hutchinson"], micro_batch_size=8,
                            hutchinson_probes=probes, seed=0)
        est = acc.hutchinson[SMALL]
        assert est.dtype == torch.float32 and est.shape == diag.shape
        errors[probes] = float((est - diag).abs().mean())
    # the estimator's standard error falls as 1/sqrt(probes): 8x from 4 to 256 probes
    assert errors[256] < errors[4] / 3, errors
    assert errors[256] < 0.5 * float(diag.abs().mean()), errors


def test_hutchinson_estimate_is_bounded_by_the_hessian_rows(tiny_eager_model, tiny_ids):
    """Each probe gives z_i (H z)_i = sum_j z_i z_j H_ij with z_j = +-1, so the estimate never
    exceeds sum_j |H_ij|: a wrong scale (say, no division by the probe count) breaks this."""
    params = _small(tiny_eager_model)
    hessian = exact_hessian_block(tiny_eager_model, tiny_ids, params[0][1])
    acc, _ = accumulate(tiny_eager_model, tiny_ids, params, ["hutchinson"], micro_batch_size=8,
                        hutchinson_probes=16, seed=3)
    est = acc.hutchinson[SMALL].reshape(-1)
    bound = hessian.abs().sum(dim=1)
    assert bool((est.abs() <= bound * (1 + 1e-4) + 1e-7).all())


def test_hutchinson_does_not_depend_on_micro_batching(tiny_eager_model, tiny_ids):
    params = _small(tiny_eager_model)
    one = accumulate(tiny_eager_model, tiny_ids, params, ["hutchinson"], 1, hutchinson_probes=4, seed=7)[0]
    eight = accumulate(tiny_eager_model, tiny_ids, params, ["hutchinson"], 8, hutchinson_probes=4, seed=7)[0]
    torch.testing.assert_close(one.hutchinson[SMALL], eight.hutchinson[SMALL], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(one.grad[SMALL], eight.grad[SMALL], rtol=1e-4, atol=1e-8)
    other_seed = accumulate(tiny_eager_model, tiny_ids, params, ["hutchinson"], 8, hutchinson_probes=4, seed=8)[0]
    assert not torch.equal(other_seed.hutchinson[SMALL], eight.hutchinson[SMALL])


def test_hutchinson_pass_still_gives_exact_gradient_and_fisher(tiny_eager_model, tiny_ids):
    params = _small(tiny_eager_model)
    acc, _ = accumulate(tiny_eager_model, tiny_ids, params, ["hutchinson", "fisher"], micro_batch_size=8,
                        hutchinson_probes=2)
    assert_grads_close(acc.grad, reference_grads(tiny_eager_model, tiny_ids, params))
    assert_grads_close(acc.fisher, reference_fisher(tiny_eager_model, tiny_ids, params), rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(acc.loss_sum / acc.n_tokens, reference_loss(tiny_eager_model, tiny_ids).item(),
                               rtol=1e-5, atol=0)


def test_hutchinson_with_fisher_keeps_its_micro_batches(tiny_eager_model, tiny_ids, monkeypatch):
    """Only fisher's own pass runs one sequence at a time; the Hessian pass keeps the configured
    micro-batch, so it costs probes x micro-batches Hessian-vector products, not x sequences."""
    params = _small(tiny_eager_model)
    alone = accumulate(tiny_eager_model, tiny_ids, params, ["hutchinson"], 3, hutchinson_probes=2, seed=5)[0]
    sizes = []
    real = accumulate_module.final_hidden

    def counted(model, ids, mask):
        sizes.append(ids.shape[0])
        return real(model, ids, mask)

    monkeypatch.setattr(accumulate_module, "final_hidden", counted)
    both = accumulate(tiny_eager_model, tiny_ids, params, ["hutchinson", "taylor2"], 3, hutchinson_probes=2, seed=5)[0]
    assert sizes == [3, 3] + [1] * len(tiny_ids)  # hutchinson pass at 3, then fisher per sequence
    assert_grads_close(both.hutchinson, alone.hutchinson, rtol=0, atol=0)  # the same batches, the same bits
    assert_grads_close(both.fisher, reference_fisher(tiny_eager_model, tiny_ids, params), rtol=1e-4, atol=1e-9)


def test_hutchinson_through_chunked_cross_entropy(tiny_eager_model, tiny_ids, monkeypatch):
    """Large vocabularies take the recomputed-chunk path; double backward must go through it."""
    params = [_small(tiny_eager_model)[0], ("lm_head.weight", tiny_eager_model.lm_head.weight)]
    whole = accumulate(tiny_eager_model, tiny_ids, params, ["hutchinson"], 8, hutchinson_probes=3, seed=1)[0]
    monkeypatch.setattr(loss, "LOGITS_BUDGET_BYTES", 4 * 96 * 5)
    chunked = accumulate(tiny_eager_model, tiny_ids, params, ["hutchinson"], 8, hutchinson_probes=3, seed=1)[0]
    assert_grads_close(chunked.hutchinson, whole.hutchinson, rtol=1e-4, atol=1e-7)
    assert_grads_close(chunked.grad, whole.grad, rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------------------- wanda


