"""The loss, its gradient, and the other per-weight accumulators the metrics need.

L is the mean next-token cross-entropy over every predicted token of every sequence: each
token weighs the same and padding weighs nothing. Micro-batch b contributes
(sum of its token losses) / N, where N is the number of predicted tokens in the whole set,
so summing the micro-batch gradients gives dL/dW exactly, whatever the batching.

Accumulators, all float32 and shaped like their weight:
- `grad`: dL/dW (every metric but magnitude needs it);
- `fisher`: mean over sequences n of g_n^2, where g_n is the gradient of sequence n's own
  mean loss (one backward per sequence);
- `hutchinson`: mean over Rademacher probes z of z * (H z), H the Hessian of L;
- `act_sq`: for each weight that multiplies an input, the sum over real tokens of x_j^2 per
  input feature j (critical_weights.activations);
- `router_picks`: per Mixture-of-Experts layer, how many real tokens its router sent to each expert.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from critical_weights import activations, distributed
from critical_weights.batching import make_batches
from critical_weights.errors import ModelError, NumericalError
from critical_weights.layout import is_bias
from critical_weights.progress import progress

log = logging.getLogger(__name__)

LOGITS_BUDGET_BYTES = 1 << 30  # above this, cross-entropy runs in recomputed chunks


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


class _GivenHidden(torch.nn.Module):
    """Stands in for the base model: hands back the hidden states it is given as inputs_embeds,
    in an output whose other fields (router logits, attentions, cache, ...) all read None."""

    def forward(self, *args: Any, inputs_embeds: torch.Tensor | None = None, **kwargs: Any) -> Any:
        from transformers.modeling_outputs import BaseModelOutputWithPast

        class HiddenOnly(BaseModelOutputWithPast):
            def __getattr__(self, name: str) -> None:
                if name.startswith("__"):
                    raise AttributeError(name)
                return None

        return HiddenOnly(last_hidden_state=inputs_embeds)


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


def check_output_path(model: torch.nn.Module, ids: Sequence[int], max_tokens: int = 32) -> None:
    """The logits of the scoring path equal `model(input_ids).logits` on (the start of) one text.

    A guard for architectures whose forward does something after its base model that
    `output_logits` would miss. Tolerance: 1e-3 of the largest |logit| (at least 8 ulp of the
    model's dtype), far below what a skipped soft-capping or logit scale changes (percents)."""
    batch = torch.tensor([list(ids[:max_tokens])], device=model.get_input_embeddings().weight.device)  # (1, T)
    with torch.no_grad():
        theirs = model(input_ids=batch, use_cache=False).logits[0].float()  # (T, V)
        hidden = base_model(model)(input_ids=batch, use_cache=False)[0][0]  # (T, C)
        ours = output_logits(model, hidden).float()  # (T, V)
    scale = float(theirs.abs().max())
    tol = max(1e-3, 8 * torch.finfo(next(model.parameters()).dtype).eps) * scale
    worst = float((ours - theirs).abs().max())
    if not worst <= tol:
        raise ModelError(
            f"model.name: {type(model).__name__}: the logits through its output head differ from model(...).logits "
            f"by {worst:.3g} (largest |logit| {scale:.3g}); this architecture's output path is not supported"
        )


def _chunk_ce(model: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # hidden (n, C), targets (n,) -> summed cross-entropy, float32 scalar
    return F.cross_entropy(output_logits(model, hidden).float(), targets, reduction="sum")


def token_loss_sum(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies over the real tokens of a padded batch (float32 scalar).

    The base model runs once over the batch; the model's own output path (`output_logits`)
    then runs on the final hidden states of the real predicting positions only. When their
    float32 logits would exceed LOGITS_BUDGET_BYTES, they are computed in chunks that are
    recomputed in backward, so the full float32 logits never exist at once.
    """
    hidden = base_model(model)(input_ids=ids, attention_mask=mask, use_cache=False)[0]  # (B, T, C)
    valid = mask[:, 1:].bool()  # (B, T-1): position t predicts token t+1
    h = hidden[:, :-1][valid]  # (n, C)
    y = ids[:, 1:][valid]  # (n,)
    vocab = model.get_output_embeddings().weight.shape[0]
    chunk = max(1, LOGITS_BUDGET_BYTES // (4 * vocab))
    if h.shape[0] <= chunk:
        return _chunk_ce(model, h, y)
    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk):
        part = torch.utils.checkpoint.checkpoint(
            _chunk_ce, model, h[start : start + chunk], y[start : start + chunk], use_reentrant=False
        )
        total = total + part
    return total


class _GradSink:
    """Moves each parameter's gradient into float32 accumulators as soon as it is ready.

    A post-accumulate-grad hook adds `scale * grad` into `grad` (and `grad^2 / n_seq` into
    `fisher` when asked), then frees the parameter's own .grad, so low-precision gradients
    never pile up across micro-batches.
    """

    def __init__(self, params: list[tuple[str, torch.nn.Parameter]], with_fisher: bool, n_sequences: int):
        self.scale = 1.0
        self.grad = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params}
        self.fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params} if with_fisher else {}
        self.inv_n = 1.0 / n_sequences
        self.handles = [p.register_post_accumulate_grad_hook(self._hook(n)) for n, p in params]

    def _hook(self, name: str) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            g = p.grad  # (shape of p), model dtype
            self.grad[name].add_(g, alpha=self.scale)
            if self.fisher:
                self.fisher[name].addcmul_(g, g, value=self.inv_n)  # g_n^2 / n_sequences
            p.grad = None

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _rademacher(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    z = torch.randint(0, 2, like.shape, generator=generator, dtype=torch.int8)
    return (z.float() * 2 - 1).to(like.device)


def _probe_generator(seed: int, probe: int) -> torch.Generator:
    # The same probe vector must be used in every micro-batch, so regenerate it from (seed, probe).
    return torch.Generator().manual_seed(seed * 1_000_003 + probe)


def _check_finite(loss: torch.Tensor, batch: int) -> None:
    if not torch.isfinite(loss):
        raise NumericalError(f"the loss of micro-batch {batch} is {loss.item()}; try model.dtype float32")


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

    Returns the accumulators and, for `wanda`, the parameters it skips with the reason.
    """
    device = params[0][1].device
    with_fisher = "fisher" in metrics or "taylor2" in metrics
    with_hutchinson = "hutchinson" in metrics
    n_tokens = predicted_tokens(input_ids)
    n_seq = len(input_ids)
    if with_fisher and not with_hutchinson and micro_batch_size != 1:
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
    sink = _GradSink(params, with_fisher, n_seq) if not with_hutchinson else None
    norms = activations.InputNorms(model, params) if "wanda" in metrics else None
    picks = activations.RouterPicks(model)  # no hooks for a dense model
    watchers = [w for w in (norms, picks) if w is not None]
    hutch = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params} if with_hutchinson else {}
    grad_sum = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params} if with_hutchinson else {}
    loss_sum = 0.0
    try:
        for b, batch in enumerate(progress(batches, "forward+backward", work=[sum(len(input_ids[i]) for i in b) for b in batches])):
            ids, mask = pad_batch([list(input_ids[i]) for i in batch], device)
            for w in watchers:
                w.mask, w.active = mask, True
            loss_b = token_loss_sum(model, ids, mask)  # float32 scalar, summed over tokens
            for w in watchers:
                w.active = False
            _check_finite(loss_b, b)
            loss_sum += float(loss_b.detach().double())
            if with_hutchinson:
                _hutchinson_step(params, loss_b / n_tokens, grad_sum, hutch, hutchinson_probes, seed)
            elif with_fisher:
                # one sequence: backward its own mean loss g_n, weigh it by T_n / N into dL/dW
                n_pred = int(mask[:, 1:].sum())
                sink.scale = n_pred / n_tokens
                (loss_b / n_pred).backward()
            else:
                (loss_b / n_tokens).backward()
    finally:
        if sink is not None:
            sink.remove()
        for w in watchers:
            w.remove()
        for _, p in params:
            p.requires_grad_(False)
    acc = Accumulators(
        grad=grad_sum if with_hutchinson else sink.grad,
        fisher=sink.fisher if sink is not None else {},
        hutchinson=hutch,
        act_sq=norms.act_sq if norms is not None else {},
        router_picks=picks.picks, router_tokens=picks.tokens,
        loss_sum=loss_sum, n_tokens=n_tokens, n_sequences=n_seq,
    )
    if with_hutchinson and with_fisher:
        acc.fisher = _fisher_pass(model, input_ids, params)
    for store in (acc.grad, acc.fisher, acc.hutchinson, acc.act_sq, acc.router_picks, acc.router_tokens):
        distributed.all_reduce_sum(store.values())
    acc.loss_sum = distributed.all_reduce_float(acc.loss_sum, device)
    _check_gradients(params, acc.grad)
    return acc, (norms.skipped if norms is not None else {})


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
    sink = _GradSink(params, with_fisher=True, n_sequences=len(input_ids))
    try:
        rank, world = distributed.world()
        for b, i in enumerate(progress(range(rank, len(input_ids), world), "fisher: per-sequence backward",
                                     work=[len(input_ids[i]) for i in range(rank, len(input_ids), world)])):
            ids, mask = pad_batch([list(input_ids[i])], device)
            loss = token_loss_sum(model, ids, mask)
            _check_finite(loss, b)
            (loss / int(mask[:, 1:].sum())).backward()
    finally:
        sink.remove()
        for _, p in params:
            p.requires_grad_(False)
    return sink.fisher


def _check_gradients(params: list[tuple[str, torch.nn.Parameter]], grads: dict[str, torch.Tensor]) -> None:
    """Every scored weight has a finite gradient of its own shape."""
    for name, p in params:
        g = grads.get(name)
        if g is None or g.shape != p.shape:
            raise ModelError(f"parameter {name}: gradient missing or shaped {None if g is None else tuple(g.shape)}, expected {tuple(p.shape)}")
        if not bool(torch.isfinite(g).all()):
            raise NumericalError(f"parameter {name}: its gradient holds NaN or Inf; try model.dtype float32")


def perplexity(avg_loss: float) -> float:
    return math.exp(avg_loss) if avg_loss < 700 else math.inf
