"""What quantize writes: the recovered share's formula and where it is left null, the headline,
the plot's table and a figure that passes the layout check."""

from __future__ import annotations

import csv
import io
import json

import pytest

from critical_weights.compression import quantization_report as rep
from critical_weights.compression.measure import TextSet
from critical_weights.reports.figures import layout_problems


def test_recovered_is_the_share_of_rtn_damage_undone():
    assert rep.recovered(40.0, 20.0, 10.0) == pytest.approx(2 / 3)
    assert rep.recovered(40.0, 10.0, 10.0) == 1.0 and rep.recovered(40.0, 40.0, 10.0) == 0.0
    assert rep.recovered(40.0, 50.0, 10.0) < 0  # keeping a set can hurt
    assert rep.recovered(None, 20.0, 10.0) is None


def test_headline_table_and_figure(quantized):
    report, out, *_ = quantized
    head = json.loads(out.metrics.read_text())
    assert head == rep.headline(report)
    assert {"loss_heldout", "perplexity_baseline", "int2_rtn_ppl", "int4_rtn_ppl"} <= set(head)
    for bits in (2, 4):
        if str(bits) in report["unrecovered"]:
            assert not any(k.startswith(f"int{bits}_") and k.endswith("_recovered") for k in head)
        else:
            assert {f"int{bits}_wanda_recovered", f"int{bits}_channels_activation_recovered"} <= set(head)
            top = next(r for r in report["table"] if (r["bits"], r["metric"], r["share"]) == (bits, "wanda", 0.1))
            assert head[f"int{bits}_wanda_recovered"] == top["recovered"]
    rows = list(csv.DictReader(io.StringIO(out.table.read_text())))
    assert list(rows[0]) == rep.TABLE_COLUMNS + ["in_sample_perplexity", "in_sample_recovered", "in_sample_saturated"]
    assert len(rows) == len(report["table"]) - 2 and all(r["protect"] != "none" for r in rows)
    assert out.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert layout_problems(rep.figure(report)) == []


def test_a_width_where_rtn_barely_hurts_gets_no_recovered_share(quantized):
    report, _, params, ids, _ = quantized
    rows = [{**r} for r in report["table"] if r["bits"] == 4]
    base = report["baseline"]["loss"]
    for r in rows:  # RTN now within MIN_DAMAGE of the dense loss
        r["loss_increase"] = rep.MIN_DAMAGE / 2 if r["protect"] == "none" else r["loss_increase"]
    texts = [TextSet("heldout", ids, {"texts": "heldout"})]
    again = rep.build_report(params, {"model": {"vocab_size": 100}}, [], 0, [], texts, [base], report["sets"],
                             report["channel_sets"], None, rows)
    assert "raises the loss by only" in again["unrecovered"]["4"]
    assert all(r["recovered"] is None for r in again["table"])
