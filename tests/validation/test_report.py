"""critical_weights.validation.report: the damage-curve table is long format and equals the
report it comes from, and the DVC metrics are the report's headline numbers, named by set."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path

import pytest

from critical_weights.core.progress import Timings
from critical_weights.validation.report import CURVE_COLUMNS, headline
from critical_weights.validation.stage import Outputs, run_validate


def test_curve_csv_is_long_format_and_equals_the_report(validate_run, tmp_path):
    prepared, sens, ranked, params = validate_run
    params = dataclasses.replace(params, validate=dataclasses.replace(params.validate, k_values=(1, 5), single_weights=0))
    out = Outputs(tmp_path / "validation.json", tmp_path / "validation_report.json", tmp_path / "damage_curve.png",
                  tmp_path / "damage_curve.csv", tmp_path / "metric_predictiveness.png")
    report = run_validate(prepared, sens, ranked, Path(params.texts.source), params, out, Timings("validate"))
    rows = list(csv.DictReader(io.StringIO(out.curve_csv.read_text(encoding="utf-8"))))
    assert tuple(rows[0]) == CURVE_COLUMNS
    assert {r["set"] for r in rows} == {"zero critical", "zero random_k", "zero bottom_k"}
    base = report["texts"]["heldout"]["loss"]
    for r in rows:
        e = report["damage"]["zero"][f"k{r['k']}"]
        cond = r["set"].split()[1]
        if cond == "random_k":
            assert float(r["loss_increase"]) == pytest.approx(e[cond]["mean_increase"], rel=1e-8)
            assert float(r["loss"]) == pytest.approx(base + e[cond]["mean_increase"], rel=1e-8)
            assert float(r["spread"]) == pytest.approx(e[cond]["std_increase"], rel=1e-8)
        else:
            assert float(r["loss"]) == pytest.approx(e[cond]["heldout"]["loss"], rel=1e-8)
    assert report["predictiveness"]["single_weights"] is None
    metrics = json.loads(out.metrics.read_text(encoding="utf-8"))
    assert metrics == headline(report)
    assert metrics["text_set_heldout"] is True and metrics["loss_heldout"] == base
    for k in (1, 5):
        entry = report["damage"]["zero"][f"k{k}"]
        assert metrics[f"zero_top{k}_loss_increase"] == entry["critical"]["heldout"]["loss_increase"]
        assert metrics[f"zero_top{k}_vs_random"] == entry["vs_random_k"]["ratio"]
    assert not any(key.startswith("spearman_") for key in metrics)  # single_weights 0: no table
