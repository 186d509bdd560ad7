"""critical_weights.sensitivity.activations: wanda's input norms equal forward hooks over the real
tokens only (padding excluded), cover the output head, and skip the tied embedding and non-matrix
weights with the reason."""

from __future__ import annotations

import torch

from _planted import ids
from _reference import assert_grads_close, reference_grads
from critical_weights.sensitivity.accumulate import accumulate, scored_parameters


def activation_sums(model: torch.nn.Module, ids: list[list[int]], names: list[str]) -> dict[str, torch.Tensor]:
    """Per nn.Linear, the sum over every real token of x_j^2, gathered with forward hooks
    over plain unpadded forward passes (no padding exists, so every token is real)."""
    params = dict(model.named_parameters())
    linear = {id(m.weight): m for m in model.modules() if isinstance(m, torch.nn.Linear)}
    sums, handles = {}, []
    for name in names:
        module = linear[id(params[name])]
        sums[name] = torch.zeros(module.in_features)

        def hook(module, args, name=name):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (tokens, in)
            sums[name] += (x * x).sum(dim=0)

        handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for seq in ids:
                model(input_ids=torch.tensor([seq]))
    finally:
        for h in handles:
            h.remove()
    return sums


def test_wanda_activation_norms_equal_forward_hooks_over_real_tokens(tiny_model, tiny_ids):
    params = scored_parameters(tiny_model, "weights")
    acc, skipped = accumulate(tiny_model, tiny_ids, params, ["wanda"], micro_batch_size=4)
    in_blocks = [n for n, _ in params if ".layers." in n]
    assert set(acc.act_sq) == {*in_blocks, "lm_head.weight"}
    expected = activation_sums(tiny_model, tiny_ids, in_blocks)
    assert_grads_close({n: acc.act_sq[n] for n in in_blocks}, expected, rtol=1e-5, atol=1e-5)
    assert skipped == {"model.embed_tokens.weight": "used as an embedding table, not only as a weight multiplying an input"}
    # wanda alone still computes dL/dW (the shards carry the gradient)
    assert_grads_close(acc.grad, reference_grads(tiny_model, tiny_ids, params))


def test_wanda_output_head_norms_cover_every_real_token(tiny_model, tiny_ids):
    params = scored_parameters(tiny_model, "weights")
    acc, _ = accumulate(tiny_model, tiny_ids, params, ["wanda"], micro_batch_size=4)
    expected = activation_sums(tiny_model, tiny_ids, ["lm_head.weight"])
    torch.testing.assert_close(acc.act_sq["lm_head.weight"], expected["lm_head.weight"], rtol=1e-5, atol=1e-5)


def test_wanda_skips_the_tied_embedding_and_non_linear_weights(tiny_tied_model, tiny_ids):
    params = scored_parameters(tiny_tied_model, "all")
    acc, skipped = accumulate(tiny_tied_model, tiny_ids, params, ["wanda"], micro_batch_size=8)
    assert skipped["model.embed_tokens.weight"] == "used as an embedding table, not only as a weight multiplying an input"
    assert "model.embed_tokens.weight" not in acc.act_sq
    norms = [n for n, p in params if p.ndim == 1]
    assert norms and all(skipped[n] == "not a weight that multiplies an input (nn.Linear, Conv1D, router or experts)"
                         for n in norms)
    linear = [n for n, p in params if p.ndim == 2 and n != "model.embed_tokens.weight"]
    assert set(acc.act_sq) == set(linear)
    assert set(skipped) == {"model.embed_tokens.weight", *norms}
