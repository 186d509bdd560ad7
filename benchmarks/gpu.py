"""Everything the GPU targets need, in one call: one JSON record and one Markdown table.

On one H100 or H200 (about 8 minutes in all):

    python benchmarks/gpu.py --out benchmarks/results/gpu

runs, each as `benchmarks/bench.py` in a process of its own (a fresh CUDA context each):
1. the in-process harness at the Llama-3.1-8B shape, after a warm-up of 4 sequences;
2. the same shape as DVC runs it, one process per stage (`--chain`);
3. the in-process harness on an 8B-weight Mixture-of-Experts, Qwen3-MoE-shaped
   (`qwen3-moe-8b`: 64 experts, 8 routed per token, experts stored as 3-D tensors);
4. on a machine with more than one GPU, the 8B chain again with the sensitivity stage sharded
   over all of them (`model.parallel: fsdp`, one process per GPU); it is recorded, not judged.

It then judges the targets of benchmarks/RESULTS.md (forward+backward >= 480 TFLOP/s, score
and write <= 1 s, peak GPU memory <= 72 GiB, the chain without model load <= 30 s) and writes
OUT/gpu.json and OUT/gpu.md, the table to paste into RESULTS.md. A run that fails is recorded
with the end of its log, the others still run, and the exit status is 1.

`--dry-run` does the same on the CPU at the tiny sizes (tiny, tiny-moe) in about a minute,
so that the script is tested where no GPU is at hand; it judges no target.
"""

from __future__ import annotations

import datetime
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from measure import GIB, table  # noqa: E402

TARGETS = {"tflops": 480.0, "score_and_write_s": 1.0, "gpu_peak_gib": 72.0, "chain_without_load_s": 30.0}


def plan(dry_run: bool, gpus: int = 0) -> list[tuple[str, list[str]]]:
    """(name, bench.py arguments) of each run, in order; the FSDP chain where `gpus` > 1 (a dry
    run shards the tiny chain over 2 CPU processes)."""
    if dry_run:
        common = ["--device", "cpu", "--n-seq", "4", "--seq-len", "16", "--keep", "50", "--k", "5"]
        dense, moe = "tiny", "tiny-moe"
    else:
        common = ["--device", "cuda"]
        dense, moe = "llama-3.1-8b", "qwen3-moe-8b"
    runs = [
        (f"in-process {dense}", ["--size", dense, *common, "--warmup", "4"]),
        (f"chain {dense}", ["--size", dense, *common, "--chain"]),
        (f"in-process {moe}", ["--size", moe, *common, "--warmup", "4"]),
    ]
    ranks = 2 if dry_run else gpus
    if ranks > 1:
        runs.append((f"chain {dense} fsdp x{ranks}", ["--size", dense, *common, "--chain", "--fsdp", str(ranks)]))
    return runs


def run_bench(name: str, args: list[str], out: Path, timeout_s: float) -> dict[str, Any]:
    """One bench.py process; its JSON record, or the end of its log when it failed."""
    slug = name.replace(" ", "_").replace(".", "")
    record_file, log_file = out / f"{slug}.json", out / f"{slug}.log"
    command = [sys.executable, str(HERE / "bench.py"), *args, "--json", str(record_file)]
    click.echo(f"[gpu] {name}: {shlex.join(command)}", err=True)
    start = time.perf_counter()
    with open(log_file, "w") as log:
        try:
            code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            code = None
    run = {"name": name, "command": shlex.join(["python", "benchmarks/bench.py", *args]),
           "wall_s": time.perf_counter() - start, "returncode": code}
    if code == 0 and record_file.is_file():
        run["record"] = json.loads(record_file.read_text())
    else:
        why = f"timed out after {timeout_s:.0f} s" if code is None else f"exit status {code}"
        run["error"] = f"{why}; end of its log:\n" + log_file.read_text()[-3000:]
    return run


def judge(runs: list[dict[str, Any]], dry_run: bool) -> list[dict[str, Any]]:
    """Each target with what was measured and whether it is met (None: not judged)."""
    def phase(run: dict, name: str) -> dict | None:
        record = run.get("record") or {}
        return next((p for p in record.get("phases", []) if p["phase"] == name), None)

    dense, chain = runs[0], runs[1]
    fb, sw = phase(dense, "forward+backward"), phase(dense, "score and write")
    measured = {
        "tflops": fb["tflops"] if fb else None,
        "score_and_write_s": sw["seconds"] if sw else None,
        "gpu_peak_gib": max((p.get("gpu_peak_bytes", 0) for p in dense.get("record", {}).get("phases", [])),
                            default=0) / GIB if fb and "gpu_peak_bytes" in fb else None,
        "chain_without_load_s": chain.get("record", {}).get("chain_excluding_load_s"),
    }
    at_least = {"tflops"}
    rows = []
    for key, target in TARGETS.items():
        value = measured[key]
        met = None if dry_run or value is None else (value >= target if key in at_least else value <= target)
        rows.append({"target": key, "goal": f"{'>=' if key in at_least else '<='} {target:g}", "measured": value,
                     "met": met})
    return rows


def markdown(report: dict[str, Any]) -> str:
    lines = [f"GPU benchmark, {report['date']}{' (CPU dry run, tiny sizes: no target judged)' if report['dry_run'] else ''}",
             "", "| target | goal | measured | met |", "|---|---|---:|---|"]
    for t in report["targets"]:
        value = "not measured" if t["measured"] is None else f"{t['measured']:.3g}"
        met = "not judged" if t["met"] is None else ("yes" if t["met"] else "no")
        lines.append(f"| {t['target']} | {t['goal']} | {value} | {met} |")
    for run in report["runs"]:
        lines += ["", f"### {run['name']}", "", f"`{run['command']}`", ""]
        if "record" in run:
            lines.append(f"{run['record']['device']}, torch {run['record']['torch']}")
            lines += ["", table(run["record"])]
        else:
            lines += ["FAILED: " + run["error"].splitlines()[0]]
    return "\n".join(lines) + "\n"


@click.command(help=__doc__)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Folder for gpu.json, gpu.md and the logs.")
@click.option("--dry-run", is_flag=True, help="On the CPU at the tiny sizes: check the script, judge no target.")
@click.option("--timeout-s", type=click.IntRange(min=1), default=300, show_default=True, help="Per run.")
def main(out: Path, dry_run: bool, timeout_s: int) -> None:
    import torch

    if not dry_run and not torch.cuda.is_available():
        raise click.ClickException("no CUDA device is visible; use --dry-run to check the script on the CPU")
    out.mkdir(parents=True, exist_ok=True)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    runs = [run_bench(name, args, out, timeout_s) for name, args in plan(dry_run, gpus)]
    report = {"date": datetime.date.today().isoformat(), "dry_run": dry_run, "runs": runs,
              "targets": judge(runs, dry_run)}
    (out / "gpu.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / "gpu.md").write_text(markdown(report), encoding="utf-8")
    click.echo(markdown(report))
    failed = [r["name"] for r in runs if "record" not in r]
    if failed:
        raise click.ClickException(f"failed: {', '.join(failed)} (see {out})")


if __name__ == "__main__":
    main()
