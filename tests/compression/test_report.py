"""The compress report's pieces: the headline names each number by its mask, the CSV holds
every row in order, and the figure draws one line per set per group with nothing overlapping."""

from __future__ import annotations

import csv
import io
import math

from critical_weights.compression import report as rep
from critical_weights.reports.figures import layout_problems


def _report(in_sample: bool = False) -> dict:
    """A report of three sets; with `in_sample`, in-sample losses beside, 0.2 nats lower."""
    table = []
    for i, metric in enumerate(("grad_x_weight", "magnitude", "random")):
        for s in (0.1, 0.5, 0.7):
            table.append({"metric": metric, "series": "unstructured per_row", "structure": "unstructured", "group": "per_row",
                          "sparsity": s, "sparsity_reached": s, "loss": 3 + i + s, "perplexity": math.exp(3 + i + s),
                          "loss_increase": i + s, "top1_agreement": 1 - s, "saturated": False})
        for structure in ("2:4", "4:8"):
            table.append({"metric": metric, "series": structure, "structure": structure, "group": "per_row",
                          "sparsity": 0.5, "sparsity_reached": 0.5, "loss": 4 + i, "perplexity": math.exp(4 + i),
                          "loss_increase": 1 + i, "top1_agreement": 0.4, "saturated": False})
    baseline = {"loss": 3.0, "perplexity": math.exp(3.0), "ln_vocab": 10.8}
    beside = []
    if in_sample:
        for r in table:
            r.update({"in_sample_loss": r["loss"] - 0.2, "in_sample_perplexity": math.exp(r["loss"] - 0.2),
                      "in_sample_top1_agreement": r["top1_agreement"], "in_sample_saturated": False})
        baseline.update({"in_sample_loss": 2.8, "in_sample_perplexity": math.exp(2.8)})
        beside = [{"texts": "in_sample"}]
    return {"protocol": {"texts": "heldout", "beside": beside}, "baseline": baseline,
            "sets": ["grad_x_weight", "magnitude", "random"], "table": table}


def test_the_headline_gives_each_set_at_half_per_row_and_at_2_4():
    head = rep.headline(_report())
    assert head["loss_heldout"] == 3.0
    assert head["grad_x_weight_ppl_50_per_row"] == math.exp(3.5) and head["magnitude_ppl_2_4"] == math.exp(5)
    assert sorted(head) == sorted(["loss_heldout", "perplexity_baseline"] + [
        f"{m}_ppl_{k}" for m in ("grad_x_weight", "magnitude", "random") for k in ("50_per_row", "2_4")])


def test_the_headline_names_each_baseline_by_its_texts():
    head = rep.headline(_report(in_sample=True))
    assert head["loss_heldout"] == 3.0 and head["loss_in_sample"] == 2.8


def test_the_csv_holds_every_row_in_order():
    rows = list(csv.DictReader(io.StringIO(rep.table_csv(_report()))))
    assert list(rows[0]) == rep.TABLE_COLUMNS and len(rows) == 15
    assert [r["series"] for r in rows[:5]] == ["unstructured per_row"] * 3 + ["2:4", "4:8"]


def test_the_csv_has_the_in_sample_columns_beside_when_measured():
    rows = list(csv.DictReader(io.StringIO(rep.table_csv(_report(in_sample=True)))))
    assert list(rows[0]) == rep.TABLE_COLUMNS + [f"in_sample_{c}" for c in rep.BESIDE_COLUMNS]
    assert float(rows[0]["in_sample_loss"]) == float(rows[0]["loss"]) - 0.2


def test_the_figure_draws_the_in_sample_lines_dashed_beside():
    fig = rep.figure(_report(in_sample=True))
    line_panel = fig.axes[0]
    dashed = [l for l in line_panel.get_lines() if l.get_linestyle() == "--" and len(l.get_xdata()) == 3]
    assert len(dashed) == 3
    assert list(dashed[1].get_ydata()) == [math.exp(4.1 - 0.2), math.exp(4.5 - 0.2), math.exp(4.7 - 0.2)]
    assert "in-sample texts (dashed, hollow)" in [t.get_text() for t in fig.legends[0].get_texts()]
    assert layout_problems(fig) == []


def test_the_figure_draws_a_line_per_set_and_the_n_m_points_with_nothing_overlapping():
    fig = rep.figure(_report())
    line_panel, nm_panel = fig.axes
    lines = {l.get_label(): l for l in line_panel.get_lines()}
    assert list(lines)[:3] == ["grad_x_weight", "magnitude", "random"]
    assert list(lines["magnitude"].get_xdata()) == [0.1, 0.5, 0.7]
    assert list(lines["magnitude"].get_ydata()) == [math.exp(4.1), math.exp(4.5), math.exp(4.7)]
    assert line_panel.get_yscale() == "log"
    assert [t.get_text() for t in nm_panel.get_xticklabels()] == ["2:4", "4:8"]
    assert layout_problems(fig) == []
