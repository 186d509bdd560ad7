"""The `quantize` stage: round-to-nearest at each width, and how much of its damage each
metric's critical weights recover when they are kept at their original values.

1. Plan from the shards, as compress plans: the same tensors (every weight of ndim >= 2 inside
   the blocks, or `compress.include`), the same sets (every computed metric, then magnitude and
   random), the same texts (`compress.n_texts` held-out texts).
2. A fresh model, checked against the shards, and a copy of the quantised tensors' originals.
3. The dense model's loss, then for each of `quantize.bits`:
   - every tensor quantised, RTN in groups of `quantize.group_size` inputs
     (critical_weights.compression.rtn); one loss evaluation;
   - element-wise protection: for each set and each share in `quantize.keep`, the set's global
     top share of all quantised weights (critical_weights.compression.protect.top_positions,
     exact) written back to their original values; one evaluation; the quantised values back;
   - channel-wise protection, as AWQ: per tensor (per expert), the top `quantize.channels` of
     its input channels by their activation norm (wanda's sums of x²), by each set's column
     sums, and at random; kept at their original values; one evaluation each.
4. The report, the headline, the table behind the DVC plot and the figure
   (critical_weights.compression.quantization_report).

Each group's grid is set by all of its weights, the protected ones included, so keeping a
weight changes no other weight's value: the recovered share measures only which weights were
kept. The report says so.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from critical_weights.artifacts.sums import Sums
from critical_weights.compression import quantization_report as rep
from critical_weights.compression.protect import top_channels, top_positions
from critical_weights.compression.rtn import quantized
from critical_weights.compression.scores import TURNED, input_norms, scores, to_out_in, to_stored
from critical_weights.compression.measure import Measurer
from critical_weights.compression.stage import Originals, Target, load_model, plan
from critical_weights.config.params import Params
from critical_weights.core.errors import NumericalError
from critical_weights.core.memory import unmap_large_blocks
from critical_weights.core.outputs import write_json, write_text
from critical_weights.core.progress import Timings, counted
from critical_weights.model import loading
from critical_weights.reports.figures import save_png

log = logging.getLogger(__name__)
ACTIVATION = "activation"  # the channel set chosen by input norm alone, as AWQ chooses


@dataclass(frozen=True)
class Outputs:
    """Where the stage writes (dvc.yaml spells the paths)."""

    metrics: Path  # quantization.json, the headline DVC metrics
    report: Path  # quantization_report.json
    table: Path  # quantization.csv, behind the DVC plot
    plot: Path  # quantization.png


class Quantizer(Originals):
    """The quantised tensors of a model: RTN in place, originals written back where kept."""

    def __init__(self, model: torch.nn.Module, tensors: list[Target]):
        super().__init__(model, tensors)
        self.quantize_seconds = 0.0

    def quantize(self, bits: int, group_size: int, symmetric: bool) -> None:
        start = time.perf_counter()
        with torch.no_grad():
            for t in self.tensors:
                w = self.weights[t.name]
                q = quantized(to_out_in(self.originals[t.name], t.kind), bits, group_size, symmetric)
                w.copy_(to_stored(q, t.kind, t.shape))
        self.quantize_seconds += time.perf_counter() - start

    def keep(self, positions: list[torch.Tensor]) -> list[torch.Tensor]:
        """Write the originals back at each tensor's stored flat `positions`; the values they replace."""
        replaced = []
        with torch.no_grad():
            for t, at in zip(self.tensors, positions):
                flat = self.weights[t.name].view(-1)
                replaced.append(flat[at].clone())
                flat[at] = self.originals[t.name].view(-1)[at]
        return replaced

    def unkeep(self, positions: list[torch.Tensor], replaced: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for t, at, values in zip(self.tensors, positions, replaced):
                self.weights[t.name].view(-1)[at] = values

def stored_positions(t: Target, out_in_positions: torch.Tensor) -> torch.Tensor:
    """Flat positions in the (out, in) matrix -> flat positions in the parameter as stored."""
    if t.kind not in TURNED:
        return out_in_positions  # (out, in) is the stored layout, flattened alike
    rows, cols = (t.shape[1], t.shape[0]) if t.kind == "conv1d" else (t.shape[0] * t.shape[2], t.shape[1])
    marked = torch.zeros(rows * cols, dtype=torch.bool, device=out_in_positions.device)
    marked[out_in_positions] = True
    return to_stored(marked.reshape(rows, cols), t.kind, t.shape).reshape(-1).nonzero().reshape(-1)


def units_of(t: Target) -> int:
    """Separate linear maps in one tensor: its experts for 3-D expert tensors, else 1."""
    return t.shape[0] if len(t.shape) == 3 else 1


class Chooser:
    """Each set's protected weights, scored on the unquantised `weights` from the saved sums,
    one tensor at a time."""

    def __init__(self, weights: dict[str, torch.Tensor], tensors: list[Target], sums: Sums, seed: int):
        self.weights, self.tensors, self.sums, self.seed = weights, tensors, sums, seed
        self.seconds = 0.0

    def _scores(self, metric: str):
        for i, t in enumerate(self.tensors):
            yield i, t, scores(metric, t.name, self.weights[t.name], t.kind, self.sums, self.seed, i)

    def elements(self, metric: str, ks: list[int]) -> dict[int, list[torch.Tensor]]:
        """Per k, per tensor: the stored flat positions of the set's global top k."""
        start = time.perf_counter()
        chosen = top_positions(lambda: (s for _, _, s in self._scores(metric)), ks)
        out = {k: [stored_positions(t, at) for t, at in zip(self.tensors, chosen[k])] for k in ks}
        self.seconds += time.perf_counter() - start
        return out

    def channels(self, metric: str, share: float) -> tuple[list[torch.Tensor], int]:
        """Per tensor: the stored flat positions of its top input channels; how many weights."""
        start = time.perf_counter()
        out, n = [], 0
        for i, t in enumerate(self.tensors):
            w = self.weights[t.name]
            s = (input_norms(t.name, w, t.kind, self.sums) if metric == ACTIVATION
                 else scores(metric, t.name, w, t.kind, self.sums, self.seed, i))
            protected, _ = top_channels(s, units_of(t), share)
            at = stored_positions(t, protected.reshape(-1).nonzero().reshape(-1))
            out.append(at)
            n += at.numel()
        self.seconds += time.perf_counter() - start
        return out, n


def run_quantize(prepared: Path, sensitivity: Path, source: Path, params: Params, out: Outputs,
                 timings: Timings) -> dict[str, Any]:
    """RTN at each width, each set's critical weights kept, measured; the report and figures."""
    qp = params.quantize
    unmap_large_blocks()  # the kept weights are chosen tensor by tensor, three passes per set (core.memory)
    loading.resolve_device(params.model)  # a device or dtype this machine lacks fails here, before any work
    with timings.phase("plan"):
        planned = plan(prepared, sensitivity, source, params)
        meta, tensors, sums, sets = planned.meta, planned.tensors, planned.sums, planned.sets
        channel_sets: list[str] = []
        no_activation = None
        if qp.channels > 0:
            channel_sets = [*([ACTIVATION] if "act_sq" in sums.kinds else []), *sets]
            if "act_sq" not in sums.kinds:
                no_activation = ("AWQ's own choice, channels by input norm, needs wanda's sums of x^2, which this run "
                                 "did not compute; add wanda to sensitivity.metrics")
                log.warning("quantize.channels: %s", no_activation)
    with timings.phase("load model"):
        model = load_model(sensitivity, planned, params, meta["metrics"][0])
        quantizer = Quantizer(model, tensors)
        chooser = Chooser(quantizer.originals, tensors, sums, params.seed)  # scores of the unquantised weights
    ks = {share: math.floor(share * quantizer.n_weights) for share in qp.keep}
    for share, k in ks.items():
        if k == 0:
            log.warning("quantize.keep: %g of %d weights keeps none; RTN alone is measured again there "
                        "(the smallest share that keeps one is %.2g)", share, quantizer.n_weights, 1 / quantizer.n_weights)
    remainders = [t.name for t in tensors if t.shape[-1 if t.kind not in TURNED else -2] % qp.group_size]
    if remainders:
        log.info("quantize: %d of %d tensors have an input size group_size %d does not divide; their last group "
                 "is smaller", len(remainders), len(tensors), qp.group_size)
    per_bits = 1 + len(sets) * len(ks) + len(channel_sets)
    rows: list[dict[str, Any]] = []
    n_states = 1 + per_bits * len(qp.bits)
    with timings.phase("quantize and measure"), counted("quantize: loss evaluations", n_states * len(planned.texts)) as step:
        measurer = Measurer(model, planned.texts, params, step)
        baseline = measurer.baseline
        if not math.isfinite(baseline):
            raise NumericalError(f"the unquantised loss is {baseline}; try model.dtype float32")
        log.info("quantize: dense loss %.4f on %s; %d tensors, %d weights", baseline,
                 " and ".join(f"{len(t.ids)} {t.name} sequences" for t in planned.texts), len(tensors), quantizer.n_weights)

        def measure(**row: Any) -> None:
            rows.append({**row, **measurer.measure()})
            log.info("quantize %s: loss %.4f (dense %.4f)", " ".join(f"{k}={v}" for k, v in row.items()),
                     rows[-1]["loss"] if rows[-1]["finite"] else float("nan"), baseline)

        for bits in qp.bits:
            quantizer.quantize(bits, qp.group_size, qp.symmetric)
            measure(bits=bits, protect="none", metric="rtn", share=0.0, n_kept=0)
            for metric in sets:
                chosen = chooser.elements(metric, list(ks.values()))
                for share, k in ks.items():
                    replaced = quantizer.keep(chosen[k])
                    measure(bits=bits, protect="weights", metric=metric, share=share, n_kept=k)
                    quantizer.unkeep(chosen[k], replaced)
            for metric in channel_sets:
                at, n = chooser.channels(metric, qp.channels)
                if n == 0:
                    log.warning("quantize.channels: %g of every tensor's inputs is less than one channel; RTN alone "
                                "is measured again there", qp.channels)
                replaced = quantizer.keep(at)
                measure(bits=bits, protect="channels", metric=metric, share=qp.channels, n_kept=n)
                quantizer.unkeep(at, replaced)
        quantizer.restore()
    eval_seconds = measurer.seconds
    work = quantizer.quantize_seconds + chooser.seconds
    log.info("quantize: quantising took %.1f s, choosing the kept weights %.1f s, loss evaluations %.1f s "
             "(%.0f%% not evaluation)", quantizer.quantize_seconds, chooser.seconds, eval_seconds,
             100 * work / max(1e-9, work + eval_seconds))
    report = rep.build_report(params, meta, tensors, quantizer.n_weights, remainders, planned.texts, measurer.baselines, sets,
                              channel_sets, no_activation, rows)
    with timings.phase("write"):
        write_json(out.report, report)
        write_json(out.metrics, rep.headline(report))
        write_text(out.table, rep.table_csv(report))
        save_png(rep.figure(report), out.plot)
    return report
