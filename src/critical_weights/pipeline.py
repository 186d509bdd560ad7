"""The `sensitivity` stage: load the model, accumulate gradients, score every weight into shards.

The stages after it (rank, export, plot) live in torch-free modules.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from critical_weights import distributed, models, scoring, shards, texts
from critical_weights.errors import ModelError
from critical_weights.outputs import atomic_path
from critical_weights.params import Params
from critical_weights.progress import Timings, progress
from critical_weights.sensitivity import accumulate, perplexity, scored_parameters

log = logging.getLogger(__name__)


def run_sensitivity(prepared: Path, params: Params, out: Path, timings: Timings) -> None:
    """Gradients over the prepared texts, then per-parameter scores into Parquet shards.

    Under `torchrun`, each process takes a share of the micro-batches; the sums are
    all-reduced and the first process scores and writes."""
    from transformers import AutoTokenizer

    input_ids, prep_meta = texts.read_prepared(prepared)
    p_model, p_sens = params.model, params.sensitivity
    with timings.phase("load model"):
        source = models.resolve_source(p_model.name)
        device, dtype = models.resolve_device(p_model)
        distributed.init_from_env(device.type == "cuda")
        device = distributed.local_device(device)
        model = models.load_model(source, p_model, device, dtype)
        tokenizer = AutoTokenizer.from_pretrained(prepared / texts.TOKENIZER_DIR)
        identity = models.identity(source, model, device)
    vocab = model.get_input_embeddings().weight.shape[0]
    if max(max(s) for s in input_ids) >= vocab:
        raise ModelError(f"model.name: the prepared token ids exceed {source.name}'s vocabulary of {vocab}; rerun prepare")
    params_list = scored_parameters(model, p_sens.parameters)
    with timings.phase("forward+backward"):
        acc, skipped = accumulate(
            model, input_ids, params_list, p_sens.metrics, p_sens.micro_batch_size,
            p_sens.batch_tokens, p_sens.hutchinson_probes, params.seed,
        )
    for name, why in skipped.items():
        log.info("wanda skips %s: %s", name, why)
    token_rows = {id(model.get_input_embeddings().weight)}
    head = model.get_output_embeddings()
    if head is not None:
        token_rows.add(id(head.weight))
    avg_loss = acc.loss_sum / acc.n_tokens
    if not distributed.is_main():
        return  # every process holds the all-reduced sums; the first one writes them
    with timings.phase("score and write"), atomic_path(out) as tmp:
        stats = []
        for index, (name, weight) in enumerate(progress(params_list, "scoring parameters")):
            stats += _score_parameter(tmp, index, name, weight, acc, params, skipped,
                                      tokenizer if id(weight) in token_rows else None)
        shards.write_stats(tmp, stats)
        shards.write_meta(tmp, {
            "model": identity,
            "loss_sum": acc.loss_sum, "avg_loss": avg_loss, "perplexity": perplexity(avg_loss),
            "n_tokens": acc.n_tokens, "n_sequences": acc.n_sequences,
            "n_parameters": len(params_list), "n_weights": sum(w.numel() for _, w in params_list),
            "metrics": list(p_sens.metrics), "keep": p_sens.keep, "parameters": p_sens.parameters,
            "wanda_skipped": skipped if "wanda" in p_sens.metrics else {},
            "hist_log10_edges": {"low": scoring.HIST_LOW, "high": scoring.HIST_HIGH, "per_decade": scoring.HIST_PER_DECADE},
            "text_sha256": prep_meta.get("text_sha256"),
            "params": {"seed": params.seed, "model": dataclasses.asdict(p_model), "sensitivity": dataclasses.asdict(p_sens)},
            "prepare": prep_meta,
        })
    log.info("avg loss %.4f over %d tokens (perplexity %.2f)", avg_loss, acc.n_tokens, perplexity(avg_loss))


def _score_parameter(folder: Path, index: int, name: str, weight: torch.Tensor, acc, params: Params,
                     skipped: dict[str, str], tokenizer: Any) -> list[dict[str, Any]]:
    """Score one parameter with every metric, write its shard(s), return its stats rows."""
    n_rows, n_cols = scoring.as_matrix(weight).shape
    w_flat = weight.detach().reshape(-1)
    g_flat = acc.grad[name].reshape(-1)
    columns: dict[str, list] = {k: [] for k in ("metric", "rank", "flat_index", "row", "col", "score", "weight", "gradient", "token")}
    stats, dense = [], {}
    for metric in params.sensitivity.metrics:
        if metric == "wanda" and name in skipped:
            continue
        scores: list[np.ndarray] | None = [] if params.sensitivity.dense else None
        s = scoring.summarise(metric, name, weight, acc, params.sensitivity.keep, scores)
        idx = torch.from_numpy(s.top_index).to(weight.device)
        rows = (s.top_index // n_cols).tolist()
        columns["metric"] += [metric] * len(idx)
        columns["rank"] += list(range(1, len(idx) + 1))
        columns["flat_index"] += s.top_index.tolist()
        columns["row"] += rows
        columns["col"] += (s.top_index % n_cols).tolist()
        columns["score"] += s.top_score.tolist()
        columns["weight"] += w_flat[idx].float().cpu().tolist()
        columns["gradient"] += g_flat[idx].cpu().tolist()
        columns["token"] += [tokenizer.decode([r]) for r in rows] if tokenizer is not None else [None] * len(idx)
        stats.append({
            "param_index": index, "parameter": name, "shape": list(weight.shape),
            "n_rows": n_rows, "n_cols": n_cols, "token_rows": tokenizer is not None, "metric": metric,
            "count": s.count, "sum": s.total, "mean": s.mean, "std": s.std, "min": s.minimum, "max": s.maximum,
            "zeros": s.zeros, "negatives": s.negatives, "hist": s.hist.tolist(),
            "grid_rows": s.grid.shape[0], "grid_cols": s.grid.shape[1], "grid": s.grid.reshape(-1).tolist(),
        })
        if scores is not None:
            dense[metric] = np.concatenate(scores)
    shards.write_candidates(folder, index, name, columns)
    if dense:
        shards.write_dense(folder, index, name, dense)
    for store in (acc.grad, acc.fisher, acc.hutchinson, acc.act_sq):
        store.pop(name, None)  # free this parameter's accumulators
    return stats
