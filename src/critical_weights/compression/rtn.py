"""Round-to-nearest (RTN) quantisation, in groups along each row's inputs, as AWQ's
`pseudo_quantize_tensor` (mit-han-lab/llm-awq) computes it, in float32.

A weight matrix comes as (out, in) (critical_weights.compression.scores.to_out_in); every row is
cut into groups of `group_size` consecutive inputs, the last one smaller when `group_size` does
not divide the input size. Each group gets its own grid from its own min and max:
- asymmetric, 2^b levels: scale = max(max - min, 1e-5) / (2^b - 1), zero = clamp(round(-min /
  scale), 0, 2^b - 1), q = clamp(round(w / scale) + zero, 0, 2^b - 1), w' = (q - zero) scale;
- symmetric, levels -2^(b-1) .. 2^(b-1) - 1: scale = max(max |w|, 1e-5) / (2^(b-1) - 1), q =
  clamp(round(w / scale), -2^(b-1), 2^(b-1) - 1), w' = q scale.
round is half to even (torch.round). The 1e-5 floor keeps a group of zeros at zero.
"""

from __future__ import annotations

import torch

BITS = (2, 8)  # the allowed range, both ends included
FLOOR = 1e-5


def _grid(w: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """RTN of `w` (rows, groups, g), each (row, group) on its own grid."""
    if symmetric:
        top, bottom = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
        scale = w.abs().amax(dim=-1, keepdim=True).clamp_(min=FLOOR) / top
        return torch.round(w / scale).clamp_(bottom, top).mul_(scale)
    top = 2**bits - 1
    high, low = w.amax(dim=-1, keepdim=True), w.amin(dim=-1, keepdim=True)
    scale = (high - low).clamp_(min=FLOOR) / top
    zero = torch.round(-low / scale).clamp_(0, top)
    return (torch.round(w / scale).add_(zero).clamp_(0, top).sub_(zero)).mul_(scale)


def quantized(matrix: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> torch.Tensor:
    """The (out, in) matrix after RTN, float32, a new tensor."""
    w = matrix.detach().float()
    rows, cols = w.shape
    full = cols - cols % group_size
    out = torch.empty_like(w)
    if full:
        out[:, :full] = _grid(w[:, :full].reshape(rows, full // group_size, group_size), bits, symmetric).reshape(rows, full)
    if full < cols:
        out[:, full:] = _grid(w[:, full:].reshape(rows, 1, cols - full), bits, symmetric).reshape(rows, cols - full)
    return out
