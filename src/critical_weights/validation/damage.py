"""The damage measurement: perturb a critical set and its controls, and measure the loss.

Losses are measured on the primary texts (held out from the gradients when there are any,
else the in-sample share), and for the critical set also on the in-sample texts, so the
in-sample number stands beside the held-out one. A selection whose perturbation changes no
weight's bits (zeroing weights that are already 0) leaves the model bit-identical, so its
loss is the baseline and is not measured again.

Against the random controls the report gives a ratio only when the controls' mean increase
stands out of noise: above NOISE_REL x the baseline loss (float32 rounding of a deep
forward pass moves the loss by about 1e-6 relative), and above twice its standard error
over the draws. Otherwise the ratio is null with the reason, and the z-score (critical
increase over the draws' spread) says how far apart they are.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from critical_weights.config.params import ValidateParams
from critical_weights.core.streams import STREAM_NOISE
from critical_weights.validation.evaluation import loss_and_top1, loss_record
from critical_weights.validation.perturbation import perturbed
from critical_weights.validation.resume import Resumable, first_block
from critical_weights.validation.selection import Selection, SetGroup

log = logging.getLogger(__name__)

NOISE_REL = 1e-5  # a loss change below NOISE_REL x baseline is not told apart from rounding
CONDITIONS = ("critical", "random_k", "bottom_k")  # what gets perturbed


@dataclass(frozen=True)
class TextSets:
    """The token ids losses are measured on, and how to batch them."""

    in_sample: list[list[int]]  # a `seed`-drawn share of the texts the gradients came from
    heldout: list[list[int]]  # source texts prepare did not choose; may be empty
    heldout_missing: str | None  # why there are no held-out texts, when there are none
    micro_batch_size: int
    batch_tokens: int = 0
    step: Callable[[], None] = field(default=lambda: None, compare=False, repr=False)  # called after each loss: progress
    resumable: dict[str, Resumable] = field(default_factory=dict, compare=False, repr=False)  # text set -> its baseline's block inputs

    @property
    def primary(self) -> str:
        """The set every loss is measured on: `heldout` when there is one."""
        return "heldout" if self.heldout else "in_sample"

    def baseline(self, model: torch.nn.Module, which: str) -> tuple[float, torch.Tensor]:
        """The unperturbed loss on text set `which` and its top-1 predictions; the hidden states
        entering each block are kept, so a later `measure` can skip the blocks its perturbation
        cannot change (critical_weights.validation.resume)."""
        ids = self.heldout if which == "heldout" else self.in_sample
        self.resumable[which] = Resumable(model, ids, self.micro_batch_size, self.batch_tokens)
        got = self.resumable[which].baseline()
        self.step()
        return got

    def measure(self, model: torch.nn.Module, which: str, start: int = 0) -> tuple[float, torch.Tensor]:
        """The loss on text set `which` and the top-1 prediction at each of its positions, for a
        model that differs from the baseline's only in blocks `start` and later."""
        if which in self.resumable:
            got = self.resumable[which].measure(start)
        else:
            ids = self.heldout if which == "heldout" else self.in_sample
            got = loss_and_top1(model, ids, self.micro_batch_size, self.batch_tokens)
        self.step()
        return got


@dataclass(frozen=True)
class Context:
    """What every measurement needs: the model, its weights, their sha256 before, the texts,
    the unperturbed losses per text set, and the params."""

    model: torch.nn.Module
    before: dict[str, str]
    sets: TextSets
    baseline: dict[str, float]  # text set -> unperturbed loss
    top1: dict[str, torch.Tensor]  # text set -> the unperturbed model's top-1 token per position (N,) int64
    vp: ValidateParams
    seed: int

    @property
    def floor(self) -> float:
        return NOISE_REL * abs(self.baseline[self.sets.primary])


def perturb_and_measure(ctx: Context, selection: Selection, kind: str, rng_key: Sequence[int],
                        which: Sequence[str]) -> dict[str, Any]:
    """Perturb `selection`, measure the loss on each text set in `which`, restore."""
    weights = dict(ctx.model.named_parameters())
    rng = np.random.default_rng([ctx.seed, STREAM_NOISE, *rng_key])
    start = first_block(ctx.model, selection)  # the blocks before it compute what the baseline computed
    with perturbed(weights, selection, kind, ctx.vp, rng, ctx.before) as n_changed:
        got = {w: ctx.sets.measure(ctx.model, w, start) if n_changed else (ctx.baseline[w], ctx.top1[w]) for w in which}
    out: dict[str, Any] = {w: {**loss_record(got[w][0], ctx.baseline[w]),
                               "top1_agreement": float((got[w][1] == ctx.top1[w]).double().mean())} for w in which}
    out["n_changed"] = n_changed
    out["measured"] = bool(n_changed)  # False: no bit changed, the loss is the baseline
    return out


def vs_random(critical: float | None, draws: list[float | None], floor: float) -> dict[str, Any]:
    """Critical loss increase against the random draws' increases: ratio (or null, with the
    reason) and z-score."""
    out: dict[str, Any] = {"ratio": None, "z": None, "reason": None}
    if critical is None or any(d is None for d in draws):
        out["reason"] = "a loss is NaN or infinite"
        return out
    incs = np.array(draws, dtype=np.float64)  # (draws,)
    mean = float(incs.mean())
    std = float(incs.std(ddof=1)) if len(incs) > 1 else 0.0
    if std > 0:
        out["z"] = (critical - mean) / std
    sem = std / math.sqrt(len(incs))
    if mean <= floor:
        out["reason"] = f"random_k mean increase {mean:.3g} nats is not above the noise floor {floor:.3g} nats"
    elif len(incs) > 1 and mean <= 2 * sem:
        out["reason"] = f"random_k increase {mean:.3g} nats is within twice its standard error {sem:.3g} over {len(incs)} draws"
    else:
        out["ratio"] = critical / mean
    return out


def vs_bottom(critical: float | None, bottom: dict[str, Any], which: str, floor: float) -> dict[str, Any]:
    """Critical loss increase over the bottom_k control's (single selection, no spread)."""
    inc = bottom[which]["loss_increase"]
    if critical is None or inc is None:
        return {"ratio": None, "reason": "a loss is NaN or infinite"}
    if not bottom["n_changed"]:
        return {"ratio": None, "reason": "no bottom_k weight changed (they are already what the perturbation makes them)"}
    if inc <= floor:
        return {"ratio": None, "reason": f"bottom_k increase {inc:.3g} nats is not above the noise floor {floor:.3g} nats"}
    return {"ratio": critical / inc, "reason": None}


def measure_group(ctx: Context, g: SetGroup, kind: str, label: int) -> dict[str, Any]:
    """One critical set and its controls under one perturbation."""
    primary = ctx.sets.primary
    both = [primary] + (["in_sample"] if primary != "in_sample" else [])
    entry: dict[str, Any] = {"n_weights": g.n_weights, "n_tensors": len(g.critical)}
    entry["critical"] = perturb_and_measure(ctx, g.critical, kind, (label, 0, 0), both)
    crit = entry["critical"][primary]["loss_increase"]
    log.info("%s %s critical: loss %s (baseline %.4f)", kind, label, entry["critical"][primary]["loss"], ctx.baseline[primary])
    if g.random_k:
        draws = [perturb_and_measure(ctx, sel, kind, (label, 1, d), [primary]) for d, sel in enumerate(g.random_k)]
        incs = [d[primary]["loss_increase"] for d in draws]
        finite = [i for i in incs if i is not None]
        entry["random_k"] = {
            "draws": draws, "n_draws": len(draws),
            "mean_increase": float(np.mean(finite)) if len(finite) == len(incs) else None,
            "std_increase": float(np.std(finite, ddof=1)) if len(finite) == len(incs) > 1 else None,
        }
        entry["vs_random_k"] = vs_random(crit, incs, ctx.floor)
    if g.bottom_k is not None:
        entry["bottom_k"] = perturb_and_measure(ctx, g.bottom_k, kind, (label, 2, 0), [primary])
        entry["vs_bottom_k"] = vs_bottom(crit, entry["bottom_k"], primary, ctx.floor)
    return entry


def damage(ctx: Context, groups: dict[str, SetGroup]) -> dict[str, Any]:
    """Per perturbation and set ("k1", ..., "exported"), the critical set against its controls."""
    out: dict[str, Any] = {}
    for kind in ctx.vp.perturbations:
        out[kind] = {}
        for i, (name, g) in enumerate(groups.items()):
            out[kind][name] = measure_group(ctx, g, kind, i)
    return out
