"""Time the pipeline, phase by phase, on a Llama-shaped model with seeded random weights.

Builds a LlamaForCausalLM from a config (nothing is downloaded) directly on the target
device (bfloat16 on CUDA, float32 on the CPU), draws N_SEQ x SEQ_LEN random token ids from
the seed, and runs the library code the stages run:

- in-process (default): `pipeline.compute_shards` (forward+backward, then scoring and
  shard writing), then rank (per_layer and global), export and plot, each of those in a
  process of its own (benchmarks/phase.py) so that its peak host memory is its own;
- `--chain`: the same work as DVC runs it, one `python stages/<stage>.py` process per
  stage, on a model folder written with `save_pretrained`; model load is reported apart;
- `--shards-only`: no model; shards of SIZE's shape with random scores, then rank, export
  and plot, which never use the GPU (so their 8B-scale cost can be measured anywhere).

Per phase it prints seconds, peak GPU memory (CUDA), peak host memory and, for
forward+backward, tokens/s and TFLOP/s counted as 6 x (weights but the embedding) x tokens.
`--json` writes the same as a JSON record.

Examples:

    python benchmarks/bench.py --size llama-3.1-8b --device cuda
    python benchmarks/bench.py --size llama-3.1-8b --device cuda --chain
    python benchmarks/bench.py --size llama-3.1-8b --shards-only
    python benchmarks/bench.py --size small --device cpu --json small.json

Results and their analysis: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import os
import platform
import re
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
PHASE_SCRIPT = Path(__file__).resolve().parent / "phase.py"
GIB = 1 << 30

# LlamaConfig keyword arguments per size. Every size has untied embeddings, like Llama-3.1-8B.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048),
    "small": dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048),
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                         rms_norm_eps=1e-5, rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}
# Llama-3.1-8B: 7 matrices per block x 32 blocks + embed_tokens + lm_head (see seed/FACTS.md)
EXPECTED = {"llama-3.1-8b": (226, 8_029_995_008)}
DEFAULT_MICRO_BATCH = {"llama-3.1-8b": 4}  # fits 72 GiB with fp32 sums by estimate; see RESULTS.md
INIT_STD = 0.02  # Llama's initializer_range


# ---------------------------------------------------------------- model, inputs, tokenizer

def build_config(size: str):
    from transformers import LlamaConfig

    config = LlamaConfig(tie_word_embeddings=False, pad_token_id=None, bos_token_id=None, eos_token_id=None,
                         **SIZES[size])
    config._attn_implementation = "sdpa"
    return config


def matrix_counts(model: torch.nn.Module) -> tuple[int, int, int]:
    """(2-D weight matrices, weights in them, weights in them but the input embedding)."""
    embed = model.get_input_embeddings().weight
    mats = [p for p in model.parameters() if p.ndim == 2]
    n = sum(p.numel() for p in mats)
    return len(mats), n, n - (embed.numel() if any(p is embed for p in mats) else 0)


def build_model(size: str, device: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """LlamaForCausalLM of `size`, built on `device` in `dtype`, 2-D weights ~ N(0, 0.02) from `seed`.

    The parameters are created on the device itself (no CPU copy of an 8B model); on the
    meta device nothing is allocated, which checks shapes and counts for free."""
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(build_config(size), dtype=dtype)
    if device.type != "meta":
        gen = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            for _, p in model.named_parameters():  # fixed order, so the weights follow from the seed
                if p.ndim == 2:
                    p.normal_(0.0, INIT_STD, generator=gen)
                else:
                    p.fill_(1.0)  # RMSNorm scales
    n_mats, n_weights, _ = matrix_counts(model)
    if size in EXPECTED and (n_mats, n_weights) != EXPECTED[size]:
        raise AssertionError(f"{size}: {n_mats} matrices holding {n_weights:,} weights, expected "
                             f"{EXPECTED[size][0]} holding {EXPECTED[size][1]:,}")
    return model.eval()


def random_ids(n_seq: int, seq_len: int, vocab: int, seed: int) -> list[list[int]]:
    """(n_seq, seq_len) token ids, uniform over the vocabulary, from `seed`."""
    return np.random.default_rng(seed).integers(0, vocab, size=(n_seq, seq_len)).tolist()


def build_tokenizer(vocab: int):
    """WordLevel tokenizer whose token i is the word `t<i>`, built offline; no special tokens."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel(vocab={f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0")


def as_text(ids: list[int]) -> str:
    """The text that `build_tokenizer` turns back into exactly `ids`."""
    return " ".join(f"t{i}" for i in ids)


def write_prepared(folder: Path, ids: list[list[int]], tokenizer: Any, seed: int, seq_len: int) -> dict[str, str]:
    """What the prepare stage would write for these ids: texts.parquet with its metadata, and the tokenizer."""
    from critical_weights import texts

    prepared = texts.PreparedTexts(list(range(len(ids))), [as_text(s) for s in ids], ids, len(ids))
    meta = {
        "source": "benchmarks/bench.py random ids", "n_available": str(len(ids)), "n_texts": str(len(ids)),
        "n_tokens": str(sum(len(s) for s in ids)), "text_sha256": texts.text_set_hash(ids),
        "params": json.dumps({"seed": seed, "texts": {"source": "random", "n_texts": len(ids), "max_length": seq_len},
                              "model.name": "random"}, sort_keys=True),
    }
    texts.write_prepared(folder, prepared, meta)
    tokenizer.save_pretrained(folder / texts.TOKENIZER_DIR)
    return meta


def bench_params(n_seq: int, seq_len: int, micro_batch: int, batch_tokens: int, keep: int, k: int,
                 metrics: tuple[str, ...], seed: int, device: str, model_name: str = "random", texts_source: str = "") -> dict:
    """A params.yaml as a dict; parse_params validates it like the stages do."""
    return {
        "seed": seed,
        "texts": {"source": texts_source or "data/texts/corpus.jsonl", "n_texts": n_seq, "max_length": seq_len},
        "model": {"name": model_name, "dtype": "auto", "device": device},
        "sensitivity": {"metrics": list(metrics), "micro_batch_size": micro_batch, "batch_tokens": batch_tokens,
                        "keep": keep},
        "rank": {"metric": metrics[0], "mode": "per_layer", "k": k},
        "validate": {"k_values": sorted({1, min(k, keep), keep})},
    }


# ---------------------------------------------------------------- measuring

def _host_peak_reset() -> bool:
    """Reset this process's peak resident set (VmHWM); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _host_peak_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Phases:
    """Seconds, peak GPU memory and peak host memory per phase, in the order they ran."""

    def __init__(self, device: torch.device):
        self.device = device
        self.records: list[dict[str, Any]] = []

    @contextlib.contextmanager
    def measure(self, name: str, **extra: Any) -> Iterator[dict[str, Any]]:
        record: dict[str, Any] = {"phase": name, "where": "in-process", **extra}
        _sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        record["host_peak_is_own"] = _host_peak_reset()
        start = time.perf_counter()
        yield record
        _sync(self.device)
        record["seconds"] = time.perf_counter() - start
        record["host_peak_bytes"] = _host_peak_bytes()
        if self.device.type == "cuda":
            record["gpu_peak_bytes"] = torch.cuda.max_memory_allocated(self.device)
            record["gpu_peak_reserved_bytes"] = torch.cuda.max_memory_reserved(self.device)
        self.records.append(record)
        _log(record)

    def add(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        _log(record)


def _log(record: dict[str, Any]) -> None:
    click.echo(f"[bench] {record['phase']}: {record['seconds']:.3f} s", err=True)


def make_timings(phases: Phases):
    """A progress.Timings whose phases (as compute_shards names them) are also measured by `phases`."""
    from critical_weights.progress import Timings

    class MeasuredTimings(Timings):
        @contextlib.contextmanager
        def phase(self, name: str) -> Iterator[None]:
            with phases.measure(name), super().phase(name):
                yield

    return MeasuredTimings("bench")


# Runs argv[2:] as its child and writes that child's rusage to argv[1]. On Linux a process's
# ru_maxrss starts from the peak of the process it was forked from, so the benchmark (hundreds
# of MiB, or an 8B model) cannot start the phases itself: this launcher, started with
# `python -S`, is a few MiB, and so is what its child inherits.
_LAUNCHER = (
    "import json, os, sys\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    os.execv(sys.argv[2], sys.argv[2:])\n"
    "_, status, usage = os.wait4(pid, 0)\n"
    "with open(sys.argv[1], 'w') as f:\n"
    "    json.dump({'max_rss_kib': usage.ru_maxrss}, f)\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


def run_process(name: str, args: list[str], log: Path, **extra: Any) -> dict[str, Any]:
    """Run `args` (cwd: the repository root), wait, and record its wall time and its own peak host memory."""
    usage_file = log.with_suffix(".rusage.json")
    start = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.call([sys.executable, "-S", "-c", _LAUNCHER, str(usage_file), *args],
                               cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if code != 0:
        raise click.ClickException(f"{name} failed (exit {code}): {shlex.join(args)}\n{log.read_text()[-4000:]}")
    max_rss = json.loads(usage_file.read_text())["max_rss_kib"] * 1024  # Linux: KiB
    return {"phase": name, "where": "subprocess", "seconds": seconds, "host_peak_bytes": max_rss,
            "command": shlex.join(args), **extra}


def run_phase(name: str, result: Path, sub_args: list[str], logs: Path) -> dict[str, Any]:
    """One benchmarks/phase.py process; its own timing of the library call is `seconds`."""
    record = run_process(name, [sys.executable, str(PHASE_SCRIPT), "--result", str(result), *sub_args], logs / f"{result.stem}.log")
    own = json.loads(result.read_text())
    record.update(process_s=record.pop("seconds"), seconds=own["seconds"], import_s=own["import_s"],
                  torch_imported=own["torch_imported"])
    return record


# ---------------------------------------------------------------- the three harnesses

def run_in_process(size: str, device: torch.device, dtype: torch.dtype, params_raw: dict, ids: list[list[int]],
                   work: Path, seed: int, warmup: int) -> list[dict[str, Any]]:
    """compute_shards on a freshly built model, then the torch-free phases."""
    from critical_weights import models, sensitivity
    from critical_weights.params import parse_params
    from critical_weights.pipeline import compute_shards

    params = parse_params(params_raw)
    phases = Phases(device)
    with phases.measure("build model"):
        model = build_model(size, device, dtype, seed)
    vocab = model.config.vocab_size
    tokenizer = build_tokenizer(vocab)
    prep_meta = write_prepared(work / "prepared", ids, tokenizer, seed, len(ids[0]))
    if warmup:
        with phases.measure("warm-up (not in the pipeline)", sequences=warmup):
            plist = sensitivity.scored_parameters(model, params.sensitivity.parameters)
            sensitivity.accumulate(model, ids[:warmup], plist, params.sensitivity.metrics,
                                   params.sensitivity.micro_batch_size, params.sensitivity.batch_tokens)
            del plist
            gc.collect()
    source = models.ModelSource(f"random {size}", "random", "")
    extra = {"model": models.identity(source, model, device), "text_sha256": prep_meta["text_sha256"], "prepare": prep_meta}
    compute_shards(model, tokenizer, ids, params, work / "sensitivity", make_timings(phases), extra)
    return phases.records + torch_free_phases(work, params.rank.metric, params.rank.k)


def torch_free_phases(work: Path, metric: str, k: int) -> list[dict[str, Any]]:
    """rank (per_layer, then global), export and plot over WORK's shards, each in a process of its own."""
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    sens, ranked, reports = work / "sensitivity", work / "ranked", work / "reports"
    runs = [(f"rank {mode}", ["rank", "--sensitivity", sens, "--out", out, "--metric", metric, "--mode", mode, "--k", k])
            for mode, out in (("per_layer", ranked), ("global", work / "ranked_global"))]
    runs.append(("export", ["export", "--sensitivity", sens, "--ranked", ranked, "--prepared", work / "prepared",
                            "--reports", reports]))
    runs.append(("plot", ["plot", "--sensitivity", sens, "--ranked", ranked, "--overlap", reports / "metric_overlap.json",
                          "--out", reports / "plots"]))
    records = []
    for name, args in runs:
        records.append(run_phase(name, logs / f"{name.replace(' ', '_')}.json", [str(a) for a in args], logs))
        _log(records[-1])
    return records


def write_synthetic_shards(folder: Path, size: str, metrics: tuple[str, ...], keep: int, seed: int,
                           tokenizer: Any, prep_meta: dict[str, str]) -> None:
    """Shards shaped like SIZE's (its parameter names and shapes, `keep` candidates per tensor
    and metric) holding random scores: what rank, export and plot read, with no model at all.

    Written as the pipeline writes them (one parameter at a time, token rows decoded), so the
    time this takes is the host-side share of "score and write"."""
    from critical_weights import scoring, shards

    model = build_model(size, torch.device("meta"), torch.float32, seed)
    token_rows = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    scored = [(n, tuple(p.shape), id(p) in token_rows) for n, p in model.named_parameters() if p.ndim == 2]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    stats = []
    for index, (name, shape, is_token) in enumerate(scored):
        n_rows, n_cols = shape
        numel = n_rows * n_cols
        n = min(keep, numel // 2)
        top: dict[str, list] = {}
        bottom: dict[str, list] = {}
        for metric in metrics:
            flat = _distinct(rng, numel, 2 * n)
            score = np.sort(rng.lognormal(-12, 2, size=2 * n).astype(np.float32))
            for store, part, s in ((top, flat[:n], score[::-1][:n]), (bottom, flat[n:], score[:n])):
                rows = (part // n_cols).tolist()
                columns = {
                    "metric": [metric] * n, "rank": list(range(1, n + 1)), "flat_index": part.tolist(), "row": rows,
                    "col": (part % n_cols).tolist(), "score": s.tolist(),
                    "weight": rng.normal(0, INIT_STD, n).astype(np.float32).tolist(),
                    "gradient": rng.normal(0, 1e-6, n).astype(np.float32).tolist(),
                    "token": [tokenizer.decode([r]) for r in rows] if is_token else [None] * n,
                }
                for key, values in columns.items():
                    store.setdefault(key, []).extend(values)
            hist = rng.multinomial(numel, _bell(scoring.N_BINS, rng))
            grid_r, grid_c = min(scoring.GRID, n_rows), min(scoring.GRID, n_cols)
            mean = float(score.mean())
            stats.append({
                "param_index": index, "parameter": name, "shape": list(shape), "n_rows": n_rows, "n_cols": n_cols,
                "token_rows": is_token, "metric": metric, "count": numel, "sum": mean * numel, "mean": mean,
                "std": float(score.std()), "min": float(score[0]), "max": float(score[-1]), "zeros": 0, "negatives": 0,
                "hist": hist.tolist(), "grid_rows": grid_r, "grid_cols": grid_c,
                "grid": rng.random(grid_r * grid_c, dtype=np.float32).tolist(),
            })
        shards.write_candidates(folder, index, name, top)
        shards.write_candidates(folder, index, name, bottom, kind="bottom")
    shards.write_stats(folder, stats)
    n_tokens = int(prep_meta["n_tokens"]) - int(prep_meta["n_texts"])
    shards.write_meta(folder, {
        "model": {"name": f"synthetic {size}"}, "text_sha256": prep_meta["text_sha256"], "prepare": prep_meta,
        "loss_sum": 12.0 * n_tokens, "avg_loss": 12.0, "perplexity": float(np.exp(12.0)), "n_tokens": n_tokens,
        "n_sequences": int(prep_meta["n_texts"]), "n_parameters": len(scored),
        "n_weights": sum(r * c for _, (r, c), _ in scored), "metrics": list(metrics), "keep": keep,
        "parameters": "weights", "wanda_skipped": {},
        "hist_log10_edges": {"low": scoring.HIST_LOW, "high": scoring.HIST_HIGH, "per_decade": scoring.HIST_PER_DECADE},
        "params": {"seed": seed},
    })


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
    phases = Phases(torch.device("cpu"))
    tokenizer = build_tokenizer(SIZES[size]["vocab_size"])
    prep_meta = write_prepared(work / "prepared", ids, tokenizer, seed, len(ids[0]))
    metrics = tuple(params_raw["sensitivity"]["metrics"])
    with phases.measure("write synthetic shards (host side of score and write)"):
        write_synthetic_shards(work / "sensitivity", size, metrics, params_raw["sensitivity"]["keep"], seed,
                               tokenizer, prep_meta)
    return phases.records + torch_free_phases(work, metrics[0], params_raw["rank"]["k"])


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
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import bench; "
            "bench.build_and_save(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6])")
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
    from critical_weights.texts import read_prepared

    got, _ = read_prepared(prepared)
    if sorted(map(tuple, got)) != sorted(map(tuple, ids)):
        raise click.ClickException("the prepare stage did not reproduce the random token ids")


# ---------------------------------------------------------------- reporting

def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    model = platform.processor() or "CPU"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            found = re.search(r"model name\s*:\s*(.+)", f.read())
            model = found.group(1).strip() if found else model
    return f"{model}, {os.cpu_count()} logical CPUs visible, torch threads {torch.get_num_threads()}"


def summarise(record: dict[str, Any]) -> None:
    """Add tokens/s and TFLOP/s to the forward+backward phase, and chain totals."""
    for p in record["phases"]:
        if p["phase"] == "forward+backward":
            p["tokens_per_s"] = record["tokens"] / p["seconds"]
            p["tflops"] = record["train_flop"] / p["seconds"] / 1e12
    if record["mode"] == "chain":
        stages = [p for p in record["phases"] if p["phase"].startswith("stage ")]
        total = sum(p["seconds"] for p in stages)
        load = next(p["stage_phases_s"].get("load model", 0.0) for p in stages if p["phase"] == "stage sensitivity")
        record["chain_s"] = total
        record["chain_load_model_s"] = load
        record["chain_excluding_load_s"] = total - load
        record["chain_excluding_prepare_and_load_s"] = total - load - next(
            p["seconds"] for p in stages if p["phase"] == "stage prepare")


def table(record: dict[str, Any]) -> str:
    """The phases as a Markdown table."""
    lines = ["| phase | where | seconds | tokens/s | TFLOP/s | peak GPU alloc (GiB) | peak host (MiB) | detail |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for p in record["phases"]:
        detail = []
        if "stage_phases_s" in p:
            detail.append(", ".join(f"{k} {v:.2f} s" for k, v in p["stage_phases_s"].items()))
        if "build_s" in p:
            detail.append(f"build {p['build_s']:.2f} s, save {p['save_s']:.2f} s, {p['bytes'] / 1e9:.2f} GB of safetensors")
        if "process_s" in p:
            detail.append(f"process {p['process_s']:.2f} s, imports {p['import_s']:.2f} s, torch imported: {p['torch_imported']}")
        if p.get("host_peak_is_own") is False:
            detail.append("host peak is the process's lifetime peak")
        lines.append("| {} | {} | {:.3f} | {} | {} | {} | {:.0f} | {} |".format(
            p["phase"], p["where"], p["seconds"],
            f"{p['tokens_per_s']:,.0f}" if "tokens_per_s" in p else "",
            f"{p['tflops']:.3g}" if "tflops" in p else "",
            f"{p['gpu_peak_bytes'] / GIB:.2f}" if "gpu_peak_bytes" in p else "",
            p["host_peak_bytes"] / (1 << 20), "; ".join(detail)))
    if record["mode"] == "chain":
        lines.append("")
        lines.append(f"chain {record['chain_s']:.2f} s; model load {record['chain_load_model_s']:.2f} s; "
                     f"chain excluding model load {record['chain_excluding_load_s']:.2f} s "
                     f"(excluding prepare too: {record['chain_excluding_prepare_and_load_s']:.2f} s)")
    return "\n".join(lines)


# ---------------------------------------------------------------- the command

@click.command(help=__doc__)
@click.option("--size", type=click.Choice(list(SIZES)), default="tiny", show_default=True, help="Model shape.")
@click.option("--device", "device_name", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--n-seq", type=click.IntRange(min=1), default=100, show_default=True, help="Sequences.")
@click.option("--seq-len", type=click.IntRange(min=2), default=512, show_default=True, help="Tokens per sequence.")
@click.option("--micro-batch-size", type=click.IntRange(min=1), help="Sequences per forward+backward [default: 4 for llama-3.1-8b, else 8].")
@click.option("--batch-tokens", type=click.IntRange(min=0), default=0, show_default=True, help="sensitivity.batch_tokens.")
@click.option("--metrics", default="grad_x_weight,magnitude", show_default=True, help="sensitivity.metrics, comma-separated; the first is ranked.")
@click.option("--keep", type=click.IntRange(min=1), default=1000, show_default=True, help="sensitivity.keep.")
@click.option("--k", type=click.IntRange(min=1), default=100, show_default=True, help="rank.k.")
@click.option("--seed", type=int, default=0, show_default=True, help="Weights and token ids follow from it.")
@click.option("--warmup", type=click.IntRange(min=0), default=0, show_default=True, help="In-process only: first run forward+backward over this many sequences, untimed by the pipeline phases.")
@click.option("--chain", is_flag=True, help="Run the stages as DVC does, one process each, instead of in-process.")
@click.option("--shards-only", is_flag=True, help="No model: write synthetic shards of SIZE's shape, then time rank, export and plot (they never use the GPU).")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), help="Keep the outputs here (default: a temporary folder, removed).")
@click.option("--json", "json_file", type=click.Path(dir_okay=False, path_type=Path), help="Also write the record as JSON here.")
def main(size: str, device_name: str, n_seq: int, seq_len: int, micro_batch_size: int | None, batch_tokens: int,
         metrics: str, keep: int, k: int, seed: int, warmup: int, chain: bool, shards_only: bool, work_dir: Path | None,
         json_file: Path | None) -> None:
    from critical_weights.errors import reported
    from critical_weights.progress import setup_logging

    setup_logging()
    if chain and shards_only:
        raise click.UsageError("--chain and --shards-only exclude each other")
    if device_name == "cuda" and not torch.cuda.is_available():
        raise click.ClickException("--device cuda: no CUDA device is visible")
    device = torch.device(device_name)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # model.dtype auto
    micro = micro_batch_size or DEFAULT_MICRO_BATCH.get(size, 8)
    metric_list = tuple(m.strip() for m in metrics.split(",") if m.strip())
    counts = matrix_counts(build_model(size, torch.device("meta"), dtype, seed))  # asserts the 8B counts
    vocab = SIZES[size]["vocab_size"]
    ids = random_ids(n_seq, seq_len, vocab, seed)
    raw = bench_params(n_seq, seq_len, micro, batch_tokens, keep, k, metric_list, seed, device_name)
    record: dict[str, Any] = {
        "mode": "chain" if chain else "shards-only" if shards_only else "in-process",
        "command": shlex.join(["python", "benchmarks/bench.py", *sys.argv[1:]]),
        "date": datetime.date.today().isoformat(),
        "device": describe_device(device), "python": platform.python_version(), "torch": torch.__version__,
        "transformers": _version("transformers"), "size": size,
        "config": {k_: v for k_, v in SIZES[size].items() if k_ != "rope_scaling"},
        "dtype": str(dtype).removeprefix("torch."),
        "n_matrices": counts[0], "n_weights": counts[1], "n_weights_but_embedding": counts[2],
        "n_seq": n_seq, "seq_len": seq_len, "tokens": n_seq * seq_len, "micro_batch_size": micro,
        "batch_tokens": batch_tokens, "metrics": list(metric_list), "keep": keep, "k": k,
        "train_flop": 6 * counts[2] * n_seq * seq_len,
    }
    work = work_dir or Path(tempfile.mkdtemp(prefix="cw-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        with reported():
            if chain:
                record["phases"] = run_chain(size, device, raw, ids, work, seed)
            elif shards_only:
                record["phases"] = run_shards_only(size, raw, ids, work, seed)
            else:
                record["phases"] = run_in_process(size, device, dtype, raw, ids, work, seed, warmup)
    finally:
        if work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    summarise(record)
    click.echo(f"{record['command']}\n{record['date']}, {record['device']}, torch {record['torch']}, "
               f"transformers {record['transformers']}; {size}: {counts[0]} matrices, {counts[1]:,} weights, "
               f"{record['dtype']}; {n_seq} x {seq_len} tokens, micro-batch {micro}\n")
    click.echo(table(record))
    if json_file is not None:
        json_file.parent.mkdir(parents=True, exist_ok=True)
        json_file.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def _version(name: str) -> str:
    from importlib import metadata

    return metadata.version(name)


if __name__ == "__main__":
    main()
