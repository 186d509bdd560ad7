"""The domains stage on the grouped tiny run: every output written, the headline the report's
own, and a run without groups that says so in every output."""

from __future__ import annotations

import json

import pytest

from critical_weights.config.params import parse_params
from critical_weights.core.errors import ParamsError
from critical_weights.core.outputs import write_json
from critical_weights.core.progress import Timings
from critical_weights.domains import stage
from critical_weights.domains.gradients import NOT_RUN


def test_every_output_is_written_and_the_headline_matches_the_report(grouped):
    report, out, *_ = grouped
    head = json.loads(out.metrics.read_text())
    assert head["n_groups"] == 3
    assert head["mean_pairwise_jaccard"] == report["overlap"]["mean_pairwise_jaccard_top"]
    assert head["damage_diagonal_dominance_heldout"] == report["damage"]["heldout"]["dominance"]["row"]["mean"]
    assert head["damage_own_over_random"] == report["damage"]["own_vs_random"]["mean_ratio"]
    assert head["n_shared_by_all_groups"] == report["shared"]["n"] == len(report["shared"]["weights"])
    assert set(report["overlap"]["vs_whole"]) == {"prose", "code", "math"}
    for path in (out.critical, out.overlap_table, out.damage_table):
        assert path.read_text().count("\n") > 1
    for path in (out.overlap_plot, out.damage_plot, out.specific_plot):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_grouped_run_gives_outputs_that_say_so(tmp_path, tiny_model_dir):
    folder = tmp_path / "domains"
    folder.mkdir()
    write_json(folder / NOT_RUN, {"run": False, "reason": "domains.field is none"})
    out = stage.Outputs(*(tmp_path / n for n in ("m.json", "r.json", "c.csv", "o.csv", "d.csv", "o.png", "d.png",
                                                  "s.png")))
    made = stage.run_domains(folder, parse_params({}), out, Timings("domains"))
    assert made == {"run": False, "reason": "domains.field is none"}
    assert json.loads(out.metrics.read_text()) == {"n_groups": 0}
    assert out.damage_plot.exists() and out.critical.read_text().startswith("group,")


def test_a_top_n_or_k_above_keep_is_one_line_each_with_the_other_params():
    with pytest.raises(ParamsError) as caught:
        parse_params({"sensitivity": {"keep": 40}, "rank": {"k": 10}, "validate": {"k_values": [1, 10]},
                      "domains": {"top_n": 41, "per_tensor_k": 50}})
    text = str(caught.value)
    assert "domains.top_n: 41 exceeds sensitivity.keep 40; each group's sets are exact only up to keep" in text
    assert "domains.per_tensor_k: 50 exceeds sensitivity.keep 40" in text
