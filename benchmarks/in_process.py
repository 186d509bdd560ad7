"""The in-process harness: `sensitivity.compute_shards` on a freshly built model (optionally after
an untimed warm-up), then rank, export and plot, each in a process of its own."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import torch

from measure import Phases, _log, make_timings, run_phase
from workload import build_model, build_tokenizer, write_prepared


def run_in_process(size: str, device: torch.device, dtype: torch.dtype, params_raw: dict, ids: list[list[int]],
                   work: Path, seed: int, warmup: int) -> list[dict[str, Any]]:
    """compute_shards on a freshly built model, then the torch-free phases."""
    from critical_weights.model import loading
    from critical_weights.model.source import ModelSource
    from critical_weights.sensitivity import accumulate
    from critical_weights.config.params import parse_params
    from critical_weights.sensitivity.stage import compute_shards

    params = parse_params(params_raw)
    phases = Phases(device)
    with phases.measure("build model"):
        model = build_model(size, device, dtype, seed)
    vocab = model.config.vocab_size
    tokenizer = build_tokenizer(vocab)
    prep_meta = write_prepared(work / "prepared", ids, tokenizer, seed, len(ids[0]))
    if warmup:
        with phases.measure("warm-up (not in the pipeline)", sequences=warmup):
            plist = accumulate.scored_parameters(model, params.sensitivity.parameters)
            accumulate.accumulate(model, ids[:warmup], plist, params.sensitivity.metrics,
                                   params.sensitivity.micro_batch_size, params.sensitivity.batch_tokens)
            del plist
            gc.collect()
    source = ModelSource(f"random {size}", "random", "")
    extra = {"model": loading.identity(source, model, device), "text_sha256": prep_meta["text_sha256"], "prepare": prep_meta}
    compute_shards(model, tokenizer, ids, params, work / "sensitivity", make_timings(phases), extra)
    return phases.records + torch_free_phases(work, params.rank.metric, params.rank.k)


def torch_free_phases(work: Path, metric: str, k: int) -> list[dict[str, Any]]:
    """rank (per_tensor, then global), export and plot over WORK's shards, each in a process of its own."""
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    sens, ranked, reports = work / "sensitivity", work / "ranked", work / "reports"
    runs = [(f"rank {mode}", ["rank", "--sensitivity", sens, "--out", out, "--metric", metric, "--mode", mode, "--k", k])
            for mode, out in (("per_tensor", ranked), ("global", work / "ranked_global"))]
    runs.append(("export", ["export", "--sensitivity", sens, "--ranked", ranked, "--prepared", work / "prepared",
                            "--reports", reports]))
    runs.append(("plot", ["plot", "--sensitivity", sens, "--ranked", ranked, "--overlap", reports / "metric_overlap.json",
                          "--out", reports / "plots"]))
    records = []
    for name, args in runs:
        records.append(run_phase(name, logs / f"{name.replace(' ', '_')}.json", [str(a) for a in args], logs))
        _log(records[-1])
    return records
