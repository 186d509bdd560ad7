"""Dropping whole experts of a Mixture-of-Experts model: does the ranking find the experts
the model cannot do without ("super experts"), and the ones it can?

An expert's importance is the sum of `rank.metric`'s scores over every expert tensor of its
layer (the shards' per-expert sums, the `sum` column of the expert-importance report,
critical_weights.reports.experts). For each n of `compress.drop_experts`, three choices are
measured, n experts in every MoE layer at once:
- `least`: the n least important of each layer (lowest sum; ties by expert index);
- `most`: the n most important;
- `random`: n drawn at random in each layer, `compress.expert_draws` times, with `seed`.

Dropping an expert zeroes every parameter of the experts module along its expert axis (its
weights, and its biases where it has them), so its output is zero; the router is left as it
is: it still sends tokens to the dropped expert, and the other experts' routing weights are
not renormalised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from critical_weights.core.errors import ModelError, ParamsError
from critical_weights.core.streams import STREAM_EXPERTS
from critical_weights.reports.experts import layer_scores

CHOICES = ("least", "most", "random")


@dataclass(frozen=True)
class Layer:
    """One MoE layer: its block, experts module path and per-expert importance."""

    block: int | None
    experts: str
    importance: np.ndarray  # (E,) float64: the sum of rank.metric's scores per expert


def layers_of(meta: dict[str, Any], stats: pa.Table, metric: str) -> list[Layer]:
    """Every MoE layer the shards describe, with its experts' importance by `metric`."""
    return [Layer(layer["block"], layer["experts"], total)
            for layer, (_, total, _) in zip(meta.get("moe_layers", []), layer_scores(meta, stats, metric))]


def unscored(layers: list[Layer]) -> list[str]:
    """The layers whose experts' importance is all zero: rank.metric scored none of their
    expert tensors, so least and most would be the same arbitrary experts."""
    return [layer.experts for layer in layers if not np.any(layer.importance)]


def check_counts(layers: list[Layer], counts: tuple[int, ...]) -> None:
    """A count that would drop every expert of a layer is a one-line error."""
    if not layers or not counts:
        return
    smallest = min(layers, key=lambda layer: len(layer.importance))
    if max(counts) >= len(smallest.importance):
        raise ParamsError([f"compress.drop_experts: {max(counts)} would drop every expert of {smallest.experts} "
                           f"({len(smallest.importance)} experts); each count must be below {len(smallest.importance)}, "
                           "or [] for none"])


def chosen(layer: Layer, choice: str, n: int, seed: int = 0, draw: int = 0) -> list[int]:
    """The n experts of `layer` that `choice` drops, ascending."""
    order = np.argsort(layer.importance, kind="stable")  # least important first, ties by index
    if choice == "least":
        picked = order[:n]
    elif choice == "most":
        picked = np.argsort(-layer.importance, kind="stable")[:n]
    else:
        rng = np.random.default_rng([seed, STREAM_EXPERTS, layer.block if layer.block is not None else -1, n, draw])
        picked = rng.choice(len(layer.importance), size=n, replace=False)
    return sorted(int(e) for e in picked)


def plan(layers: list[Layer], counts: tuple[int, ...], draws: int, seed: int) -> list[dict[str, Any]]:
    """Every drop the stage measures: (n, choice, draw) and the experts of each layer; none for
    a model without MoE layers."""
    out: list[dict[str, Any]] = []
    if not layers:
        return out
    for n in counts:
        for choice in CHOICES:
            for draw in range(draws if choice == "random" else 1):
                out.append({"n": n, "choice": choice, "draw": draw,
                            "dropped": {layer.experts: chosen(layer, choice, n, seed, draw) for layer in layers}})
    return out


class Dropper:
    """Zero experts in place, and write their originals back: each drop saves only the slices
    it zeroes."""

    def __init__(self, model: torch.nn.Module, layers: list[Layer]):
        self.params: dict[str, list[torch.Tensor]] = {}
        for layer in layers:
            n = len(layer.importance)
            found = [p for p in model.get_submodule(layer.experts).parameters() if p.ndim >= 1 and p.shape[0] == n]
            if not found:
                raise ModelError(f"compress.drop_experts: {layer.experts} holds no parameter with {n} experts along "
                                 "its first axis, so no expert of it can be dropped; set compress.drop_experts []")
            self.params[layer.experts] = found
        self.saved: list[tuple[torch.Tensor, list[int], torch.Tensor]] = []

    def drop(self, dropped: dict[str, list[int]]) -> None:
        with torch.no_grad():
            for path, experts in dropped.items():
                for p in self.params[path]:
                    self.saved.append((p, experts, p[experts].clone()))
                    p[experts] = 0.0

    def restore(self) -> None:
        with torch.no_grad():
            for p, experts, original in self.saved:
                p[experts] = original
        self.saved = []


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per count: the loss increase of least, most, and the random draws' mean and spread."""
    out = []
    for n in dict.fromkeys(r["n"] for r in rows):
        mine = [r for r in rows if r["n"] == n]
        one = {c: next((r for r in mine if r["choice"] == c), None) for c in ("least", "most")}
        drawn = [r["loss_increase"] for r in mine if r["choice"] == "random"]
        finite = [x for x in drawn if x is not None]
        out.append({
            "n": n,
            "least_loss_increase": one["least"]["loss_increase"] if one["least"] else None,
            "most_loss_increase": one["most"]["loss_increase"] if one["most"] else None,
            "random_loss_increase_mean": float(np.mean(finite)) if finite else None,
            "random_loss_increase_std": float(np.std(finite, ddof=1)) if len(finite) > 1 else None,
            "random_draws": len(drawn),
        })
    return out
