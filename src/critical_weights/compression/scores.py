"""Every weight's score, rebuilt from the saved sums (critical_weights.artifacts.sums) by the
metric's own score function: the same formula and the same float32 arithmetic as the
sensitivity stage's, with no forward or backward pass.

Scores come as the (out, in) matrix a pruning mask is made on (critical_weights.compression.masks):
nn.Linear and (E, out, in) experts as stored, Conv1D (in, out) and (E, in, out) experts turned
so that rows are output units; `to_stored` turns a mask back into the parameter's own shape.
`random` is the control: uniform scores drawn with `seed`, one stream per tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from critical_weights.artifacts.sums import Sums
from critical_weights.core.streams import STREAM_PRUNE
from critical_weights.metrics import REGISTRY
from critical_weights.sensitivity.scoring import metric_scores

RANDOM = "random"
TURNED = ("conv1d", "experts_in_out")  # layouts stored (…, in, out)


@dataclass
class _One:
    """The accumulators of one parameter, as scoring.metric_scores reads them."""

    grad: dict[str, torch.Tensor] = field(default_factory=dict)
    fisher: dict[str, torch.Tensor] = field(default_factory=dict)
    hutchinson: dict[str, torch.Tensor] = field(default_factory=dict)
    act_sq: dict[str, torch.Tensor] = field(default_factory=dict)


def to_out_in(stored: torch.Tensor, kind: str) -> torch.Tensor:
    """A parameter (any ndim >= 2) as its (out, in) matrix."""
    if kind == "experts_in_out":
        return stored.transpose(1, 2).reshape(-1, stored.shape[1])
    if kind == "conv1d":
        return stored.t()
    return stored.reshape(-1, stored.shape[-1])


def to_stored(matrix: torch.Tensor, kind: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The inverse of `to_out_in`: an (out, in) matrix back in the stored shape."""
    if kind == "experts_in_out":
        e, n_in, n_out = shape
        return matrix.reshape(e, n_out, n_in).transpose(1, 2).contiguous()
    if kind == "conv1d":
        return matrix.t().contiguous()
    return matrix.reshape(shape)


def scores(metric: str, name: str, weight: torch.Tensor, kind: str, sums: Sums, seed: int, index: int) -> torch.Tensor:
    """(out, in) float32 scores of parameter `name` (number `index` among the pruned tensors)."""
    if metric == RANDOM:
        rng = np.random.default_rng([seed, STREAM_PRUNE, index])
        drawn = torch.from_numpy(rng.random(weight.numel(), dtype=np.float32)).reshape(weight.shape)
        return to_out_in(drawn, kind).to(weight.device)
    one = _One()
    for need in REGISTRY[metric].needs:
        getattr(one, need)[name] = torch.from_numpy(sums.get(need, name)).to(weight.device)
    with torch.no_grad():
        stored = metric_scores(metric, name, weight, one, slice(0, weight.reshape(-1, weight.shape[-1]).shape[0]))
    return to_out_in(stored.reshape(weight.shape), kind)


def input_norms(name: str, weight: torch.Tensor, kind: str, sums: Sums) -> torch.Tensor:
    """(out, in) float32: at every weight, the L2 norm of the input it multiplies (wanda's
    ||x_j||, from the same saved sums of x², so the same float32 arithmetic)."""
    one = _One(act_sq={name: torch.from_numpy(sums.get("act_sq", name)).to(weight.device)})
    with torch.no_grad():
        stored = metric_scores("wanda", name, torch.ones_like(weight), one,
                               slice(0, weight.reshape(-1, weight.shape[-1]).shape[0]))
    return to_out_in(stored.reshape(weight.shape), kind)
