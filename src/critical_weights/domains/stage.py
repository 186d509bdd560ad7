"""The `domains` stage: which weights matter for which texts.

1. Groups (critical_weights.domains.groups): the texts of `domains.source` grouped by
   `domains.field`, each group's in-sample and held-out texts drawn with `seed`, tokenised by
   the prepared tokenizer and truncated as `prepare` does.
2. Per group, exactly what the sensitivity stage computes on its texts: the gradient of the
   group's own mean token loss and every metric of `sensitivity.metrics`, with the same loss,
   accumulation and scoring code (`accumulate`, `write_shards`), into the group's own shards
   under the output folder. One group at a time, so memory holds the model's accumulators once.
3. The whole (every group's in-sample texts together) without another pass: its mean loss is
   the token-weighted mean of the groups' (L = sum_g n_g L_g / N), so its gradient is the
   token-weighted sum of the group gradients, kept in one extra float32 accumulator (plus the
   per-column sums of x² for wanda, and the router's picks, which add). It is scored by
   `rank.metric` alone.
4. The sets, their overlap and each group's specific weights (critical_weights.domains.sets).
5. The damage matrix (critical_weights.domains.damage): each group's top-N zeroed, every
   group's held-out texts measured, with random controls.
6. The report, its DVC-metrics headline, the tables behind `dvc plots` and the figures
   (critical_weights.domains.report).

With `domains.field: none` nothing is computed; the outputs say so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from critical_weights.artifacts.prepared_texts import TOKENIZER_DIR, text_set_hash
from critical_weights.config.params import Params
from critical_weights.core.errors import ParamsError, out_of_memory
from critical_weights.core.outputs import atomic_path, write_json
from critical_weights.core.progress import Timings
from critical_weights.domains import damage, groups, report, sets
from critical_weights.metrics import REGISTRY
from critical_weights.model import loading, tokenization
from critical_weights.model.source import resolve_source
from critical_weights.sensitivity.accumulate import Accumulators, accumulate, scored_parameters
from critical_weights.sensitivity.recompute import checkpointed_blocks
from critical_weights.sensitivity.stage import write_shards
from critical_weights.texts import sources

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outputs:
    """Where the stage writes (dvc.yaml spells the paths)."""

    shards: Path  # a folder: each group's shards, and the whole's
    metrics: Path  # domains.json, the DVC-metrics headline
    report: Path  # domains_report.json
    critical: Path  # domains_critical.csv: every group's top-N
    overlap_table: Path  # domain_overlap.csv, behind the DVC plot
    damage_table: Path  # domain_damage.csv, behind the DVC plot
    overlap_plot: Path
    damage_plot: Path
    specific_plot: Path


def folder_name(index: int, name: str) -> str:
    """A group's shard folder: its index and a filesystem-safe form of its name."""
    return f"{index:02d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)[:40]}"


class Whole:
    """The whole's sums, built group by group: the token-weighted sum of the group gradients
    (and of the Fisher and Hutchinson sums, when `rank.metric` needs them, which are means
    over sequences and tokens), the per-column sums of x², and the router's picks."""

    def __init__(self, needs: tuple[str, ...], n_tokens: int, n_sequences: int):
        self.needs, self.n_tokens, self.n_sequences = needs, n_tokens, n_sequences
        self.acc = Accumulators(grad={})

    def add(self, acc: Accumulators) -> None:
        weight = {"grad": acc.n_tokens / self.n_tokens, "hutchinson": acc.n_tokens / self.n_tokens,
                  "fisher": acc.n_sequences / self.n_sequences, "act_sq": 1.0}
        for kind in ("grad", *[k for k in ("fisher", "hutchinson", "act_sq") if k in self.needs]):
            mine, theirs = getattr(self.acc, kind), getattr(acc, kind)
            for name, t in theirs.items():
                if name in mine:
                    mine[name].add_(t, alpha=weight[kind])
                else:
                    mine[name] = t * weight[kind]
        for name, picks in acc.router_picks.items():
            self.acc.router_picks[name] = self.acc.router_picks.get(name, 0) + picks
            self.acc.router_tokens[name] = self.acc.router_tokens.get(name, 0) + acc.router_tokens[name]
        self.acc.loss_sum += acc.loss_sum
        self.acc.n_tokens += acc.n_tokens
        self.acc.n_sequences += acc.n_sequences


def run_domains(prepared: Path, params: Params, out: Outputs, timings: Timings) -> dict[str, Any]:
    """Group the texts, score each group, compare the sets, measure the damage matrix, report."""
    dp = params.domains
    if dp.field == "none":
        log.info("domains.field is none: no grouped run")
        made = report.not_run("domains.field is none")
        with atomic_path(out.shards) as tmp:
            tmp.mkdir()
            write_json(tmp / "not_run.json", made)
        report.write(out, made, [], [])
        return made
    device, dtype = loading.resolve_device(params.model)  # a device or dtype this machine lacks fails here
    for key, value in (("domains.top_n", dp.top_n), ("domains.per_tensor_k", dp.per_tensor_k)):
        if value > params.sensitivity.keep:
            raise ParamsError([f"{key}: {value} exceeds sensitivity.keep {params.sensitivity.keep}; each group's sets are "
                               f"exact only up to keep (raise sensitivity.keep or lower {key})"])
    with timings.phase("groups"):
        pairs = sources.read_grouped(Path(dp.source), dp.field)
        tokenizer = tokenization.load_saved(prepared / TOKENIZER_DIR)
        shown, left_out = groups.draw(pairs, dp, params.seed, params.texts.max_length,
                                      lambda t: tokenizer(t)["input_ids"])
    for name, why in left_out.items():
        log.info("domains: group %r left out: %s", name, why)
    log.info("domains: %d groups: %s", len(shown), ", ".join(g.name for g in shown))
    with timings.phase("load model"):
        source = resolve_source(params.model.name)
        model = loading.load_model(source, params.model, device, dtype)
        identity = loading.identity(source, model, device)
    loading.check_vocabulary(source.name, model, [s for g in shown for s in g.in_sample + g.heldout])
    folders = {g.name: out.shards / folder_name(i, g.name) for i, g in enumerate(shown)}
    with timings.phase("per-group sensitivity"), atomic_path(out.shards) as tmp:
        tmp.mkdir()
        score_groups(model, tokenizer, shown, params, tmp, timings, identity)
    with timings.phase("sets and overlap"):
        rank = params.rank
        critical = [sets.critical_of(g.name, folders[g.name], rank, dp.top_n, dp.per_tensor_k) for g in shown]
        whole = sets.critical_of(sets.WHOLE, out.shards / sets.WHOLE, rank, dp.top_n, dp.per_tensor_k)
        overlap = sets.overlap([*critical, whole])
        specific = sets.specific(critical)
    with timings.phase("damage matrix"):
        matrix = damage.damage_matrix(model, shown, critical, whole, params)
    made = report.build(params, identity, shown, left_out, critical, whole, overlap, specific, matrix)
    with timings.phase("write"):
        report.write(out, made, critical, shown)
    return made


def score_groups(model: torch.nn.Module, tokenizer: Any, shown: list[groups.Group], params: Params, tmp: Path,
                 timings: Timings, identity: dict[str, Any]) -> None:
    """Each group's shards, then the whole's from the token-weighted sums (module docstring)."""
    p_sens = params.sensitivity
    group_params = dataclasses.replace(params, sensitivity=dataclasses.replace(p_sens, save_sums=False, dense=False))
    whole_params = dataclasses.replace(group_params, sensitivity=dataclasses.replace(
        group_params.sensitivity, metrics=(params.rank.metric,)))
    if "hutchinson" in p_sens.metrics:
        loading.use_implementations(model, "hutchinson needs double backward", attention="eager", experts="eager")
    params_list = scored_parameters(model, p_sens.parameters)
    n_tokens = sum(len(s) - 1 for g in shown for s in g.in_sample)
    whole = Whole(REGISTRY[params.rank.metric].needs, n_tokens, sum(len(g.in_sample) for g in shown))
    skipped: dict[str, str] = {}
    extra = {"model": {**identity, "implementations": loading.implementations(model)}}
    for i, g in enumerate(shown):
        log.info("domains: group %d/%d, %r: %d texts", i + 1, len(shown), g.name, len(g.in_sample))
        recompute = checkpointed_blocks(model) if p_sens.checkpointing else contextlib.nullcontext()
        with timings.phase(f"forward+backward {g.name}"), recompute:
            try:
                acc, skipped = accumulate(model, g.in_sample, params_list, p_sens.metrics, p_sens.micro_batch_size,
                                          p_sens.batch_tokens, p_sens.hutchinson_probes, params.seed)
            except torch.OutOfMemoryError:
                raise out_of_memory(p_sens.micro_batch_size, p_sens.batch_tokens, max(map(len, g.in_sample)),
                                    p_sens.checkpointing) from None
        whole.add(acc)
        write_shards(model, tokenizer, params_list, acc, skipped, group_params, tmp / folder_name(i, g.name), timings,
                     {**extra, "group": g.name, "text_sha256": text_set_hash(g.in_sample)})
        del acc
    write_shards(model, tokenizer, params_list, whole.acc, skipped, whole_params, tmp / sets.WHOLE, timings,
                 {**extra, "group": sets.WHOLE, "text_sha256": text_set_hash([s for g in shown for s in g.in_sample]),
                  "whole": "the token-weighted sum of the groups' sums, no pass of its own"})
