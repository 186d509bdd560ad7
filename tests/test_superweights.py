"""The superweights stage: a planted super weight is found at exactly its coordinate; recorded
activations equal hand-written hooks (dense and MoE); coordinates mean (output, input) in every
layout; ranks against the shards are exact or honest bounds; the stage runs on a dense, a
Conv1D and a MoE model; bad input gives one `Error:` line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
import yaml

import architectures
from _cli import assert_error, invoke, write_params_file
from conftest import ROOT, build_tiny_model, build_tokenizer, run_prepare_and_sensitivity, tiny_params
from critical_weights import shards, weight_ranks
from critical_weights.params import SuperweightsParams
from critical_weights.projections import output_projections, watch
from critical_weights.superweights import record, search
from critical_weights.superweights_damage import _restore_hook

BLOCK, ROW, COL = 0, 5, 7  # the planted super weight: model.layers.0.mlp.down_proj (5, 7)
PNG = b"\x89PNG\r\n\x1a\n"


def plant(model: torch.nn.Module) -> torch.nn.Module:
    """Make residual channel 3 large (embeddings, untouched by block 0's attention), route it
    into down_proj input channel COL through gate and up, and make down_proj[ROW, COL] the
    only weight of that column: every token then spikes on input COL and output ROW."""
    layer = model.model.layers[BLOCK]
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 3] = 3.0
        layer.self_attn.o_proj.weight[3, :] = 0.0
        for proj in (layer.mlp.gate_proj, layer.mlp.up_proj):
            proj.weight[COL, :] = 0.0
            proj.weight[COL, 3] = 4.0
        layer.mlp.down_proj.weight[:, COL] = 0.0
        layer.mlp.down_proj.weight[ROW, COL] = 2.0
    return model


def ids(n: int = 3, vocab: int = 96) -> list[list[int]]:
    rng = np.random.default_rng(7)
    return [rng.integers(2, vocab, size=9 + i).tolist() for i in range(n)]


def test_planted_super_weight_is_found_at_exactly_its_coordinate():
    model = plant(build_tiny_model())
    projections, _ = output_projections(model)
    found, records, _ = search(model, projections, ids(), SuperweightsParams(threshold=50.0))
    assert [(c.projection.block, c.projection.component, c.row, c.col, c.expert) for c in found] == [
        (BLOCK, "mlp.down_proj", ROW, COL, None)]
    c = found[0]
    assert c.weight == 2.0 and c.flat_index == ROW * 32 + COL
    assert abs(c.inp.value) > 50 and abs(c.out.value) > 50
    assert not records[1].spikes(50.0)
    assert model.model.layers[BLOCK].mlp.down_proj.weight[ROW, COL].item() == 2.0, "search left the weight zeroed"


def test_no_candidate_without_a_spike_and_threshold_is_respected():
    model = plant(build_tiny_model())
    found, records, _ = search(model, output_projections(model)[0], ids(), SuperweightsParams(threshold=1e6))
    assert found == [] and len(records) == 2


def test_records_equal_a_hand_written_forward_hook():
    model = build_tiny_model()
    seqs = ids()
    records, hidden = record(model, output_projections(model)[0], seqs)
    by_hand = {}
    hooks = []
    for b, layer in enumerate(model.model.layers):
        def hook(module, args, out, b=b):
            for side, t in (("in", args[0][0]), ("out", out[0])):  # (T, C)
                best = by_hand.get((b, side), (0.0, -1))
                i = int(t.abs().argmax())
                if abs(float(t.reshape(-1)[i])) > abs(best[0]):
                    by_hand[(b, side)] = (float(t.reshape(-1)[i]), i % t.shape[-1])
        hooks.append(layer.mlp.down_proj.register_forward_hook(hook))
    with torch.no_grad():
        for s in seqs:
            model(torch.tensor([s]))
    for h in hooks:
        h.remove()
    for r in records:
        assert (r.inp.value, r.inp.channel) == by_hand[(r.projection.block, "in")]
        assert (r.out.value, r.out.channel) == by_hand[(r.projection.block, "out")]
    assert len(hidden) == 3 and [h.shape for h in hidden[0]] == [(len(s), 16) for s in seqs]


def moe_model(kind: str, vocab: int = 96) -> torch.nn.Module:
    """A tiny seeded MoE causal LM: mixtral (E, out, in) or gpt_oss (E, in, out)."""
    import transformers as tf

    torch.manual_seed(0)
    common = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  num_local_experts=4, num_experts_per_tok=2, vocab_size=vocab, max_position_embeddings=64,
                  pad_token_id=None, bos_token_id=None, eos_token_id=None)
    if kind == "mixtral":
        model = tf.MixtralForCausalLM(tf.MixtralConfig(intermediate_size=24, **common))
    else:
        model = tf.GptOssForCausalLM(tf.GptOssConfig(intermediate_size=24, head_dim=8, **common))
    return architectures.redraw(model).eval()


def test_moe_records_equal_each_expert_computed_by_hand():
    model = moe_model("mixtral")
    seqs = ids()
    records, _ = record(model, output_projections(model)[0], seqs)
    by_hand: dict = {}
    hooks = []
    for b, layer in enumerate(model.model.layers):
        experts = layer.mlp.experts

        def hook(module, args, out, b=b):
            hs, index, _ = args  # (n, H), (n, top_k), (n, top_k)
            for e in range(module.num_experts):
                rows = (index == e).any(dim=-1)
                if not rows.any():
                    continue
                gate, up = F.linear(hs[rows], module.gate_up_proj[e]).chunk(2, dim=-1)
                x = module.act_fn(gate) * up  # (m, I)
                y = x @ module.down_proj[e].T  # (m, H)
                for side, t in (("in", x), ("out", y)):
                    best = by_hand.get((b, e, side), (0.0, -1))
                    i = int(t.abs().argmax())
                    if abs(float(t.reshape(-1)[i])) > abs(best[0]):
                        by_hand[(b, e, side)] = (float(t.reshape(-1)[i]), i % t.shape[-1])
        hooks.append(experts.register_forward_hook(hook))
    with torch.no_grad():
        for s in seqs:
            model(torch.tensor([s]))
    for h in hooks:
        h.remove()
    assert len(records) == len(by_hand) // 2 > 2
    for r in records:
        for side, spike in (("in", r.inp), ("out", r.out)):
            value, channel = by_hand[(r.projection.block, r.expert, side)]
            assert spike.channel == channel
            torch.testing.assert_close(spike.value, value, rtol=1e-5, atol=1e-6)  # float32, another summation order


def conv1d_model(vocab: int = 96) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=vocab, n_positions=64,
                        bos_token_id=None, eos_token_id=None)
    model = GPT2LMHeadModel(config)
    return architectures.redraw(model).eval()


@pytest.mark.parametrize("kind, layout", [("llama", "linear"), ("gpt2", "conv1d"), ("mixtral", "experts"),
                                          ("gpt_oss", "experts_in_out")])
def test_coordinates_are_output_row_and_input_col_in_every_layout(kind, layout):
    model = {"llama": build_tiny_model, "gpt2": conv1d_model}.get(kind, lambda: moe_model(kind))()
    proj = output_projections(model)[0][0]
    assert proj.layout == layout
    seen: dict = {}

    def keep(p, expert, x, y):
        if p == proj:
            seen.setdefault(expert, (x.clone(), y.clone()))

    seq = torch.tensor([ids(1)[0]])
    with watch(model, [proj], keep), torch.no_grad():
        model(seq)
    expert = next(iter(seen))
    x, y = seen[expert]
    row, col = 3, 5
    flat = proj.flat_index(expert, row, col)
    assert proj.coordinates(flat) == (expert, row, col)
    weight = model.get_parameter(proj.parameter)
    with torch.no_grad():
        weight.view(-1)[flat] += 1.0
    seen.clear()
    with watch(model, [proj], keep), torch.no_grad():
        model(seq)
    x2, y2 = seen[expert]
    torch.testing.assert_close(x2, x, rtol=0, atol=0)  # the projection's input is unchanged
    diff = y2 - y  # (n, out): only column `row` moves, by x[:, col]
    torch.testing.assert_close(diff[:, row], x[:, col], rtol=1e-4, atol=1e-5)
    others = torch.cat([diff[:, :row], diff[:, row + 1:]], dim=1)
    torch.testing.assert_close(others, torch.zeros_like(others), rtol=0, atol=1e-5)


def test_restore_hook_puts_back_the_original_output_at_its_peak():
    torch.manual_seed(3)
    x, w = torch.randn(6, 8), torch.randn(4, 8)  # (n, in), (out, in)
    w[2, 5] = 9.0
    original = x @ w.T  # (n, out)
    w0 = w.clone()
    w0[2, 5] = 0.0
    zeroed = x @ w0.T

    class C:  # the fields of a Candidate the hook reads
        projection, expert, row, col, weight = type("P", (), {"parameter": "p"})(), None, 2, 5, 9.0

    out = _restore_hook(C)(C.projection, None, x, zeroed)
    t = int(original[:, 2].abs().argmax())
    torch.testing.assert_close(out[t, 2], original[t, 2], rtol=1e-5, atol=1e-5)
    mask = torch.ones_like(out, dtype=torch.bool)
    mask[t, 2] = False
    assert torch.equal(out[mask], zeroed[mask])


def brute_rank(scores: dict[str, np.ndarray], order: dict[str, int], name: str, f: int) -> tuple[int, int]:
    """Ranks by the ranking's order (score desc, flat asc, parameter order), by sorting everything."""
    keys = [(-float(v), i, order[n]) for n, s in scores.items() for i, v in enumerate(s)]
    mine = (-float(scores[name][f]), f, order[name])
    within = sorted((-float(v), i) for i, v in enumerate(scores[name])).index(mine[:2]) + 1
    return within, sorted(keys).index(mine) + 1


def test_dense_ranks_equal_brute_force_and_kept_ranks_are_exact_or_bounds(dense_shards):
    sens, params = dense_shards
    stats = shards.read_stats(sens)
    names = list(dict.fromkeys(stats["parameter"].to_pylist()))
    order = dict(zip(stats["parameter"].to_pylist(), stats["param_index"].to_pylist()))
    scores = {}
    for n in names:
        t = shards.read_dense(sens, order[n], n)
        scores[n] = t.filter(pc.equal(t["metric"], "grad_x_weight"))["score"].to_numpy()
    rng = np.random.default_rng(0)
    items = [(n, int(rng.integers(len(scores[n])))) for n in names] + [(names[2], int(np.argmax(scores[names[2]])))]
    got = weight_ranks.ranks(sens, params.rank, items)
    sub = stats.filter(pc.equal(stats["metric"], "grad_x_weight"))
    sizes = {n: int(np.prod(s)) for n, s in zip(sub["parameter"].to_pylist(), sub["shape"].to_pylist())}
    kept = weight_ranks._kept_ranks(sens, sub, order, sizes, 40, "grad_x_weight", items)
    for (name, f), dense, bounded in zip(items, got, kept):
        within, overall = brute_rank(scores, order, name, f)
        d = dense["grad_x_weight"]
        assert (d["rank_in_tensor"], d["rank_global"], d["score"]) == (within, overall, float(scores[name][f]))
        if bounded["rank_in_tensor"] is not None:
            assert bounded["rank_in_tensor"] == within
        else:
            assert within >= bounded["rank_in_tensor_at_least"] == 41
        if bounded["exact"]:
            assert bounded["rank_global"] == overall
        else:
            assert overall >= bounded["rank_global_at_least"]
    assert kept[-1]["rank_in_tensor"] == 1


# ----------------------------------------------------------------------------- the stage


def save(model: torch.nn.Module, folder: Path) -> Path:
    tokenizer = build_tokenizer()
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vocab() -> int:
    return len(build_tokenizer())


def run_stage(folder: Path, model_dir: Path, **superweights) -> tuple[object, Path]:
    """prepare and sensitivity through the library, then the stage script through Click."""
    params = tiny_params(model_dir, sensitivity={"dense": False, "keep": 20},
                         superweights={"top_k": 10, "n_texts": 3, "threshold": 50.0, **superweights})
    prepared, sens = run_prepare_and_sensitivity(folder, params)
    write_params_file(folder / "params.yaml", params)
    out = folder / "reports"
    result = invoke("superweights", "--params", folder / "params.yaml", "--prepared", prepared, "--sensitivity", sens,
                    "--report", out / "superweights.json", "--metrics", out / "headline.json",
                    "--plot", out / "sw.png", "--table", out / "sw.csv")
    return result, out


@pytest.mark.parametrize("detect_on", ["prompt", "prepared"])
def test_stage_on_a_dense_model_with_a_planted_super_weight(tmp_path, vocab, detect_on):
    model_dir = save(plant(build_tiny_model(vocab_size=vocab)), tmp_path / "model")
    result, out = run_stage(tmp_path / "run", model_dir, detect_on=detect_on)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "superweights.json").read_text())
    (c,) = report["candidates"]
    assert (c["parameter"], c["block"], c["row"], c["col"], c["weight"]) == (
        "model.layers.0.mlp.down_proj.weight", BLOCK, ROW, COL, 2.0)
    assert c["input_spike"]["token"] is not None and c["input_spike"]["position"] is not None
    assert report["detection"]["n_sequences"] == (1 if detect_on == "prompt" else 3)
    assert set(c["ranks"]) == {"grad_x_weight", "magnitude"}
    mag = c["ranks"]["magnitude"]
    assert mag["rank_in_tensor"] == 1 and mag["score"] == 2.0  # the largest |w| of its tensor
    base = report["baseline"]["loss"]
    assert c["zeroed"]["n_changed"] == 1 and c["zeroed"]["loss"] != base
    assert abs(c["restored"]["loss"] - base) < abs(c["zeroed"]["loss"] - base)  # restoring undoes most of it
    controls = report["controls"]
    assert [t["n"] for t in controls["top_n"]] == [1] and controls["random"]["n_weights"] == 1
    assert controls["all_candidates"]["loss"] == c["zeroed"]["loss"]
    assert len(report["massive_activations"]) == 3 and report["massive_activations"][0]["top"][0]["token"]
    headline = json.loads((out / "headline.json").read_text())  # the DVC metrics: flat, from the report
    assert headline == {
        "n_candidates": 1, "search_exhausted": True, "baseline_loss": base,
        "strongest": f"model.layers.0.mlp.down_proj.weight ({ROW}, {COL})",
        "strongest_zeroed_loss_increase": c["zeroed"]["loss_increase"],
        "strongest_restored_loss_increase": c["restored"]["loss_increase"],
        "strongest_rank_grad_x_weight": c["ranks"]["grad_x_weight"]["rank_global"],
        "all_candidates_zeroed_loss_increase": controls["all_candidates"]["loss_increase"],
        "top1_grad_x_weight_zeroed_loss_increase": controls["top_n"][0]["loss_increase"],
        "random1_zeroed_loss_increase": controls["random"]["loss_increase"],
        "max_massive_activation": max(t["abs"] for layer in report["massive_activations"] for t in layer["top"]),
    }
    assert all(not isinstance(v, (dict, list)) for v in headline.values())
    rows = (out / "sw.csv").read_text().splitlines()
    assert rows[0].startswith("block,mlp_input_max_abs") and len(rows) == 3
    assert (out / "sw.png").read_bytes()[:8] == PNG
    first = (out / "superweights.json").read_bytes()
    again = invoke("superweights", "--params", tmp_path / "run" / "params.yaml", "--prepared", tmp_path / "run" / "prepared",
                   "--sensitivity", tmp_path / "run" / "sensitivity", "--report", out / "superweights.json",
                   "--plot", out / "sw.png", "--table", out / "sw.csv")
    assert again.exit_code == 0 and (out / "superweights.json").read_bytes() == first


@pytest.mark.parametrize("kind", ["gpt2", "mixtral"])
def test_stage_runs_on_conv1d_and_moe_models(tmp_path, vocab, kind):
    model = conv1d_model(vocab) if kind == "gpt2" else moe_model(kind, vocab)
    with torch.no_grad():  # a spike the stage must find: one large output weight, fed by a large input
        proj = output_projections(model)[0][0]
        w = model.get_parameter(proj.parameter)
        w.view(-1)[proj.flat_index(0 if proj.n_experts else None, 2, 3)] = 40.0
    model_dir = save(model, tmp_path / "model")
    result, out = run_stage(tmp_path / "run", model_dir, threshold=1.0, max_candidates=2)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "superweights.json").read_text())
    layouts = {r["parameter"] for r in report["projections"]}
    assert layouts == {p.parameter for p in output_projections(model)[0]}
    assert 1 <= report["n_candidates"] <= 2
    for c in report["candidates"]:
        assert c["layout"] == ("conv1d" if kind == "gpt2" else "experts")
        assert (c["expert"] is None) == (kind == "gpt2")
        assert len(c["restored"]) and c["zeroed"]["n_changed"] == 1
        mag = c["ranks"]["magnitude"]  # the shards score this tensor, at the same flat index
        assert mag["scored"]
        if mag["rank_in_tensor"] is not None:
            assert mag["score"] == abs(c["weight"])
    assert (out / "sw.png").read_bytes()[:8] == PNG


def test_prompt_of_one_token_and_bad_threshold_are_one_line_errors(tmp_path, vocab):
    model_dir = save(build_tiny_model(vocab_size=vocab), tmp_path / "model")
    result, _ = run_stage(tmp_path / "run", model_dir, prompt="Apple")
    assert_error(result, "superweights.prompt: 'Apple' is 1 token(s) with this model's tokenizer; it needs at least 2")
    raw = yaml.safe_load((tmp_path / "run" / "params.yaml").read_text())
    raw["superweights"]["threshold"] = 0
    raw["superweights"]["top_k"] = 50
    path = write_params_file(tmp_path / "bad.yaml", raw)
    run = tmp_path / "run"
    args = ("--prepared", run / "prepared", "--sensitivity", run / "sensitivity", "--report", tmp_path / "r.json",
            "--plot", tmp_path / "p.png", "--table", tmp_path / "t.csv")
    assert_error(invoke("superweights", "--params", path, *args),
                 "invalid params.yaml: superweights.threshold: 0 must be a positive number (the Super Weight paper uses 50)")
    raw["superweights"]["threshold"] = 50
    assert_error(invoke("superweights", "--params", write_params_file(tmp_path / "k.yaml", raw), *args),
                 "superweights.top_k: 50 exceeds the shards' sensitivity.keep 20; lower superweights.top_k or raise sensitivity.keep")
    assert not (tmp_path / "r.json").exists()


def test_dvc_stage_reads_exactly_the_superweights_keys():
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["superweights"]
    assert {p for p in stage["params"] if p.startswith("superweights.")} == {
        f"superweights.{k}" for k in SuperweightsParams.__dataclass_fields__}
