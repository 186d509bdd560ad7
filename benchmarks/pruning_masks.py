"""Peak host memory and time of building every pruning mask of one metric, and 3-bit RTN, at a
size's shape, one tensor at a time, in a process of its own.

For the block tensors of SIZE (every weight of ndim >= 2 inside the blocks, names and shapes
from workload.SIZES on the meta device; Llama-3.1-8B: 7 per block x 32 blocks), block by
block: synthetic float32 sums of the block's tensors (`grad` and `act_sq`, what grad_x_weight
and wanda need) written to a sums folder as the sensitivity stage writes it (SumsWriter) and
read back by the stages' own reader (Sums); then per tensor a synthetic float32 weight, and,
as Pruner.masks does it, per mask the tensor's scores rebuilt from the sums
(compression.scores) and its mask (compression.masks): the compress stage's default masks
(unstructured per row at 0.1, 0.3, 0.5, 0.7; 2:4; 4:8) and per tensor at 0.5; then the
quantize stage's RTN of the tensor (its default width and group). The block's sums folder is
deleted before the next block's is written.

Only one weight tensor is held at a time: the model itself is not built. The peak host memory
of each mask and of RTN (VmHWM, reset before each) is the interpreter, torch, that one weight
and everything the work allocates; "beside the model" takes that one weight out. Like the
compress stage, the run leaves malloc's settings alone; `--unmap-large-blocks` fixes its mmap
threshold first, as the quantize stage does (critical_weights.core.memory).

    python benchmarks/pruning_masks.py --size llama-3.1-8b --blocks 2 --metric grad_x_weight

`--blocks N` measures the first N blocks and scales the time to all of them (every block has
the same shapes); `--blocks 0` measures all. Results: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import datetime
import json
import math
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness modules beside this script

from measure import child_json, describe_device, host_peak_bytes, host_peak_reset, portable_command  # noqa: E402
from workload import INIT_STD, MOE_SIZES, SIZES, build_model  # noqa: E402

from critical_weights.artifacts.sums import Sums, SumsWriter, path_of  # noqa: E402
from critical_weights.compression.masks import pruned_mask  # noqa: E402
from critical_weights.compression.rtn import quantized  # noqa: E402
from critical_weights.compression.scores import RANDOM, scores, to_out_in, to_stored  # noqa: E402
from critical_weights.compression.stage import Target, configurations  # noqa: E402
from critical_weights.config.params import Params  # noqa: E402
from critical_weights.core.memory import unmap_large_blocks  # noqa: E402
from critical_weights.metrics import REGISTRY  # noqa: E402
from critical_weights.model import layout  # noqa: E402

TARGET_BYTES = 2 * 10**9  # issue 18: under 2 GB of host memory beside the model
MIB = 1 << 20
SUMS = ("grad", "act_sq")  # the synthetic sums written (grad_x_weight's and wanda's)
METRICS = tuple(m for m in REGISTRY if set(REGISTRY[m].needs) <= set(SUMS)) + (RANDOM,)
DENSE_SIZES = tuple(s for s in SIZES if s not in MOE_SIZES)  # every block weight is nn.Linear
GRAD_STD = 1e-6  # the synthetic gradient sums' scale; the masks' cost does not depend on it
N_TOKENS = 51_200  # the synthetic act_sq sums' token count (100 x 512, the benchmark's workload)


def mask_configurations() -> list[tuple[str, str, float]]:
    """(structure, group, sparsity): the compress stage's defaults, then per tensor at 0.5."""
    return [*configurations(Params()), ("unstructured", "per_tensor", 0.5)]


def label(config: tuple[str, str, float]) -> str:
    """`per_row 0.5`, `per_tensor 0.5`, `2:4`: how the records and tables name a mask."""
    structure, group, sparsity = config
    return f"{group} {sparsity:g}" if structure == "unstructured" else structure


def block_tensors(size: str) -> list[layout.TensorLayout]:
    """Every weight of ndim >= 2 inside SIZE's blocks, in parameter order (shapes from the meta device)."""
    model = build_model(size, torch.device("meta"), torch.float32, seed=0)
    chosen = [p for p in layout.describe(model).values() if p.block is not None and len(p.shape) >= 2]
    odd = [p.parameter for p in chosen if p.kind != "linear"]
    if odd:
        raise click.ClickException(f"{size}: {odd[0]} is not an nn.Linear weight; this benchmark writes act_sq "
                                   "sums for nn.Linear only")
    return chosen


def _generator(seed: int, index: int, stream: int) -> torch.Generator:
    """One stream per tensor (its index among the pruned tensors) and purpose, from the seed."""
    return torch.Generator().manual_seed((seed * 1_000_003 + index) * 2 + stream)


def write_sums(folder: Path, tensors: list[tuple[int, Target]], seed: int) -> None:
    """Synthetic float32 sums of (index, target) `tensors` in `folder`/sums, one file per kind as
    the sensitivity stage writes them: grad ~ N(0, GRAD_STD) in the stored shape, act_sq a sum of
    squares over N_TOKENS tokens per input, (in,) for nn.Linear; one tensor in memory at a time."""
    meta = {"format": "critical-weights/sums/1", "model": "synthetic", "text_sha256": "none", "n_tokens": str(N_TOKENS)}
    shapes = {"grad": {t.name: t.shape for _, t in tensors}, "act_sq": {t.name: (t.shape[-1],) for _, t in tensors}}
    writers = {kind: SumsWriter(path_of(folder, kind), shapes[kind], {**meta, "kind": kind}) for kind in SUMS}
    try:
        for index, t in tensors:
            gen = _generator(seed, index, 1)
            writers["grad"].write(t.name, torch.empty(t.shape).normal_(0.0, GRAD_STD, generator=gen).numpy())
            act_sq = torch.empty(t.shape[-1]).normal_(generator=gen).square_().add_(0.5).mul_(N_TOKENS)  # (in,)
            writers["act_sq"].write(t.name, act_sq.numpy())
    finally:
        for writer in writers.values():
            writer.close()


def synthetic_weight(t: Target, seed: int, index: int) -> torch.Tensor:
    """The tensor's weight in its stored shape, float32 ~ N(0, INIT_STD), from the seed."""
    return torch.empty(t.shape).normal_(0.0, INIT_STD, generator=_generator(seed, index, 0))


def one_mask(metric: str, index: int, t: Target, weight: torch.Tensor, sums: Sums, seed: int,
             config: tuple[str, str, float]) -> tuple[torch.Tensor, float, float]:
    """Pruner.masks's work for one tensor and one configuration: (pruned, bool in the stored
    shape; seconds rebuilding the scores; seconds choosing the mask)."""
    structure, group, sparsity = config
    start = time.perf_counter()
    s = scores(metric, t.name, weight, t.kind, sums, seed, index)  # (out, in) float32
    middle = time.perf_counter()
    pruned = to_stored(pruned_mask(s, sparsity, structure, group, t.name), t.kind, t.shape)
    return pruned, middle - start, time.perf_counter() - middle


def measure_tensor(metric: str, index: int, place: layout.TensorLayout, sums: Sums, seed: int,
                   configs: list[tuple[str, str, float]], params: Params) -> dict[str, Any]:
    """Every mask of `configs`, then RTN, of one tensor: seconds, and the peak host memory of
    each (VmHWM, reset before each), the one weight held included."""
    t = Target(place.parameter, place.kind, place.shape)
    weight = synthetic_weight(t, seed, index)  # the model's own tensor: held, not counted
    q = params.quantize
    record: dict[str, Any] = {"parameter": t.name, "component": place.component, "shape": list(t.shape),
                              "weight_bytes": weight.numel() * weight.element_size(), "rss_before_bytes": _rss_bytes(),
                              "masks": {}}
    own, start = True, time.perf_counter()
    for config in configs:
        own &= host_peak_reset()
        pruned, score_s, mask_s = one_mask(metric, index, t, weight, sums, seed, config)
        share = int(pruned.sum()) / pruned.numel()
        del pruned  # as the stage drops it before the next tensor's
        record["masks"][label(config)] = {"score_s": score_s, "mask_s": mask_s, "pruned_share": share,
                                          "peak_bytes": host_peak_bytes()}
    own &= host_peak_reset()
    rtn_start = time.perf_counter()
    with torch.no_grad():
        weight.copy_(to_stored(quantized(to_out_in(weight, t.kind), q.bits[0], q.group_size, q.symmetric),
                               t.kind, t.shape))  # as Quantizer.quantize writes it
    record.update(rtn_s=time.perf_counter() - rtn_start, rtn_peak_bytes=host_peak_bytes(),
                  seconds=time.perf_counter() - start, host_peak_is_own=own)
    record["host_peak_bytes"] = max(record["rtn_peak_bytes"], *(m["peak_bytes"] for m in record["masks"].values()))
    return record


def _rss_bytes() -> int:
    """This process's resident memory now (VmRSS), in bytes; 0 where /proc is absent."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def by_block(tensors: list[layout.TensorLayout],
             n_blocks: int) -> Iterator[tuple[int, list[tuple[int, layout.TensorLayout]]]]:
    """(block, its (index, tensor) pairs) for the first n_blocks blocks (all with 0); the index
    is the tensor's among all the pruned tensors, as the stage numbers them."""
    blocks = sorted({p.block for p in tensors})
    for block in blocks[:n_blocks] if n_blocks else blocks:
        yield block, [(i, p) for i, p in enumerate(tensors) if p.block == block]


def run_masks(size: str, metric: str, n_blocks: int, work: Path, seed: int, unmap: bool = False) -> dict[str, Any]:
    """Measure every tensor of the first `n_blocks` blocks (0: all) in this process; the record.
    `unmap`: fix malloc's mmap threshold first, as the quantize stage does (core.memory); the
    compress stage does not."""
    unmapped = unmap_large_blocks() if unmap else False
    tensors = block_tensors(size)
    configs, params = mask_configurations(), Params()
    runtime, write_s, records = _rss_bytes(), 0.0, []  # runtime: the interpreter, torch and the library
    for block, places in by_block(tensors, n_blocks):
        folder = work / f"block{block}"
        start = time.perf_counter()
        write_sums(folder, [(i, Target(p.parameter, p.kind, p.shape)) for i, p in places], seed)
        write_s += time.perf_counter() - start
        sums = Sums(folder)
        try:
            for i, p in places:
                records.append(measure_tensor(metric, i, p, sums, seed, configs, params))
        finally:
            shutil.rmtree(folder)
    beside = max(r["host_peak_bytes"] - r["weight_bytes"] for r in records)
    components = _components(records, tensors)
    q = params.quantize
    return {
        "size": size, "metric": metric, "threads": torch.get_num_threads(), "unmap_large_blocks": unmapped,
        "masks": list(records[0]["masks"]),
        "rtn": {"bits": q.bits[0], "group_size": q.group_size, "symmetric": q.symmetric},
        "n_blocks": len({p.block for p in tensors}), "n_tensors": len(tensors), "n_measured": len(records),
        "n_weights_measured": sum(math.prod(r["shape"]) for r in records),
        "largest_tensor_bytes": max(r["weight_bytes"] for r in records), "runtime_bytes": runtime,
        "host_peak_is_own": all(r["host_peak_is_own"] for r in records),
        "peak_bytes": max(r["host_peak_bytes"] for r in records),
        "peak_beside_model_bytes": beside, "target_bytes": TARGET_BYTES, "target_met": beside < TARGET_BYTES,
        "measured_s": sum(r["seconds"] for r in records),
        "all_blocks_s": sum(c["all_blocks_s"] for c in components.values()),
        "write_sums_s": write_s, "steps": _steps(records), "components": components, "tensors": records,
    }


def _components(records: list[dict[str, Any]], tensors: list[layout.TensorLayout]) -> dict[str, dict[str, Any]]:
    """Per component (self_attn.q_proj, ...): seconds summed over its measured tensors, the
    largest peaks, and the seconds scaled to its tensors in every block."""
    components: dict[str, dict[str, Any]] = {}
    for r in records:
        c = components.setdefault(r["component"], {"shape": r["shape"], "n_measured": 0, "seconds": 0.0, "score_s": 0.0,
                                                  "mask_s": 0.0, "rtn_s": 0.0, "peak_bytes": 0,
                                                  "beside_model_bytes": 0, "working_bytes": 0})
        c["n_measured"] += 1
        c["seconds"] += r["seconds"]
        c["score_s"] += sum(m["score_s"] for m in r["masks"].values())
        c["mask_s"] += sum(m["mask_s"] for m in r["masks"].values())
        c["rtn_s"] += r["rtn_s"]
        c["peak_bytes"] = max(c["peak_bytes"], r["host_peak_bytes"])
        c["beside_model_bytes"] = max(c["beside_model_bytes"], r["host_peak_bytes"] - r["weight_bytes"])
        c["working_bytes"] = max(c["working_bytes"], r["host_peak_bytes"] - r["rss_before_bytes"])
    for name, c in components.items():
        c["n_all_blocks"] = sum(1 for p in tensors if p.component == name)
        c["all_blocks_s"] = c["seconds"] / c["n_measured"] * c["n_all_blocks"]  # every block has the same shapes
    return components


def _steps(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per mask, then RTN: seconds summed over the measured tensors, and the largest peak beside the weight."""
    steps: dict[str, dict[str, float]] = {}
    for r in records:
        done = {**{k: (m["score_s"] + m["mask_s"], m["peak_bytes"]) for k, m in r["masks"].items()},
                "RTN": (r["rtn_s"], r["rtn_peak_bytes"])}
        for k, (seconds, peak) in done.items():
            step = steps.setdefault(k, {"seconds": 0.0, "peak_beside_model_bytes": 0})
            step["seconds"] += seconds
            step["peak_beside_model_bytes"] = max(step["peak_beside_model_bytes"], peak - r["weight_bytes"])
    return steps


_CHILD = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import torch
from pruning_masks import run_masks
size, metric, work = sys.argv[2], sys.argv[3], Path(sys.argv[5])
n_blocks, seed, threads, unmap = int(sys.argv[4]), int(sys.argv[6]), int(sys.argv[7]), sys.argv[8] == "1"
if threads:
    torch.set_num_threads(threads)
print(json.dumps(run_masks(size, metric, n_blocks, work, seed, unmap)))
"""


def run_in_child(size: str, metric: str, n_blocks: int, work: Path, seed: int, threads: int = 0,
                 unmap: bool = False) -> dict[str, Any]:
    """`run_masks` in a process of its own, so that the peak is its own."""
    args = [str(Path(__file__).resolve().parent), size, metric, str(n_blocks), str(work), str(seed), str(threads),
            "1" if unmap else "0"]
    try:
        return child_json(_CHILD, args)
    except subprocess.CalledProcessError as e:
        raise click.ClickException(f"the {metric} run failed (exit {e.returncode}):\n{e.stderr[-4000:]}") from None


def table(record: dict[str, Any]) -> str:
    """Per component and per step, as Markdown tables, then the verdict."""
    lines = ["| tensor | shape | measured | s per tensor | of it: scores | masks | RTN "
             "| peak beside the model (MiB) | working (MiB) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, c in record["components"].items():
        n = c["n_measured"]
        lines.append(f"| {name} | {' x '.join(map(str, c['shape']))} | {n} | {c['seconds'] / n:.2f} "
                     f"| {c['score_s'] / n:.2f} | {c['mask_s'] / n:.2f} | {c['rtn_s'] / n:.2f} "
                     f"| {c['beside_model_bytes'] / MIB:,.0f} | {c['working_bytes'] / MIB:,.0f} |")
    lines += ["", "| step | seconds, measured tensors | peak beside the model (MiB) |", "|---|---:|---:|"]
    lines += [f"| {k} | {step['seconds']:.1f} | {step['peak_beside_model_bytes'] / MIB:,.0f} |"
              for k, step in record["steps"].items()]
    return "\n".join([*lines, "", verdict(record)])


def verdict(record: dict[str, Any]) -> str:
    """The totals and whether the peak beside the model stays under the target, in one paragraph."""
    r = record
    scaled = "" if r["n_measured"] == r["n_tensors"] else (
        f"; all {r['n_tensors']}, scaled from the measured ones: {r['all_blocks_s']:.1f} s")
    own = "" if r["host_peak_is_own"] else "; the peak is the process's lifetime peak (VmHWM could not be reset)"
    return (f"{r['metric']}: {len(r['masks'])} masks ({', '.join(r['masks'])}) and RTN at {r['rtn']['bits']} bits per "
            f"tensor; {r['n_measured']} of {r['n_tensors']} tensors measured in {r['measured_s']:.1f} s{scaled} "
            f"(writing the synthetic sums, not counted: {r['write_sums_s']:.1f} s). Peak host memory "
            f"{r['peak_bytes'] / MIB:,.0f} MiB, {r['peak_beside_model_bytes'] / MIB:,.0f} MiB beside the one weight "
            f"tensor held (largest {r['largest_tensor_bytes'] / MIB:,.0f} MiB), the interpreter, torch and the library "
            f"included ({r['runtime_bytes'] / MIB:,.0f} MiB before the first tensor): "
            f"{'under' if r['target_met'] else 'NOT under'} 2 GB ({TARGET_BYTES / MIB:,.0f} MiB){own}.")


@click.command(help=__doc__)
@click.option("--size", type=click.Choice(DENSE_SIZES), default="tiny", show_default=True, help="Model shape.")
@click.option("--metric", "metrics", type=click.Choice(METRICS), multiple=True, default=("grad_x_weight",),
              show_default=True, help="The set whose masks are built; repeat for several, each in its own process.")
@click.option("--blocks", type=click.IntRange(min=0), default=2, show_default=True,
              help="Measure the first N blocks and scale the time to all; 0 = all.")
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="torch.set_num_threads in the child; 0 = torch's default, as the stages run.")
@click.option("--unmap-large-blocks", "unmap", is_flag=True,
              help="Fix malloc's mmap threshold at 1 MiB first, as the quantize stage does (the compress stage does not).")
@click.option("--seed", type=int, default=0, show_default=True, help="Weights and sums follow from it.")
@click.option("--json", "json_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the records as JSON here.")
def main(size: str, metrics: tuple[str, ...], blocks: int, threads: int, unmap: bool, seed: int,
         json_file: Path | None) -> None:
    report: dict[str, Any] = {
        "command": portable_command(["python", "benchmarks/pruning_masks.py", *sys.argv[1:]]),
        "date": datetime.date.today().isoformat(), "device": describe_device(torch.device("cpu")),
        "python": platform.python_version(), "torch": torch.__version__, "runs": [],
    }
    click.echo(f"{report['command']}\n{report['date']}, {report['device']}, torch {report['torch']}\n")
    for metric in metrics:
        work = Path(tempfile.mkdtemp(prefix="cw-masks-"))
        try:
            record = run_in_child(size, metric, blocks, work, seed, threads, unmap)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        report["runs"].append(record)
        malloc = "mmap threshold fixed at 1 MiB" if record["unmap_large_blocks"] else "malloc's defaults"
        click.echo(f"### {metric} (torch threads {record['threads']}, {malloc})\n\n{table(record)}\n")
    if json_file is not None:
        json_file.parent.mkdir(parents=True, exist_ok=True)
        json_file.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
