"""The chain harness: the pipeline as DVC runs it, one `python stages/<stage>.py` process per
stage, on a model folder written with `save_pretrained`; model load is reported apart."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click
import torch
import yaml

from measure import _log, _sync, run_process
from workload import as_text, build_model, build_tokenizer


def build_and_save(size: str, device_name: str, seed: int, model_dir: str, result: str) -> None:
    """Build SIZE on the device, save it (safetensors) and its tokenizer to MODEL_DIR, and
    write the seconds each step took to RESULT. Run by `save_model` in a process of its own."""
    device = torch.device(device_name)
    start = time.perf_counter()
    model = build_model(size, device, torch.bfloat16 if device.type == "cuda" else torch.float32, seed)
    _sync(device)
    built = time.perf_counter()
    model.save_pretrained(model_dir, safe_serialization=True)
    build_tokenizer(model.config.vocab_size).save_pretrained(model_dir)
    saved = time.perf_counter()
    size_bytes = sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))
    Path(result).write_text(json.dumps({"build_s": built - start, "save_s": saved - built, "bytes": size_bytes}))


def save_model(size: str, device_name: str, seed: int, model_dir: Path, logs: Path) -> dict[str, Any]:
    """`build_and_save` in a child process, so that this one never holds a CUDA context (or an
    8B model) while the stages run."""
    result = logs / "save_model.json"
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import chain; "
            "chain.build_and_save(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6])")
    record = run_process("build and save model (not in the chain)",
                         [sys.executable, "-c", code, str(Path(__file__).resolve().parent), size, device_name,
                          str(seed), str(model_dir), str(result)], logs / "save_model.log")
    record.update(json.loads(result.read_text()))
    return record


def run_chain(size: str, device: torch.device, params_raw: dict, ids: list[list[int]], work: Path,
              seed: int) -> list[dict[str, Any]]:
    """The pipeline as DVC runs it: one process per stage, reading a saved model folder."""
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    model_dir = work / "model"
    records = [save_model(size, device.type, seed, model_dir, logs)]
    _log(records[-1])
    texts_file = work / "texts.jsonl"
    texts_file.write_text("".join(json.dumps({"text": as_text(s)}) + "\n" for s in ids), encoding="utf-8")
    params_raw = {**params_raw, "texts": {**params_raw["texts"], "source": str(texts_file)},
                  "model": {**params_raw["model"], "name": str(model_dir)}}
    params_file = work / "params.yaml"
    params_file.write_text(yaml.safe_dump(params_raw, sort_keys=False), encoding="utf-8")
    prepared, sens, ranked, reports = work / "prepared", work / "sensitivity", work / "ranked", work / "reports"
    stages = {
        "prepare": ["--source", texts_file, "--out", prepared],
        "sensitivity": ["--prepared", prepared, "--out", sens],
        "rank": ["--sensitivity", sens, "--out", ranked],
        "export": ["--prepared", prepared, "--sensitivity", sens, "--ranked", ranked, "--reports", reports],
        "plot": ["--sensitivity", sens, "--ranked", ranked, "--overlap", reports / "metric_overlap.json",
                 "--out", reports / "plots"],
    }
    for stage, args in stages.items():
        timings = logs / f"{stage}.json"
        cmd = [sys.executable, f"stages/{stage}.py", "--params", str(params_file), *map(str, args), "--timings", str(timings)]
        record = run_process(f"stage {stage}", cmd, logs / f"{stage}.log")
        record["stage_phases_s"] = json.loads(timings.read_text())["phases_s"]
        records.append(record)
        _log(record)
    _check_chain(prepared, ids)
    return records


def _check_chain(prepared: Path, ids: list[list[int]]) -> None:
    """The prepare stage must have turned the texts back into exactly the benchmark's ids."""
    from critical_weights.artifacts.prepared_texts import read_prepared

    got, _ = read_prepared(prepared)
    if sorted(map(tuple, got)) != sorted(map(tuple, ids)):
        raise click.ClickException("the prepare stage did not reproduce the random token ids")
