"""What pinning the CPU kernels to AVX2 costs: forward+backward of the embedded default model
under the pinned kernels and under this CPU's native ones, each run in a process of its own,
alternated (A B A B ...) so that load on a shared machine falls on both alike.

    python benchmarks/kernel_cost.py --n-texts 16 --repeats 2

Prints one line per run and the ratio pinned / native of the median wall and CPU seconds
(CPU seconds suffer less from other processes on a shared machine). Results: RESULTS.md.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

import click

from measure import child_json

ROOT = Path(__file__).resolve().parents[1]
PINNED_KEYS = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA", "CRITICAL_WEIGHTS_CPU_KERNELS")

# One forward+backward over the first N corpus texts (max_length 256), in the child process.
_CHILD = """
import json, sys, time
import torch
from pathlib import Path
from critical_weights.config.params import ModelParams
from critical_weights.core import kernels
from critical_weights.model import loading, tokenization
from critical_weights.model.source import resolve_source
from critical_weights.sensitivity import accumulate
from critical_weights.texts import sources
n, micro = int(sys.argv[1]), int(sys.argv[2])
p = ModelParams()
source = resolve_source(p.name)
tok = tokenization.load_tokenizer(source, p)
model = loading.load_model(source, p, torch.device("cpu"), torch.float32)
raw = sources.read_texts(Path(sys.argv[3]))[:n]
ids = [tok(t)["input_ids"][:256] for t in raw]
params = accumulate.scored_parameters(model, "weights")
start, cpu = time.perf_counter(), time.process_time()
accumulate.accumulate(model, ids, params, ["grad_x_weight"], micro)
seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "tokens": sum(map(len, ids)), **kernels.describe()}))
"""


def run_once(setting: str, n_texts: int, micro: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in PINNED_KEYS}
    env["CRITICAL_WEIGHTS_CPU_KERNELS"] = setting
    return child_json(_CHILD, [str(n_texts), str(micro), str(ROOT / "data/texts/corpus.jsonl")], env)


@click.command(help=__doc__)
@click.option("--n-texts", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--micro-batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=2, show_default=True)
def main(n_texts: int, micro_batch_size: int, repeats: int) -> None:
    seconds: dict[str, list[float]] = {"avx2": [], "native": []}
    cpu: dict[str, list[float]] = {"avx2": [], "native": []}
    for _ in range(repeats):
        for setting in seconds:
            r = run_once(setting, n_texts, micro_batch_size)
            seconds[setting].append(r["seconds"])
            cpu[setting].append(r["cpu_seconds"])
            click.echo(f"{setting:6s} ({r['cpu_capability']}, {r['threads']} threads): forward+backward "
                       f"{r['seconds']:.2f} s, {r['cpu_seconds']:.2f} s of CPU, for {r['tokens']} tokens", )
    for what, values in (("wall", seconds), ("CPU", cpu)):
        ratio = statistics.median(values["avx2"]) / statistics.median(values["native"])
        click.echo(f"pinned avx2 / native, median {what} seconds: {ratio:.3f}")


if __name__ == "__main__":
    main()
