"""critical_weights.domains.report: the CSVs behind the DVC heatmaps hold every cell, the
critical CSV every group's top-N with its specificity, and the figures pass the layout check."""

from __future__ import annotations

import csv
import io

from critical_weights.domains import report as rep
from critical_weights.reports.figures import layout_problems


def test_the_tables_hold_every_cell(grouped):
    report, out, *_ = grouped
    overlap = list(csv.DictReader(io.StringIO(out.overlap_table.read_text())))
    assert list(overlap[0]) == rep.OVERLAP_COLUMNS and len(overlap) == 3 * 4 * 4
    damage = list(csv.DictReader(io.StringIO(out.damage_table.read_text())))
    assert list(damage[0]) == rep.DAMAGE_COLUMNS and len(damage) == 2 * 3 * 3
    assert {r["panel"] for r in damage} == {"held-out", "in-sample"}
    critical = list(csv.DictReader(io.StringIO(out.critical.read_text())))
    assert list(critical[0]) == rep.CRITICAL_COLUMNS and len(critical) == 3 * 12
    specific = {(r["group"], r["parameter"], r["flat_index"]) for r in critical if r["specific"] == "True"}
    assert len(specific) == sum(report["specific"][g]["n"] for g in ("code", "prose", "math"))


def test_the_figures_pass_the_layout_check(grouped):
    report, *_ = grouped
    assert layout_problems(rep.overlap_figure(report)) == []
    assert layout_problems(rep.damage_figure(report)) == []
    assert layout_problems(rep.specific_figure(report, report["model"]["n_blocks"])) == []


def test_the_headline_of_no_run_is_zero_groups():
    assert rep.headline(rep.not_run("x")) == {"n_groups": 0}
