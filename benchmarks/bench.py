"""Time the pipeline, phase by phase, on a Llama-shaped model with seeded random weights.

Builds a LlamaForCausalLM from a config (nothing is downloaded) directly on the target
device (bfloat16 on CUDA, float32 on the CPU), draws N_SEQ x SEQ_LEN random token ids from
the seed, and runs the library code the stages run:

- in-process (default): `sensitivity.compute_shards` (forward+backward, then scoring and
  shard writing), then rank (per_tensor and global), export and plot, each of those in a
  process of its own (benchmarks/phase.py) so that its peak host memory is its own;
- `--chain`: the same work as DVC runs it, one `python stages/<stage>.py` process per
  stage, on a model folder written with `save_pretrained`; model load is reported apart;
- `--shards-only`: no model; shards of SIZE's shape with random scores, then rank, export
  and plot, which never use the GPU (so their 8B-scale cost can be measured anywhere).

Per phase it prints seconds, peak GPU memory (CUDA), peak host memory and, for
forward+backward, tokens/s and TFLOP/s counted as 6 x (weights but the embedding) x tokens
(for a Mixture-of-Experts size, only the routed share of the expert weights counts).
`--json` writes the same as a JSON record.

Examples:

    python benchmarks/bench.py --size llama-3.1-8b --device cuda
    python benchmarks/bench.py --size llama-3.1-8b --device cuda --chain
    python benchmarks/bench.py --size llama-3.1-8b --shards-only
    python benchmarks/bench.py --size small --device cpu --json small.json

Results and their analysis: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import datetime
import json
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness modules beside this script

from chain import run_chain  # noqa: E402
from in_process import run_in_process  # noqa: E402
from measure import describe_device, portable_command, summarise, table  # noqa: E402
from shards_only import run_shards_only  # noqa: E402
from workload import (  # noqa: E402
    DEFAULT_MICRO_BATCH, SIZES, active_weights, bench_params, build_model, matrix_counts, random_ids,
)


@click.command(help=__doc__)
@click.option("--size", type=click.Choice(list(SIZES)), default="tiny", show_default=True, help="Model shape.")
@click.option("--device", "device_name", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--n-seq", type=click.IntRange(min=1), default=100, show_default=True, help="Sequences.")
@click.option("--seq-len", type=click.IntRange(min=2), default=512, show_default=True, help="Tokens per sequence.")
@click.option("--micro-batch-size", type=click.IntRange(min=1), help="Sequences per forward+backward [default: 4 for llama-3.1-8b, else 8].")
@click.option("--batch-tokens", type=click.IntRange(min=0), default=0, show_default=True, help="sensitivity.batch_tokens.")
@click.option("--checkpointing", is_flag=True, help="sensitivity.checkpointing (off here: the GPU targets are throughput).")
@click.option("--metrics", default="grad_x_weight,magnitude", show_default=True, help="sensitivity.metrics, comma-separated; the first is ranked.")
@click.option("--keep", type=click.IntRange(min=1), default=1000, show_default=True, help="sensitivity.keep.")
@click.option("--k", type=click.IntRange(min=1), default=100, show_default=True, help="rank.k.")
@click.option("--seed", type=int, default=0, show_default=True, help="Weights and token ids follow from it.")
@click.option("--warmup", type=click.IntRange(min=0), default=0, show_default=True, help="In-process only: first run forward+backward over this many sequences, untimed by the pipeline phases.")
@click.option("--chain", is_flag=True, help="Run the stages as DVC does, one process each, instead of in-process.")
@click.option("--fsdp", type=click.IntRange(min=2), help="With --chain: model.parallel fsdp, the sensitivity stage sharded over this many processes (one per GPU).")
@click.option("--shards-only", is_flag=True, help="No model: write synthetic shards of SIZE's shape, then time rank, export and plot (they never use the GPU).")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), help="Keep the outputs here (default: a temporary folder, removed).")
@click.option("--json", "json_file", type=click.Path(dir_okay=False, path_type=Path), help="Also write the record as JSON here.")
def main(size: str, device_name: str, n_seq: int, seq_len: int, micro_batch_size: int | None, batch_tokens: int,
         checkpointing: bool, metrics: str, keep: int, k: int, seed: int, warmup: int, chain: bool, fsdp: int | None,
         shards_only: bool, work_dir: Path | None,
         json_file: Path | None) -> None:
    from critical_weights.core.errors import reported
    from critical_weights.core.progress import setup_logging

    setup_logging()
    if chain and shards_only:
        raise click.UsageError("--chain and --shards-only exclude each other")
    if fsdp and not chain:
        raise click.UsageError("--fsdp runs the stages as DVC does: add --chain")
    if device_name == "cuda" and not torch.cuda.is_available():
        raise click.ClickException("--device cuda: no CUDA device is visible")
    device = torch.device(device_name)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # model.dtype auto
    micro = micro_batch_size or DEFAULT_MICRO_BATCH.get(size, 8)
    metric_list = tuple(m.strip() for m in metrics.split(",") if m.strip())
    meta_model = build_model(size, torch.device("meta"), dtype, seed)  # asserts the 8B counts
    counts, active = matrix_counts(meta_model), active_weights(meta_model)
    vocab = SIZES[size]["vocab_size"]
    ids = random_ids(n_seq, seq_len, vocab, seed)
    raw = bench_params(n_seq, seq_len, micro, batch_tokens, keep, k, metric_list, seed, device_name, checkpointing)
    if fsdp:
        raw["model"].update(parallel="fsdp", processes=fsdp)
    record: dict[str, Any] = {
        "mode": f"chain, fsdp over {fsdp}" if fsdp else "chain" if chain else "shards-only" if shards_only else "in-process",
        "command": portable_command(["python", "benchmarks/bench.py", *sys.argv[1:]]),
        "date": datetime.date.today().isoformat(),
        "device": describe_device(device), "python": platform.python_version(), "torch": torch.__version__,
        "transformers": _version("transformers"), "size": size,
        "config": {k_: v for k_, v in SIZES[size].items() if k_ != "rope_scaling"},
        "dtype": str(dtype).removeprefix("torch."),
        "n_matrices": counts[0], "n_weights": counts[1], "n_weights_but_embedding": counts[2],
        "n_seq": n_seq, "seq_len": seq_len, "tokens": n_seq * seq_len, "micro_batch_size": micro,
        "batch_tokens": batch_tokens, "checkpointing": checkpointing, "metrics": list(metric_list), "keep": keep, "k": k,
        "n_active_weights_but_embedding": active,  # MoE: only the routed share of the experts
        "train_flop": 6 * active * n_seq * seq_len,
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
