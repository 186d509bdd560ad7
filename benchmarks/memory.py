"""Peak host memory and time of forward+backward on the embedded default model, per setting of
`sensitivity.batch_tokens` / `micro_batch_size` and `sensitivity.checkpointing`: each setting
in a process of its own (its peak resident memory, VmHWM), over the N longest corpus texts
(max_length 256), the settings alternated when repeated.

    python benchmarks/memory.py --n-texts 16

Prints one line per run: wall and CPU seconds of forward+backward, the process's resident
memory after loading the model and its peak, and the loss (the same for every setting up to
float rounding). Results: README, "Where the time and the memory go".
"""

from __future__ import annotations

from pathlib import Path

import click

from measure import child_json

ROOT = Path(__file__).resolve().parents[1]

# (label, micro_batch_size, batch_tokens, checkpointing)
SETTINGS = (
    ("8 sequences, no checkpointing (the old default)", 8, 0, False),
    ("256 tokens, no checkpointing", 8, 256, False),
    ("256 tokens, checkpointing (the default)", 8, 256, True),
    ("8 sequences, checkpointing", 8, 0, True),
)

_CHILD = """
import contextlib, json, sys, time
import torch
from pathlib import Path
from critical_weights.config.params import ModelParams
from critical_weights.core.progress import peak_memory_mib
from critical_weights.model import loading, tokenization
from critical_weights.model.source import resolve_source
from critical_weights.sensitivity import accumulate
from critical_weights.sensitivity.recompute import checkpointed_blocks
from critical_weights.texts import sources
n, micro, budget, recompute = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
p = ModelParams()
source = resolve_source(p.name)
tok = tokenization.load_tokenizer(source, p)
raw = sources.read_texts(Path(sys.argv[5]))
ids = sorted((tok(t)["input_ids"][:256] for t in raw), key=len, reverse=True)[:n]
del tok
model = loading.load_model(source, p, torch.device("cpu"), torch.float32)
loaded = peak_memory_mib()
params = accumulate.scored_parameters(model, "weights")
start, cpu = time.perf_counter(), time.process_time()
with checkpointed_blocks(model) if recompute else contextlib.nullcontext():
    acc, _ = accumulate.accumulate(model, ids, params, ["grad_x_weight"], micro, budget)
print(json.dumps({"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
                  "tokens": sum(map(len, ids)), "loaded_mib": loaded,
                  "peak_mib": peak_memory_mib(),
                  "loss": acc.loss_sum / acc.n_tokens}))
"""


def run_once(n_texts: int, micro: int, budget: int, recompute: bool) -> dict:
    args = [str(n_texts), str(micro), str(budget), "1" if recompute else "0", str(ROOT / "data/texts/corpus.jsonl")]
    return child_json(_CHILD, args)


@click.command(help=__doc__)
@click.option("--n-texts", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True)
def main(n_texts: int, repeats: int) -> None:
    for _ in range(repeats):
        for label, micro, budget, recompute in SETTINGS:
            r = run_once(n_texts, micro, budget, recompute)
            click.echo(f"{label}: forward+backward {r['seconds']:.2f} s ({r['cpu_seconds']:.2f} s of CPU) for "
                       f"{r['tokens']} tokens; after load {r['loaded_mib']:.0f} MiB, peak {r['peak_mib']:.0f} MiB; "
                       f"loss {r['loss']:.6f}")


if __name__ == "__main__":
    main()
