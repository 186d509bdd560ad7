"""One grouped run of the tiny model the tests of this package share: a labelled source of
three groups with enough texts and one without, each group's gradient, sets and damage."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from _tiny import CORPUS, tiny_params
from critical_weights.core.progress import Timings
from critical_weights.domains.gradients import run_domain_sensitivity
from critical_weights.domains.stage import Outputs, run_domains
from critical_weights.texts.stage import run_prepare

DOMAINS = CORPUS.parent / "domains.jsonl"


@pytest.fixture(scope="package")
def labelled(tmp_path_factory) -> Path:
    """code, prose and math with 7 texts each, poetry with 2 (too few), from the project's texts."""
    rows = [json.loads(line) for line in DOMAINS.read_text(encoding="utf-8").splitlines()]
    keep = {"code": 7, "prose": 7, "math": 7, "poetry": 2}
    chosen = []
    for r in rows:
        if keep.get(r["domain"], 0) > 0:
            keep[r["domain"]] -= 1
            chosen.append(r)
    path = tmp_path_factory.mktemp("labelled") / "labelled.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in chosen), encoding="utf-8")
    return path


@pytest.fixture(scope="package")
def grouped(tmp_path_factory, tiny_model_dir, labelled):
    """(report, outputs, params, prepared, shards) of one grouped run: 3 in-sample and 3 held-out
    texts per group, top 12, two random draws."""
    params = tiny_params(tiny_model_dir, sensitivity={"metrics": ("grad_x_weight", "magnitude", "wanda"), "dense": False})
    params = replace(params, domains=replace(params.domains, source=str(labelled), n_in_sample=3, n_heldout=3,
                                             top_n=12, per_tensor_k=4, random_draws=2))
    folder = tmp_path_factory.mktemp("domains")
    prepared = folder / "prepared"
    run_prepare(Path(params.texts.source), params, prepared, Timings("prepare"))
    shards = folder / "shards"
    run_domain_sensitivity(prepared, labelled, params, shards, Timings("domain_sensitivity"))
    out = Outputs(folder / "domains.json", folder / "domains_report.json", folder / "critical.csv",
                  folder / "overlap.csv", folder / "damage.csv", folder / "overlap.png", folder / "damage.png",
                  folder / "specific.png")
    report = run_domains(shards, params, out, Timings("domains"))
    return report, out, params, prepared, shards
