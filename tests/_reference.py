"""Hand-written references the metrics are checked against: the loss and its gradient by plain
autograd over unbatched sequences, Fisher by per-sequence gradients, an exact Hessian block."""

from __future__ import annotations

import torch
import torch.nn.functional as F

GRAD_TOL = {"rtol": 1e-4, "atol": 1e-7}


def sequence_loss_sums(model: torch.nn.Module, ids: list[list[int]]) -> list[torch.Tensor]:
    """Per sequence, the summed next-token cross-entropy from a plain, unpadded model(...) call."""
    out = []
    for seq in ids:
        x = torch.tensor([seq])  # (1, T)
        logits = model(input_ids=x).logits[0]  # (T, V): position t predicts token t+1
        out.append(F.cross_entropy(logits[:-1].float(), x[0, 1:], reduction="sum"))
    return out


def reference_loss(model: torch.nn.Module, ids: list[list[int]]) -> torch.Tensor:
    """Mean token cross-entropy over every predicted token of every sequence."""
    n_tokens = sum(len(s) - 1 for s in ids)
    return torch.stack(sequence_loss_sums(model, ids)).sum() / n_tokens


def reference_grads(model, ids, params) -> dict[str, torch.Tensor]:
    for _, p in params:
        p.requires_grad_(True)
    grads = torch.autograd.grad(reference_loss(model, ids), [p for _, p in params])
    for _, p in params:
        p.requires_grad_(False)
    return {n: g for (n, _), g in zip(params, grads)}


def reference_fisher(model, ids, params) -> dict[str, torch.Tensor]:
    """Mean over sequences of the squared gradient of each sequence's own mean loss."""
    for _, p in params:
        p.requires_grad_(True)
    fisher = {n: torch.zeros_like(p) for n, p in params}
    for seq in ids:
        (loss_sum,) = sequence_loss_sums(model, [seq])
        grads = torch.autograd.grad(loss_sum / (len(seq) - 1), [p for _, p in params])
        for (n, _), g in zip(params, grads):
            fisher[n] += g * g / len(ids)
    for _, p in params:
        p.requires_grad_(False)
    return fisher


def exact_hessian_block(model, ids, param: torch.nn.Parameter) -> torch.Tensor:
    """The Hessian of the mean loss with respect to one parameter, (numel, numel) float32."""
    for p in model.parameters():
        p.requires_grad_(False)
    param.requires_grad_(True)
    (g,) = torch.autograd.grad(reference_loss(model, ids), param, create_graph=True)
    eye = torch.eye(param.numel()).reshape(param.numel(), *param.shape)
    (rows,) = torch.autograd.grad(g, param, grad_outputs=eye, is_grads_batched=True, retain_graph=True)
    # spot-check the batched rows against one plain Hessian-vector product each
    for i in (0, param.numel() // 2, param.numel() - 1):
        (row,) = torch.autograd.grad(g.reshape(-1)[i], param, retain_graph=True)
        torch.testing.assert_close(rows[i], row, rtol=1e-5, atol=1e-7)
    param.requires_grad_(False)
    return rows.reshape(param.numel(), param.numel()).detach()


def assert_grads_close(actual: dict, expected: dict, **tol) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert actual[name].dtype == torch.float32, name
        torch.testing.assert_close(actual[name], expected[name], msg=lambda m, n=name: f"{n}: {m}", **(tol or GRAD_TOL))
