"""The kept weights are exactly a stable sort's choice: the global top k over many tensors,
for several k at once, ties by (tensor, position), negative scores and zeros of either sign
included; and the top input channels per tensor and per expert."""

from __future__ import annotations

import pytest
import torch

from critical_weights.compression.protect import sortable, top_channels, top_positions
from critical_weights.core.errors import NumericalError


def test_keys_order_as_the_floats_do_with_one_key_for_zero():
    x = torch.tensor([-3e38, -2.0, -1.0, -1e-40, -0.0, 0.0, 1e-40, 1.0, 3e38])
    keys = sortable(x)
    assert keys.dtype == torch.int32
    assert keys[4] == keys[5]
    assert torch.all(keys[1:] >= keys[:-1]) and len(set(keys.tolist())) == len(x) - 1
    with pytest.raises(NumericalError, match="NaN"):
        sortable(torch.tensor([1.0, float("nan")]))


@pytest.mark.parametrize("seed", range(6))
def test_the_global_top_k_is_a_stable_sort_of_everything(seed):
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randint(-4, 5, (6, 7), generator=g).float() * 0.25,  # many ties
               torch.randn(3, 5, generator=g) * 1e-30, -torch.rand(40, generator=g),
               torch.zeros(2, 3), torch.randn(4, 4, generator=g).mul(1e6)]
    tensors[3][0, 0] = -0.0
    everything = torch.cat([t.reshape(-1) for t in tensors])
    order = torch.sort(-everything, stable=True).indices  # highest first, ties by position
    starts = torch.tensor([0] + [t.numel() for t in tensors]).cumsum(0)
    ks = [0, 1, 7, 30, 31, 90, everything.numel()]
    got = top_positions(lambda: iter(tensors), ks)
    for k in ks:
        flat = torch.cat([p + starts[i] for i, p in enumerate(got[k])])
        assert flat.tolist() == sorted(order[:k].tolist()), k
        assert all(torch.equal(p, torch.sort(p).values) for p in got[k])


def test_k_above_the_scores_is_refused():
    with pytest.raises(ValueError, match="exceeds the 6 scores"):
        top_positions(lambda: iter([torch.ones(2, 3)]), [7])


def test_top_channels_per_unit_by_column_sum_ties_by_position():
    scores = torch.tensor([[1.0, 3, 3, 0], [1, 0, 0, 5],   # expert 0: column sums 2 3 3 5
                           [9, 0, 0, 0], [0, 0, 0, 1]])     # expert 1: 9 0 0 1
    kept, n = top_channels(scores, units=2, share=0.5)
    assert n == 2
    assert kept.tolist() == [[False, True, False, True], [False, True, False, True],
                             [True, False, False, True], [True, False, False, True]]
    assert not top_channels(scores, units=1, share=0.2)[0].any()  # floor(4 x 0.2) = 0 channels
