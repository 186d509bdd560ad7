"""Is a super-weight candidate critical? Zero it and measure the loss, as `validate` does.

Every loss is L, the mean next-token cross-entropy over every predicted token, measured as
`validate` measures it (validation.resume.Resumable: the same loss code as
evaluation.mean_loss, skipping the blocks before the first one a candidate sits in) on the same
prepared texts, and every weight is restored bit-exactly after each measurement
(perturbation.zeroed). Conditions:
- `alone`: each candidate zeroed on its own;
- `restored`: each candidate zeroed, but its massive activation put back (the paper's control):
  in every sequence, at the token where the original output channel `row` of the projection
  peaks in |value|, that output is set to its original value y + w * x[col]. Measured one
  sequence per forward pass, so "per sequence" is exact for experts too;
- `all_candidates`: every candidate zeroed together;
- `top_n`: the global top-1, 2, ..., N by rank.metric zeroed (N = the number of candidates);
- `random`: N random weights of the candidates' tensors (same count per tensor, drawn with
  `seed`, the candidates left out).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from critical_weights.model.projections import Projection, watch
from critical_weights.superweights.detect import Candidate
from critical_weights.validation.evaluation import loss_record
from critical_weights.validation.perturbation import digest, zeroed
from critical_weights.validation.resume import Resumable, first_block
from critical_weights.validation.selection import Selection, from_pairs, random_selection

log = logging.getLogger(__name__)


def _restore_hook(c: Candidate) -> Callable:
    """Put the candidate's massive activation back at the token where it peaks."""
    def fn(proj: Projection, expert: int | None, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        if proj.parameter != c.projection.parameter or expert != c.expert or not len(y):
            return None
        original = y[:, c.row].float() + c.weight * x[:, c.col].float()  # (n,) the output with w in place
        t = int(original.abs().argmax())
        y = y.clone()
        y[t, c.row] = original[t].to(y.dtype)
        return y

    return fn


class Meter:
    """Zero a selection, measure L, restore; checks every touched tensor against its digest.

    Built with the unperturbed measurement (`baseline`); the hooked condition (`restored`), one
    sequence per pass, gets its own unperturbed pass the first time it is asked for."""

    def __init__(self, model: torch.nn.Module, ids: list[list[int]], batching: tuple[int, int], touched: list[str],
                 step: Callable[[], None] = lambda: None):
        self.model, self.ids, self.batching = model, ids, batching  # batching: (micro_batch_size, batch_tokens)
        self.step = step  # called after each measurement: progress
        self.weights = dict(model.named_parameters())
        self.before = {n: digest(self.weights[n]) for n in touched}
        self.batched = Resumable(model, ids, *batching)
        self.baseline = self.batched.baseline()[0]
        self.one_by_one: Resumable | None = None
        step()

    def _single(self) -> Resumable:
        if self.one_by_one is None:
            self.one_by_one = Resumable(self.model, self.ids, 1)
            loss = self.one_by_one.baseline()[0]
            self.step()
            log.info("baseline, one sequence per pass: loss %.4f", loss)
        return self.one_by_one

    def zero(self, selection: Selection, label: str, hook: tuple[list[Projection], Callable] | None = None) -> dict[str, Any]:
        start = first_block(self.model, selection)  # the hook acts in the candidate's own block
        texts = self.batched if hook is None else self._single()
        with zeroed(self.weights, selection, self.before) as n_changed:
            if hook is None:
                loss = texts.measure(start)[0]
            else:
                with watch(self.model, *hook):
                    loss = texts.measure(start)[0]
        self.step()
        log.info("%s: loss %.4f (baseline %.4f)", label, loss, self.baseline)
        return {**loss_record(loss, self.baseline), "n_weights": int(sum(len(v) for v in selection.values())),
                "n_changed": n_changed}


def planned(n_candidates: int) -> int:
    """The measurements a Meter and `damage` make for `n_candidates`: the baseline; each
    candidate alone and restored, with one more baseline one sequence per pass for the
    restored; then (with any) all together, the top-1..N and the random control."""
    return 1 + 2 * n_candidates + (n_candidates + 3 if n_candidates else 0)


def damage(meter: Meter, candidates: list[Candidate], projections: list[Projection], top: list[tuple[str, int]],
           sizes: dict[str, int], seed: int) -> dict[str, Any]:
    """Every condition above; `top` is the global ranking by rank.metric, best first."""
    n = len(candidates)
    out: dict[str, Any] = {"alone": [], "restored": [], "top_n": []}
    for i, c in enumerate(candidates):
        sel = from_pairs([c.key])
        out["alone"].append(meter.zero(sel, f"candidate {i} alone"))
        out["restored"].append(meter.zero(sel, f"candidate {i} restored", (projections, _restore_hook(c))))
    if not n:
        return out
    chosen = from_pairs([c.key for c in candidates])
    out["all_candidates"] = meter.zero(chosen, "all candidates")
    for k in range(1, n + 1):
        out["top_n"].append({"n": k, **meter.zero(from_pairs(top[:k]), f"top {k} by rank.metric")})
    counts = {name: len(v) for name, v in chosen.items()}
    out["random"] = meter.zero(random_selection(counts, sizes, chosen, seed, n), f"{n} random weights")
    return out
