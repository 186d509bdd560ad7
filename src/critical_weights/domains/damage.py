"""The cross-group damage matrix: zero one group's critical weights, measure every group.

Row g, column h: the loss increase on group h's texts when group g's top-N (by `rank.metric`)
is set to 0, measured with validate's loss code on h's held-out texts, and on h's in-sample
texts beside them. The controls are `domains.random_draws` random sets of N weights spread
over the tensors as the groups' top-N sets are together (each tensor's share of their union,
rounded by largest remainder), none of those weights, measured on every group's held-out
texts: their mean and spread are the damage any N weights of those tensors do. Each group's
own damage D[g, g] is set against the controls on its texts as validate sets a critical set
against its random_k draws (`validation.damage.vs_random`: a ratio only when the controls
stand out of float noise, and a z-score).

How diagonal the matrix is, two ways, each as the mean and spread (sample std) over groups:
- `row`: D[g, g] / mean over h != g of D[g, h]: does zeroing g's set hurt g more than the
  others?
- `column`: D[h, h] / mean over g != h of D[g, h]: is h hurt most by its own set?
A value near 1 says the sets do not tell the groups apart. A loss past ln V (a uniform guess)
is marked saturated: there a loss no longer orders damage, and the ratios say little.

Each measurement starts at the first block the zeroed weights sit in, from the hidden states
the baseline kept (critical_weights.validation.resume): the same bits as a full pass.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from critical_weights.config.params import Params
from critical_weights.core.progress import counted
from critical_weights.domains.groups import Group
from critical_weights.domains.sets import Critical
from critical_weights.validation.damage import NOISE_REL, vs_random
from critical_weights.validation.evaluation import loss_and_top1, loss_record
from critical_weights.validation.perturbation import digest, zeroed
from critical_weights.validation.resume import Resumable, first_block
from critical_weights.validation.selection import Selection, from_pairs, random_selection

TEXTS = ("heldout", "in_sample")


def selection_of(table: Any) -> Selection:
    return from_pairs(list(zip(table["parameter"].to_pylist(), table["flat_index"].to_pylist())))


def dominance(matrix: list[list[float | None]]) -> dict[str, Any]:
    """Row and column dominance of a square matrix of loss increases (module docstring); a row
    with a loss that is not finite, or whose other cells do not add up to a loss increase, has
    none."""
    d = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=np.float64)
    n = len(d)
    out: dict[str, Any] = {}
    for kind in ("row", "column"):
        m = d if kind == "row" else d.T
        ratios = []
        for g in range(n):
            off = np.delete(m[g], g)
            ok = np.isfinite(m[g]).all() and off.mean() > 0
            ratios.append(float(m[g, g] / off.mean()) if ok else None)
        finite = [r for r in ratios if r is not None]
        out[kind] = {"per_group": ratios, "mean": float(np.mean(finite)) if finite else None,
                     "std": float(np.std(finite, ddof=1)) if len(finite) > 1 else None}
    return out


class Measured:
    """One text set: its baseline, then losses under a perturbation from any block, resumed
    from the baseline's kept block inputs where `resume` (critical_weights.validation.resume)."""

    def __init__(self, model: torch.nn.Module, ids: list[list[int]], micro_batch_size: int, batch_tokens: int,
                 resume: bool):
        self.model, self.ids, self.batching = model, ids, (micro_batch_size, batch_tokens)
        self.resumable = Resumable(model, ids, micro_batch_size, batch_tokens) if resume else None

    def baseline(self) -> tuple[float, torch.Tensor]:
        if self.resumable is not None:
            return self.resumable.baseline()
        return loss_and_top1(self.model, self.ids, *self.batching)

    def measure(self, start: int) -> tuple[float, torch.Tensor]:
        if self.resumable is not None:
            return self.resumable.measure(start)
        return loss_and_top1(self.model, self.ids, *self.batching)


def matched_counts(selections: list[Selection], n: int) -> dict[str, int]:
    """n weights over the tensors as the selections are spread together: each tensor's share of
    their union, rounded by largest remainder (ties by tensor order)."""
    union = {name: len(set().union(*(set(s[name].tolist()) for s in selections if name in s)))
             for name in dict.fromkeys(name for s in selections for name in s)}
    total = sum(union.values())
    exact = {name: n * c / total for name, c in union.items()}
    out = {name: math.floor(x) for name, x in exact.items()}
    order = sorted(exact, key=lambda name: -(exact[name] - out[name]))
    for name in order[:n - sum(out.values())]:
        out[name] += 1
    return {name: c for name, c in out.items() if c}


def union_of(selections: list[Selection]) -> Selection:
    names = dict.fromkeys(name for s in selections for name in s)
    return {name: np.unique(np.concatenate([s[name] for s in selections if name in s])) for name in names}


def _finite(values: list[float | None]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def damage_matrix(model: torch.nn.Module, shown: list[Group], critical: list[Critical], params: Params) -> dict[str, Any]:
    """The matrix on held-out and in-sample texts, the random controls, and the dominance."""
    dp, sp = params.domains, params.sensitivity
    weights = dict(model.named_parameters())
    sizes = {n: p.numel() for n, p in weights.items()}
    rows = [selection_of(c.top) for c in critical]
    avoid = union_of(rows)
    per_tensor = matched_counts(rows, dp.top_n)
    controls = [random_selection(per_tensor, sizes, avoid, params.seed, dp.top_n, d) for d in range(dp.random_draws)]
    before = {n: digest(weights[n]) for n in sorted({n for s in [*rows, *controls] for n in s})}
    g = len(shown)
    total = 2 * g + 2 * g * g + dp.random_draws * g
    skips = any(first_block(model, s) > 0 for s in [*rows, *controls])  # else no block input is worth keeping
    with counted("domains: loss evaluations", total) as step:
        texts = {(w, i): Measured(model, getattr(grp, w), sp.micro_batch_size, sp.batch_tokens, skips)
                 for i, grp in enumerate(shown) for w in TEXTS}
        baseline = {}
        for key, r in texts.items():
            baseline[key] = r.baseline()
            step()

        def measure(selection: Selection, which: tuple[str, ...]) -> dict[tuple[str, int], dict[str, Any]]:
            start = first_block(model, selection)
            got = {}
            with zeroed(weights, selection, before) as n_changed:
                for key, r in texts.items():
                    if key[0] not in which:
                        continue
                    loss, top1 = r.measure(start) if n_changed else baseline[key]
                    got[key] = {**loss_record(loss, baseline[key][0]),
                                "top1_agreement": float((top1 == baseline[key][1]).double().mean())}
                    step()
            return got

        critical_rows = [measure(s, TEXTS) for s in rows]
        control_rows = [measure(s, ("heldout",)) for s in controls]
    out: dict[str, Any] = {
        "baseline": {w: [baseline[(w, i)][0] for i in range(g)] for w in TEXTS},
        "controls": {"n_weights": sum(per_tensor.values()), "draws": dp.random_draws, "per_tensor": per_tensor,
                     "matched_to": "the groups' top-N sets together: each tensor's share of their union, none of "
                                   "their weights"},
    }
    for w in TEXTS:
        out[w] = {"loss_increase": [[r[(w, h)]["loss_increase"] for h in range(g)] for r in critical_rows],
                  "loss": [[r[(w, h)]["loss"] for h in range(g)] for r in critical_rows],
                  "top1_agreement": [[r[(w, h)]["top1_agreement"] for h in range(g)] for r in critical_rows]}
        out[w]["dominance"] = dominance(out[w]["loss_increase"])
    drawn = [[c[("heldout", h)]["loss_increase"] for h in range(g)] for c in control_rows]  # (draws, groups), None if not finite
    per_group = [_finite([d[h] for d in drawn]) for h in range(g)]
    out["controls"].update({
        "loss_increase": drawn,
        "mean": [float(np.mean(v)) if v else None for v in per_group],
        "std": [float(np.std(v, ddof=1)) if len(v) > 1 else None for v in per_group],
    })
    floor = NOISE_REL * float(np.mean([abs(b) for b in out["baseline"]["heldout"]]))
    own = [vs_random(out["heldout"]["loss_increase"][h][h], [d[h] for d in drawn], floor) for h in range(g)]
    ratios, zs = _finite([o["ratio"] for o in own]), _finite([o["z"] for o in own])
    out["own_vs_random"] = {"per_group": own, "mean_ratio": float(np.mean(ratios)) if ratios else None,
                            "n_ratios": len(ratios), "mean_z": float(np.mean(zs)) if zs else None}
    out["ln_vocab"] = math.log(model.config.vocab_size) if getattr(model.config, "vocab_size", None) else None
    return out
