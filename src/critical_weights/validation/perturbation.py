"""Perturbing weights in place, and restoring them bit-exactly.

Perturbations, each applied to the stored value w of the selected weights:
- `zero`: w -> 0;
- `sign_flip`: w -> -w;
- `gauss_noise`: w -> w + N(0, (noise_sigma |w|)^2), noise from the generator given;
- `bit_flip`: one bit of w's stored representation XORed (`sign`, the exponent's highest
  bit `exponent_msb`, or a bit index): float32 viewed as int32, bfloat16 and float16 as int16.

`perturbed` writes the originals back on exit and checks every touched tensor's sha256
against one taken before, so a measurement can never leak into the next.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator

import numpy as np
import torch

from critical_weights.config.params import ValidateParams
from critical_weights.core.errors import ModelError, ParamsError
from critical_weights.validation.selection import Selection

# float dtype -> (integer view, bits, the exponent's highest bit)
_LAYOUT = {
    torch.float32: (torch.int32, 32, 30),
    torch.bfloat16: (torch.int16, 16, 14),
    torch.float16: (torch.int16, 16, 14),
}
_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class RestoreError(RuntimeError):
    """A perturbed tensor did not come back bit-exactly: a bug, never the user's doing."""


def bit_index(dtype: torch.dtype, bit: str | int) -> int:
    """The bit `validate.bit` names, for weights stored as `dtype`."""
    if dtype not in _LAYOUT:
        raise ModelError(f"validate.perturbations: bit_flip needs float32, bfloat16 or float16 weights, not {dtype}")
    _, width, exponent_msb = _LAYOUT[dtype]
    if bit == "sign":
        return width - 1
    if bit == "exponent_msb":
        return exponent_msb
    if not 0 <= int(bit) < width:
        raise ParamsError([f"validate.bit: {bit} is beyond the {width} bits of {str(dtype).removeprefix('torch.')} "
                           f"weights; use sign, exponent_msb or 0..{width - 1}"])
    return int(bit)


def flip_bit(values: torch.Tensor, bit: int) -> torch.Tensor:
    """`values` (n,) float with `bit` of each stored representation XORed; same dtype."""
    int_dtype, width, _ = _LAYOUT[values.dtype]
    mask = 1 << bit
    if mask >= 1 << (width - 1):
        mask -= 1 << width  # the top bit, as the signed integer the view holds
    return (values.contiguous().view(int_dtype) ^ mask).view(values.dtype)


def perturbed_values(kind: str, values: torch.Tensor, vp: ValidateParams, rng: np.random.Generator) -> torch.Tensor:
    """New values for the stored `values` (n,), in their dtype."""
    if kind == "zero":
        return torch.zeros_like(values)
    if kind == "sign_flip":
        return -values
    if kind == "gauss_noise":
        noise = torch.from_numpy(rng.standard_normal(values.numel())).to(values.device)  # (n,) float64
        w = values.double()
        return (w + noise * vp.noise_sigma * w.abs()).to(values.dtype)
    if kind == "bit_flip":
        return flip_bit(values, bit_index(values.dtype, vp.bit))
    raise ValueError(f"unknown perturbation {kind!r}")


def flat_view(weight: torch.Tensor) -> torch.Tensor:
    """(numel,) view sharing `weight`'s storage."""
    if not weight.is_contiguous():
        raise ModelError(f"a weight of shape {tuple(weight.shape)} is not contiguous; cannot perturb it in place")
    return weight.detach().view(-1)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The same memory as integers, so copies and comparisons are bit-exact (NaN, -0.0)."""
    return t.view(_INT_OF_SIZE[t.element_size()])


def digest(weight: torch.Tensor) -> str:
    """sha256 of a tensor's stored bytes."""
    data = flat_view(weight).view(torch.uint8).cpu().numpy()  # (numel * itemsize,) uint8
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def perturbed(weights: dict[str, torch.Tensor], selection: Selection, kind: str, vp: ValidateParams,
              rng: np.random.Generator, before: dict[str, str]) -> Iterator[int]:
    """Perturb the selected weights in place by `kind`; yield how many of them changed.

    On exit the original values are written back and each touched tensor's sha256 must
    equal `before[name]`, else RestoreError."""
    with _replaced(weights, selection, lambda values: perturbed_values(kind, values, vp, rng), before, kind) as n:
        yield n


@contextlib.contextmanager
def zeroed(weights: dict[str, torch.Tensor], selection: Selection, before: dict[str, str]) -> Iterator[int]:
    """The selected weights set to 0 (yield how many changed), restored bit-exactly on exit."""
    with _replaced(weights, selection, torch.zeros_like, before, "zero") as n:
        yield n


@contextlib.contextmanager
def _replaced(weights: dict[str, torch.Tensor], selection: Selection, new_values: Callable[[torch.Tensor], torch.Tensor],
              before: dict[str, str], label: str) -> Iterator[int]:
    """Write `new_values(original)` (n,) over each tensor's selected weights, yield how many
    changed, and restore the originals on exit, checked against `before`."""
    saved = []  # (name, index (n,) int64, original (n,) model dtype)
    with torch.no_grad():
        for name, flat_index in selection.items():
            flat = flat_view(weights[name])
            index = torch.from_numpy(flat_index).to(flat.device)
            saved.append((name, index, flat[index].clone()))
    try:
        changed = 0
        with torch.no_grad():
            for name, index, original in saved:
                new = new_values(original)
                _bits(flat_view(weights[name]))[index] = _bits(new)
                changed += int((_bits(new) != _bits(original)).sum())
        yield changed
    finally:
        with torch.no_grad():
            for name, index, original in saved:
                _bits(flat_view(weights[name]))[index] = _bits(original)
        for name, _, _ in saved:
            if digest(weights[name]) != before[name]:
                raise RestoreError(f"parameter {name}: not restored bit-exactly after {label}")
