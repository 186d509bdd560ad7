"""The shards folder of a sensitivity run: every parameter scored by every metric, its
candidates and stats rows, the sums when asked, and the meta; written whole or not at all.

One process scores each parameter whole (`write_shards`); under FSDP each rank scores its own
rows and rank 0 writes what it merges (`critical_weights.sensitivity.sharded`), through the
same `Writing`, `pick` and `scored`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import torch

from critical_weights.artifacts import shards, sums
from critical_weights.config.params import Params
from critical_weights.core.outputs import atomic_path
from critical_weights.core.progress import Timings, progress
from critical_weights.metrics import REGISTRY
from critical_weights.model import layout, tokenization
from critical_weights.sensitivity import scoring
from critical_weights.sensitivity.loss import perplexity

SCORING_THREADS = 2


def write_shards(model: torch.nn.Module, tokenizer: Any, params_list: list[tuple[str, torch.Tensor]], acc,
                 skipped: dict[str, str], params: Params, out: Path, timings: Timings,
                 extra_meta: dict[str, Any]) -> None:
    """Score every parameter of `params_list` from the sums in `acc` (freed as they are used)
    by every metric of `params.sensitivity`, and write the shards (and the sums, if asked) into
    `out`, whole or not at all."""
    with Writing(model, tokenizer, params_list, acc, skipped, params, out, timings, extra_meta) as writing:

        def score(item: tuple[int, tuple[str, torch.Tensor]]) -> Scored:
            index, (name, weight) = item
            return _score_parameter(writing.folder, index, name, weight, writing.places[name], acc, params, skipped,
                                    writing.tokenizer_of(weight), writing.sums)

        # two parameters at a time: small tensors leave a core idle, and writing overlaps the
        # next tensor's scores; each parameter's result is the same bits, written in order
        pool = ThreadPoolExecutor(SCORING_THREADS)
        try:
            for scored in progress(pool.map(score, enumerate(params_list)), "scoring parameters", len(params_list)):
                writing.add(scored)
        finally:
            pool.shutdown(cancel_futures=True)  # after an error or Ctrl-C, start no other parameter


class Writing:
    """The shards folder while its parameters arrive one by one, in order (`add`): the
    candidates and stats of each, then the meta when the context closes; written whole or not
    at all (`core.outputs.atomic_path`). One process scores (`write_shards`) or many do, each
    its own rows (`critical_weights.sensitivity.sharded`)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, params_list: list[tuple[str, torch.Tensor]], acc,
                 skipped: dict[str, str], params: Params, out: Path, timings: Timings, extra_meta: dict[str, Any],
                 shapes: dict[str, dict[str, tuple[int, ...]]] | None = None):
        self.shapes = shapes or {}  # per kind of sums, each parameter's whole shape where acc holds only part
        self.token_rows = {id(model.get_input_embeddings().weight)}
        head = model.get_output_embeddings()
        if head is not None:
            self.token_rows.add(id(head.weight))
        if isinstance(tokenizer, Path):
            with timings.phase("load tokenizer"):
                tokenizer = tokenization.load_saved(tokenizer)
        self.tokenizer = tokenizer
        self.places = layout.describe(model, [n for n, _ in params_list])
        self.model, self.params_list, self.acc, self.skipped, self.params = model, params_list, acc, skipped, params
        self.out, self.timings, self.extra_meta = out, timings, extra_meta
        self.stats: list[dict[str, Any]] = []
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Writing:
        with contextlib.ExitStack() as opening:
            opening.callback(self._stack.close)  # a failure while opening leaves nothing behind
            self._stack.enter_context(self.timings.phase("score and write"))
            self.folder = self._stack.enter_context(atomic_path(self.out))
            self.folder.mkdir()
            self.sums = (_sums_writers(self.folder, self.acc, self.extra_meta, self.shapes)
                         if self.params.sensitivity.save_sums else {})
            self.candidates = shards.CandidateWriter(self.folder)
            opening.pop_all()
        return self

    def tokenizer_of(self, weight: torch.Tensor) -> Any:
        """The tokenizer for a weight whose rows are token ids (embedding, head), else None."""
        return self.tokenizer if id(weight) in self.token_rows else None

    def add(self, scored: Scored) -> None:
        if scored.stats:
            self.stats += scored.stats
            self.candidates.add(scored.top, scored.bottom)

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        try:
            self.candidates.close(quiet=kind is not None)
            if kind is None:
                for writer in self.sums.values():
                    writer.close()
                acc = self.acc
                shards.write_stats(self.folder, self.stats)
                shards.write_meta(self.folder, shards_meta(
                    self.extra_meta, self.params, acc.loss_sum, acc.n_tokens, acc.n_sequences, len(self.params_list),
                    sum(w.numel() for _, w in self.params_list), self.skipped, _moe_layers(self.model, acc)))
        finally:
            self._stack.__exit__(kind, *rest)


def _sums_writers(folder: Path, acc, extra_meta: dict[str, Any],
                  shapes: dict[str, dict[str, tuple[int, ...]]]) -> dict[str, sums.SumsWriter]:
    """A writer per accumulator the run filled (critical_weights.artifacts.sums), its header
    fixed from the names and shapes (the held ones, or those `shapes` gives for a kind) before
    the first parameter is scored."""
    meta = {"format": "critical-weights/sums/1", "model": str(extra_meta.get("model", {}).get("name")),
            "text_sha256": str(extra_meta.get("text_sha256")), "n_tokens": str(acc.n_tokens)}
    stores = {"grad": acc.grad, "fisher": acc.fisher, "hutchinson": acc.hutchinson, "act_sq": acc.act_sq}
    return {kind: sums.SumsWriter(sums.path_of(folder, kind),
                                  {n: shapes.get(kind, {}).get(n, tuple(t.shape)) for n, t in store.items()},
                                  {**meta, "kind": kind})
            for kind, store in stores.items() if store}


def shards_meta(extra_meta: dict[str, Any], params: Params, loss_sum: float, n_tokens: int, n_sequences: int,
                n_parameters: int, n_weights: int, skipped: dict[str, str],
                moe_layers: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The shards' meta.json: what was measured, over what, and with which params; for a
    Mixture-of-Experts model, each MoE layer and its router's picks per expert."""
    p_sens = params.sensitivity
    avg_loss = loss_sum / n_tokens
    return {
        **extra_meta,
        "loss_sum": loss_sum, "avg_loss": avg_loss, "perplexity": perplexity(avg_loss),
        "n_tokens": n_tokens, "n_sequences": n_sequences, "n_parameters": n_parameters, "n_weights": n_weights,
        "metrics": list(p_sens.metrics), "keep": p_sens.keep, "parameters": p_sens.parameters,
        "wanda_skipped": skipped if "wanda" in p_sens.metrics else {},
        "moe_layers": moe_layers or [],
        "hist_log10_edges": {"low": scoring.HIST_LOW, "high": scoring.HIST_HIGH, "per_decade": scoring.HIST_PER_DECADE},
        "params": {"seed": params.seed, "model": dataclasses.asdict(params.model), "sensitivity": dataclasses.asdict(p_sens)},
    }


def _moe_layers(model: torch.nn.Module, acc) -> list[dict[str, Any]]:
    """Every Mixture-of-Experts layer with its router's picks per expert over the real tokens."""
    return [{"block": m.block, "experts": m.experts, "router": m.router, "n_experts": m.n_experts,
             "router_picks": acc.router_picks[m.experts].cpu().tolist(), "tokens": int(acc.router_tokens[m.experts])}
            for m in layout.moe_layers(model)]


def stats_row(index: int, place: layout.TensorLayout, token_rows: bool, metric: str, s: scoring.Summary) -> dict[str, Any]:
    """One row of the stats shard (STATS_SCHEMA): one parameter, one metric. The pooled grid
    is over the stored matrix view; Conv1D and (E, in, out) experts are turned back so that
    rows are output units and cols input features."""
    grid = s.grid.T if place.kind in ("conv1d", "experts_in_out") else s.grid
    return {
        "param_index": index, "parameter": place.parameter, "block": place.block, "component": place.component,
        "layout": place.kind, "shape": list(place.shape), "n_experts": place.n_experts,
        "n_rows": place.n_out, "n_cols": place.n_in, "token_rows": token_rows, "metric": metric,
        "count": s.count, "sum": s.total, "mean": s.mean, "std": s.std, "min": s.minimum, "max": s.maximum,
        "zeros": s.zeros, "negatives": s.negatives, "hist": s.hist.tolist(),
        "grid_rows": grid.shape[0], "grid_cols": grid.shape[1], "grid": grid.reshape(-1).tolist(),
        "expert_sum": s.expert_sum.tolist(), "expert_max": s.expert_max.tolist(),
    }


def candidate_table(metric: str, index: np.ndarray, score: np.ndarray, weight: np.ndarray, gradient: np.ndarray,
                    place: layout.TensorLayout, tokenizer: Any) -> pa.Table:
    """Candidate rows (CANDIDATE_SCHEMA) for flat indices `index`, in order, ranked from 1;
    `score`, `weight` and `gradient` are the (k,) float32 values at those indices. (expert,
    row, col) come from the tensor's layout: row is the output unit, col the input feature."""
    expert, rows, cols = place.coordinates(index)
    n = len(index)
    return pa.table({
        "parameter": pa.repeat(place.parameter, n),
        "metric": pa.repeat(metric, n),
        "rank": np.arange(1, n + 1, dtype=np.int32),
        "flat_index": np.asarray(index, dtype=np.int64),
        "expert": expert.astype(np.int32) if expert is not None else pa.nulls(n, pa.int32()),
        "row": rows,
        "col": cols,
        "score": np.asarray(score, dtype=np.float32),
        "weight": np.asarray(weight, dtype=np.float32),
        "gradient": np.asarray(gradient, dtype=np.float32),
        "token": [tokenizer.decode([r]) for r in rows.tolist()] if tokenizer is not None else pa.nulls(n, pa.string()),
    }, schema=shards.CANDIDATE_SCHEMA)


class Scored(NamedTuple):
    """One parameter's results: its stats rows and its top and bottom candidates."""

    stats: list[dict[str, Any]]
    top: pa.Table
    bottom: pa.Table


class Picked(NamedTuple):
    """One metric's summary of one parameter, with the weight and the gradient (float32) at
    its top and bottom candidates."""

    summary: scoring.Summary
    top_weight: np.ndarray
    top_grad: np.ndarray
    bottom_weight: np.ndarray
    bottom_grad: np.ndarray


def pick(metric: str, name: str, weight: torch.Tensor, acc, keep: int, n_experts: int,
         dense: list[np.ndarray] | None = None, rows_of: tuple[int, int] | None = None) -> Picked | None:
    """`scoring.summarise` of one parameter (or of the stored-matrix rows `rows_of` of it that
    `weight` holds), with the values at its candidates; None when `weight` holds no row."""
    s = scoring.summarise(metric, name, weight, acc, keep, dense, n_experts, rows_of)
    if s is None:
        return None
    first = rows_of[0] * scoring.as_matrix(weight).shape[1] if rows_of else 0  # flat index of weight's first value
    w_flat, g_flat = weight.detach().reshape(-1), acc.grad[name].reshape(-1)
    values = []
    for index in (s.top_index, s.bottom_index):
        idx = torch.from_numpy(index - first).to(w_flat.device)
        values += [w_flat[idx].float().cpu().numpy(), g_flat[idx].cpu().numpy()]  # (k,) float32 each
    return Picked(s, *values)


def scored(index: int, place: layout.TensorLayout, tokenizer: Any, picks: dict[str, Picked]) -> Scored:
    """The stats rows and candidate tables of one parameter from each metric's `Picked`."""
    top, bottom, stats = [], [], []
    for metric, p in picks.items():
        s = p.summary
        top.append(candidate_table(metric, s.top_index, s.top_score, p.top_weight, p.top_grad, place, tokenizer))
        bottom.append(candidate_table(metric, s.bottom_index, s.bottom_score, p.bottom_weight, p.bottom_grad, place,
                                      tokenizer))
        stats.append(stats_row(index, place, tokenizer is not None, metric, s))
    return Scored(stats, *(pa.concat_tables(t) if t else shards.CANDIDATE_SCHEMA.empty_table() for t in (top, bottom)))


def scored_metrics(params: Params, name: str, skipped: dict[str, str]) -> list[str]:
    """The metrics that score `name`: all asked for, but wanda where it has no input norms."""
    return [m for m in params.sensitivity.metrics if not ("act_sq" in REGISTRY[m].needs and name in skipped)]


def free(acc, name: str) -> None:
    """Drop one parameter's accumulators."""
    for store in (acc.grad, acc.fisher, acc.hutchinson, acc.act_sq):
        store.pop(name, None)


def _score_parameter(folder: Path, index: int, name: str, weight: torch.Tensor, place: layout.TensorLayout,
                     acc, params: Params, skipped: dict[str, str], tokenizer: Any,
                     writers: dict[str, sums.SumsWriter]) -> Scored:
    """Score one parameter with every metric (writing its dense shard and its sums, if asked)
    and free its accumulators."""
    picks, dense = {}, {}
    for metric in scored_metrics(params, name, skipped):
        scores: list[np.ndarray] | None = [] if params.sensitivity.dense else None
        picks[metric] = pick(metric, name, weight, acc, params.sensitivity.keep, place.n_experts or 0, scores)
        if scores is not None:
            dense[metric] = np.concatenate(scores)
    if dense:
        shards.write_dense(folder, index, name, dense)
    for kind, writer in writers.items():
        held = getattr(acc, kind).get(name)
        if held is not None:
            writer.write(name, held.float().cpu().numpy())
    free(acc, name)
    return scored(index, place, tokenizer, picks)
