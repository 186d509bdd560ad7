"""One pass over the texts: the float32 sums that the metrics are computed from.

Accumulators, all float32 and shaped like their weight unless said otherwise:
- `grad`: dL/dW, always (L is the loss of `critical_weights.sensitivity.loss`);
- `fisher`: mean over sequences n of g_n^2, where g_n is the gradient of sequence n's own
  mean loss (one backward per sequence);
- `hutchinson`: mean over Rademacher probes z of z * (H z), H the Hessian of L;
- `act_sq`: for each weight that multiplies an input, the sum over real tokens of x_j^2 per
  input feature j, shaped to broadcast against the scored matrix (`critical_weights.sensitivity.activations`);
- `router_picks`, `router_tokens`: per Mixture-of-Experts layer, how many real tokens its router
  sent to each expert, and how many it routed (always gathered; no hooks for a dense model).

Which of them a run fills follows from the metrics asked for (`critical_weights.metrics`).
The main pass runs in one of three modes: plain micro-batches (dL/dW only), one sequence per
micro-batch (dL/dW and fisher from the same backward), or double backward per micro-batch
(dL/dW and hutchinson; fisher, if asked too, then gets a pass of its own).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from critical_weights.core.errors import ModelError, NumericalError
from critical_weights.core.progress import progress
from critical_weights.metrics import accumulators_for
from critical_weights.model.layout import is_bias
from critical_weights.sensitivity import activations, distributed
from critical_weights.sensitivity.batching import make_batches
from critical_weights.sensitivity.loss import backward_in_two, check_finite_loss, final_hidden, head_loss_sum, head_parameters, pad_batch, predicted_tokens

log = logging.getLogger(__name__)


@dataclass
class Accumulators:
    """What one pass over the texts leaves behind."""

    grad: dict[str, torch.Tensor]
    fisher: dict[str, torch.Tensor] = field(default_factory=dict)
    hutchinson: dict[str, torch.Tensor] = field(default_factory=dict)
    act_sq: dict[str, torch.Tensor] = field(default_factory=dict)
    router_picks: dict[str, torch.Tensor] = field(default_factory=dict)  # experts module -> (E,) int64
    router_tokens: dict[str, torch.Tensor] = field(default_factory=dict)  # experts module -> () int64
    loss_sum: float = 0.0  # sum of token cross-entropies, float64 on the host
    n_tokens: int = 0  # predicted tokens
    n_sequences: int = 0


def scored_parameters(model: torch.nn.Module, which: str) -> list[tuple[str, torch.nn.Parameter]]:
    """Parameters to score, in `named_parameters()` order; tied weights once, first name.

    `weights`: every weight tensor of ndim >= 2 (3-D expert tensors included), biases left out
    (expert biases such as `gate_up_proj_bias` too). `all`: every parameter.
    """
    chosen = [(n, p) for n, p in model.named_parameters() if which == "all" or p.ndim >= 2 and not is_bias(n)]
    if not chosen:
        raise ModelError(f"sensitivity.parameters: {which!r} selects no parameter of this model")
    return chosen


class _GradSink:
    """Moves each parameter's gradient into float32 accumulators as soon as it is whole.

    A post-accumulate-grad hook adds `scale * grad` into `grad` (and `grad^2 / n_seq` into
    `fisher` when asked), then frees the parameter's own .grad, so low-precision gradients
    never pile up across micro-batches. A `deferred` parameter (`loss.head_parameters`) gets
    its gradient in pieces; they gather in its .grad until `flush`, as fisher squares the sum.
    """

    def __init__(self, params: list[tuple[str, torch.nn.Parameter]], with_fisher: bool, n_sequences: int,
                 deferred: set[int] = frozenset()):
        self.scale = 1.0
        self.grad = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params}
        self.fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params} if with_fisher else {}
        self.inv_n = 1.0 / n_sequences
        self.later = [(n, p) for n, p in params if id(p) in deferred]
        self.handles = [p.register_post_accumulate_grad_hook(lambda p, n=n: self._move(n, p))
                        for n, p in params if id(p) not in deferred]

    def _move(self, name: str, p: torch.Tensor) -> None:
        g = p.grad  # (shape of p), model dtype
        self.grad[name].add_(g, alpha=self.scale)
        if self.fisher:
            self.fisher[name].addcmul_(g, g, value=self.inv_n)  # g_n^2 / n_sequences
        p.grad = None

    def flush(self) -> None:
        for name, p in self.later:
            if p.grad is not None:
                self._move(name, p)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        for _, p in self.later:
            p.grad = None


def _rademacher(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    z = torch.randint(0, 2, like.shape, generator=generator, dtype=torch.int8)
    return (z.float() * 2 - 1).to(like.device)


def _probe_generator(seed: int, probe: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + probe)  # each micro-batch draws the same probe again


def accumulate(
    model: torch.nn.Module,
    input_ids: Sequence[Sequence[int]],
    params: list[tuple[str, torch.nn.Parameter]],
    metrics: Sequence[str],
    micro_batch_size: int,
    batch_tokens: int = 0,
    hutchinson_probes: int = 0,
    seed: int = 0,
) -> tuple[Accumulators, dict[str, str]]:
    """One pass over the texts, filling the accumulators that `metrics` need.

    Returns the accumulators and, for `act_sq` (wanda), the parameters it skips with the reason.
    Under torchrun each process takes a share of the micro-batches; the sums are all-reduced.
    """
    needs = accumulators_for(metrics)
    device = params[0][1].device
    n_tokens, n_seq = predicted_tokens(input_ids), len(input_ids)
    if "fisher" in needs and "hutchinson" not in needs and micro_batch_size != 1:
        # with hutchinson, the main pass keeps its micro-batches and fisher gets its own pass
        log.info("fisher/taylor2 need each sequence's own gradient: running one sequence per micro-batch")
        micro_batch_size = 1
    rank, world = distributed.world()
    batches = make_batches([len(s) for s in input_ids], micro_batch_size, batch_tokens)[rank::world]

    for p in model.parameters():
        p.requires_grad_(False)
    for _, p in params:
        p.requires_grad_(True)
        p.grad = None
    if "hutchinson" in needs:
        step: _Step = _DoubleBackward(params, n_tokens, hutchinson_probes, seed)
    elif "fisher" in needs:
        step = _PerSequence(model, params, n_tokens, n_seq)
    else:
        step = _Plain(model, params, n_tokens, n_seq)
    norms = activations.InputNorms(model, params) if "act_sq" in needs else None
    picks = activations.RouterPicks(model)  # no hooks for a dense model
    watchers = [w for w in (norms, picks) if w is not None]
    try:
        loss_sum = _main_pass(model, input_ids, batches, device, step, watchers)
    finally:
        step.close()
        for w in watchers:
            w.remove()
        for _, p in params:
            p.requires_grad_(False)
    acc = Accumulators(**step.sums(), act_sq=norms.act_sq if norms is not None else {},
                       router_picks=picks.picks, router_tokens=picks.tokens,
                       loss_sum=loss_sum, n_tokens=n_tokens, n_sequences=n_seq)
    if "hutchinson" in needs and "fisher" in needs:
        acc.fisher = _fisher_pass(model, input_ids, params)
    for store in (acc.grad, acc.fisher, acc.hutchinson, acc.act_sq, acc.router_picks, acc.router_tokens):
        distributed.all_reduce_sum(store.values())
    acc.loss_sum = distributed.all_reduce_float(acc.loss_sum, device)
    _check_gradients(params, acc.grad)
    return acc, (norms.skipped if norms is not None else {})


def _main_pass(model: torch.nn.Module, input_ids: Sequence[Sequence[int]], batches: list[list[int]],
               device: torch.device, step: _Step, watchers: list[activations.InputNorms | activations.RouterPicks]) -> float:
    """Forward every micro-batch's base model (the `watchers` hooks counting its real tokens),
    hand its final hidden states to `step`, which finishes the loss and runs the backward;
    return the summed token loss, float64 on the host."""
    loss_sum = 0.0
    work = [sum(len(input_ids[i]) for i in b) for b in batches]
    for b, batch in enumerate(progress(batches, "forward+backward", work=work)):
        ids, mask = pad_batch([list(input_ids[i]) for i in batch], device)
        for w in watchers:
            w.mask, w.active = mask, True
        hidden = final_hidden(model, ids, mask)  # (B, T, C)
        for w in watchers:
            w.active = False
        loss_b = step(model, hidden, ids, mask)  # float32 scalar, summed over tokens
        check_finite_loss(loss_b, b)
        loss_sum += float(loss_b.double())
    return loss_sum


class _Plain:
    """Micro-batches of any size: backward of each one's share of L into dL/dW."""

    def __init__(self, model: torch.nn.Module, params: list[tuple[str, torch.nn.Parameter]], n_tokens: int,
                 n_seq: int, with_fisher: bool = False):
        self.n_tokens = n_tokens
        # a sum takes a gradient's pieces one by one; a square (fisher) needs them whole
        self.sink = _GradSink(params, with_fisher, n_seq, head_parameters(model) if with_fisher else set())

    def __call__(self, model: torch.nn.Module, hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        loss_b = backward_in_two(model, hidden, ids, mask, self._scale(mask))
        self.sink.flush()
        return loss_b

    def _scale(self, mask: torch.Tensor) -> float:  # the summed loss's factor in backward: 1/N, the token mean
        return 1.0 / self.n_tokens

    def close(self) -> None:
        self.sink.remove()

    def sums(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"grad": self.sink.grad, "fisher": self.sink.fisher}


class _PerSequence(_Plain):
    """One sequence per micro-batch: backward of its own mean loss g_n, which the sink adds as
    g_n^2 / n_sequences into fisher and, weighed by T_n / N, into dL/dW."""

    def __init__(self, model: torch.nn.Module, params: list[tuple[str, torch.nn.Parameter]], n_tokens: int, n_seq: int):
        super().__init__(model, params, n_tokens, n_seq, with_fisher=True)

    def _scale(self, mask: torch.Tensor) -> float:
        n_pred = int(mask[:, 1:].sum())
        self.sink.scale = n_pred / self.n_tokens
        return 1.0 / n_pred  # the sequence's own mean loss


class _DoubleBackward:
    """Per micro-batch, dL_b/dW with its graph kept, then one Hessian-vector product per probe."""

    def __init__(self, params: list[tuple[str, torch.nn.Parameter]], n_tokens: int, probes: int, seed: int):
        self.params, self.n_tokens, self.probes, self.seed = params, n_tokens, probes, seed
        self.hutchinson = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params}
        self.grad = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params}

    def __call__(self, model: torch.nn.Module, hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        loss_b = head_loss_sum(model, hidden, ids, mask)
        _hutchinson_step(self.params, loss_b / self.n_tokens, self.grad, self.hutchinson, self.probes, self.seed)
        return loss_b.detach()

    def close(self) -> None:
        pass

    def sums(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"grad": self.grad, "hutchinson": self.hutchinson}


_Step = _Plain | _DoubleBackward


def _hutchinson_step(
    params: list[tuple[str, torch.nn.Parameter]], loss: torch.Tensor,
    grad_sum: dict[str, torch.Tensor], hutch: dict[str, torch.Tensor], probes: int, seed: int,
) -> None:
    """Add this micro-batch's dL_b/dW and, per probe, z * (H_b z) / probes (double backward)."""
    weights = [p for _, p in params]
    grads = torch.autograd.grad(loss, weights, create_graph=True)
    for (n, _), g in zip(params, grads):
        grad_sum[n].add_(g.detach())
    for j in range(probes):
        gen = _probe_generator(seed, j)
        zs = [_rademacher(w, gen) for w in weights]
        hvs = torch.autograd.grad(grads, weights, grad_outputs=[z.to(w.dtype) for z, w in zip(zs, weights)],
                                  retain_graph=j < probes - 1)
        for (n, _), z, hv in zip(params, zs, hvs):
            hutch[n].addcmul_(z, hv.float(), value=1.0 / probes)


def _fisher_pass(
    model: torch.nn.Module, input_ids: Sequence[Sequence[int]], params: list[tuple[str, torch.nn.Parameter]],
) -> dict[str, torch.Tensor]:
    """Fisher diagonal in its own pass (used when hutchinson already owns the main pass)."""
    device = params[0][1].device
    for _, p in params:
        p.requires_grad_(True)
    step = _PerSequence(model, params, predicted_tokens(input_ids), len(input_ids))
    try:
        rank, world = distributed.world()
        mine = range(rank, len(input_ids), world)
        for b, i in enumerate(progress(mine, "fisher: per-sequence backward", work=[len(input_ids[i]) for i in mine])):
            ids, mask = pad_batch([list(input_ids[i])], device)
            check_finite_loss(step(model, final_hidden(model, ids, mask), ids, mask), b)
    finally:
        step.close()
        for _, p in params:
            p.requires_grad_(False)
    return step.sink.fisher


def _check_gradients(params: list[tuple[str, torch.nn.Parameter]], grads: dict[str, torch.Tensor]) -> None:
    """Every scored weight has a finite gradient of its own shape."""
    for name, p in params:
        g = grads.get(name)
        if g is None or g.shape != p.shape:
            raise ModelError(f"parameter {name}: gradient missing or shaped {None if g is None else tuple(g.shape)}, expected {tuple(p.shape)}")
        if not bool(torch.isfinite(g).all()):
            raise NumericalError(f"parameter {name}: its gradient holds NaN or Inf; try model.dtype float32")


