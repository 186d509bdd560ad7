"""Micro-batches: longest first, ties by index, capped by count and by padded-token budget."""

from __future__ import annotations

import numpy as np
import pytest

from critical_weights.sensitivity.batching import make_batches


def test_sorted_longest_first_with_ties_in_index_order():
    lengths = [3, 7, 7, 1, 5, 7]
    assert make_batches(lengths, micro_batch_size=2) == [[1, 2], [5, 4], [0, 3]]
    assert make_batches(lengths, micro_batch_size=1) == [[1], [2], [5], [4], [0], [3]]
    assert make_batches(lengths, micro_batch_size=100) == [[1, 2, 5, 4, 0, 3]]


def test_token_budget_counts_padded_tokens():
    lengths = [10, 9, 4, 4, 4, 30]
    # 30 alone exceeds the budget but still gets a batch; 10+9 pad to 2*10 = 20 <= 20
    assert make_batches(lengths, micro_batch_size=8, batch_tokens=20) == [[5], [0, 1], [2, 3, 4]]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("size, budget", [(1, 0), (3, 0), (8, 0), (8, 40), (2, 25)])
def test_batches_cover_every_sequence_once_within_both_limits(seed, size, budget):
    lengths = np.random.default_rng(seed).integers(2, 20, size=23).tolist()
    batches = make_batches(lengths, size, budget)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert flat == sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    for b in batches:
        assert len(b) <= size
        if budget and len(b) > 1:
            assert len(b) * max(lengths[i] for i in b) <= budget
