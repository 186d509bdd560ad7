"""Pruning masks, exact by construction, and their packed form for export.

Every function takes scores as the (out, in) matrix of one tensor (`row` the output unit,
`col` the input feature, as critical_weights.model.layout defines them; for 3-D experts the
rows of every expert stacked) and returns `pruned`, a bool matrix of the same shape, True
where a weight is set to 0. The lowest scores go first; among equal scores the weight
earlier in (row, col) order goes first, so a mask never depends on the sort algorithm:
- `per_row` (Wanda's comparison group): floor(in x s) weights in every row;
- `per_tensor`: floor(rows x in x s) weights in the whole matrix;
- `N:M`: N weights in every M consecutive inputs of a row, leaving at most M - N non-zeros
  (2:4 and 4:8 prune half); M must divide the input size.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from critical_weights.core.errors import ParamsError

GROUPS = ("per_row", "per_tensor")


def n_m(structure: str) -> tuple[int, int] | None:
    """(N, M) of an `N:M` structure; None for `unstructured`."""
    if structure == "unstructured":
        return None
    n, _, m = structure.partition(":")
    return int(n), int(m)


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Positions (…, k) of the k lowest scores along the last axis, ties by position (a stable sort)."""
    return torch.sort(scores, dim=-1, stable=True).indices[..., :k]


def _lowest_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """True at the k lowest scores along the last axis, ties by position: the same choice as a
    stable sort, found in linear time from the k-th lowest value (`kthvalue`): everything
    below it, then as many of the scores equal to it as are still needed, first by position."""
    kth = torch.kthvalue(scores, k, dim=-1, keepdim=True).values
    upto = scores <= kth
    if bool((upto.sum(dim=-1) == k).all()):
        return upto  # no tie past the k-th: the usual case, and the cheap one
    below = scores < kth
    tied = upto & ~below
    need = k - below.sum(dim=-1, keepdim=True)
    return below | (tied & (torch.cumsum(tied, dim=-1) <= need))


def pruned_mask(scores: torch.Tensor, sparsity: float, structure: str = "unstructured", group: str = "per_row",
                name: str = "") -> torch.Tensor:
    """True where a weight is pruned; see the module docstring for the rules."""
    rows, cols = scores.shape
    pruned = torch.zeros(rows, cols, dtype=torch.bool, device=scores.device)
    nm = n_m(structure)
    if nm is not None:
        n, m = nm
        if cols % m:
            raise ParamsError([f"compress.structures: {structure} needs the input size to be a multiple of {m}; "
                               f"{name} has {cols} inputs (use unstructured, or an M that divides {cols})"])
        view = scores.reshape(rows, cols // m, m)
        pruned.view(rows, cols // m, m).scatter_(-1, _lowest(view, n), True)
        return pruned
    if group == "per_row":
        k = math.floor(cols * sparsity)
        return _lowest_mask(scores, k) if k else pruned
    k = math.floor(rows * cols * sparsity)
    return _lowest_mask(scores.reshape(-1), k).reshape(rows, cols) if k else pruned


def pack(keep: np.ndarray) -> np.ndarray:
    """Bool array -> uint8 bits along the last axis, little bit order: shape (..., ceil(n / 8)),
    bit j of byte b is element 8 b + j (as compressed-tensors' bitmask stored them)."""
    return np.packbits(np.asarray(keep, dtype=bool), axis=-1, bitorder="little")


def unpack(bits: np.ndarray, n: int) -> np.ndarray:
    """The inverse of `pack`, for a last axis of `n` elements."""
    return np.unpackbits(bits, axis=-1, count=n, bitorder="little").astype(bool)
