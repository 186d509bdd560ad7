"""The `domain_sensitivity` stage: each group's own gradient and scores, and the whole's.

1. Groups (critical_weights.domains.groups): the texts of `domains.source` grouped by
   `domains.field`, each group's in-sample and held-out texts drawn with `seed`, tokenised by
   the prepared tokenizer and truncated as `prepare` does; written to `groups.json` for the
   `domains` stage.
2. Per group, exactly what the sensitivity stage computes on its texts: the gradient of the
   group's own mean token loss and every metric of `sensitivity.metrics`, by the same code
   (`sensitivity.stage.gradients`, then `write_shards`), into the group's own shards
   `NN-name/`. One group at a time, so memory holds the model's accumulators once.
3. The whole (every group's in-sample texts together) without a pass of its own: its mean
   loss is L = sum_g n_g L_g / N (n_g the group's predicted tokens), so its gradient is the
   token-weighted sum of the group gradients, kept in one extra float32 accumulator as the
   groups go, beside the per-column sums of x² (wanda's, which add) and the router's picks.
   The whole is scored by every computed metric those sums give (grad_x_weight, gradient,
   magnitude, wanda); fisher, taylor2 and hutchinson would each need a second model-sized
   accumulator, so the whole leaves them out and its meta says so.

With `domains.field: none` nothing is computed; the folder holds `not_run.json`.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Any

import torch

from critical_weights.artifacts.prepared_texts import TOKENIZER_DIR, text_set_hash
from critical_weights.config.params import Params
from critical_weights.core.outputs import atomic_path, write_json
from critical_weights.core.progress import Timings
from critical_weights.domains import groups
from critical_weights.domains.groups import WHOLE, Group
from critical_weights.metrics import REGISTRY
from critical_weights.model import loading, tokenization
from critical_weights.model.source import resolve_source
from critical_weights.sensitivity.accumulate import Accumulators
from critical_weights.sensitivity.loss import predicted_tokens
from critical_weights.sensitivity.stage import gradients
from critical_weights.sensitivity.writing import write_shards
from critical_weights.texts import sources

log = logging.getLogger(__name__)
NOT_RUN = "not_run.json"
WHOLE_SUMS = ("grad", "act_sq")  # what the whole keeps: one model-sized accumulator, and one per input column


def folder_name(index: int, name: str) -> str:
    """A group's shard folder: its index and a filesystem-safe form of its name."""
    return f"{index:02d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)[:40]}"


def whole_metrics(metrics: tuple[str, ...]) -> tuple[str, ...]:
    """The computed metrics the whole's sums give (module docstring)."""
    return tuple(m for m in metrics if set(REGISTRY[m].needs) <= set(WHOLE_SUMS))


class Whole:
    """The whole's sums, built group by group: dL/dW as the token-weighted sum of the group
    gradients, the per-column sums of x², the router's picks and the loss and counts."""

    def __init__(self, n_tokens: int):
        self.n_tokens = n_tokens
        self.acc = Accumulators(grad={})

    def add(self, acc: Accumulators) -> None:
        for kind, weight in (("grad", acc.n_tokens / self.n_tokens), ("act_sq", 1.0)):
            mine = getattr(self.acc, kind)
            for name, t in getattr(acc, kind).items():
                if name in mine:
                    mine[name].add_(t, alpha=weight)
                else:
                    mine[name] = t * weight
        for name, picks in acc.router_picks.items():
            self.acc.router_picks[name] = self.acc.router_picks.get(name, 0) + picks
            self.acc.router_tokens[name] = self.acc.router_tokens.get(name, 0) + acc.router_tokens[name]
        self.acc.loss_sum += acc.loss_sum
        self.acc.n_tokens += acc.n_tokens
        self.acc.n_sequences += acc.n_sequences


def run_domain_sensitivity(prepared: Path, source: Path, params: Params, out: Path, timings: Timings) -> None:
    """Draw the groups, score each group and the whole into `out` (module docstring)."""
    dp = params.domains
    if dp.field == "none":
        log.info("domains.field is none: no grouped run")
        with atomic_path(out) as tmp:
            tmp.mkdir()
            write_json(tmp / NOT_RUN, {"run": False, "reason": "domains.field is none"})
        return
    device, dtype = loading.resolve_device(params.model)  # a device or dtype this machine lacks fails here
    with timings.phase("groups"):
        tokenizer = tokenization.load_saved(prepared / TOKENIZER_DIR)
        shown, left_out = groups.draw(sources.read_grouped(source, dp.field), dp, params.seed,
                                      params.texts.max_length, lambda t: tokenizer(t)["input_ids"])
    for name, why in left_out.items():
        log.info("domains: group %r left out: %s", name, why)
    log.info("domains: %d groups: %s", len(shown), ", ".join(g.name for g in shown))
    with timings.phase("load model"):
        model_source = resolve_source(params.model.name)
        model = loading.load_model(model_source, params.model, device, dtype)
        identity = loading.identity(model_source, model, device)
    loading.check_vocabulary(model_source.name, model, [s for g in shown for s in g.in_sample + g.heldout])
    with atomic_path(out) as tmp:
        tmp.mkdir()
        score_groups(model, tokenizer, shown, params, tmp, timings, {"model": identity})
        groups.write(tmp, shown, left_out)


def score_groups(model: torch.nn.Module, tokenizer: Any, shown: list[Group], params: Params, folder: Path,
                 timings: Timings, meta: dict[str, Any]) -> None:
    """Each group's shards, then the whole's from the token-weighted sums (module docstring)."""
    p_sens = params.sensitivity
    group_params = dataclasses.replace(params, sensitivity=dataclasses.replace(p_sens, save_sums=False, dense=False))
    kept = whole_metrics(p_sens.metrics)
    whole = Whole(sum(predicted_tokens(g.in_sample) for g in shown))
    skipped: dict[str, str] = {}
    params_list: list = []
    extra = meta
    for i, g in enumerate(shown):
        log.info("domains: group %d/%d, %r: %d texts", i + 1, len(shown), g.name, len(g.in_sample))
        params_list, acc, skipped, extra = gradients(model, g.in_sample, group_params, timings, meta,
                                                     f"forward+backward {g.name}")
        whole.add(acc)
        write_shards(model, tokenizer, params_list, acc, skipped, group_params, folder / folder_name(i, g.name),
                     timings, {**extra, "group": g.name, "text_sha256": text_set_hash(g.in_sample)})
        del acc
    left = [m for m in p_sens.metrics if m not in kept]
    if left:
        log.info("domains: the whole is scored by %s; %s would need a second model-sized accumulator",
                 ", ".join(kept) or "no metric", ", ".join(left))
    if not kept:
        return
    whole_params = dataclasses.replace(group_params, sensitivity=dataclasses.replace(group_params.sensitivity, metrics=kept))
    write_shards(model, tokenizer, params_list, whole.acc, skipped, whole_params, folder / WHOLE, timings,
                 {**extra, "group": WHOLE, "text_sha256": text_set_hash([s for g in shown for s in g.in_sample]),
                  "whole": "every group's in-sample texts: the token-weighted sum of the group gradients, no pass of "
                           "its own", "not_scored": {m: "needs a second model-sized accumulator" for m in left}})
