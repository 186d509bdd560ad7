"""Round-to-nearest against a hand computation, element by element in float32: both grids, a
smaller last group, a group of zeros, ties to even, and never more than 2^b levels a group."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from critical_weights.compression.rtn import FLOOR, quantized

F = np.float32


def _by_hand(group: list[float], bits: int, symmetric: bool) -> list[float]:
    """One group, each step a float32 operation as the module docstring writes it."""
    w = [F(v) for v in group]
    if symmetric:
        top, bottom = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
        scale = F(max(F(max(abs(v) for v in w)), F(FLOOR)) / F(top))
        return [F(min(max(np.round(v / scale), bottom), top) * scale) for v in w]
    top = 2**bits - 1
    scale = F(max(F(max(w) - min(w)), F(FLOOR)) / F(top))
    zero = F(min(max(np.round(F(-min(w)) / scale), 0), top))
    return [F(F(min(max(F(np.round(v / scale) + zero), 0), top) - zero) * scale) for v in w]


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_every_group_equals_the_hand_computation_with_a_smaller_last_group(bits, symmetric):
    w = torch.randn(5, 11, generator=torch.Generator().manual_seed(bits)) * 0.1  # groups of 4: 4, 4 and 3
    got = quantized(w, bits, 4, symmetric)
    for r in range(5):
        want = [x for start in (0, 4, 8) for x in _by_hand(w[r, start:start + 4].tolist(), bits, symmetric)]
        assert got[r].tolist() == [float(x) for x in want]


def test_a_worked_example_and_ties_to_even():
    # asymmetric 2 bits over [0, 0.75]: scale 0.25, zero 0; 0.125 / 0.25 = 0.5 rounds to 0, 0.375 -> 1.5 -> 2
    got = quantized(torch.tensor([[0.0, 0.125, 0.375, 0.75]]), 2, 4, False)
    assert got.tolist() == [[0.0, 0.0, 0.5, 0.75]]
    # symmetric 3 bits, max |w| 3: scale 1; -1.5 -> -2 and 2.5 -> 2 (both to even), -0.5 -> -0
    got = quantized(torch.tensor([[3.0, -1.5, 2.5, -0.5]]), 3, 4, True)
    assert got.tolist() == [[3.0, -2.0, 2.0, -0.0]]


def test_a_group_of_zeros_stays_zero_and_levels_are_at_most_two_to_the_bits():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    w[:, :16] = 0.0
    for bits in (2, 3, 4):
        for symmetric in (False, True):
            got = quantized(w, bits, 16, symmetric)
            assert torch.equal(got[:, :16], torch.zeros(8, 16))
            for r in range(8):
                for start in range(16, 64, 16):
                    assert len(set(got[r, start:start + 16].tolist())) <= 2**bits
            assert (got - w).abs().max() < w.abs().max()  # a rounding, not a rewrite
