"""Pruning masks: exact counts per row, per tensor and per N:M group, ties by position, and
bits that pack and unpack to the same mask."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from critical_weights.compression.masks import n_m, pack, pruned_mask, unpack
from critical_weights.core.errors import ParamsError


@pytest.fixture
def scores() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.rand(6, 16)


@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.5, 0.7, 0.99])
def test_per_row_prunes_floor_of_in_times_s_lowest_in_every_row(scores, sparsity):
    pruned = pruned_mask(scores, sparsity, "unstructured", "per_row")
    k = math.floor(16 * sparsity)
    assert pruned.sum(dim=1).tolist() == [k] * 6
    for row, mask in zip(scores, pruned):
        if k:
            assert row[mask].max() < row[~mask].min() if k < 16 else True


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.7])
def test_per_tensor_prunes_floor_of_numel_times_s_lowest_overall(scores, sparsity):
    pruned = pruned_mask(scores, sparsity, "unstructured", "per_tensor")
    assert int(pruned.sum()) == math.floor(96 * sparsity)
    assert scores[pruned].max() < scores[~pruned].min()


@pytest.mark.parametrize("structure", ["2:4", "4:8", "1:4"])
def test_n_m_prunes_n_lowest_of_every_m_consecutive_inputs(scores, structure):
    n, m = n_m(structure)
    pruned = pruned_mask(scores, 0.0, structure)
    groups = pruned.reshape(6, 16 // m, m)
    assert (groups.sum(dim=-1) == n).all(), "exactly N pruned, so at most M - N non-zeros in every group"
    s = scores.reshape(6, 16 // m, m)
    assert (s.masked_fill(~groups, -1).amax(-1) < s.masked_fill(groups, 2).amin(-1)).all()


def test_equal_scores_go_in_row_col_order():
    flat = torch.zeros(2, 8)
    assert pruned_mask(flat, 0.25, "unstructured", "per_row").nonzero().tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert pruned_mask(flat, 0.25, "unstructured", "per_tensor").nonzero().tolist() == [[0, 0], [0, 1], [0, 2], [0, 3]]
    assert pruned_mask(flat, 0.0, "2:4").nonzero().tolist() == [[0, 0], [0, 1], [0, 4], [0, 5], [1, 0], [1, 1], [1, 4], [1, 5]]


def test_an_m_that_does_not_divide_the_inputs_is_a_one_line_error():
    with pytest.raises(ParamsError, match=r"compress.structures: 4:8 needs the input size to be a multiple of 8; "
                                          r"w has 12 inputs"):
        pruned_mask(torch.rand(2, 12), 0.0, "4:8", name="w")


def test_bits_pack_little_endian_along_the_last_axis_and_unpack_back():
    keep = np.array([[1, 0, 0, 0, 0, 0, 0, 0, 1, 1], [0, 1, 0, 0, 0, 0, 0, 1, 0, 0]], dtype=bool)
    bits = pack(keep)
    assert bits.dtype == np.uint8 and bits.shape == (2, 2)
    assert bits.tolist() == [[0b00000001, 0b00000011], [0b10000010, 0]]
    assert np.array_equal(unpack(bits, 10), keep)
    cube = np.random.default_rng(0).random((3, 4, 13)) > 0.5
    assert pack(cube).shape == (3, 4, 2) and np.array_equal(unpack(pack(cube), 13), cube)


@pytest.mark.parametrize("group", ["per_row", "per_tensor"])
@pytest.mark.parametrize("levels", [3, 1000])
def test_the_linear_time_choice_equals_a_stable_sort_with_many_ties(group, levels):
    g = torch.Generator().manual_seed(levels)
    s = torch.randint(0, levels, (7, 40), generator=g).float()
    s[0, :5] = -0.0  # -0.0 and 0.0 are equal scores
    for sparsity in (0.05, 0.3, 0.5, 0.9):
        flat = s if group == "per_row" else s.reshape(1, -1)
        k = math.floor(flat.shape[1] * sparsity)
        want = torch.zeros_like(flat, dtype=torch.bool)
        want.scatter_(-1, torch.sort(flat, dim=-1, stable=True).indices[:, :k], True)
        assert torch.equal(pruned_mask(s, sparsity, "unstructured", group), want.reshape(7, 40))
