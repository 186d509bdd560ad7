"""The metrics, each in one place: its name, the accumulators it needs, and its score.

A score function gets `w`, a float32 copy of some rows of the weight viewed as a matrix
(r, cols), which it may overwrite, and `part(accumulator)`, the same rows of that accumulator
((r, cols) float32; for `act_sq`, the sums of squared inputs shaped to broadcast against w:
(cols,), (r, 1) or (r, cols), see `scoring._input_rows`). It returns the scores, (r, cols)
float32. `accumulate` fills exactly the accumulators the asked metrics need; `grad` is always
filled, since the loss's gradient is what the stage computes. `params` takes its metric
choices from METRICS, and the metric table in docs/loss-and-metrics.md is checked against
`formula` and `meaning` (tests/test_metrics.py).

Adding a metric: one `Metric(...)` entry below, plus its row in the table of
docs/loss-and-metrics.md. A metric that needs a new kind of accumulator also needs that
accumulator in `accumulate`.

This module imports nothing heavy: params imports it, and the torch-free stages import params.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

ACCUMULATORS = ("grad", "fisher", "hutchinson", "act_sq")  # see critical_weights.sensitivity.accumulate

Tensor = Any  # a torch.Tensor; not imported, so that this module stays torch-free
Part = Callable[[str], Tensor]


@dataclass(frozen=True)
class Metric:
    name: str
    needs: tuple[str, ...]  # accumulators, from ACCUMULATORS
    score: Callable[[Tensor, Part], Tensor]  # (w, part) -> scores, see the module docstring
    formula: str  # as the metric table in docs/loss-and-metrics.md writes it
    meaning: str


def _grad_x_weight(w: Tensor, part: Part) -> Tensor:
    return w.mul_(part("grad")).abs_()  # |w g|


def _gradient(w: Tensor, part: Part) -> Tensor:
    return part("grad").abs()  # |g|


def _magnitude(w: Tensor, part: Part) -> Tensor:
    return w.abs_()  # |w|


def _fisher(w: Tensor, part: Part) -> Tensor:
    return part("fisher").clone()  # mean over n of g_n^2


def _taylor2(w: Tensor, part: Part) -> Tensor:
    return w.mul_(w).mul_(part("fisher")).mul_(0.5)  # 1/2 fisher w^2


def _hutchinson(w: Tensor, part: Part) -> Tensor:
    return w.mul_(w).mul_(part("hutchinson")).mul_(0.5)  # 1/2 H_ii w^2


def _wanda(w: Tensor, part: Part) -> Tensor:
    norm = part("act_sq").sqrt()  # L2 norm of each weight's input feature, broadcastable against w
    return w.abs_().mul_(norm)  # |w_ij| ||x_j||_2


REGISTRY: dict[str, Metric] = {m.name: m for m in (
    Metric("grad_x_weight", ("grad",), _grad_x_weight, "|w g|", "first-order loss change if w is zeroed"),
    Metric("gradient", ("grad",), _gradient, "|g|", ""),
    Metric("magnitude", (), _magnitude, "|w|", "baseline that needs no data"),
    Metric("fisher", ("fisher",), _fisher, "mean over texts n of g_n²", "empirical Fisher diagonal, per text"),
    Metric("taylor2", ("fisher",), _taylor2, "½ fisher w²", "second-order (OBD) loss change if w is zeroed"),
    Metric("hutchinson", ("hutchinson",), _hutchinson, "½ H_ii w²", "H_ii from Rademacher probes z, as E[z (Hz)]"),
    Metric("wanda", ("act_sq",), _wanda, "|w_ij| ‖x_j‖₂",
           "every weight that multiplies an input (Linear, Conv1D, routers, experts)"),
)}

METRICS = tuple(REGISTRY)  # the allowed values of sensitivity.metrics and rank.metric, in this order


def accumulators_for(metrics: Iterable[str]) -> set[str]:
    """Every accumulator that `metrics` need, `grad` always among them."""
    return {"grad", *(need for m in metrics for need in REGISTRY[m].needs)}
