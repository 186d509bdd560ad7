"""params.yaml: typed defaults, and every problem reported at once with an exact message."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from critical_weights.config.params import METRICS, Params, RankParams, SensitivityParams, load_params, parse_params
from critical_weights.core.errors import ParamsError

ROOT = Path(__file__).parents[2]
ALL_METRICS = ", ".join(METRICS)


def problems(raw) -> list[str]:
    with pytest.raises(ParamsError) as info:
        parse_params(raw)
    assert str(info.value) == "; ".join(info.value.problems)
    return info.value.problems


def test_project_params_yaml_parses_to_the_defaults():
    params = load_params(ROOT / "params.yaml")
    assert params == Params()
    assert params.sensitivity.metrics == ("grad_x_weight", "magnitude", "wanda")
    assert params.rank == RankParams(metric="grad_x_weight", mode="per_tensor", k=100, include=(), exclude=())


def test_project_params_yaml_spells_every_default_explicitly():
    """Every key the dataclasses know is written out, section by section."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    defaults = Params()
    assert {"texts", "model", "sensitivity", "rank", "plot"} <= set(raw)
    for section in (s for s in raw if s != "seed"):
        fields = {f.name for f in dataclasses.fields(getattr(defaults, section))}
        assert set(raw[section]) == fields, section
    assert raw["seed"] == defaults.seed


def test_empty_yaml_gives_the_defaults():
    assert parse_params(None) == Params()
    assert parse_params({}) == Params()


def test_lists_become_tuples_and_params_are_frozen():
    params = parse_params({"sensitivity": {"metrics": ["fisher", "grad_x_weight"]},
                           "rank": {"include": ["model.layers.*"], "exclude": ["lm_head*"]}})
    assert params.sensitivity.metrics == ("fisher", "grad_x_weight")
    assert params.rank.include == ("model.layers.*",) and params.rank.exclude == ("lm_head*",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.rank.k = 3  # type: ignore[misc]


def test_every_problem_is_reported_at_once():
    raw = {
        "seed": -1,
        "texts": {"n_texts": 0},
        "model": {"dtype": "float8"},
        "sensitivity": {"metrics": ["grad_x_weight", "bogus"], "micro_batch_size": "eight"},
        "rank": {"mode": "per_head", "k": 0, "kk": 5},
        "plot": {"dpi": 10},
        "colour": 1,
    }
    assert problems(raw) == [
        "seed: -1 must be an integer between 0 and 4294967295",
        "texts.n_texts: 0 must be an integer >= 1",
        "model.dtype: 'float8' is not one of auto, float32, bfloat16, float16 (did you mean float32?)",
        f"sensitivity.metrics: 'bogus' not one of {ALL_METRICS}",
        "sensitivity.micro_batch_size: 'eight' is not an integer",
        "rank.mode: 'per_head' is not one of per_tensor, per_block, per_component, global",
        "rank.k: 0 must be an integer >= 1",
        "rank.kk: unknown key (did you mean rank.k?); known keys here are exclude, include, k, metric, mode",
        "plot.dpi: 10 must be an integer between 30 and 600",
        "colour: unknown key; known keys here are compress, domains, model, plot, quantize, rank, seed, sensitivity, superweights, texts, validate",
    ]


def test_load_params_reports_every_problem_of_a_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("rank:\n  metric: bogus\n  mode: nope\nsensitivity:\n  keep: 0\n", encoding="utf-8")
    with pytest.raises(ParamsError) as info:
        load_params(path)
    assert info.value.problems == [
        "sensitivity.keep: 0 must be an integer >= 1",
        f"rank.metric: 'bogus' is not one of {ALL_METRICS}",
        "rank.mode: 'nope' is not one of per_tensor, per_block, per_component, global",
    ]


@pytest.mark.parametrize("raw, expected", [
    ({"sensitivity": {"metrics": ["grad_x_weight", "bogus", "worse"]}},
     f"sensitivity.metrics: 'bogus', 'worse' not one of {ALL_METRICS}"),
    ({"rank": {"metric": "bogus"}}, f"rank.metric: 'bogus' is not one of {ALL_METRICS}"),
    ({"rank": {"mode": "per_head"}}, "rank.mode: 'per_head' is not one of per_tensor, per_block, per_component, global"),
    ({"rank": {"k": 0}}, "rank.k: 0 must be an integer >= 1"),
    ({"rank": {"k": -3}}, "rank.k: -3 must be an integer >= 1"),
    ({"rank": {"k": True}}, "rank.k: True is not an integer"),
    ({"rank": {"k": 2.5}}, "rank.k: 2.5 is not an integer"),
    ({"rank": {"kk": 5}},
     "rank.kk: unknown key (did you mean rank.k?); known keys here are exclude, include, k, metric, mode"),
    ({"seeed": 1},
     "seeed: unknown key (did you mean seed?); known keys here are compress, domains, model, plot, quantize, rank, seed, sensitivity, superweights, texts, validate"),
    ({"sensitivity": {"metric": ["fisher"]}},
     "sensitivity.metric: unknown key (did you mean sensitivity.metrics?); known keys here are batch_tokens, "
     "checkpointing, dense, hutchinson_probes, keep, metrics, micro_batch_size, parameters, save_sums"),
    ({"rank": {"k": 2000}}, "rank.k: 2000 exceeds sensitivity.keep 1000; raise sensitivity.keep so the ranking stays exact"),
    ({"sensitivity": {"metrics": ["magnitude"]}},
     "rank.metric: 'grad_x_weight' is not computed; sensitivity.metrics has magnitude"),
    ({"sensitivity": {"metrics": []}}, f"sensitivity.metrics: [] must name at least one of {ALL_METRICS}"),
    ({"sensitivity": {"metrics": ["magnitude", "magnitude"]}},
     "sensitivity.metrics: ['magnitude', 'magnitude'] repeats an entry"),
    ({"sensitivity": {"metrics": "fisher"}}, "sensitivity.metrics: 'fisher' must be a list of strings"),
    ({"sensitivity": {"dense": "yes"}}, "sensitivity.dense: 'yes' must be true or false"),
    ({"rank": {"include": "x"}}, "rank.include: 'x' must be a list of strings"),
    ({"model": {"name": ""}}, "model.name: '' must be a non-empty string"),
    ({"texts": 5}, "texts: 5 is not a mapping"),
    ({"plot": {"heatmap_stat": "median"}}, "plot.heatmap_stat: 'median' is not one of max, mean (did you mean mean?)"),
    ({"superweights": {"threshold": 0}}, "superweights.threshold: 0 must be a positive number (the Super Weight paper uses 50)"),
    ({"superweights": {"threshold": -5.5}},
     "superweights.threshold: -5.5 must be a positive number (the Super Weight paper uses 50)"),
    ({"superweights": {"threshold": "high"}},
     "superweights.threshold: 'high' must be a positive number (the Super Weight paper uses 50)"),
    ({"superweights": {"detect_on": "corpus"}}, "superweights.detect_on: 'corpus' is not one of prompt, prepared"),
    ({"superweights": {"max_candidates": 0}}, "superweights.max_candidates: 0 must be an integer between 1 and 1000"),
    ({"superweights": {"prompt": ""}}, "superweights.prompt: '' must be a non-empty string"),
    ({"model": {"device_map": "auto", "device": "cpu"}},
     "model.device_map: 'auto' spreads over GPUs and needs model.device auto or cuda, not 'cpu'"),
    ({"model": {"parallel": "fsdp", "device_map": "auto"}},
     "model.parallel: fsdp shards the model over torchrun's processes; model.device_map auto spreads it over one "
     "process's GPUs: choose one (set model.device_map none)"),
    ({"model": {"parallel": "fsdp", "processes": 1}},
     "model.processes: 1 process cannot shard the model; allowed: 0 (one per visible GPU) or 2 and more"),
    ({"model": {"parallel": "fsdp"}, "sensitivity": {"metrics": ["grad_x_weight", "hutchinson"]}},
     "sensitivity.metrics: hutchinson cannot run with model.parallel fsdp (its Hessian-vector products need double "
     "backward, which FSDP2 does not run); leave it out, or run it with model.parallel none (one process, torchrun "
     "data parallel or model.device_map auto)"),
    ({"model": {"parallel": "fsdp"}, "sensitivity": {"dense": True}},
     "sensitivity.dense: every score is written by one process, which a sharded model does not fit; set it false "
     "with model.parallel fsdp"),
    ({"model": {"parallel": "ddp"}}, "model.parallel: 'ddp' is not one of none, fsdp"),
])
def test_exact_message(raw, expected):
    assert problems(raw) == [expected]


def test_k_above_keep_is_reported_with_both_values():
    small = {"domains": {"top_n": 5, "per_tensor_k": 5}}
    raw = {"sensitivity": {"keep": 10}, "rank": {"k": 20}, "validate": {"k_values": [1, 5]}, **small}
    assert problems(raw) == ["rank.k: 20 exceeds sensitivity.keep 10; raise sensitivity.keep so the ranking stays exact"]
    ok = parse_params({"sensitivity": {"keep": 20}, "rank": {"k": 20}, "validate": {"k_values": [1, 5]}, **small})
    assert ok.rank.k == ok.sensitivity.keep == 20


def test_bad_value_falls_back_to_default_so_cross_checks_do_not_pile_up():
    # an invalid rank.k is reported once, not again as "exceeds sensitivity.keep"
    assert problems({"rank": {"k": "many"}}) == ["rank.k: 'many' is not an integer"]


def test_an_invalid_value_is_not_cross_checked_as_its_default():
    raw = {"sensitivity": {"keep": 20}, "rank": {"k": 0}, "validate": {"k_values": [1]},
           "domains": {"top_n": 5, "per_tensor_k": 5}}
    assert problems(raw) == ["rank.k: 0 must be an integer >= 1"]


def test_an_invalid_metric_is_not_cross_checked_as_its_default():
    raw = {"sensitivity": {"metrics": ["magnitude"]}, "rank": {"metric": "bogus"}}
    assert problems(raw) == [f"rank.metric: 'bogus' is not one of {ALL_METRICS}"]


def test_params_error_via_the_cli_reads_as_one_line():
    err = ParamsError(["a: 1 is bad", "b: 2 is bad"])
    assert str(err) == "a: 1 is bad; b: 2 is bad"


def test_unreadable_and_invalid_files(tmp_path):
    missing = tmp_path / "none.yaml"
    with pytest.raises(ParamsError) as info:
        load_params(missing)
    assert info.value.problems == [f"{missing}: cannot be read (No such file or directory)"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("rank: [unclosed\n", encoding="utf-8")
    with pytest.raises(ParamsError) as info:
        load_params(bad)
    (problem,) = info.value.problems
    assert problem.startswith(f"{bad}: is not valid YAML (")


def test_top_level_that_is_not_a_mapping_names_the_sections():
    assert problems(["a"]) == [
        "top level: ['a'] is not a mapping; expected the sections "
        "seed, texts, model, sensitivity, rank, plot, validate, superweights, compress, quantize, domains"]


def test_a_huge_value_is_shown_short():
    (problem,) = problems({"rank": {"k": "x" * 500}})
    assert problem.startswith("rank.k: 'xxx") and problem.endswith("' is not an integer")
    assert len(problem) < 120


def test_dataclass_defaults_match_the_documented_ones():
    assert SensitivityParams().keep == 1000 and SensitivityParams().micro_batch_size == 8
    assert set(SensitivityParams().metrics) <= set(METRICS)
