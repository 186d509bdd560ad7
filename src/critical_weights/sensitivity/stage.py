"""The `sensitivity` stage: load the model, accumulate gradients, score every weight into shards.

The stages after it (rank, export, plot) live in torch-free modules.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import torch

from critical_weights.artifacts import prepared_texts, shards, sums
from critical_weights.config.params import Params
from critical_weights.core.errors import out_of_memory
from critical_weights.core.outputs import atomic_path
from critical_weights.core.progress import Timings, progress
from critical_weights.metrics import REGISTRY
from critical_weights.model import layout, loading, tokenization
from critical_weights.model.source import resolve_source
from critical_weights.sensitivity import distributed, scoring
from critical_weights.sensitivity.accumulate import Accumulators, accumulate, scored_parameters
from critical_weights.sensitivity.loss import check_output_path, perplexity
from critical_weights.sensitivity.recompute import checkpointed_blocks

log = logging.getLogger(__name__)
SCORING_THREADS = 2


def run_sensitivity(prepared: Path, params: Params, out: Path, timings: Timings) -> None:
    """Gradients over the prepared texts, then per-parameter scores into Parquet shards.

    Under `torchrun`, each process takes a share of the micro-batches; the sums are
    all-reduced and the first process scores and writes."""
    p_model = params.model
    device, dtype = loading.resolve_device(p_model)  # a device or dtype this machine lacks fails here, before any work
    input_ids, prep_meta = prepared_texts.read_prepared(prepared)
    with timings.phase("load model"):
        source = resolve_source(p_model.name)
        distributed.init_from_env(device.type == "cuda")
        device = distributed.local_device(device)
        model = loading.load_model(source, p_model, device, dtype)
        identity = loading.identity(source, model, device)
    loading.check_vocabulary(source.name, model, input_ids)
    extra = {"model": identity, "text_sha256": prep_meta.get("text_sha256"), "prepare": prep_meta}
    compute_shards(model, prepared / prepared_texts.TOKENIZER_DIR, input_ids, params, out, timings, extra)


def compute_shards(model: torch.nn.Module, tokenizer: Any, input_ids: list[list[int]], params: Params,
                   out: Path, timings: Timings, extra_meta: dict[str, Any]) -> None:
    """The work after loading: accumulate over the texts, score every parameter, write shards.

    `tokenizer` (it decodes the rows of token matrices) may be the folder to load it from,
    which then happens after the pass, so that it does not add to the pass's peak memory."""
    params_list, acc, skipped, extra_meta = gradients(model, input_ids, params, timings, extra_meta)
    avg_loss = acc.loss_sum / acc.n_tokens
    if not distributed.is_main():
        return  # every process holds the all-reduced sums; the first one writes them
    write_shards(model, tokenizer, params_list, acc, skipped, params, out, timings, extra_meta)
    log.info("avg loss %.4f over %d tokens (perplexity %.2f)", avg_loss, acc.n_tokens, perplexity(avg_loss))


def gradients(model: torch.nn.Module, input_ids: list[list[int]], params: Params, timings: Timings,
              extra_meta: dict[str, Any], phase: str = "forward+backward"
              ) -> tuple[list[tuple[str, torch.nn.Parameter]], Accumulators, dict[str, str], dict[str, Any]]:
    """One pass over the texts: the scored parameters, their sums (`accumulate`), the
    parameters wanda skips with the reason, and the meta with the implementations in use.
    Checks first that the scoring path gives the model's own logits (`check_output_path`)."""
    p_sens = params.sensitivity
    if "hutchinson" in p_sens.metrics:
        # Hessian-vector products need double backward, which fused SDPA and grouped_mm kernels lack
        loading.use_implementations(model, "hutchinson needs double backward", attention="eager", experts="eager")
    recompute = checkpointed_blocks(model) if p_sens.checkpointing else contextlib.nullcontext()
    extra_meta = {**extra_meta, "model": {**extra_meta.get("model", {}), "implementations": loading.implementations(model)}}
    params_list = scored_parameters(model, p_sens.parameters)
    check_output_path(model, input_ids[0])
    with timings.phase(phase), recompute:
        try:
            acc, skipped = accumulate(
                model, input_ids, params_list, p_sens.metrics, p_sens.micro_batch_size,
                p_sens.batch_tokens, p_sens.hutchinson_probes, params.seed,
            )
        except torch.OutOfMemoryError:
            raise out_of_memory(p_sens.micro_batch_size, p_sens.batch_tokens, max(map(len, input_ids)),
                                p_sens.checkpointing) from None
    for name, why in skipped.items():
        log.info("wanda skips %s: %s", name, why)
    return params_list, acc, skipped, extra_meta


def write_shards(model: torch.nn.Module, tokenizer: Any, params_list: list[tuple[str, torch.Tensor]], acc,
                 skipped: dict[str, str], params: Params, out: Path, timings: Timings,
                 extra_meta: dict[str, Any]) -> None:
    """Score every parameter of `params_list` from the sums in `acc` (freed as they are used)
    by every metric of `params.sensitivity`, and write the shards (and the sums, if asked) into
    `out`, whole or not at all."""
    token_rows = {id(model.get_input_embeddings().weight)}
    head = model.get_output_embeddings()
    if head is not None:
        token_rows.add(id(head.weight))
    if isinstance(tokenizer, Path):
        with timings.phase("load tokenizer"):
            tokenizer = tokenization.load_saved(tokenizer)
    with timings.phase("score and write"), atomic_path(out) as tmp:
        tmp.mkdir()
        stats = []
        places = layout.describe(model, [n for n, _ in params_list])

        writers = _sums_writers(tmp, acc, extra_meta) if params.sensitivity.save_sums else {}

        def score(item: tuple[int, tuple[str, torch.Tensor]]) -> Scored:
            index, (name, weight) = item
            return _score_parameter(tmp, index, name, weight, places[name], acc, params, skipped,
                                    tokenizer if id(weight) in token_rows else None, writers)

        # two parameters at a time: small tensors leave a core idle, and writing overlaps the
        # next tensor's scores; each parameter's result is the same bits, written in order
        pool = ThreadPoolExecutor(SCORING_THREADS)
        try:
            with shards.CandidateWriter(tmp) as candidates:
                for scored in progress(pool.map(score, enumerate(params_list)), "scoring parameters", len(params_list)):
                    if scored.stats:
                        stats += scored.stats
                        candidates.add(scored.top, scored.bottom)
        finally:
            pool.shutdown(cancel_futures=True)  # after an error or Ctrl-C, start no other parameter
        for writer in writers.values():
            writer.close()
        shards.write_stats(tmp, stats)
        shards.write_meta(tmp, shards_meta(extra_meta, params, acc.loss_sum, acc.n_tokens, acc.n_sequences,
                                           len(params_list), sum(w.numel() for _, w in params_list), skipped,
                                           _moe_layers(model, acc)))


def _sums_writers(folder: Path, acc, extra_meta: dict[str, Any]) -> dict[str, sums.SumsWriter]:
    """A writer per accumulator the run filled (critical_weights.artifacts.sums), its header
    fixed from the names and shapes before the first parameter is scored."""
    meta = {"format": "critical-weights/sums/1", "model": str(extra_meta.get("model", {}).get("name")),
            "text_sha256": str(extra_meta.get("text_sha256")), "n_tokens": str(acc.n_tokens)}
    stores = {"grad": acc.grad, "fisher": acc.fisher, "hutchinson": acc.hutchinson, "act_sq": acc.act_sq}
    return {kind: sums.SumsWriter(sums.path_of(folder, kind), {n: tuple(t.shape) for n, t in store.items()},
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


def _score_parameter(folder: Path, index: int, name: str, weight: torch.Tensor, place: layout.TensorLayout,
                     acc, params: Params, skipped: dict[str, str], tokenizer: Any,
                     writers: dict[str, sums.SumsWriter]) -> Scored:
    """Score one parameter with every metric (writing its dense shard and its sums, if asked)
    and free its accumulators."""
    w_flat = weight.detach().reshape(-1)
    g_flat = acc.grad[name].reshape(-1)
    top: list[pa.Table] = []
    bottom: list[pa.Table] = []
    stats, dense = [], {}
    for metric in params.sensitivity.metrics:
        if "act_sq" in REGISTRY[metric].needs and name in skipped:  # wanda: no input norms for it
            continue
        scores: list[np.ndarray] | None = [] if params.sensitivity.dense else None
        s = scoring.summarise(metric, name, weight, acc, params.sensitivity.keep, scores, place.n_experts or 0)
        for store, (i, v) in ((top, (s.top_index, s.top_score)), (bottom, (s.bottom_index, s.bottom_score))):
            idx = torch.from_numpy(i).to(w_flat.device)
            at_w, at_g = w_flat[idx].float().cpu().numpy(), g_flat[idx].cpu().numpy()  # (k,) float32
            store.append(candidate_table(metric, i, v, at_w, at_g, place, tokenizer))
        stats.append(stats_row(index, place, tokenizer is not None, metric, s))
        if scores is not None:
            dense[metric] = np.concatenate(scores)
    if dense:
        shards.write_dense(folder, index, name, dense)
    for kind, writer in writers.items():
        held = getattr(acc, kind).get(name)
        if held is not None:
            writer.write(name, held.float().cpu().numpy())
    for store in (acc.grad, acc.fisher, acc.hutchinson, acc.act_sq):
        store.pop(name, None)  # free this parameter's accumulators
    return Scored(stats, *(pa.concat_tables(t) if t else shards.CANDIDATE_SCHEMA.empty_table() for t in (top, bottom)))
