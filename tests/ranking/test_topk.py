"""Exact top-k over the shards, per tensor, block, component and globally, against brute
force over every (dense) score."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import fnmatch
import numpy as np
import pyarrow as pa
import pytest

from critical_weights.artifacts import shards
from critical_weights.artifacts.ranked_file import read_ranked
from critical_weights.config.params import RankParams
from critical_weights.core.errors import ParamsError, ShardError
from critical_weights.model.layout import place
from critical_weights.ranking.stage import run_rank
from critical_weights.ranking.topk import group_of

MODES = ("per_tensor", "per_block", "per_component", "global")
BLOCK = re.compile(r"^model\.layers\.(\d+)\.")


def brute_group(mode: str, parameter: str) -> str:
    """Groups spelled out independently of ranking.group_of, for Llama parameter names: the
    component is the module path inside the block (below `model.` outside blocks)."""
    m = BLOCK.match(parameter)
    module = parameter[m.end():] if m else parameter.removeprefix("model.")
    module = module.removesuffix(".weight")
    return {
        "per_tensor": parameter,
        "per_component": module,
        "per_block": f"block {m.group(1)}" if m else module,
        "global": "all",
    }[mode]


def brute_place(parameter: str) -> tuple[int | None, str]:
    m = BLOCK.match(parameter)
    return (int(m.group(1)) if m else None), brute_group("per_component", parameter)


_DENSE_CACHE: dict[tuple[Path, str], list] = {}


def dense_scores(sens: Path, metric: str) -> list[tuple[int, str, np.ndarray]]:
    """(param_index, parameter, every score in flat order) of the parameters scored by `metric`."""
    if (sens, metric) in _DENSE_CACHE:
        return _DENSE_CACHE[sens, metric]
    out = []
    for r in shards.read_stats(sens).to_pylist():
        if r["metric"] != metric:
            continue
        table = shards.read_dense(sens, r["param_index"], r["parameter"])
        rows = [i for i, m in enumerate(table["metric"].to_pylist()) if m == metric]
        part = table.take(pa.array(rows))
        assert part["flat_index"].to_pylist() == list(range(r["count"]))
        out.append((r["param_index"], r["parameter"], part["score"].to_numpy()))
    _DENSE_CACHE[sens, metric] = out
    return out


def brute_rank(sens: Path, metric: str, mode: str, k: int, include=(), exclude=()) -> list[tuple]:
    """(group, rank, parameter, flat_index, score) in output order: groups by first parameter,
    then score descending, flat index ascending, parameter order; over every score."""
    groups: list[str] = []
    names: list[str] = []
    cols: dict[str, list[np.ndarray]] = {"group": [], "score": [], "flat": [], "p_index": [], "name": []}
    for p_index, name, scores in dense_scores(sens, metric):
        if include and not any(fnmatch.fnmatchcase(name, p) for p in include):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        g = brute_group(mode, name)
        if g not in groups:
            groups.append(g)
        n = scores.size
        cols["group"].append(np.full(n, groups.index(g)))
        cols["score"].append(scores.astype(np.float64))
        cols["flat"].append(np.arange(n))
        cols["p_index"].append(np.full(n, p_index))
        cols["name"].append(np.full(n, len(names)))
        names.append(name)
    group, score, flat, p_index, name = (np.concatenate(cols[c]) for c in ("group", "score", "flat", "p_index", "name"))
    order = np.lexsort((p_index, flat, -score))  # last key first: -score, then flat index, then parameter
    out = []
    for g, group_name in enumerate(groups):
        best = order[group[order] == g][:k]
        out += [(group_name, r + 1, names[name[i]], int(flat[i]), np.float32(score[i])) for r, i in enumerate(best)]
    return out


def ranked_rows(out: Path) -> list[tuple]:
    table, _ = read_ranked(out)
    return list(zip(table["group"].to_pylist(), table["rank"].to_pylist(), table["parameter"].to_pylist(),
                    table["flat_index"].to_pylist(), [np.float32(s) for s in table["score"].to_pylist()]))


# ----------------------------------------------------------------------------- names


@pytest.mark.parametrize("name, blocks, base, block, component", [
    ("model.layers.0.self_attn.q_proj.weight", "model.layers", "model", 0, "self_attn.q_proj"),
    ("model.layers.17.mlp.down_proj.weight", "model.layers", "model", 17, "mlp.down_proj"),
    ("model.layers.2.mlp.experts.down_proj", "model.layers", "model", 2, "mlp.experts.down_proj"),
    ("model.layers.2.self_attn.q_proj.bias", "model.layers", "model", 2, "self_attn.q_proj.bias"),
    ("model.embed_tokens.weight", "model.layers", "model", None, "embed_tokens"),
    ("lm_head.weight", "model.layers", "model", None, "lm_head"),
    ("transformer.h.3.attn.c_attn.weight", "transformer.h", "transformer", 3, "attn.c_attn"),
    ("model.language_model.layers.5.mlp.gate.weight", "model.language_model.layers", "model", 5, "mlp.gate"),
    ("model.norm.weight", "model.layers", "model", None, "norm"),
])
def test_block_and_component_of_parameter_names(name, blocks, base, block, component):
    assert place(name, blocks, base) == (block, component)


def test_group_of_each_mode():
    name = "model.layers.1.mlp.up_proj.weight"
    assert [group_of(m, name, (1, "mlp.up_proj")) for m in MODES] == [name, "block 1", "mlp.up_proj", "all"]
    assert group_of("per_block", "lm_head.weight", (None, "lm_head")) == "lm_head"


# ----------------------------------------------------------------------------- real shards


@pytest.mark.parametrize("metric", ["grad_x_weight", "magnitude", "fisher", "wanda"])
@pytest.mark.parametrize("mode", MODES)
def test_rank_equals_brute_force_over_dense_scores(dense_shards, tmp_path, mode, metric):
    sens, params = dense_shards
    k = 25
    run_rank(sens, dataclasses.replace(params.rank, metric=metric, mode=mode, k=k), tmp_path / "ranked")
    expected = brute_rank(sens, metric, mode, k)
    assert ranked_rows(tmp_path / "ranked") == expected
    _, info = read_ranked(tmp_path / "ranked")
    assert info["n_ranked"] == len(expected)
    assert info["n_groups"] == len({e[0] for e in expected})
    assert info["rank"] == {"metric": metric, "mode": mode, "k": k, "include": [], "exclude": []}


def test_per_tensor_gives_k_per_tensor_and_global_gives_k(dense_shards, tmp_path):
    sens, params = dense_shards
    run_rank(sens, dataclasses.replace(params.rank, mode="per_tensor", k=7), tmp_path / "a")
    table, info = read_ranked(tmp_path / "a")
    names = [n for _, n, _ in dense_scores(sens, "grad_x_weight")]
    assert table.num_rows == 7 * len(names)
    assert info["parameters"] == sorted(names)
    run_rank(sens, dataclasses.replace(params.rank, mode="global", k=7), tmp_path / "b")
    table, _ = read_ranked(tmp_path / "b")
    assert table.num_rows == 7 and table["rank"].to_pylist() == list(range(1, 8))


def test_wanda_ranks_without_the_skipped_embedding(dense_shards, tmp_path):
    sens, params = dense_shards
    meta = shards.read_meta(sens)
    assert list(meta["wanda_skipped"]) == ["model.embed_tokens.weight"]
    run_rank(sens, dataclasses.replace(params.rank, metric="wanda", mode="per_tensor", k=3), tmp_path / "r")
    table, _ = read_ranked(tmp_path / "r")
    assert "model.embed_tokens.weight" not in set(table["parameter"].to_pylist())


def test_ranked_rows_carry_consistent_positions_weights_and_gradients(dense_shards, tmp_path):
    from safetensors.numpy import load_file

    sens, params = dense_shards
    weights = load_file(str(Path(params.model.name) / "model.safetensors"))
    run_rank(sens, dataclasses.replace(params.rank, mode="per_tensor", k=10), tmp_path / "r")
    table, _ = read_ranked(tmp_path / "r")
    n_cols = {r["parameter"]: r["n_cols"] for r in shards.read_stats(sens).to_pylist()}
    for r in table.to_pylist():
        assert r["flat_index"] == r["row"] * n_cols[r["parameter"]] + r["col"]
        w = weights[r["parameter"]]
        assert np.float32(r["weight"]) == w[r["row"], r["col"]]
        assert np.float32(r["score"]) == np.abs(np.float32(r["weight"]) * np.float32(r["gradient"]))
        has_token = r["parameter"] in ("model.embed_tokens.weight", "lm_head.weight")
        assert (r["token"] is not None) == has_token


@pytest.mark.parametrize("include, exclude, expected", [
    (("model.layers.0.*",), ("*mlp*",), [f"model.layers.0.self_attn.{c}_proj.weight" for c in "qkvo"]),
    ((), ("*embed_tokens*", "lm_head*"), None),  # every block weight
    (("lm_head*", "*down_proj*"), (), ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight",
                                       "lm_head.weight"]),
])
@pytest.mark.parametrize("mode", ["per_tensor", "global", "per_block"])
def test_include_and_exclude_patterns(dense_shards, tmp_path, include, exclude, expected, mode):
    sens, params = dense_shards
    rank = dataclasses.replace(params.rank, mode=mode, k=9, include=include, exclude=exclude)
    run_rank(sens, rank, tmp_path / "r")
    table, info = read_ranked(tmp_path / "r")
    every = [n for _, n, _ in dense_scores(sens, "grad_x_weight")]
    chosen = expected if expected is not None else [n for n in every if ".layers." in n]
    ranked_names = set(table["parameter"].to_pylist())
    assert ranked_names <= set(chosen)
    if mode == "per_tensor":
        assert ranked_names == set(chosen)
    assert info["parameters"] == sorted(ranked_names)
    assert ranked_rows(tmp_path / "r") == brute_rank(sens, "grad_x_weight", mode, 9, include, exclude)


def test_patterns_that_leave_nothing_raise_params_error(dense_shards, tmp_path):
    sens, params = dense_shards
    rank = dataclasses.replace(params.rank, include=("model.layers.*",), exclude=("*weight",))
    with pytest.raises(ParamsError) as info:
        run_rank(sens, rank, tmp_path / "r")
    names = list(dict.fromkeys(shards.read_stats(sens)["parameter"].to_pylist()))
    assert names[0] == "model.embed_tokens.weight" and names[-1] == "lm_head.weight"
    assert info.value.problems == [
        "rank.include/rank.exclude: ['model.layers.*'] / ['*weight'] leave no parameter to rank; the patterns match "
        f"parameter names such as model.embed_tokens.weight, {names[len(names) // 2]}, lm_head.weight"]
    assert not (tmp_path / "r").exists()


def test_k_above_keep_raises_shard_error(dense_shards, tmp_path):
    sens, params = dense_shards
    with pytest.raises(ShardError) as info:
        run_rank(sens, dataclasses.replace(params.rank, k=41), tmp_path / "r")
    assert str(info.value) == "rank.k: 41 exceeds the shards' sensitivity.keep 40; raise sensitivity.keep"
    assert not (tmp_path / "r").exists()
    run_rank(sens, dataclasses.replace(params.rank, k=40), tmp_path / "r")  # k == keep is fine


def test_metric_not_in_shards_raises_shard_error_naming_the_metrics_present(dense_shards, tmp_path):
    sens, params = dense_shards
    with pytest.raises(ShardError) as info:
        run_rank(sens, dataclasses.replace(params.rank, metric="taylor2"), tmp_path / "r")
    assert str(info.value) == (
        "rank.metric: 'taylor2' is not in the shards; they hold grad_x_weight, magnitude, fisher, wanda "
        "(add it to sensitivity.metrics)")


def test_missing_or_foreign_shards_raise_shard_error(tmp_path):
    with pytest.raises(ShardError, match=r"meta.json is missing; rerun the sensitivity stage \(dvc repro\)$"):
        run_rank(tmp_path, RankParams(), tmp_path / "r")
    (tmp_path / "meta.json").write_text('{"format": "other"}', encoding="utf-8")
    with pytest.raises(ShardError, match=r"is not a critical-weights/sensitivity/3 file; rerun the sensitivity stage"):
        run_rank(tmp_path, RankParams(), tmp_path / "r")


# ----------------------------------------------------------------------------- synthetic shards with ties


def write_synthetic_shards(folder: Path, scores: dict[str, np.ndarray], keep: int, metric: str = "grad_x_weight") -> None:
    """Shards as the sensitivity stage would write them, from given score matrices."""
    stats = []
    folder.mkdir(parents=True, exist_ok=True)
    writer = shards.CandidateWriter(folder)
    for index, (name, s) in enumerate(scores.items()):
        n_rows, n_cols = s.shape
        flat = s.reshape(-1).astype(np.float32)
        order = np.lexsort((np.arange(flat.size), -flat.astype(np.float64)))[:keep]
        top = pa.table({
            "parameter": [name] * len(order), "metric": [metric] * len(order), "rank": list(range(1, len(order) + 1)),
            "flat_index": order.tolist(), "expert": [None] * len(order),
            "row": (order // n_cols).tolist(), "col": (order % n_cols).tolist(),
            "score": flat[order].tolist(), "weight": [1.0] * len(order), "gradient": flat[order].tolist(),
            "token": [None] * len(order),
        }, schema=shards.CANDIDATE_SCHEMA)
        writer.add(top, top.slice(0, 0))  # no bottom candidates: ranking never reads them
        shards.write_dense(folder, index, name, {metric: flat})
        stats.append({
            "param_index": index, "parameter": name, **dict(zip(("block", "component"), brute_place(name))),
            "layout": "linear", "shape": [n_rows, n_cols], "n_experts": None, "n_rows": n_rows, "n_cols": n_cols,
            "token_rows": False, "metric": metric, "count": flat.size, "sum": float(flat.sum()),
            "mean": float(flat.mean()), "std": float(flat.std()), "min": float(flat.min()), "max": float(flat.max()),
            "zeros": int((flat == 0).sum()), "negatives": int((flat < 0).sum()), "hist": [0] * 300,
            "grid_rows": 1, "grid_cols": 1, "grid": [float(flat.max())], "expert_sum": [], "expert_max": [],
        })
    writer.close()
    shards.write_stats(folder, stats)
    shards.write_meta(folder, {"metrics": [metric], "keep": keep, "params": {},
                               "hist_log10_edges": {"low": -24, "high": 6, "per_decade": 10}})


TIED_NAMES = [
    "model.embed_tokens.weight",
    *(f"model.layers.{b}.{m}.weight" for b in range(3) for m in ("self_attn.q_proj", "mlp.down_proj")),
    "lm_head.weight",
]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k", [1, 6, 20])
def test_ties_break_by_flat_index_then_parameter_order(tmp_path, seed, mode, k):
    rng = np.random.default_rng(seed)
    scores = {name: rng.integers(0, 4, size=(int(rng.integers(3, 9)), int(rng.integers(2, 6)))).astype(np.float32)
              for name in TIED_NAMES}
    write_synthetic_shards(tmp_path / "sens", scores, keep=20)
    run_rank(tmp_path / "sens", RankParams(mode=mode, k=k), tmp_path / "ranked")
    assert ranked_rows(tmp_path / "ranked") == brute_rank(tmp_path / "sens", "grad_x_weight", mode, k)


def test_global_ties_prefer_the_earlier_parameter(tmp_path):
    scores = {"model.layers.0.mlp.down_proj.weight": np.array([[1.0, 5.0]], np.float32),
              "model.layers.1.mlp.down_proj.weight": np.array([[5.0, 5.0]], np.float32)}
    write_synthetic_shards(tmp_path / "sens", scores, keep=2)
    run_rank(tmp_path / "sens", RankParams(mode="global", k=2), tmp_path / "ranked")
    rows = ranked_rows(tmp_path / "ranked")
    # three scores of 5: flat index 0 (layer 1) beats flat index 1 (layers 0 and 1), then layer 0 first
    assert [(r[2], r[3]) for r in rows] == [("model.layers.1.mlp.down_proj.weight", 0),
                                           ("model.layers.0.mlp.down_proj.weight", 1)]
