"""The shards-only harness: no model. Shards of a size's shape (its parameter names and shapes,
`keep` candidates per tensor and metric) holding random scores, then rank, export and plot,
which never use the GPU, so their cost at the 8B scale can be measured on any machine.

The rows are built by the library's own builders (`sensitivity.candidate_table`,
`sensitivity.stats_row`, `sensitivity.shards_meta`) and written by `shards`, one parameter at a
time, so the time this takes is the host-side share of "score and write"."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from in_process import torch_free_phases
from measure import Phases
from workload import INIT_STD, SIZES, build_model, build_tokenizer, write_prepared


def random_summary(rng: np.random.Generator, numel: int, grid: tuple[int, int], keep: int):
    """A scoring.Summary of `numel` log-normal scores: `keep` distinct top and bottom indices
    with their scores, a bell-shaped exact histogram and a random pooled grid."""
    from critical_weights.sensitivity import scoring

    n = min(keep, numel // 2)
    flat = _distinct(rng, numel, 2 * n)
    score = np.sort(rng.lognormal(-12, 2, size=2 * n).astype(np.float32))  # ascending
    return scoring.Summary(
        top_index=flat[:n], top_score=score[::-1][:n].copy(), bottom_index=flat[n:], bottom_score=score[:n].copy(),
        count=numel, total=float(score.mean()) * numel, mean=float(score.mean()), std=float(score.std()),
        minimum=float(score[0]), maximum=float(score[-1]), zeros=0, negatives=0,
        hist=rng.multinomial(numel, _bell(scoring.N_BINS, rng)),
        grid=rng.random(grid, dtype=np.float32),
    )


def write_synthetic_shards(folder: Path, size: str, params: Any, tokenizer: Any, prep_meta: dict[str, str]) -> None:
    """Shards of SIZE's shape with random scores, for every metric of `params` (a Params)."""
    import pyarrow as pa

    from critical_weights.artifacts import shards
    from critical_weights.model import layout
    from critical_weights.sensitivity import scoring
    from critical_weights.sensitivity.accumulate import scored_parameters
    from critical_weights.sensitivity.writing import candidate_table, shards_meta, stats_row

    model = build_model(size, torch.device("meta"), torch.float32, params.seed)
    token_rows = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    weights = scored_parameters(model, "weights")
    places = layout.describe(model, [n for n, _ in weights])
    scored = [(n, tuple(p.shape), id(p) in token_rows) for n, p in weights]
    rng = np.random.default_rng(params.seed)
    folder.mkdir(parents=True)
    stats = []
    candidates = shards.CandidateWriter(folder)
    for index, (name, shape, is_token) in enumerate(scored):
        n_rows, n_cols = scoring.as_matrix(torch.empty(shape, device="meta")).shape
        top: list = []
        bottom: list = []
        for metric in params.sensitivity.metrics:
            s = random_summary(rng, n_rows * n_cols, (min(scoring.GRID, n_rows), min(scoring.GRID, n_cols)),
                               params.sensitivity.keep)
            for store, (i, v) in ((top, (s.top_index, s.top_score)), (bottom, (s.bottom_index, s.bottom_score))):
                weight = rng.normal(0, INIT_STD, len(i)).astype(np.float32)
                gradient = rng.normal(0, 1e-6, len(i)).astype(np.float32)
                store.append(candidate_table(metric, i, v, weight, gradient, places[name], tokenizer if is_token else None))
            stats.append(stats_row(index, places[name], is_token, metric, s))
        candidates.add(pa.concat_tables(top), pa.concat_tables(bottom))
    candidates.close()
    shards.write_stats(folder, stats)
    n_tokens = int(prep_meta["n_tokens"]) - int(prep_meta["n_texts"])
    extra = {"model": {"name": f"synthetic {size}"}, "text_sha256": prep_meta["text_sha256"], "prepare": prep_meta}
    shards.write_meta(folder, shards_meta(extra, params, 12.0 * n_tokens, n_tokens, int(prep_meta["n_texts"]),
                                          len(scored), sum(math.prod(shape) for _, shape, _ in scored), {}))


def _distinct(rng: np.random.Generator, numel: int, n: int) -> np.ndarray:
    """n distinct flat indices below numel, in random order (int64)."""
    if numel <= 4 * n:
        return rng.permutation(numel)[:n]
    found = np.unique(rng.integers(0, numel, size=2 * n))
    while len(found) < n:
        found = np.unique(np.concatenate([found, rng.integers(0, numel, size=n)]))
    return rng.permutation(found)[:n]


def _bell(n_bins: int, rng: np.random.Generator) -> np.ndarray:
    """Bin probabilities shaped like a log-normal score distribution."""
    centre = n_bins * 0.55 + rng.normal(0, 3)
    p = np.exp(-0.5 * ((np.arange(n_bins) - centre) / 12.0) ** 2)
    return p / p.sum()


def run_shards_only(size: str, params_raw: dict, ids: list[list[int]], work: Path, seed: int) -> list[dict[str, Any]]:
    """No model: synthetic shards of SIZE's shape, then the torch-free phases on them."""
    from critical_weights.config.params import parse_params

    params = parse_params(params_raw)
    phases = Phases(torch.device("cpu"))
    tokenizer = build_tokenizer(SIZES[size]["vocab_size"])
    prep_meta = write_prepared(work / "prepared", ids, tokenizer, seed, len(ids[0]))
    with phases.measure("write synthetic shards (host side of score and write)"):
        write_synthetic_shards(work / "sensitivity", size, params, tokenizer, prep_meta)
    return phases.records + torch_free_phases(work, params.rank.metric, params.rank.k)
