"""The groups of a labelled source: which texts each group's gradient is taken on, and which
are held out to measure damage on.

Every text's group is its `domains.field` (critical_weights.texts.sources.read_grouped).
Groups keep the order of their first text. Within each group the texts are shuffled by
(`seed`, STREAM_DOMAINS, the group's index): the first `domains.n_in_sample` are in-sample,
the next `domains.n_heldout` held out, so every group shown has both. A group with fewer
texts than that, after tokenisation (texts under 2 tokens predict nothing), is left out and
listed with the reason.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from critical_weights.config.params import DomainsParams
from critical_weights.core.errors import ParamsError, ShardError
from critical_weights.core.outputs import write_json
from critical_weights.core.streams import STREAM_DOMAINS

FILE = "groups.json"  # in the domain_sensitivity stage's folder: the groups drawn, with their token ids
WHOLE = "whole"  # every group's in-sample texts together (critical_weights.domains.gradients)


@dataclass(frozen=True)
class Group:
    """One group shown: its name, and the token ids of its in-sample and held-out texts."""

    name: str
    n_texts: int  # texts of the group in the source
    in_sample: list[list[int]]
    heldout: list[list[int]]


def check_labels(pairs: list[tuple[str, str]], field: str) -> None:
    """A field whose values are all distinct or all the same groups nothing: one line each."""
    values = [g for _, g in pairs]
    distinct = set(values)
    if len(distinct) == 1:
        raise ParamsError([f"domains.field: every text has {field} = {values[0]!r}, so there is one group; "
                           "choose a field whose values split the texts, or set domains.field none"])
    if len(distinct) == len(values) and len(values) > 1:
        raise ParamsError([f"domains.field: {field!r} gives each of the {len(values)} texts a group of its own; "
                           "choose a field whose values the texts share, such as a domain or a language"])


def draw(pairs: list[tuple[str, str]], dp: DomainsParams, seed: int, max_length: int,
         tokenize: Callable[[str], list[int]]) -> tuple[list[Group], dict[str, str]]:
    """The groups shown, and every group left out with the reason (module docstring)."""
    check_labels(pairs, dp.field)
    need = dp.n_in_sample + dp.n_heldout
    names = list(dict.fromkeys(g for _, g in pairs))
    if WHOLE in names:
        raise ParamsError([f"domains.field: a group is named {WHOLE!r}, the name this stage gives every group's texts "
                           "together; rename that group in the source"])
    shown, left_out = [], {}
    for index, name in enumerate(names):
        texts = [t for t, g in pairs if g == name]
        ids = [s for s in (tokenize(t)[:max_length] for t in texts) if len(s) >= 2]
        if len(ids) < need:
            left_out[name] = (f"{len(ids)} usable texts; a group needs domains.n_in_sample + domains.n_heldout = "
                              f"{dp.n_in_sample} + {dp.n_heldout} = {need}")
            continue
        order = np.random.default_rng([seed, STREAM_DOMAINS, index]).permutation(len(ids))
        shown.append(Group(name, len(texts), [ids[i] for i in order[:dp.n_in_sample]],
                           [ids[i] for i in order[dp.n_in_sample:need]]))
    if len(shown) < 2:
        have = ", ".join(f"{n} ({why.split(';')[0]})" for n, why in left_out.items())
        raise ParamsError([f"domains: {len(shown)} group(s) have the {need} texts a group needs "
                           f"(domains.n_in_sample + domains.n_heldout), at least 2 are needed; the others: {have}; "
                           "lower those counts or add texts"])
    return shown, left_out


def summary(groups: list[Group], left_out: dict[str, str]) -> dict[str, Any]:
    """What the report says of the groups."""
    return {"shown": [{"name": g.name, "n_texts": g.n_texts, "n_in_sample": len(g.in_sample),
                       "n_heldout": len(g.heldout)} for g in groups],
            "left_out": left_out}


def write(folder: Path, shown: list[Group], left_out: dict[str, str]) -> None:
    """FILE: the groups shown (name, text count, in-sample and held-out token ids) and those left out."""
    write_json(folder / FILE, {"shown": [asdict(g) for g in shown], "left_out": left_out})


def read(folder: Path) -> tuple[list[Group], dict[str, str]]:
    """The groups `write` wrote."""
    try:
        raw = json.loads((folder / FILE).read_text(encoding="utf-8"))
        return [Group(**g) for g in raw["shown"]], dict(raw["left_out"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ShardError(f"{folder / FILE}: missing or unreadable ({type(err).__name__}); rerun the domain_sensitivity "
                         "stage (dvc repro)") from None
