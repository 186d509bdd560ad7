"""critical_weights.superweights.report: the per-block table takes each block's largest spikes and
the hidden state after it, the top-k check finds exactly the weights on a spike's row or column,
and the headline names the candidate whose zeroing hurts most (a non-finite loss counts as most)."""

from __future__ import annotations

import math

import pyarrow as pa

from _planted import BLOCK, COL, ROW, ids, plant
from _tiny import build_tiny_model
from critical_weights.model.projections import output_projections
from critical_weights.superweights.detect import massive_activations, record
from critical_weights.superweights.report import block_rows, blocks_csv, headline, top_k_check


def planted_records():
    model = plant(build_tiny_model())
    projections, _ = output_projections(model)
    records, hidden = record(model, projections, ids())
    return projections, records, massive_activations(hidden, 2)


def test_block_rows_take_each_blocks_largest_spikes_and_the_hidden_state_after_it():
    _, records, massive = planted_records()
    rows = block_rows(records, massive)
    assert [r["block"] for r in rows] == [0, 1]
    for r, rec in zip(rows, records):  # one projection per block in a dense model
        assert (r["mlp_input_max_abs"], r["input_channel"]) == (abs(rec.inp.value), rec.inp.channel)
        assert (r["mlp_output_max_abs"], r["output_channel"]) == (abs(rec.out.value), rec.out.channel)
        after = massive[r["block"] + 1]["top"][0]
        assert (r["hidden_max_abs"], r["hidden_channel"]) == (after["abs"], after["channel"])
    assert (rows[BLOCK]["input_channel"], rows[BLOCK]["output_channel"]) == (COL, ROW)
    lines = blocks_csv(rows, 50.0).splitlines()
    assert lines[0].split(",")[-1] == "threshold" and len(lines) == 3 and lines[1].endswith(",50")


def test_top_k_check_finds_exactly_the_weights_on_a_spike_row_or_column():
    projections, records, _ = planted_records()
    proj = projections[BLOCK]
    cols = 32  # down_proj is (hidden 16, intermediate 32)
    chosen = [(ROW, COL), (ROW, 0), (1, COL), (2, 3)]
    top = pa.table({"rank": list(range(1, 5)), "parameter": [proj.parameter] * 4,
                    "flat_index": [r * cols + c for r, c in chosen], "score": [4.0, 3.0, 2.0, 1.0],
                    "weight": [2.0, 0.0, 0.0, 0.1]})
    check = top_k_check(top, projections, records, 50.0, "grad_x_weight")
    assert check["k"] == 4 and check["n_in_mlp_output_projections"] == 4
    assert check["n_on_spike_row"] == 2 and check["n_on_spike_col"] == 2
    flags = [(e["row"], e["col"], e["on_spike_row"], e["on_spike_col"]) for e in check["on_spike_channels"]]
    assert flags == [(ROW, COL, True, True), (ROW, 0, True, False), (1, COL, False, True)]


def _candidate(name: str, increase: float, finite: bool = True) -> dict:
    return {"parameter": name, "row": 1, "col": 2, "expert": None,
            "zeroed": {"loss_increase": increase if finite else None, "finite": finite},
            "restored": {"loss_increase": 0.0}, "ranks": {"fisher": {"rank_global": 7}}}


def test_headline_names_the_candidate_that_hurts_most_and_a_non_finite_loss_counts_as_most():
    controls = {"all_candidates": {"loss_increase": 3.0}, "top_n": [{"loss_increase": 1.0}, {"loss_increase": 2.5}],
                "random": {"loss_increase": 1e-6}}
    report = {"candidates": [_candidate("a", 0.5), _candidate("b", 2.0)], "search_exhausted": True,
              "baseline": {"loss": 2.0}, "settings": {"rank_metric": "fisher"}, "controls": controls,
              "massive_activations": [{"top": [{"abs": 5.0}]}, {"top": [{"abs": 9.0}]}]}
    h = headline(report)
    assert h["strongest"] == "b (1, 2)" and h["strongest_zeroed_loss_increase"] == 2.0
    assert h["strongest_rank_fisher"] == 7 and h["top2_fisher_zeroed_loss_increase"] == 2.5
    assert h["random2_zeroed_loss_increase"] == 1e-6 and h["max_massive_activation"] == 9.0
    report["candidates"].append(_candidate("c", math.nan, finite=False))
    assert headline(report)["strongest"] == "c (1, 2)"
    empty = headline({**report, "candidates": [], "massive_activations": []})
    assert empty == {"n_candidates": 0, "search_exhausted": True, "loss_in_sample": 2.0, "max_massive_activation": None}
