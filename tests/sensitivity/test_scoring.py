"""Per-weight scores and their exact summaries, against brute force in numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from critical_weights.config.params import METRICS
from critical_weights.core.errors import NumericalError
from critical_weights.sensitivity import scoring
from critical_weights.sensitivity.accumulate import Accumulators
from critical_weights.sensitivity.scoring import GRID, HIST_HIGH, HIST_LOW, HIST_PER_DECADE, N_BINS, hist_edges, log10_bin, metric_scores, summarise, top_k_stable

NAME = "model.layers.0.mlp.down_proj.weight"


def random_acc(weight: torch.Tensor, seed: int = 0) -> Accumulators:
    """Accumulators for one parameter filled with random values of the right sign."""
    gen = torch.Generator().manual_seed(seed)
    shape = weight.shape
    cols = scoring.as_matrix(weight).shape[1]
    return Accumulators(
        grad={NAME: torch.randn(shape, generator=gen)},
        fisher={NAME: torch.rand(shape, generator=gen) * 1e-3},
        hutchinson={NAME: torch.randn(shape, generator=gen)},  # may be negative
        act_sq={NAME: torch.rand(cols, generator=gen) * 10},
    )


def formula(metric: str, w: np.ndarray, acc: Accumulators) -> np.ndarray:
    """The documented score of every weight, in float64: (rows, cols)."""
    w = w.astype(np.float64).reshape(w.shape[0], -1)
    g = acc.grad[NAME].double().numpy().reshape(w.shape)
    f = acc.fisher[NAME].double().numpy().reshape(w.shape)
    h = acc.hutchinson[NAME].double().numpy().reshape(w.shape)
    return {
        "grad_x_weight": np.abs(w * g),
        "gradient": np.abs(g),
        "magnitude": np.abs(w),
        "fisher": f,
        "taylor2": 0.5 * f * w**2,
        "hutchinson": 0.5 * h * w**2,
        "wanda": np.abs(w) * np.sqrt(acc.act_sq[NAME].double().numpy())[None, :],
    }[metric]


def brute_top(scores: np.ndarray, index: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top k by score descending, ties by smaller index."""
    order = np.lexsort((index, -scores.astype(np.float64)))[:k]
    return scores[order], index[order]


def brute_hist(scores: np.ndarray) -> np.ndarray:
    """The documented binning in float64: floor((log10(s) - LOW) * PER_DECADE), clamped; positives only."""
    pos = scores[scores > 0].astype(np.float64)
    b = np.floor((np.log10(pos) - HIST_LOW) * HIST_PER_DECADE).astype(np.int64)
    return np.bincount(np.clip(b, 0, N_BINS - 1), minlength=N_BINS)


def brute_grid(scores: np.ndarray) -> np.ndarray:
    """Max-pool with row r -> r * gr // R, col c -> c * gc // C."""
    n_rows, n_cols = scores.shape
    gr, gc = min(GRID, n_rows), min(GRID, n_cols)
    grid = np.full((gr, gc), -np.inf, dtype=np.float32)
    row_bin = np.arange(n_rows)[:, None] * gr // n_rows  # (R, 1)
    col_bin = np.arange(n_cols)[None, :] * gc // n_cols  # (1, C)
    np.maximum.at(grid, (np.broadcast_to(row_bin, scores.shape), np.broadcast_to(col_bin, scores.shape)), scores)
    return grid


# ----------------------------------------------------------------------------- formulas


@pytest.mark.parametrize("metric", METRICS)
def test_metric_scores_follow_the_documented_formula(metric):
    weight = torch.randn(13, 7, generator=torch.Generator().manual_seed(1))
    acc = random_acc(weight)
    expected = formula(metric, weight.numpy(), acc)
    whole = metric_scores(metric, NAME, weight, acc, slice(0, 13))
    assert whole.dtype == torch.float32 and whole.shape == (13, 7)
    torch.testing.assert_close(whole.double(), torch.from_numpy(expected), rtol=1e-6, atol=0)
    part = metric_scores(metric, NAME, weight, acc, slice(4, 9))
    torch.testing.assert_close(part, whole[4:9], rtol=0, atol=0)


@pytest.mark.parametrize("metric", METRICS)
def test_summarise_dense_scores_follow_the_formula_and_leave_inputs_alone(metric):
    weight = torch.randn(9, 11, generator=torch.Generator().manual_seed(2))
    acc = random_acc(weight, seed=3)
    weight_before = weight.clone()
    acc_before = {k: {n: t.clone() for n, t in getattr(acc, k).items()} for k in ("grad", "fisher", "hutchinson", "act_sq")}
    dense: list[np.ndarray] = []
    summarise(metric, NAME, weight, acc, keep=5, dense=dense)
    scores = np.concatenate(dense)
    assert scores.dtype == np.float32 and scores.shape == (99,)
    np.testing.assert_allclose(scores, formula(metric, weight_before.numpy(), acc).reshape(-1), rtol=1e-6, atol=0)
    torch.testing.assert_close(weight, weight_before, rtol=0, atol=0)
    for k, tensors in acc_before.items():
        for n, t in tensors.items():
            torch.testing.assert_close(getattr(acc, k)[n], t, rtol=0, atol=0)


def test_summarise_never_modifies_a_float32_parameter_in_place():
    """The float32 copy must be a copy even when the weight is already float32 and contiguous."""
    param = torch.nn.Parameter(torch.randn(6, 5, generator=torch.Generator().manual_seed(4)), requires_grad=False)
    before = param.detach().clone()
    acc = random_acc(param.detach())
    for metric in METRICS:
        summarise(metric, NAME, param, acc, keep=3)
        torch.testing.assert_close(param.detach(), before, rtol=0, atol=0, msg=metric)


def test_one_dimensional_parameters_are_scored_as_a_column():
    weight = torch.randn(10, generator=torch.Generator().manual_seed(5))
    acc = random_acc(weight)
    s = summarise("grad_x_weight", NAME, weight, acc, keep=4)
    expected = np.abs(weight.numpy() * acc.grad[NAME].numpy())
    top_s, top_i = brute_top(expected.astype(np.float32), np.arange(10), 4)
    np.testing.assert_array_equal(s.top_index, top_i)
    np.testing.assert_array_equal(s.top_score, top_s)
    assert s.grid.shape == (10, 1)


def test_unknown_metric_raises_value_error():
    weight = torch.ones(2, 2)
    with pytest.raises(ValueError, match="unknown metric nope"):
        metric_scores("nope", NAME, weight, random_acc(weight), slice(0, 2))


# ----------------------------------------------------------------------------- top-k


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [1, 7, 50, 500])
def test_top_k_stable_equals_brute_force_with_many_ties(seed, k):
    rng = np.random.default_rng(seed)
    n = 300
    values = rng.integers(0, 6, size=n).astype(np.float32)  # heavy ties
    index = rng.permutation(10 * n)[:n].astype(np.int64)  # unique, in no order
    v, i = top_k_stable(torch.from_numpy(values), torch.from_numpy(index), k)
    ev, ei = brute_top(values, index, k)
    assert len(i) == min(k, n)
    np.testing.assert_array_equal(v.numpy(), ev)
    np.testing.assert_array_equal(i.numpy(), ei)


@pytest.mark.parametrize("kind", ["continuous", "ties", "negative", "inf", "skewed", "sorted", "tied_blocks"])
def test_top_k_stable_past_the_block_prefilter_equals_brute_force(kind, monkeypatch):
    """Chunks of at least 4 x k blocks go through `_in_top_blocks` first; it must never change
    the result, whatever the values (ties at the cut, negatives, infinities, a few huge
    values, the largest all in one place, or block maxima that tie everywhere). NaN never
    gets here: see test_nan_scores_are_refused_with_parameter_and_metric."""
    rng = np.random.default_rng(3)
    n, k = 200_000 + 77, 100  # a tail past the last whole block
    values = rng.standard_normal(n).astype(np.float32)
    if kind == "ties":
        values = rng.integers(0, 40, size=n).astype(np.float32)  # ~5,000 values per level
    elif kind == "negative":
        values = -np.abs(values)
    elif kind == "inf":
        values[rng.choice(n, 20, replace=False)] = np.inf
        values[rng.choice(n, 20, replace=False)] = -np.inf
    elif kind == "skewed":
        values[rng.choice(n, 3 * k, replace=False)] = 1e6  # 3k equal maxima
    elif kind == "sorted":
        values = np.sort(values)  # the top k all in the last blocks and the tail
    elif kind == "tied_blocks":
        values = rng.integers(0, 3, size=n).astype(np.float32)  # every block's max is 2: no subset
    assert n // scoring.BLOCK >= 4 * k
    index = rng.permutation(n).astype(np.int64)
    for given in (torch.from_numpy(index), 1000):  # scattered indices, or consecutive from 1000
        v, i = top_k_stable(torch.from_numpy(values), given, k)
        monkeypatch.setattr(scoring, "BLOCK", n)  # one block: no prefilter, the plain path
        pv, pi = top_k_stable(torch.from_numpy(values), given, k)
        monkeypatch.undo()
        assert torch.equal(v, pv) and torch.equal(i, pi)
        ev, ei = brute_top(values, given.numpy() if isinstance(given, torch.Tensor) else np.arange(n) + given, k)
        np.testing.assert_array_equal(v.numpy(), ev)
        np.testing.assert_array_equal(i.numpy(), ei)


def test_block_prefilter_keeps_few_values():
    """The subset is what spares the time: about k blocks, not the whole chunk."""
    values = torch.from_numpy(np.random.default_rng(0).standard_normal(1 << 20).astype(np.float32))
    pos = scoring._in_top_blocks(values, 100)
    assert pos is not None and 100 * scoring.BLOCK <= pos.numel() <= 110 * scoring.BLOCK
    assert torch.equal(pos, pos.sort().values)


def test_nan_scores_are_refused_with_parameter_and_metric():
    """An overflowed accumulator times a zero weight scores NaN, which no ranking can place:
    the stage stops and says where, instead of dropping the parameter's candidates."""
    weight = torch.ones(40, 30)
    weight[3, 4] = 0.0
    acc = random_acc(weight)
    acc.fisher[NAME][3, 4] = float("inf")  # 1/2 * inf * 0^2 = NaN
    with pytest.raises(NumericalError, match=rf"^parameter {NAME}: taylor2 scores: 1 of them are NaN \(a factor "
                       r"overflowed to infinity and met a zero\), and NaN has no rank; leave taylor2 out of "
                       r"sensitivity.metrics$"):
        summarise("taylor2", NAME, weight, acc, keep=5)
    summarise("fisher", NAME, weight, acc, keep=5)  # inf alone is a score like any other


def test_top_k_stable_with_distinct_values_and_all_equal_values():
    values = torch.tensor([0.5, 3.0, -1.0, 3.5, 0.0])
    index = torch.tensor([10, 11, 12, 13, 14])
    v, i = top_k_stable(values, index, 3)
    assert v.tolist() == [3.5, 3.0, 0.5] and i.tolist() == [13, 11, 10]
    v, i = top_k_stable(torch.zeros(6), torch.tensor([5, 3, 9, 0, 7, 1]), 4)
    assert v.tolist() == [0.0] * 4 and i.tolist() == [0, 1, 3, 5]


def _tied_case(rows: int, cols: int, seed: int, acc_seed: int):
    """Integer-valued weight, gradient and Hessian diagonal: many ties and zeros."""
    rng = np.random.default_rng(seed)
    weight = torch.from_numpy(rng.integers(-3, 4, size=(rows, cols)).astype(np.float32))
    acc = random_acc(weight, seed=acc_seed)
    acc.grad[NAME] = torch.from_numpy(rng.integers(-2, 3, size=(rows, cols)).astype(np.float32))
    acc.hutchinson[NAME] = torch.from_numpy(rng.integers(-2, 3, size=(rows, cols)).astype(np.float32))
    return weight, acc


@pytest.mark.parametrize("metric", ["magnitude", "grad_x_weight", "hutchinson"])
@pytest.mark.parametrize("chunk_rows", [1, 3, 1000])
def test_summarise_top_k_equals_brute_force_across_chunks(monkeypatch, metric, chunk_rows):
    rows, cols, keep = 23, 9, 17
    monkeypatch.setattr(scoring, "CHUNK_ELEMENTS", chunk_rows * cols)
    assert len(list(scoring.row_chunks(rows, cols))) == -(-rows // min(rows, chunk_rows))
    weight, acc = _tied_case(rows, cols, seed=chunk_rows, acc_seed=chunk_rows)
    dense: list[np.ndarray] = []
    s = summarise(metric, NAME, weight, acc, keep, dense)
    scores = np.concatenate(dense)
    ev, ei = brute_top(scores, np.arange(scores.size), keep)
    np.testing.assert_array_equal(s.top_index, ei)
    np.testing.assert_array_equal(s.top_score, ev)
    assert s.top_index.dtype == np.int64 and s.top_score.dtype == np.float32


@pytest.mark.parametrize("metric", ["magnitude", "grad_x_weight", "hutchinson"])
@pytest.mark.parametrize("chunk_rows", [1, 4, 1000])
def test_summarise_bottom_k_equals_brute_force_across_chunks(monkeypatch, metric, chunk_rows):
    """The `keep` least sensitive weights: score ascending, ties by smaller flat index."""
    rows, cols, keep = 21, 8, 13
    monkeypatch.setattr(scoring, "CHUNK_ELEMENTS", chunk_rows * cols)
    weight, acc = _tied_case(rows, cols, seed=100 + chunk_rows, acc_seed=chunk_rows)
    dense: list[np.ndarray] = []
    s = summarise(metric, NAME, weight, acc, keep, dense)
    scores = np.concatenate(dense)
    order = np.lexsort((np.arange(scores.size), scores.astype(np.float64)))[:keep]
    np.testing.assert_array_equal(s.bottom_index, order)
    np.testing.assert_array_equal(s.bottom_score, scores[order])
    assert s.bottom_index.dtype == np.int64 and s.bottom_score.dtype == np.float32


def test_keep_larger_than_the_tensor_keeps_every_weight():
    weight = torch.randn(3, 4, generator=torch.Generator().manual_seed(6))
    s = summarise("magnitude", NAME, weight, random_acc(weight), keep=1000)
    assert sorted(s.top_index.tolist()) == list(range(12))
    assert np.all(np.diff(s.top_score) <= 0)


# ----------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("metric", ["magnitude", "grad_x_weight", "hutchinson", "wanda"])
@pytest.mark.parametrize("chunk_rows", [2, 1000])
def test_stats_equal_numpy_float64(monkeypatch, metric, chunk_rows):
    rows, cols = 37, 19
    monkeypatch.setattr(scoring, "CHUNK_ELEMENTS", chunk_rows * cols)
    gen = torch.Generator().manual_seed(chunk_rows)
    weight = torch.randn(rows, cols, generator=gen) * 3
    weight[::5, ::3] = 0.0  # exact zeros
    acc = random_acc(weight, seed=7)
    dense: list[np.ndarray] = []
    s = summarise(metric, NAME, weight, acc, keep=10, dense=dense)
    x = np.concatenate(dense).astype(np.float64)
    assert s.count == x.size == rows * cols
    scale = np.abs(x).sum()  # float32 sums within a row: ~1e-7 relative error, never worse
    np.testing.assert_allclose(s.total, x.sum(), rtol=1e-6, atol=1e-6 * scale)
    np.testing.assert_allclose(s.mean, x.mean(), rtol=1e-6, atol=1e-6 * scale / x.size)
    np.testing.assert_allclose(s.std, x.std(), rtol=1e-5)
    assert s.minimum == x.min() and s.maximum == x.max()
    assert s.zeros == int((x == 0).sum()) > 0
    assert s.negatives == int((x < 0).sum())
    if metric == "hutchinson":
        assert s.negatives > 0
    else:
        assert s.negatives == 0


# ----------------------------------------------------------------------------- histogram


def test_hist_edges_are_the_documented_log10_bins():
    edges = hist_edges()
    assert edges.shape == (N_BINS + 1,)
    assert edges[0] == HIST_LOW and edges[-1] == HIST_HIGH
    np.testing.assert_allclose(np.diff(edges), 1 / HIST_PER_DECADE)
    assert N_BINS == (HIST_HIGH - HIST_LOW) * HIST_PER_DECADE


def test_log10_bin_places_scores_in_documented_bins():
    scores = torch.tensor([0.0, -3.0, 1e-30, 1.5e-24, 1.0e-3 * 1.01, 0.5, 2.0, 9.0e5, 5e6, 1e30])
    expected = [0, 0, 0, 1, 210, 236, 243, 299, 299, 299]
    assert log10_bin(scores).tolist() == expected
    assert log10_bin(scores).dtype == torch.int64


@pytest.mark.parametrize("chunk_rows", [3, 1000])
def test_hist_equals_brute_force_and_counts_only_positive_scores(monkeypatch, chunk_rows):
    rows, cols = 40, 25
    monkeypatch.setattr(scoring, "CHUNK_ELEMENTS", chunk_rows * cols)
    rng = np.random.default_rng(8)
    # log10 values at bin centres (+-0.03, so float32 rounding never crosses an edge), from
    # below the first edge to above the last, so the underflow and overflow bins fill too
    centres = HIST_LOW - 2 + (np.arange(-20, (HIST_HIGH - HIST_LOW + 4) * HIST_PER_DECADE) + 0.5) / HIST_PER_DECADE
    logs = rng.choice(centres, size=rows * cols) + rng.uniform(-0.03, 0.03, size=rows * cols)
    scores = (10.0**logs).astype(np.float32)
    scores[rng.choice(scores.size, 60, replace=False)] = 0.0
    scores[rng.choice(scores.size, 45, replace=False)] *= -1.0  # (some of them zeros: -0.0)
    weight = torch.ones(rows, cols)
    acc = random_acc(weight)
    acc.fisher[NAME] = torch.from_numpy(scores.reshape(rows, cols))  # `fisher` scores are the values themselves
    s = summarise("fisher", NAME, weight, acc, keep=5)
    expected = brute_hist(scores)
    assert s.hist.dtype == np.int64 and s.hist.shape == (N_BINS,)
    np.testing.assert_array_equal(s.hist, expected)
    assert s.hist.sum() == int((scores > 0).sum())
    assert s.hist[0] > 0 and s.hist[-1] > 0  # underflow and overflow both exercised
    assert s.zeros == int((scores == 0).sum()) and s.negatives == int((scores < 0).sum())


def test_hist_of_real_scores_sums_to_the_positive_count():
    weight = torch.randn(50, 30, generator=torch.Generator().manual_seed(9))
    weight[0] = 0.0
    acc = random_acc(weight)
    for metric in METRICS:
        dense: list[np.ndarray] = []
        s = summarise(metric, NAME, weight, acc, keep=3, dense=dense)
        x = np.concatenate(dense)
        assert s.hist.sum() == int((x > 0).sum()), metric
        assert s.hist.sum() + s.zeros + s.negatives == s.count, metric


# ----------------------------------------------------------------------------- pooled grid


@pytest.mark.parametrize("shape", [(5, 7), (100, 70), (130, 3), (64, 200), (128, 70), (192, 128)])
@pytest.mark.parametrize("chunk_rows", [4, 7, 10_000])  # row bins of 2 or 3 rows: aligned chunks, and not
def test_grid_equals_brute_force_max_pool(monkeypatch, shape, chunk_rows):
    rows, cols = shape
    monkeypatch.setattr(scoring, "CHUNK_ELEMENTS", chunk_rows * cols)
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows))
    acc = random_acc(weight)
    for metric in ("magnitude", "hutchinson"):  # hutchinson: negative scores pool too
        dense: list[np.ndarray] = []
        s = summarise(metric, NAME, weight, acc, keep=2, dense=dense)
        scores = np.concatenate(dense).reshape(rows, cols)
        expected = brute_grid(scores)
        assert s.grid.shape == (min(GRID, rows), min(GRID, cols))
        assert s.grid.dtype == np.float32
        np.testing.assert_array_equal(s.grid, expected)
        assert s.grid.max() == s.maximum
