"""Measuring a phase: wall time, peak GPU memory and peak host memory, in this process or in
a child process of its own; the device description, the summary and the Markdown table."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import torch

from critical_weights.core.progress import peak_memory_mib

ROOT = Path(__file__).resolve().parents[1]
PHASE_SCRIPT = Path(__file__).resolve().parent / "phase.py"
GIB = 1 << 30


def host_peak_reset() -> bool:
    """Reset this process's peak resident set (VmHWM); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def host_peak_bytes() -> int:
    return round(peak_memory_mib() * 2**20)  # the stages' own reader: VmHWM, else ru_maxrss


def child_json(code: str, args: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `python -c code args` in a process of its own; the JSON object on its last line."""
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


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
        record["host_peak_is_own"] = host_peak_reset()
        start = time.perf_counter()
        yield record
        _sync(self.device)
        record["seconds"] = time.perf_counter() - start
        record["host_peak_bytes"] = host_peak_bytes()
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
    from critical_weights.core.progress import Timings

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
            "command": portable_command(args), **extra}


def portable_command(args: list[str]) -> str:
    """The command as a reader can rerun it: `python`, paths relative to the repository, and
    the temporary folder as $TMPDIR, so no record holds this machine's paths."""
    tmp = tempfile.gettempdir().rstrip(os.sep) + os.sep
    words = []
    for a in map(str, args):
        a = "python" if a == sys.executable else a.replace(str(ROOT) + os.sep, "")
        words.append(a.replace(tmp, "$TMPDIR/"))
    return shlex.join(words)


def run_phase(name: str, result: Path, sub_args: list[str], logs: Path) -> dict[str, Any]:
    """One benchmarks/phase.py process; its own timing of the library call is `seconds`."""
    record = run_process(name, [sys.executable, str(PHASE_SCRIPT), "--result", str(result), *sub_args], logs / f"{result.stem}.log")
    own = json.loads(result.read_text())
    record.update(process_s=record.pop("seconds"), seconds=own["seconds"], import_s=own["import_s"],
                  torch_imported=own["torch_imported"])
    return record


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
