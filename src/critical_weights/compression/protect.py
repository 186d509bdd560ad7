"""Which weights a quantisation keeps at their original values: exact choices, one tensor at a time.

- `top_positions`: the k highest scores over all quantised tensors together, for several k at
  once, with no more memory than one tensor's keys. Scores become 32-bit keys ordered as the
  floats are (`sortable`); a histogram of the keys' high 16 bits finds the bin of each k-th
  highest, a histogram of the low 16 bits inside that bin finds the k-th highest key exactly,
  and a third pass takes every key above it and, of the keys equal to it, the first in
  (tensor, position) order. So the choice equals a stable sort of everything, highest first.
- `top_channels`: per tensor (per expert for 3-D expert tensors), the input channels with the
  highest column sums of a score, as AWQ keeps its salient channels; ties by position.

Scores come as each tensor's (out, in) matrix (critical_weights.compression.scores).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from critical_weights.core.errors import NumericalError

HALF = 16  # bits per histogram level
BINS = 1 << HALF
OFFSET = 1 << (HALF - 1)  # a key's high half (signed, from -2^15) + OFFSET is its bin


def sortable(scores: torch.Tensor) -> torch.Tensor:
    """int32 keys ordered as the float32 scores are (-0.0 and 0.0 one key): a float's bits,
    with every bit but the sign flipped for negative floats."""
    if bool(torch.isnan(scores).any()):
        raise NumericalError("a score is NaN, so no top-k is defined; try model.dtype float32")
    keys = scores.detach().to(torch.float32, copy=True).reshape(-1).add_(0.0).view(torch.int32)  # -0.0 + 0.0 is 0.0
    keys.bitwise_xor_((keys < 0).to(torch.int32).mul_(0x7FFFFFFF))
    return keys


def _bin_of(histogram: torch.Tensor, k: int) -> tuple[int, int]:
    """(bin, how many of the k lie in it): the bin holding the k-th highest entry, counting
    from the top bin down."""
    from_top = torch.cumsum(histogram.flip(0), 0)
    i = int(torch.searchsorted(from_top, torch.tensor(k, dtype=from_top.dtype)))  # first with from_top >= k
    above = int(from_top[i - 1]) if i else 0
    return len(histogram) - 1 - i, k - above


def top_positions(passes: Callable[[], Iterable[torch.Tensor]], ks: list[int]) -> dict[int, list[torch.Tensor]]:
    """For each k: per tensor, the flat positions (ascending) of its share of the k highest
    scores over every tensor `passes()` yields, in the same order each call."""
    total = 0
    high = torch.zeros(BINS, dtype=torch.int64)
    for s in passes():  # 1: high halves
        keys = sortable(s)
        total += keys.numel()
        high += torch.bincount((keys >> HALF).add_(OFFSET), minlength=BINS)
    wanted = sorted({k for k in ks if k > 0})
    if wanted and wanted[-1] > total:
        raise ValueError(f"top_positions: k = {wanted[-1]} exceeds the {total} scores")
    bins = {k: _bin_of(high, k) for k in wanted}
    low = {b: torch.zeros(BINS, dtype=torch.int64) for b, _ in bins.values()}
    for s in passes():  # 2: low halves inside each k's bin
        keys = sortable(s)
        for b, hist in low.items():
            hist += torch.bincount(keys[(keys >> HALF) == b - OFFSET] & (BINS - 1), minlength=BINS)
    threshold, ties = {}, {}
    for k, (b, inside) in bins.items():
        lo, left = _bin_of(low[b], inside)
        threshold[k] = ((b - OFFSET) << HALF) | lo  # a Python int, signed as the keys are
        ties[k] = left  # of the keys equal to the threshold, how many the top k takes (the first ones)
    out: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for s in passes():  # 3: take them
        keys = sortable(s)
        for k in ks:
            if k <= 0:
                out[k].append(torch.zeros(0, dtype=torch.int64))
                continue
            above = (keys > threshold[k]).nonzero().reshape(-1)
            equal = (keys == threshold[k]).nonzero().reshape(-1)[: ties[k]]
            ties[k] -= equal.numel()
            out[k].append(torch.sort(torch.cat([above, equal])).values)
    return out


def top_channels(scores: torch.Tensor, units: int, share: float) -> tuple[torch.Tensor, int]:
    """(protected, channels per unit): True on every row of the floor(in x share) input
    channels of each unit (expert, or the whole matrix) with the highest column sums."""
    rows, cols = scores.shape
    n = math.floor(cols * share)
    protected = torch.zeros(rows, cols, dtype=torch.bool, device=scores.device)
    if n == 0:
        return protected, 0
    sums = scores.reshape(units, rows // units, cols).sum(dim=1, dtype=torch.float64)  # (units, in)
    chosen = torch.sort(-sums, dim=-1, stable=True).indices[:, :n]
    view = protected.view(units, rows // units, cols)
    view.scatter_(-1, chosen[:, None, :].expand(units, rows // units, n), True)
    return protected, n
