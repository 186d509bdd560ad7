"""The layout of every architecture in the matrix: blocks, components, and coordinates that
mean the same thing everywhere, checked against the layer's real computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from architectures import ARCHITECTURES, MOE, build, one_thread  # noqa: F401 (autouse fixture)
from critical_weights.model import layout

EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {a: build(a) for a in ARCHITECTURES}


class _Products(TorchFunctionMode):
    """Records (input, output) of every matrix product a module runs: F.linear, @, addmm and
    grouped_mm (transformers' default experts implementation)."""

    def __init__(self):
        super().__init__()
        self.records: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if name in ("linear", "matmul", "__matmul__", "grouped_mm", "_grouped_mm"):
            self.records.append((args[0].detach().clone(), out.detach().clone()))
        elif name == "addmm":
            self.records.append((args[1].detach().clone(), out.detach().clone()))
        return out


def _run(module: torch.nn.Module, inputs: tuple) -> list[tuple[torch.Tensor, torch.Tensor]]:
    with torch.no_grad(), _Products() as rec:
        module(*inputs)
    return rec.records


def _inputs(model: torch.nn.Module, module_path: str, t: layout.TensorLayout, expert: int | None) -> tuple:
    """Inputs for the module holding `t`: 5 tokens of random features; experts get every
    token routed to `expert` with weight 1 (the second choice weighs 0)."""
    g = torch.Generator().manual_seed(7)
    module = model.get_submodule(module_path)
    width = t.n_in if t.kind in ("linear", "conv1d") else model.get_input_embeddings().weight.shape[-1]
    x = torch.randn(5, width, generator=g)
    if expert is None:
        return (x.unsqueeze(0),) if not layout.is_experts_module(module) else ()
    other = (expert + 1) % t.n_experts
    index = torch.tensor([[expert, other]] * 5)
    weights = torch.tensor([[1.0, 0.0]] * 5)
    return x, index, weights


def _cases(model: torch.nn.Module):
    for name, t in layout.describe(model).items():
        if t.kind in ("linear", "conv1d", "experts", "experts_in_out") and not layout.is_bias(name):
            yield name, t


CASES = [(a, None) for a in ARCHITECTURES if a not in MOE] + [(a, impl) for a in MOE for impl in ("eager", "grouped_mm")]


@pytest.mark.parametrize(("arch", "experts_impl"), CASES)
def test_perturbing_expert_row_col_changes_only_that_output_through_that_input(models, arch, experts_impl):
    """For every scored matrix: adding d to the weight at flat_index(expert, row, col) changes
    the first matrix product it enters (the later ones read its output) only in output unit `row`, by d * (its input feature `col`),
    and only for the tokens routed to `expert` (experts: in both transformers implementations)."""
    model = models[arch]
    if experts_impl is not None:
        model.set_experts_implementation(experts_impl)
    rng = np.random.default_rng(0)
    checked = 0
    for name, t in _cases(model):
        module_path = name.rpartition(".")[0]
        module = model.get_submodule(module_path)
        expert = int(rng.integers(t.n_experts)) if t.n_experts else None
        row, col = int(rng.integers(t.n_out)), int(rng.integers(t.n_in))
        flat = t.flat_index(expert, row, col)
        e_back, r_back, c_back = t.coordinates(np.array([flat]))
        assert (r_back[0], c_back[0]) == (row, col) and (e_back is None) == (expert is None)
        if expert is not None:
            assert e_back[0] == expert
        inputs = _inputs(model, module_path, t, expert)
        before = _run(module, inputs)
        w = dict(model.named_parameters())[name]
        d = 0.5
        with torch.no_grad():
            w.view(-1)[flat] += d
        try:
            after = _run(module, inputs)
        finally:
            with torch.no_grad():
                w.view(-1)[flat] -= d
        changed = [(x, a - b) for (x, b), (_, a) in zip(before, after) if not torch.equal(a, b)]
        assert changed, f"{name}: no product changed"
        x, delta = changed[0]
        x, delta = x.reshape(-1, x.shape[-1]), delta.reshape(-1, delta.shape[-1])  # (n, in), (n, out)
        others = torch.cat([delta[:, :row], delta[:, row + 1:]], dim=1)
        assert torch.count_nonzero(others) == 0, f"{name}: outputs other than row {row} changed"
        moved = delta[:, row] != 0
        assert int(moved.sum()) == 5, f"{name}: {int(moved.sum())} tokens changed, expected the 5 routed ones"
        expect = d * x[moved, col]
        # the difference of two float32 dot products of length n_in, each off by at most
        # n_in * eps * sum_i |w_i x_i| <= n_in * eps * (max|w| + d) * sum_i |x_i|
        bound = x[moved].abs().sum(1) * (w.detach().abs().max() + d)  # (5,)
        tol = 2 * t.n_in * EPS32 * float(bound.max())
        torch.testing.assert_close(delta[moved, row], expect, atol=tol, rtol=0)
        checked += 1
    assert checked >= 5


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_blocks_and_components_are_the_models_own_paths(models, arch):
    model = models[arch]
    layouts = layout.describe(model)
    n_blocks = model.config.num_hidden_layers
    blocks = {t.block for t in layouts.values() if t.block is not None}
    assert blocks == set(range(n_blocks))
    for name, t in layouts.items():
        if t.block is not None:
            assert f".{t.block}.{t.component}" in name  # the path inside the block, not a fixed list
    outside = {t.component for t in layouts.values() if t.block is None}
    embed = [n for n, p in model.named_parameters() if p is model.get_input_embeddings().weight][0]
    assert layouts[embed].kind == "embedding" and layouts[embed].component in outside


def test_components_read_as_the_issue_names_them(models):
    def comps(arch: str) -> set[str]:
        return {t.component for t in layout.describe(models[arch]).values() if t.block == 0}

    assert {"self_attn.q_proj", "mlp.down_proj"} <= comps("llama")
    assert {"attn.c_attn", "mlp.c_proj"} <= comps("gpt2")
    assert {"attention.query_key_value", "mlp.dense_4h_to_h"} <= comps("gpt_neox")
    assert {"mlp.gate", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"} <= comps("mixtral")
    assert {"mlp.router", "mlp.experts.down_proj", "mlp.experts.down_proj_bias"} <= comps("gpt_oss")
    assert {"mlp.shared_expert.up_proj", "mlp.shared_expert_gate", "mlp.gate"} <= comps("qwen2_moe")


@pytest.mark.parametrize("arch", MOE)
def test_moe_layers_find_experts_and_router(models, arch):
    found = layout.moe_layers(models[arch])
    assert [m.block for m in found] == [0, 1]
    for m in found:
        assert m.n_experts == 4 and m.router is not None
        router = models[arch].get_submodule(m.router)
        assert router.weight.shape[0] == 4


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_mlp_output_projections_write_the_residual_stream(models, arch):
    out = layout.mlp_output_projections(models[arch])
    assert sorted(out) == [0, 1]
    names = {"down_proj", "c_proj", "dense_4h_to_h"}
    for block, params in out.items():
        if arch == "qwen2_moe":  # the routed experts and the shared expert both write the residual
            assert params == [f"model.layers.{block}.mlp.experts.down_proj",
                              f"model.layers.{block}.mlp.shared_expert.down_proj.weight"]
            continue
        assert len(params) == 1
        assert ".mlp." in params[0] and any(n in params[0] for n in names), params
