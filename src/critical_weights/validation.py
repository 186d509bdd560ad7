"""Validation: perturb the critical weights and measure how far the loss moves.

The critical set is the exact global top-k of `rank.metric` (within `rank.include` and
`rank.exclude`) for every k in `validate.k_values`. Controls perturb as many weights in the
same tensors, with the same count per tensor:
- `random_k`: drawn uniformly by `seed`, the critical weights left out;
- `bottom_k`: the least sensitive weights, from the `bottom` shards.

Each perturbation in `validate.perturbations` (zero, sign_flip, gauss_noise, bit_flip; see
critical_weights.perturbation) is applied to every set in turn.

Every loss is L as `sensitivity` defines it: the mean next-token cross-entropy over every
predicted token. After each measurement the original values are written back, and every
touched tensor's bytes are checked against a sha256 taken before the first perturbation.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from critical_weights import models, ranking, shards, texts
from critical_weights.batching import make_batches
from critical_weights.errors import ModelError, NumericalError, ShardError, TextsError
from critical_weights.outputs import atomic_path, write_json, write_text
from critical_weights.params import PERTURBATIONS, Params, RankParams, ValidateParams
from critical_weights.perturbation import Selection, bit_index, digest, flat_view, perturbed
from critical_weights.progress import Timings
from critical_weights.loss import pad_batch, perplexity, token_loss_sum

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

CONDITIONS = ("critical", "random_k", "bottom_k")  # what gets perturbed

# Independent random streams, all from `seed`: np.random.default_rng([seed, STREAM, ...]).
_STREAM_TEXTS, _STREAM_HOLDOUT, _STREAM_RANDOM_K, _STREAM_NOISE = 1, 2, 3, 4

# ---- texts -----------------------------------------------------------------------------


def choose_texts(n_total: int, n_texts: int, seed: int) -> list[int]:
    """Positions of the prepared texts to measure: all when `n_texts` is 0 or covers them,
    else `n_texts` drawn by `seed`, ascending."""
    if n_texts == 0 or n_texts >= n_total:
        return list(range(n_total))
    rng = np.random.default_rng([seed, _STREAM_TEXTS])
    return sorted(int(i) for i in rng.choice(n_total, size=n_texts, replace=False))


def prepared_text_index(prepared: Path) -> list[int]:
    """Positions in the source of the texts `prepare` chose."""
    path = prepared / texts.PREPARED_FILE
    try:
        return pq.read_table(path, columns=["text_index"]).column("text_index").to_pylist()
    except (pa.ArrowException, OSError, KeyError) as err:
        raise TextsError(f"prepared texts {path} are missing or lack text_index ({str(err).splitlines()[0]}); rerun dvc repro") from None


def heldout_ids(source: Path, prepared: Path, n: int, max_length: int, seed: int) -> list[list[int]]:
    """Token ids of `n` source texts that `prepare` did not choose, drawn by `seed`,
    tokenised with the prepared tokenizer and truncated at `max_length`, as `prepare` does."""
    from transformers import AutoTokenizer

    all_texts = texts.read_texts(source)
    n_seen = texts.read_prepared_meta(prepared).get("n_available")
    if n_seen is not None and int(n_seen) != len(all_texts):
        raise TextsError(f"texts.source: {source} now holds {len(all_texts)} texts, but prepare saw {n_seen}; rerun dvc repro")
    unchosen = sorted(set(range(len(all_texts))) - set(prepared_text_index(prepared)))
    if not unchosen:
        raise TextsError(f"validate.holdout: prepare chose every text of {source}, so none is left to hold out; "
                         "lower texts.n_texts or set validate.holdout: 0")
    if n > len(unchosen):
        log.warning("validate.holdout asks for %d held-out texts but only %d are left; using all", n, len(unchosen))
        n = len(unchosen)
    pick = sorted(int(i) for i in np.random.default_rng([seed, _STREAM_HOLDOUT]).choice(unchosen, size=n, replace=False))
    tokenizer = AutoTokenizer.from_pretrained(prepared / texts.TOKENIZER_DIR)
    ids = [s for s in (tokenizer(all_texts[i])["input_ids"][:max_length] for i in pick) if len(s) >= 2]
    if not ids:
        raise TextsError("validate.holdout: every held-out text is shorter than 2 tokens")
    return ids


# ---- the loss --------------------------------------------------------------------------


def mean_loss(model: torch.nn.Module, input_ids: Sequence[Sequence[int]], micro_batch_size: int,
              batch_tokens: int = 0) -> float:
    """L: mean next-token cross-entropy over every predicted token (NaN or inf if it is)."""
    device = model.get_input_embeddings().weight.device
    total, n = 0.0, 0
    with torch.no_grad():
        for batch in make_batches([len(s) for s in input_ids], micro_batch_size, batch_tokens):
            ids, mask = pad_batch([list(input_ids[i]) for i in batch], device)  # (B, T) int64
            total += float(token_loss_sum(model, ids, mask).double())  # summed over real tokens
            n += int(mask[:, 1:].sum())
    return total / n


# ---- which weights ---------------------------------------------------------------------


def group(names: Sequence[str], flat: np.ndarray, order: Sequence[str]) -> Selection:
    """Flat indices grouped by parameter, parameters in `order`, indices ascending."""
    names_arr, present = np.asarray(names, dtype=object), set(names)
    return {n: np.sort(flat[names_arr == n]).astype(np.int64) for n in order if n in present}


def counts(selection: Selection) -> dict[str, int]:
    return {n: len(idx) for n, idx in selection.items()}


def random_selection(per_tensor: dict[str, int], sizes: dict[str, int], avoid: Selection, seed: int, k: int) -> Selection:
    """Per tensor, `per_tensor[name]` weights drawn uniformly by (`seed`, `k`), none in `avoid`."""
    rng = np.random.default_rng([seed, _STREAM_RANDOM_K, k])
    out: Selection = {}
    for name, c in per_tensor.items():
        skip = avoid.get(name, np.empty(0, np.int64))
        draw = rng.choice(sizes[name], size=min(sizes[name], c + len(skip)), replace=False)  # (c + |skip|,)
        kept = draw[~np.isin(draw, skip)][:c]
        if len(kept) < c:
            raise ModelError(f"random_k: parameter {name} has {sizes[name] - len(skip)} weights outside the critical set, fewer than {c}")
        out[name] = np.sort(kept).astype(np.int64)
    return out


def bottom_selection(bottom: pa.Table, per_tensor: dict[str, int]) -> Selection:
    """Per tensor, its `per_tensor[name]` least sensitive weights (bottom shards, least first)."""
    names = np.asarray(bottom["parameter"].to_pylist(), dtype=object)
    rank, flat = bottom["rank"].to_numpy(), bottom["flat_index"].to_numpy()
    out: Selection = {}
    for name, c in per_tensor.items():
        rows = np.flatnonzero(names == name)
        rows = rows[np.argsort(rank[rows], kind="stable")][:c]
        if len(rows) < c:
            raise ShardError(f"bottom_k: the bottom shard of {name} holds {len(rows)} weights, fewer than {c}; raise sensitivity.keep")
        out[name] = np.sort(flat[rows]).astype(np.int64)
    return out


@dataclass(frozen=True)
class Plan:
    """What gets perturbed, decided from the shards alone (no model needed)."""

    sizes: dict[str, int]  # weights per touched parameter
    sets: dict[int, dict[str, Selection]]  # k -> condition -> selection
    expected: pa.Table  # parameter, flat_index, weight of every shard row used: checked on the model

    @property
    def touched(self) -> list[str]:
        """Every parameter some selection touches, in model order."""
        names = {n for by_cond in self.sets.values() for sel in by_cond.values() for n in sel}
        return [n for n in self.sizes if n in names]


def plan(sensitivity: Path, rank: RankParams, vp: ValidateParams, seed: int) -> Plan:
    """The critical set (exact global top-k of rank.metric) and the controls for every k."""
    top = ranking.rank_metric(sensitivity, replace(rank, mode="global", k=max(vp.k_values)))  # best first
    stats = shards.read_stats(sensitivity)
    stats = stats.filter(pc.equal(stats["metric"], rank.metric))
    order = stats["parameter"].to_pylist()  # model order
    touched = set(top["parameter"].to_pylist())
    sizes = {n: math.prod(s) for n, s in zip(order, stats["shape"].to_pylist()) if n in touched}
    bottom = None
    if "bottom_k" in vp.controls:
        used = stats.filter(pa.array([n in touched for n in order]))
        bottom = shards.read_candidates(sensitivity, used, rank.metric, kind="bottom")
    sets: dict[int, dict[str, Selection]] = {}
    for k in vp.k_values:
        head = top.slice(0, k)
        critical = group(head["parameter"].to_pylist(), head["flat_index"].to_numpy(), order)
        sets[k] = {"critical": critical}
        if "random_k" in vp.controls:
            sets[k]["random_k"] = random_selection(counts(critical), sizes, critical, seed, k)
        if bottom is not None:
            sets[k]["bottom_k"] = bottom_selection(bottom, counts(critical))
    columns = ["parameter", "flat_index", "weight"]
    expected = top.select(columns) if bottom is None else pa.concat_tables([top.select(columns), bottom.select(columns)])
    return Plan({n: sizes[n] for n in order if n in sizes}, sets, expected)


# ---- measuring -------------------------------------------------------------------------


@dataclass(frozen=True)
class TextSets:
    """The token ids every loss is measured on, and how to batch them."""

    measured: list[list[int]]  # a `seed`-drawn share of the prepared texts
    heldout: list[list[int]] | None  # source texts prepare did not choose, or None
    micro_batch_size: int
    batch_tokens: int = 0


def measure(model: torch.nn.Module, sets: TextSets) -> dict[str, float]:
    """`loss` on the measured texts and, with held-out texts, `heldout_loss`."""
    out = {"loss": mean_loss(model, sets.measured, sets.micro_batch_size, sets.batch_tokens)}
    if sets.heldout:
        out["heldout_loss"] = mean_loss(model, sets.heldout, sets.micro_batch_size, sets.batch_tokens)
    return out


def loss_record(loss: float, baseline: float) -> dict[str, Any]:
    """Loss, perplexity and increase over `baseline`; a non-finite value becomes null."""
    finite = math.isfinite(loss)
    ppl = perplexity(loss) if finite else math.inf
    return {"loss": loss if finite else None, "perplexity": ppl if math.isfinite(ppl) else None,
            "loss_increase": loss - baseline if finite else None, "finite": finite}


def ratio(critical: dict[str, Any], control: dict[str, Any]) -> float | None:
    """The critical set's loss increase over the control's; null unless both are finite and
    the control's is positive."""
    a, b = critical["loss_increase"], control["loss_increase"]
    return a / b if a is not None and b is not None and b > 0 else None


def damage(model: torch.nn.Module, the_plan: Plan, vp: ValidateParams, seed: int, sets: TextSets,
           baseline: dict[str, float], before: dict[str, str]) -> dict[str, Any]:
    """Per perturbation and k, the losses after perturbing the critical set and each control."""
    weights = dict(model.named_parameters())
    out: dict[str, Any] = {}
    for kind in vp.perturbations:
        out[kind] = {}
        for k, by_condition in the_plan.sets.items():
            entry: dict[str, Any] = {"n_weights": sum(counts(by_condition["critical"]).values()),
                                     "n_tensors": len(by_condition["critical"])}
            for condition, selection in by_condition.items():
                rng = np.random.default_rng([seed, _STREAM_NOISE, k, CONDITIONS.index(condition)])
                with perturbed(weights, selection, kind, vp, rng, before) as n_changed:
                    losses = measure(model, sets)
                entry[condition] = {**loss_record(losses["loss"], baseline["loss"]), "n_changed": n_changed}
                if "heldout_loss" in losses:
                    entry[condition]["heldout"] = loss_record(losses["heldout_loss"], baseline["heldout_loss"])
                log.info("%s k=%d %s: loss %.4f (baseline %.4f)", kind, k, condition, losses["loss"], baseline["loss"])
            for control in vp.controls:
                entry[f"ratio_vs_{control}"] = ratio(entry["critical"], entry[control])
                if sets.heldout:
                    entry[f"heldout_ratio_vs_{control}"] = ratio(entry["critical"]["heldout"], entry[control]["heldout"])
            out[kind][f"k{k}"] = entry
    return out


# ---- the model -------------------------------------------------------------------------


def load_checked(params: Params, the_plan: Plan, max_token_id: int) -> tuple[torch.nn.Module, torch.device]:
    """A fresh copy of the model, checked against the shards: every weight the plan uses
    must hold the value the shards recorded."""
    source = models.resolve_source(params.model.name)
    device, dtype = models.resolve_device(params.model)
    model = models.load_model(source, params.model, device, dtype)
    vocab = model.get_input_embeddings().weight.shape[0]
    if max_token_id >= vocab:
        raise ModelError(f"model.name: the prepared token ids exceed {source.name}'s vocabulary of {vocab}; rerun prepare")
    weights = dict(model.named_parameters())
    expected = the_plan.expected
    for name in the_plan.touched:
        w = weights.get(name)
        if w is None or w.numel() != the_plan.sizes[name]:
            raise ShardError(f"parameter {name}: the shards describe {the_plan.sizes[name]} weights, the model "
                             f"{'none' if w is None else w.numel()}; rerun the sensitivity stage (dvc repro)")
        rows = expected.filter(pc.equal(expected["parameter"], name))
        index = torch.from_numpy(np.array(rows["flat_index"].to_numpy())).to(w.device)  # (n,) int64
        got = flat_view(w)[index].float().cpu().numpy()  # (n,) float32
        if not np.array_equal(got, rows["weight"].to_numpy(), equal_nan=True):
            raise ShardError(f"parameter {name}: the model's weights differ from those the shards recorded; "
                             "rerun the sensitivity stage (dvc repro)")
    return model, device


# ---- the report ------------------------------------------------------------------------


def build_report(params: Params, model: torch.nn.Module, device: torch.device, sets: TextSets,
                 baseline: dict[str, float], sensitivity_loss: float | None, dmg: dict[str, Any]) -> dict[str, Any]:
    """validation.json: what was measured, the baseline, and the damage per perturbation and k."""
    vp = params.validate
    dtype = next(model.parameters()).dtype
    base = {**loss_record(baseline["loss"], baseline["loss"]), "n_texts": len(sets.measured),
            "n_tokens": sum(len(s) - 1 for s in sets.measured), "sensitivity_loss_all_texts": sensitivity_loss}
    del base["loss_increase"], base["finite"]
    report: dict[str, Any] = {
        "baseline": base,
        "critical_set": {"metric": params.rank.metric, "mode": "global",
                         "include": list(params.rank.include), "exclude": list(params.rank.exclude)},
        "model": {"name": params.model.name, "dtype": str(dtype).removeprefix("torch."), "device": device.type},
        "settings": {"seed": params.seed, "perturbations": list(vp.perturbations), "controls": list(vp.controls),
                     "k_values": list(vp.k_values), "noise_sigma": vp.noise_sigma, "bit": vp.bit,
                     "bit_index": bit_index(dtype, vp.bit) if "bit_flip" in vp.perturbations else None},
        "damage": dmg,
    }
    if sets.heldout:
        held = loss_record(baseline["heldout_loss"], baseline["heldout_loss"])
        report["heldout_baseline"] = {"loss": held["loss"], "perplexity": held["perplexity"],
                                      "n_texts": len(sets.heldout), "n_tokens": sum(len(s) - 1 for s in sets.heldout)}
    return report


def curve_csv(report: dict[str, Any]) -> str:
    """The damage curve as CSV: one row per k, a loss column for every perturbation and
    condition there could be (empty where not run or not finite), so the columns that
    dvc.yaml's `plots:` names always exist."""
    dmg = report["damage"]
    columns = [(kind, c) for kind in PERTURBATIONS for c in CONDITIONS]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["k", "baseline"] + [f"{kind}_{c}" for kind, c in columns])
    for k in report["settings"]["k_values"]:
        losses = [dmg.get(kind, {}).get(f"k{k}", {}).get(c, {}).get("loss") for kind, c in columns]
        writer.writerow([k, report["baseline"]["loss"], *["" if v is None else v for v in losses]])
    return buf.getvalue()


_STYLES = {
    "critical": {"color": "tab:red", "marker": "o", "linestyle": "-", "label": "critical (global top-k)"},
    "random_k": {"color": "tab:gray", "marker": "s", "linestyle": "--", "label": "random_k (same tensors, same counts)"},
    "bottom_k": {"color": "tab:blue", "marker": "^", "linestyle": ":", "label": "bottom_k (least sensitive, same counts)"},
}


def _title(kind: str, settings: dict[str, Any]) -> str:
    return {
        "zero": "zero: w -> 0",
        "sign_flip": "sign_flip: w -> -w",
        "gauss_noise": f"gauss_noise: w + N(0, ({settings['noise_sigma']:g} |w|)^2)",
        "bit_flip": f"bit_flip: bit {settings['bit_index']} ({settings['bit']}) XORed",
    }[kind]


def _panel(ax: Any, per_k: dict[str, Any], ks: list[int], conditions: list[str], heldout: bool, baseline: float) -> None:
    """Loss against k for each condition on one axis, with the baseline; a non-finite loss
    is an X at the top edge."""
    lost: dict[str, list[int]] = {}
    for c in conditions:
        records = [per_k[f"k{k}"][c]["heldout"] if heldout else per_k[f"k{k}"][c] for k in ks]
        ax.plot(ks, [np.nan if r["loss"] is None else r["loss"] for r in records], **_STYLES[c])
        lost[c] = [k for k, r in zip(ks, records) if r["loss"] is None]
    ax.axhline(baseline, color="black", linewidth=0.8, linestyle="-.", label=f"unperturbed: {baseline:.4f}")
    if any(lost.values()):
        low, high = ax.get_ylim()
        ax.set_ylim(low, high + 0.15 * (high - low))  # a band above the data for the X marks
    for c, ks_lost in lost.items():
        if ks_lost:  # x in data, y in axes coordinates: inside the band
            ax.scatter(ks_lost, [0.95] * len(ks_lost), transform=ax.get_xaxis_transform(), marker="X", s=70,
                       color=_STYLES[c]["color"], label=f"{c}: loss NaN or inf")
    ax.set_xscale("log")
    ax.set_xlim(min(ks) / 1.5, max(ks) * 1.5)  # fixed, so a panel with no finite point still draws
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("k, weights perturbed (log scale)")
    ax.set_ylabel(("held-out " if heldout else "") + "mean token loss (nats)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="best")


def damage_figure(report: dict[str, Any]) -> Figure:
    """Loss against k (log x), critical vs controls, one panel per perturbation; a second
    row for the held-out texts when there are any."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dmg, settings = report["damage"], report["settings"]
    ks, conditions = settings["k_values"], ["critical", *settings["controls"]]
    rows = [False, True] if "heldout_baseline" in report else [False]
    n = len(settings["perturbations"])
    fig, axes = plt.subplots(len(rows), n, figsize=(5.6 * n, 4.6 * len(rows)), squeeze=False)
    for r, heldout in enumerate(rows):
        base = report["heldout_baseline" if heldout else "baseline"]["loss"]
        for ax, kind in zip(axes[r], settings["perturbations"]):
            _panel(ax, dmg[kind], ks, conditions, heldout, base)
            ax.set_title(_title(kind, settings) + (" (held-out texts)" if heldout else ""), fontsize=10)
    b = report["baseline"]
    fig.suptitle(f"Damage from perturbing the global top-k by {report['critical_set']['metric']} vs controls "
                 f"({report['model']['name']}, {b['n_texts']} texts, {b['n_tokens']} predicted tokens)", fontsize=11)
    fig.tight_layout()
    return fig


def save_png(fig: Figure, path: Path, dpi: int = 120) -> None:
    """PNG with no software tag or timestamp, written atomically."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, metadata={"Software": None}, format="png")
    plt.close(fig)


# ---- the stage -------------------------------------------------------------------------


def run_validate(prepared: Path, sensitivity: Path, source: Path, params: Params, report_path: Path,
                 plot_path: Path, table_path: Path, timings: Timings) -> dict[str, Any]:
    """Measure the baseline, perturb the critical weights and the controls for every
    perturbation and k, and write validation.json, the damage-curve PNG and its CSV."""
    vp = params.validate
    models.resolve_device(params.model)  # a device or dtype this machine lacks fails here, before any work
    with timings.phase("plan"):
        the_plan = plan(sensitivity, params.rank, vp, params.seed)
        input_ids, _ = texts.read_prepared(prepared)
        measured = [input_ids[i] for i in choose_texts(len(input_ids), vp.n_texts, params.seed)]
        heldout = None
        if vp.holdout > 0:
            n_held = max(1, round(vp.holdout * len(measured)))
            heldout = heldout_ids(source, prepared, n_held, params.texts.max_length, params.seed)
        sets = TextSets(measured, heldout, params.sensitivity.micro_batch_size, params.sensitivity.batch_tokens)
    with timings.phase("load model"):
        model, device = load_checked(params, the_plan, max(max(s) for s in input_ids + (heldout or [])))
        weights = dict(model.named_parameters())
        before = {name: digest(weights[name]) for name in the_plan.touched}
    with timings.phase("baseline"):
        baseline = measure(model, sets)
    for key, value in baseline.items():
        if not math.isfinite(value):
            raise NumericalError(f"the unperturbed {key.replace('_', ' ')} is {value}; try model.dtype float32")
    log.info("baseline loss %.4f over %d texts", baseline["loss"], len(measured))
    with timings.phase("perturb and measure"):
        dmg = damage(model, the_plan, vp, params.seed, sets, baseline, before)
    report = build_report(params, model, device, sets, baseline, shards.read_meta(sensitivity).get("avg_loss"), dmg)
    with timings.phase("write"):
        write_json(report_path, report)
        write_text(table_path, curve_csv(report))
        save_png(damage_figure(report), plot_path)
    return report
