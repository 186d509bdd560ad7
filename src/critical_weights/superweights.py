"""Super weights and massive activations, found from forward passes alone.

Detection follows the Super Weight paper (Yu et al., 2024). One forward pass on a prompt records,
for every block's MLP output projection (per expert for MoE), the largest |input| and |output|
activation and their channels. Where both exceed `superweights.threshold`, the weight at
(row = output channel, col = input channel) is a candidate: the input spike times that weight
makes the output spike. The candidate is zeroed and the search runs again (a later spike may be
the echo of an earlier one) until none is left or `superweights.max_candidates` are found; each
round takes the earliest block that spikes on both sides.

Massive activations (Sun et al., 2024) are the largest hidden-state magnitudes of each layer, as
`output_hidden_states` returns them (0 = the embeddings, last = after the final norm).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from critical_weights import models, shards, texts, tokenization, weight_ranks
from critical_weights.damage import TextSets
from critical_weights.errors import NumericalError, ShardError
from critical_weights.evaluation import load_checked, mean_loss
from critical_weights.outputs import write_json, write_text
from critical_weights.params import Params, SuperweightsParams, ValidateParams
from critical_weights.perturbation import digest, flat_view, perturbed
from critical_weights.progress import Timings
from critical_weights.plots import save_png
from critical_weights.projections import Projection, output_projections, watch
from critical_weights.selection import STREAM_TEXTS, Plan, SetGroup, group

log = logging.getLogger(__name__)


@dataclass
class Spike:
    """The largest |activation| seen on one side of a projection."""

    value: float = 0.0  # signed
    channel: int = -1
    text: int | None = None  # which sequence (0 for the prompt)
    position: int | None = None  # token position; None for experts, whose rows are routed tokens

    def offer(self, a: torch.Tensor, text: int, positions: bool) -> None:
        """Keep the largest |a| of a (n, channels) activation if it beats the current one."""
        flat = a.detach().float().reshape(-1)  # (n * channels,) float32
        i = int(flat.abs().argmax())
        if abs(float(flat[i])) > abs(self.value):
            pos, ch = divmod(i, a.shape[-1])
            self.value, self.channel, self.text, self.position = float(flat[i]), ch, text, pos if positions else None


@dataclass
class ProjectionRecord:
    """Max |input| and |output| of one projection (one expert of it, for MoE)."""

    projection: Projection
    expert: int | None
    inp: Spike = field(default_factory=Spike)
    out: Spike = field(default_factory=Spike)

    def spikes(self, threshold: float) -> bool:
        return abs(self.inp.value) > threshold and abs(self.out.value) > threshold


@dataclass(frozen=True)
class Candidate:
    """A super-weight candidate: the weight joining an input spike to an output spike."""

    round: int  # search round that found it (0 = the unmodified model)
    projection: Projection
    expert: int | None
    row: int  # output channel of the spike
    col: int  # input channel of the spike
    flat_index: int
    weight: float
    inp: Spike
    out: Spike

    @property
    def key(self) -> tuple[str, int]:
        return self.projection.parameter, self.flat_index


def record(model: torch.nn.Module, projections: list[Projection], sequences: Sequence[Sequence[int]]
           ) -> tuple[list[ProjectionRecord], list[torch.Tensor]]:
    """One forward pass per sequence: the max |input| and |output| of every projection (and
    expert), and every layer's hidden states (T, C) per sequence, float32 on the CPU."""
    records: dict[tuple[int, int | None], ProjectionRecord] = {}
    order = {id(p): i for i, p in enumerate(projections)}
    text = 0

    def fn(proj: Projection, expert: int | None, x: torch.Tensor, y: torch.Tensor) -> None:
        key = (order[id(proj)], expert)
        rec = records.setdefault(key, ProjectionRecord(proj, expert))
        rec.inp.offer(x, text, expert is None)  # x (n, in)
        rec.out.offer(y, text, expert is None)  # y (n, out)

    hidden: list[list[torch.Tensor]] = []  # per sequence, per layer (T, C)
    device = model.get_input_embeddings().weight.device
    with watch(model, projections, fn), torch.no_grad():
        for text, seq in enumerate(sequences):
            ids = torch.tensor([list(seq)], dtype=torch.long, device=device)  # (1, T)
            out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
            hidden.append([h[0].float().cpu() for h in out.hidden_states])
    ordered = [records[k] for k in sorted(records, key=lambda k: (k[0], -1 if k[1] is None else k[1]))]
    return ordered, _layers(hidden)


def _layers(hidden: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    """Per layer, the (T, C) hidden states of every sequence."""
    return [[seqs[layer] for seqs in hidden] for layer in range(len(hidden[0]))]


@contextlib.contextmanager
def zeroed(model: torch.nn.Module, candidates: Sequence[Candidate]) -> Iterator[None]:
    """The candidates' weights set to 0, restored bit-exactly on exit."""
    weights = dict(model.named_parameters())
    selection: dict[str, list[int]] = {}
    for c in candidates:
        selection.setdefault(c.projection.parameter, []).append(c.flat_index)
    sel = {n: np.array(sorted(set(v)), dtype=np.int64) for n, v in selection.items()}
    before = {n: digest(weights[n]) for n in sel}
    with perturbed(weights, sel, "zero", ValidateParams(), np.random.default_rng(0), before):
        yield


def search(model: torch.nn.Module, projections: list[Projection], sequences: Sequence[Sequence[int]],
           sp: SuperweightsParams) -> tuple[list[Candidate], list[ProjectionRecord], list[list[torch.Tensor]]]:
    """The iterative search. Returns the candidates, the unmodified model's projection records
    and its hidden states per layer."""
    weights = dict(model.named_parameters())
    found: list[Candidate] = []
    first: list[ProjectionRecord] = []
    hidden: list[list[torch.Tensor]] = []
    for rnd in range(sp.max_candidates):
        with zeroed(model, found):
            records, layers = record(model, projections, sequences)
        if rnd == 0:
            first, hidden = records, layers
        taken = {c.key for c in found}
        hits = [r for r in records if r.spikes(sp.threshold)
                and (r.projection.parameter, r.projection.flat_index(r.expert, r.out.channel, r.inp.channel)) not in taken]
        if not hits:
            log.info("round %d: no new spike above %g on both sides; %d candidate(s)", rnd, sp.threshold, len(found))
            break
        r = hits[0]  # the earliest block: a later spike may be this one's echo
        flat = r.projection.flat_index(r.expert, r.out.channel, r.inp.channel)
        w = float(flat_view(weights[r.projection.parameter])[flat])
        found.append(Candidate(rnd, r.projection, r.expert, r.out.channel, r.inp.channel, flat, w, r.inp, r.out))
        log.info("round %d: candidate %s expert %s (row %d, col %d), w = %.4g, |in| %.4g, |out| %.4g", rnd,
                 r.projection.parameter, r.expert, r.out.channel, r.inp.channel, w, abs(r.inp.value), abs(r.out.value))
    else:
        log.info("stopped after superweights.max_candidates = %d rounds; more spikes may remain", sp.max_candidates)
    return found, first, hidden


def massive_activations(layers: list[list[torch.Tensor]], top: int) -> list[dict[str, Any]]:
    """Per layer: the `top` largest |h| (value, channel, text, position) and the median |h|."""
    out = []
    for layer, seqs in enumerate(layers):
        entries = []
        for text, h in enumerate(seqs):  # h (T, C) float32
            a = h.abs().reshape(-1)
            vals, idx = torch.topk(a, min(top, a.numel()))
            for v, i in zip(vals.tolist(), idx.tolist()):
                pos, ch = divmod(i, h.shape[-1])
                entries.append((v, text, pos, ch, float(h[pos, ch])))
        entries.sort(key=lambda e: (-e[0], e[1], e[2], e[3]))
        median = float(torch.cat([h.abs().reshape(-1) for h in seqs]).median())
        out.append({"layer": layer, "median_abs": median,
                    "top": [{"value": e[4], "abs": e[0], "channel": e[3], "text": e[1], "position": e[2],
                             "ratio_to_median": e[0] / median if median > 0 else None} for e in entries[:top]]})
    return out


# ---- the stage -------------------------------------------------------------------------


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The prompt tokenised as `prepare` tokenises texts; at least 2 tokens."""
    from critical_weights.errors import TextsError

    ids = list(tokenizer(prompt)["input_ids"])
    if len(ids) < 2:
        raise TextsError(f"superweights.prompt: {prompt!r} is {len(ids)} token(s) with this model's tokenizer; "
                         "it needs at least 2")
    return ids


def run_superweights(prepared: Path, sensitivity: Path, params: Params, report_path: Path, plot_path: Path,
                     table_path: Path, timings: Timings, metrics_path: Path | None = None) -> dict[str, Any]:
    """Detect the candidates and the massive activations, rank them against the gradients,
    zero them and the controls, and write the JSON report, the per-block CSV and the PNG
    (and, with `metrics_path`, the short headline that DVC shows as metrics)."""
    from critical_weights import superweights_report as rep
    from critical_weights.superweights_damage import Meter, damage

    sp = params.superweights
    models.resolve_device(params.model)  # a device this machine lacks fails here, before any work
    with timings.phase("plan"):
        keep = shards.read_meta(sensitivity)["keep"]
        for key, value in (("top_k", sp.top_k), ("max_candidates", sp.max_candidates)):
            if value > keep:
                raise ShardError(f"superweights.{key}: {value} exceeds the shards' sensitivity.keep {keep}; "
                                 f"lower superweights.{key} or raise sensitivity.keep")
        top = weight_ranks.top_weights(sensitivity, params.rank, max(sp.top_k, sp.max_candidates))
        tokenizer = tokenization.load_saved(prepared / texts.TOKENIZER_DIR)
        prompt = prompt_ids(tokenizer, sp.prompt)
        input_ids, _ = texts.read_prepared(prepared)
        measured = [input_ids[i] for i in texts.choose(len(input_ids), sp.n_texts or len(input_ids), params.seed,
                                                      STREAM_TEXTS, "superweights.n_texts", "prepare kept {n} texts")]
        detect = [prompt] if sp.detect_on == "prompt" else measured
        stats = shards.read_stats(sensitivity)
        sizes = {n: math.prod(s) for n, s in zip(stats["parameter"].to_pylist(), stats["shape"].to_pylist())}
        head = top.slice(0, sp.max_candidates)
        the_plan = Plan({n: sizes[n] for n in dict.fromkeys(head["parameter"].to_pylist())},
                        {"candidates": SetGroup(group(head["parameter"].to_pylist(), head["flat_index"].to_numpy(), list(sizes)))},
                        head.select(["parameter", "flat_index", "weight"]))
    with timings.phase("load model"):
        model, device = load_checked(params, the_plan, input_ids + [prompt])
        projections, skipped = output_projections(model)
    with timings.phase("detect"):
        candidates, records, hidden = search(model, projections, detect, sp)
        massive = massive_activations(hidden, sp.massive_top)

    def decode(text: int | None, position: int | None) -> str | None:
        return None if text is None or position is None else tokenizer.decode([detect[text][position]])

    for layer in massive:
        for t in layer["top"]:
            t["token"] = decode(t["text"], t["position"])
    with timings.phase("cross-check"):
        ranks = weight_ranks.ranks(sensitivity, params.rank, [c.key for c in candidates])
        top_pairs = list(zip(top["parameter"].to_pylist(), top["flat_index"].to_pylist()))
        check = rep.top_k_check(top.slice(0, sp.top_k), projections, records, sp.threshold, params.rank.metric)
    with timings.phase("measure"):
        sets = TextSets(measured, [], "superweights measures in-sample", params.sensitivity.micro_batch_size,
                        params.sensitivity.batch_tokens)
        baseline = mean_loss(model, sets.in_sample, sets.micro_batch_size, sets.batch_tokens)
        if not math.isfinite(baseline):
            raise NumericalError(f"the unperturbed loss is {baseline}; try model.dtype float32")
        weights = dict(model.named_parameters())
        touched = list(dict.fromkeys([c.projection.parameter for c in candidates] + [n for n, _ in top_pairs[:len(candidates)]]))
        meter = Meter(model, sets, baseline, touched)
        dmg = damage(meter, candidates, projections, top_pairs, {n: weights[n].numel() for n in touched}, params.seed)
    report = rep.build_report(params, model, device, detect, measured, candidates, ranks, records, massive, check,
                          baseline, dmg, decode)
    report["detection"]["skipped"] = skipped
    rows = rep.block_rows(records, massive)
    with timings.phase("write"):
        write_json(report_path, report)
        if metrics_path is not None:
            write_json(metrics_path, rep.headline(report))
        write_text(table_path, rep.blocks_csv(rows, sp.threshold))
        save_png(rep.figure(report, rows), plot_path)
    return report

