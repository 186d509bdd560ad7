"""Per-weight scores and their exact summaries, computed on the model's device in row chunks.

For each parameter and metric this yields the top-`keep` candidates (ties broken by flat
index, ascending), the `keep` least sensitive weights (for validation controls), exact statistics, a fixed log10-binned histogram and a max-pooled grid.
Nothing here loops over elements in Python.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from critical_weights.core.errors import NumericalError
from critical_weights.metrics import REGISTRY
from critical_weights.sensitivity.accumulate import Accumulators

CHUNK_ELEMENTS = 1 << 26  # 64M scores (256 MiB float32) at a time on a GPU
HOST_CHUNK_ELEMENTS = 1 << 21  # 2M on the CPU: a chunk's temporaries (about 40 bytes a score) stay near 80 MiB
GRID = 64  # pooled grid is at most GRID x GRID
HIST_LOW, HIST_HIGH, HIST_PER_DECADE = -24, 6, 10  # log10 bins: 1e-24 .. 1e6, 10 per decade
N_BINS = (HIST_HIGH - HIST_LOW) * HIST_PER_DECADE


def hist_edges() -> np.ndarray:
    """The N_BINS + 1 bin edges, as log10(score). Bin 0 collects underflow, the last overflow."""
    return np.linspace(HIST_LOW, HIST_HIGH, N_BINS + 1)


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """View any parameter as stored (rows, cols): 1-D tensors are a column, >2-D fold their
    leading dims into rows (an (E, d1, d2) expert tensor is (E * d1, d2))."""
    if t.ndim == 1:
        return t.reshape(-1, 1)
    return t.reshape(-1, t.shape[-1])


def _input_rows(act_sq: torch.Tensor, rows: slice, n_rows: int) -> torch.Tensor:
    """The sums of squared inputs of each weight's input feature, broadcastable against the
    rows `rows` of the stored matrix view. `act_sq` says by its shape which input each weight
    sees: (cols,) one per column (nn.Linear, routers); (n_rows, 1) one per stored row (Conv1D,
    experts stored (E, in, out)); (E, 1, cols) one per column of each expert's rows (experts
    stored (E, out, in))."""
    if act_sq.ndim == 1:
        return act_sq  # (cols,)
    if act_sq.ndim == 2:
        return act_sq[rows]  # (r, 1)
    per_expert = n_rows // act_sq.shape[0]
    expert = torch.arange(rows.start, rows.stop, device=act_sq.device) // per_expert  # (r,)
    return act_sq[expert, 0]  # (r, cols)


def metric_scores(metric: str, name: str, weight: torch.Tensor, acc: Accumulators, rows: slice) -> torch.Tensor:
    """Scores of `rows` of one parameter, (r, cols) float32, by the metric's own score function."""
    if metric not in REGISTRY:
        raise ValueError(f"unknown metric {metric}")
    matrix = as_matrix(weight)
    w = matrix[rows].to(torch.float32, copy=True)  # (r, cols) float32, never the weight itself

    def part(accumulator: str) -> torch.Tensor:
        held = getattr(acc, accumulator)[name]
        if accumulator == "act_sq":
            return _input_rows(held, rows, matrix.shape[0])  # (cols,), (r, 1) or (r, cols) float32
        return as_matrix(held)[rows]  # (r, cols) float32

    return REGISTRY[metric].score(w, part)


def row_chunks(n_rows: int, n_cols: int, device: torch.device = torch.device("cpu")) -> Iterator[slice]:
    """Whole rows at a time, at most CHUNK_ELEMENTS scores (HOST_CHUNK_ELEMENTS on the CPU,
    where the chunk's temporaries add to the process's peak memory)."""
    limit = CHUNK_ELEMENTS if device.type != "cpu" else min(CHUNK_ELEMENTS, HOST_CHUNK_ELEMENTS)
    step = max(1, limit // max(1, n_cols))
    for start in range(0, n_rows, step):
        yield slice(start, min(n_rows, start + step))


BLOCK = 128  # `_in_top_blocks` splits a chunk into runs of this many scores


def _in_top_blocks(values: torch.Tensor, k: int) -> torch.Tensor | None:
    """Positions (ascending) of a subset of `values` that holds the k largest values and every
    tie of the k-th, or None where no subset is worth taking.

    Split the values into blocks of BLOCK and let t be the k-th largest block maximum: k
    blocks hold a value >= t, so the k-th largest value is >= t, and every value that can be
    in the result lies in a block whose maximum is >= t (or in the short tail past the last
    whole block). Those blocks are about k of the n / BLOCK, so topk then sees about k x BLOCK
    values instead of n, and the result of `top_k_stable` is the same."""
    n_blocks = values.numel() // BLOCK
    if k < 1 or n_blocks < 4 * k:
        return None
    block_max = values[: n_blocks * BLOCK].view(n_blocks, BLOCK).amax(dim=1)  # (n_blocks,)
    threshold = torch.topk(block_max, k, sorted=False).values.min()
    blocks = (block_max >= threshold).nonzero().squeeze(1)  # (>= k,), more where block maxima tie
    if blocks.numel() > n_blocks // 4:
        return None  # the maxima tie too widely for a subset to spare much
    within = torch.arange(BLOCK, device=values.device)
    tail = torch.arange(n_blocks * BLOCK, values.numel(), device=values.device)
    return torch.cat([(blocks.unsqueeze(1) * BLOCK + within).reshape(-1), tail])


def top_k_stable(values: torch.Tensor, index: torch.Tensor | int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest values, ties broken by smaller index; returned in that order.

    values (n,) float32 without NaN (`_Running.add` refuses NaN scores); index (n,) int64
    and unique, or an int: the index of values[0], the others following it one by one (then
    no index tensor of n is ever made). Exact: every value above the k-th is kept, and among
    values equal to it, the smallest indices.
    """
    k = min(k, values.numel())
    pos = _in_top_blocks(values, k)
    if pos is not None:
        values, index = values[pos], _indices(index, pos)
    top, pos = torch.topk(values, k, sorted=False)
    threshold = top.min()
    n_at = int(torch.count_nonzero(values == threshold))
    if n_at != int(torch.count_nonzero(top == threshold)):
        # topk cut through a tie: keep the values above, then the ties of smallest index
        above = (values > threshold).nonzero().squeeze(1)
        at = (values == threshold).nonzero().squeeze(1)  # (n_at,) positions, ascending
        need = k - above.numel()
        if isinstance(index, int):
            at = at[:need]  # positions ascend with the index
        else:
            at = at[torch.topk(index[at], need, largest=False, sorted=False).indices]
        pos = torch.cat([above, at])
    # else topk kept every value equal to the k-th, so its positions are already the exact set
    pos = pos[torch.argsort(_indices(index, pos), stable=True)]  # index ascending...
    pos = pos[torch.argsort(values[pos], descending=True, stable=True)]  # ...then score descending
    return values[pos], _indices(index, pos)


def _indices(index: torch.Tensor | int, positions: torch.Tensor) -> torch.Tensor:
    """The flat indices at `positions`, for `index` as `top_k_stable` takes it."""
    return positions + index if isinstance(index, int) else index[positions]


@dataclass
class Summary:
    """Exact summary of one parameter's scores for one metric (numpy, on the host)."""

    top_index: np.ndarray  # (k,) int64 flat indices, best first
    top_score: np.ndarray  # (k,) float32
    bottom_index: np.ndarray  # (k,) int64 flat indices of the least sensitive, least first
    bottom_score: np.ndarray  # (k,) float32
    count: int
    total: float
    mean: float
    std: float
    minimum: float
    maximum: float
    zeros: int
    negatives: int
    hist: np.ndarray  # (N_BINS,) int64 counts of positive scores by log10 bin
    grid: np.ndarray  # (gr, gc) float32 max-pooled scores over the stored matrix view
    expert_sum: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (E,) float64 per expert; (0,) dense
    expert_max: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (E,) float64 per expert; (0,) dense
    m2: float = 0.0  # sum of squared deviations from the mean (std = sqrt(m2 / count)), float64


def log10_bin(scores: torch.Tensor) -> torch.Tensor:
    """Histogram bin of each score: floor((log10(s) - HIST_LOW) * HIST_PER_DECADE), clamped
    to [0, N_BINS - 1]; zero and negative scores fall in bin 0. (n,) float32 -> (n,) int64."""
    tiny = 10.0 ** (HIST_LOW - 1)
    b = scores.clamp_min(tiny).log10_().sub_(HIST_LOW).mul_(HIST_PER_DECADE).floor_()
    return b.clamp_(0, N_BINS - 1).long()


def chan(n: int, mean: float, m2: float, n_b: int, mean_b: float, m2_b: float) -> tuple[int, float, float]:
    """Chan's parallel update: (count, mean, sum of squared deviations) of a set joined with
    another set's, in float64 on the host."""
    delta, n_new = mean_b - mean, n + n_b
    return n_new, mean + delta * n_b / n_new, m2 + (m2_b + delta * delta * n * n_b / n_new)


class _Running:
    """Chunk-wise accumulation of the summary (Chan's parallel mean/variance in float64)."""

    def __init__(self, n_rows: int, n_cols: int, keep: int, device: torch.device, n_experts: int, name: str,
                 metric: str):
        self.keep = keep
        self.name, self.metric = name, metric  # for errors
        self.n_experts = n_experts
        self.expert_sum = torch.zeros(n_experts, dtype=torch.float64, device=device)
        self.expert_max = torch.full((n_experts,), -np.inf, dtype=torch.float64, device=device)
        self.row_expert = torch.arange(n_rows, device=device) // max(1, n_rows // max(1, n_experts))  # (rows,)
        self.cand_v: list[torch.Tensor] = []
        self.cand_i: list[torch.Tensor] = []
        self.low_v: list[torch.Tensor] = []  # negated scores of the least sensitive
        self.low_i: list[torch.Tensor] = []
        self.n, self.mean, self.m2 = 0, 0.0, 0.0
        self.total = 0.0  # float64 on the host
        self.lo, self.hi = torch.tensor(np.inf, device=device), torch.tensor(-np.inf, device=device)
        self.zeros = torch.zeros((), dtype=torch.int64, device=device)
        self.negatives = torch.zeros((), dtype=torch.int64, device=device)
        self.hist = torch.zeros(N_BINS, dtype=torch.int64, device=device)
        self.n_rows, self.n_cols = n_rows, n_cols
        self.gr, self.gc = min(GRID, n_rows), min(GRID, n_cols)
        self.grid = torch.full((self.gr, self.gc), -np.inf, device=device)
        self.row_bin = torch.arange(n_rows, device=device) * self.gr // n_rows  # (rows,)
        self.col_bin = torch.arange(n_cols, device=device) * self.gc // n_cols  # (cols,)

    def add(self, s: torch.Tensor, rows: slice) -> None:
        # s (r, cols) float32 scores for rows `rows`
        flat = s.reshape(-1)
        chunk_min, chunk_max = torch.aminmax(flat)  # both NaN if any score is NaN
        low, high = torch.stack((chunk_min, chunk_max)).tolist()  # one host sync
        if math.isnan(high):
            raise NumericalError(f"parameter {self.name}: {self.metric} scores: {int(flat.isnan().sum())} of them are "
                                 "NaN (a factor overflowed to infinity and met a zero), and NaN has no rank; "
                                 f"leave {self.metric} out of sensitivity.metrics")
        start = rows.start * self.n_cols  # flat index of the chunk's first score
        v, i = top_k_stable(flat, start, self.keep)
        self.cand_v.append(v)
        self.cand_i.append(i)
        v, i = top_k_stable(flat.neg(), start, self.keep)  # smallest scores, ties by index
        self.low_v.append(v)
        self.low_i.append(i)
        n_c = flat.numel()
        # float32 sums within rows, float64 across rows: accurate and fast on every device
        mean_c = float(s.sum(dim=1).double().sum()) / n_c
        m2_c = float((s - mean_c).square_().sum(dim=1).double().sum())
        self.n, self.mean, self.m2 = chan(self.n, self.mean, self.m2, n_c, mean_c, m2_c)
        self.total += mean_c * n_c
        self.lo = torch.minimum(self.lo, chunk_min)
        self.hi = torch.maximum(self.hi, chunk_max)
        # most metrics are >= 0, and many chunks > 0: no pass to count what is not there
        zeros = torch.count_nonzero(flat == 0) if low <= 0 else 0
        negatives = torch.count_nonzero(flat < 0) if low < 0 else 0
        self.zeros += zeros
        self.negatives += negatives
        self.hist += torch.bincount(log10_bin(flat), minlength=N_BINS)
        self.hist[0] -= zeros + negatives  # they landed in the underflow bin; count positives only
        if s.shape[1] % self.gc == 0:  # equal runs of columns per cell: a plain max, no scatter
            by_col = s.reshape(s.shape[0], self.gc, -1).amax(dim=2)  # (r, gc)
        else:
            by_col = torch.full((s.shape[0], self.gc), -np.inf, device=s.device)
            by_col.scatter_reduce_(1, self.col_bin.expand(s.shape[0], -1), s, "amax")  # (r, gc)
        per = self.n_rows // self.gr  # rows per grid row, when they divide evenly
        if self.n_rows % self.gr == 0 and rows.start % per == 0 and s.shape[0] % per == 0:
            cells = self.grid[rows.start // per : rows.start // per + s.shape[0] // per]  # (bins, gc) view
            torch.maximum(cells, by_col.reshape(-1, per, self.gc).amax(dim=1), out=cells)  # a plain max again
        else:
            row_idx = self.row_bin[rows].unsqueeze(1).expand(-1, self.gc)
            self.grid.scatter_reduce_(0, row_idx, by_col, "amax")
        if self.n_experts:
            expert = self.row_expert[rows]  # (r,) expert of each stored row
            self.expert_sum.index_add_(0, expert, s.sum(dim=1).double())
            self.expert_max.scatter_reduce_(0, expert, s.amax(dim=1).double(), "amax")

    def finish(self) -> Summary:
        v, i = top_k_stable(torch.cat(self.cand_v), torch.cat(self.cand_i), self.keep)
        low_v, low_i = top_k_stable(torch.cat(self.low_v), torch.cat(self.low_i), self.keep)
        return Summary(
            top_index=i.cpu().numpy(), top_score=v.cpu().numpy(),
            bottom_index=low_i.cpu().numpy(), bottom_score=low_v.neg().cpu().numpy(),
            count=self.n, total=self.total, mean=self.mean,
            std=float(np.sqrt(self.m2 / self.n)) if self.n else 0.0,
            minimum=float(self.lo), maximum=float(self.hi),
            zeros=int(self.zeros), negatives=int(self.negatives),
            hist=self.hist.cpu().numpy(), grid=self.grid.cpu().numpy(),
            expert_sum=self.expert_sum.cpu().numpy(), expert_max=self.expert_max.cpu().numpy(), m2=self.m2,
        )


def summarise(metric: str, name: str, weight: torch.Tensor, acc: Accumulators, keep: int,
              dense: list[np.ndarray] | None = None, n_experts: int = 0,
              rows_of: tuple[int, int] | None = None) -> Summary | None:
    """Score one parameter chunk by chunk; with `dense`, also append every score (flat, float32).

    `n_experts` > 0: the tensor's leading axis is the expert, and each expert's sum and max
    are kept too. `rows_of` (offset, total): `weight` and its accumulators hold only the
    stored-matrix rows offset.. of a matrix of `total` rows (a rank's shard under FSDP); the
    summary then speaks of the whole matrix (global flat indices, grid and experts), and
    `merge` joins the shards' summaries. None when the shard holds no row."""
    n_rows, n_cols = as_matrix(weight).shape
    offset, total = rows_of or (0, n_rows)
    if n_rows == 0:
        return None
    run = _Running(total, n_cols, keep, weight.device, n_experts, name, metric)
    for rows in row_chunks(n_rows, n_cols, weight.device):
        s = metric_scores(metric, name, weight, acc, rows)  # (r, cols) float32
        run.add(s, slice(rows.start + offset, rows.stop + offset))
        if dense is not None:
            dense.append(s.reshape(-1).cpu().numpy())
    return run.finish()


def merge(parts: list[Summary], keep: int) -> Summary:
    """One summary of a matrix from the summaries of disjoint row ranges of it (`summarise`
    with `rows_of`), in row order. Exact: the top and bottom `keep` (with the same ties by
    flat index), count, min, max, zeros, negatives, histogram, grid and expert maxima. The mean
    and m2 join by Chan's parallel formula in float64, as the chunks within one range do, and
    the sums add; each chunk sums its rows in float32, so where the ranges cut the rows into
    other chunks than one range does, they equal its values to float32 rounding."""
    first = parts[0]
    top_v, top_i = top_k_stable(torch.from_numpy(np.concatenate([p.top_score for p in parts])),
                                torch.from_numpy(np.concatenate([p.top_index for p in parts])), keep)
    low_v, low_i = top_k_stable(torch.from_numpy(-np.concatenate([p.bottom_score for p in parts])),
                                torch.from_numpy(np.concatenate([p.bottom_index for p in parts])), keep)
    n, mean, m2 = 0, 0.0, 0.0
    for p in parts:
        n, mean, m2 = chan(n, mean, m2, p.count, p.mean, p.m2)
    experts = len(first.expert_sum)
    return Summary(
        top_index=top_i.numpy(), top_score=top_v.numpy(), bottom_index=low_i.numpy(), bottom_score=(-low_v).numpy(),
        count=n, total=float(sum(p.total for p in parts)), mean=mean, std=float(np.sqrt(m2 / n)) if n else 0.0,
        minimum=min(p.minimum for p in parts), maximum=max(p.maximum for p in parts),
        zeros=sum(p.zeros for p in parts), negatives=sum(p.negatives for p in parts),
        hist=np.sum([p.hist for p in parts], axis=0), grid=np.maximum.reduce([p.grid for p in parts]),
        expert_sum=np.sum([p.expert_sum for p in parts], axis=0) if experts else first.expert_sum,
        expert_max=np.maximum.reduce([p.expert_max for p in parts]) if experts else first.expert_max, m2=m2,
    )
