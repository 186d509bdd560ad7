"""Every architecture of the matrix is scored exactly: the loss is the model's own, and the
dense grad_x_weight is |w * dL/dw| from autograd of that loss for every weight of ndim >= 2.

Tolerances follow from float32 arithmetic: L is a mean of N cross-entropies, each a sum over
the vocabulary; two evaluations of it in different order differ by a few ulp of each term.
"""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pytest
import torch
from torch.overrides import TorchFunctionMode

import architectures
from _tiny import tiny_params
from architectures import ARCHITECTURES, MOE, VOCAB, build, one_thread  # noqa: F401 (autouse fixture)
from critical_weights.artifacts import shards
from critical_weights.core.errors import ModelError
from critical_weights.core.progress import Timings
from critical_weights.model import layout
from critical_weights.sensitivity import loss
from critical_weights.sensitivity.accumulate import scored_parameters
from critical_weights.sensitivity.loss import pad_batch, token_loss_sum
from critical_weights.sensitivity.stage import compute_shards

EPS32 = torch.finfo(torch.float32).eps
LENGTHS = (5, 12, 9, 16)


@pytest.fixture(scope="module")
def ids() -> list[list[int]]:
    rng = np.random.default_rng(11)
    return [rng.integers(0, VOCAB, size=n).tolist() for n in LENGTHS]


def _model_loss(model: torch.nn.Module, ids: list[list[int]]) -> torch.Tensor:
    """transformers' own loss: model(input_ids, labels=...) with padding labelled -100."""
    batch, mask = pad_batch(ids, torch.device("cpu"))
    return model(input_ids=batch, attention_mask=mask, labels=batch.masked_fill(mask == 0, -100)).loss


def _tol(loss: torch.Tensor) -> float:
    # each token's cross-entropy is a log-sum-exp over VOCAB logits: a few ulp of each, and
    # the mean over N tokens adds at most N ulp of the total
    n = sum(n - 1 for n in LENGTHS)
    return float(8 * (VOCAB + n) * EPS32 * max(1.0, abs(float(loss))))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_loss_is_the_models_own(arch, ids, monkeypatch):
    """L (one micro-batch, and in logit chunks of 3 positions) equals model(..., labels=...)."""
    model = build(arch)
    batch, mask = pad_batch(ids, torch.device("cpu"))
    n = int(mask[:, 1:].sum())
    with torch.no_grad():
        theirs = _model_loss(model, ids)
        ours = token_loss_sum(model, batch, mask) / n
        monkeypatch.setattr(loss, "LOGITS_BUDGET_BYTES", 4 * VOCAB * 3)
        real, rows = loss.output_logits, []
        monkeypatch.setattr(loss, "output_logits", lambda m, h: rows.append(h.shape[0]) or real(m, h))
        chunked = token_loss_sum(model, batch, mask) / n
    torch.testing.assert_close(ours, theirs, atol=_tol(theirs), rtol=0)
    torch.testing.assert_close(chunked, theirs, atol=_tol(theirs), rtol=0)
    assert sum(rows) == n and max(rows) == 3  # float32 logits of 3 positions at a time: the budget


@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text", "granite", "cohere"])
def test_the_logit_transform_matters_in_these_fixtures(arch, ids):
    """The head alone (no soft-capping or scaling) gives another loss: the test above bites."""
    model = build(arch)
    batch, mask = pad_batch(ids, torch.device("cpu"))
    with torch.no_grad():
        hidden = model.base_model(input_ids=batch, attention_mask=mask)[0][:, :-1][mask[:, 1:].bool()]
        head_only = torch.nn.functional.cross_entropy(model.lm_head(hidden), batch[:, 1:][mask[:, 1:].bool()])
        theirs = _model_loss(model, ids)
    assert abs(float(head_only - theirs)) > 10 * _tol(theirs)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_dense_grad_x_weight_is_w_times_autograd_of_the_models_loss(arch, ids, tmp_path):
    """Every weight of ndim >= 2 is scored, every score is there, and each equals |w g| with g
    from autograd of transformers' own loss."""
    model = build(arch)
    loss = _model_loss(model, ids)
    expected = {n: (p.detach() * g).abs().reshape(-1)
                for (n, p), g in zip(model.named_parameters(), torch.autograd.grad(loss, list(model.parameters()),
                                                                                  allow_unused=True))
                if g is not None}
    weights = [n for n, p in model.named_parameters() if p.ndim >= 2 and not n.rpartition(".")[2].endswith("bias")]
    assert [n for n, _ in scored_parameters(model, "weights")] == weights
    model.zero_grad(set_to_none=True)
    params = tiny_params("unused", sensitivity={"metrics": ("grad_x_weight",), "dense": True, "micro_batch_size": 3})
    compute_shards(model, architectures.tokenizer(), ids, params, tmp_path / "s", Timings("t"), {})
    stats = shards.read_stats(tmp_path / "s")
    assert stats["parameter"].to_pylist() == weights
    for index, name in enumerate(weights):
        dense = shards.read_dense(tmp_path / "s", index, name)
        got = torch.tensor(dense.filter(pc.equal(dense["metric"], "grad_x_weight"))["score"].to_numpy())
        want = expected[name]
        assert got.numel() == want.numel() == dict(model.named_parameters())[name].numel()
        # two float32 backward passes over N tokens in other orders: each g is a sum of N
        # per-token terms, so they may differ by N ulp of the largest |w g| in the tensor
        scale = float(want.max())
        assert scale > 0, f"{name}: every gradient is zero"
        n_tokens = sum(n - 1 for n in LENGTHS)
        torch.testing.assert_close(got, want, atol=2 * n_tokens * EPS32 * scale, rtol=0, msg=name)


class _Inputs(TorchFunctionMode):
    """Reference input norms: for every matrix product whose weight operand is a scored tensor
    or one expert's slice of it (transformers' eager experts), adds x_j^2 over its input rows
    into (E, in) or (in,) sums in input-feature space; also counts router picks."""

    def __init__(self, weights: dict[str, torch.Tensor], layouts: dict):
        super().__init__()
        self.by_storage = {w.untyped_storage().data_ptr(): n for n, w in weights.items()}
        self.weights, self.layouts = weights, layouts
        self.sums: dict[str, torch.Tensor] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        x, w = (args[1], args[2]) if name == "addmm" else (args[0], args[1]) if name in ("linear", "matmul", "__matmul__") else (None, None)
        if isinstance(w, torch.Tensor) and w.untyped_storage().data_ptr() in self.by_storage:
            pname = self.by_storage[w.untyped_storage().data_ptr()]
            t = self.layouts[pname]
            sq = x.detach().reshape(-1, x.shape[-1]).double().square().sum(0)  # (in,)
            if t.n_experts:
                expert = (w.storage_offset() - self.weights[pname].storage_offset()) // self.weights[pname].stride(0)
                self.sums.setdefault(pname, torch.zeros(t.n_experts, t.n_in, dtype=torch.float64))[expert] += sq
            else:
                self.sums[pname] = self.sums.get(pname, 0) + sq
        return out


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_wanda_scores_every_weight_that_multiplies_an_input(arch, ids, tmp_path):
    """Dense wanda scores equal |w| times the L2 norm of the weight's input feature over the
    real tokens (each expert: the tokens routed to it), taken from transformers' eager
    forward, text by text; only embeddings are skipped."""
    model = build(arch)
    names = [n for n, _ in scored_parameters(model, "weights")]
    layouts = layout.describe(model, names)
    weights = {n: p.detach() for n, p in model.named_parameters() if n in layouts}
    head = model.get_output_embeddings().weight
    ref = _Inputs({n: w for n, w in weights.items() if w is not head}, layouts)
    if arch in MOE:
        model.set_experts_implementation("eager")
    with torch.no_grad(), ref:
        for s in ids:
            model(input_ids=torch.tensor([s]))
    if arch in MOE:
        model.set_experts_implementation("grouped_mm")
    params = tiny_params("unused", sensitivity={"metrics": ("wanda",), "dense": True, "micro_batch_size": 3})
    compute_shards(model, architectures.tokenizer(), ids, params, tmp_path / "s", Timings("t"), {})
    meta = shards.read_meta(tmp_path / "s")
    assert all(layouts[n].kind == "embedding" for n in meta["wanda_skipped"])
    stats = shards.read_stats(tmp_path / "s")
    scored = dict(zip(stats["parameter"].to_pylist(), stats["param_index"].to_pylist()))
    assert set(scored) == set(names) - set(meta["wanda_skipped"])
    for name, index in scored.items():
        if weights[name] is head:
            continue  # its inputs are the base model's outputs over every real token: test_accumulate
        t = layouts[name]
        dense = shards.read_dense(tmp_path / "s", index, name)
        got = torch.tensor(dense["score"].to_numpy())
        expert, row, col = t.coordinates(np.arange(got.numel()))
        norm = ref.sums[name].sqrt()
        norm = norm[expert, col] if expert is not None else norm[col]
        want = weights[name].reshape(-1).double().abs() * norm
        # a sum of squares over N tokens in float32, then a sqrt and a product: N + 3 ulp
        n_tokens = sum(LENGTHS)
        torch.testing.assert_close(got.double(), want, rtol=2 * (n_tokens + 3) * EPS32, atol=0, msg=name)


@pytest.mark.parametrize("arch", MOE)
def test_router_picks_are_counted_over_real_tokens(arch, ids, tmp_path):
    """meta.json holds, per Mixture-of-Experts layer, how often its router picked each expert:
    top-k picks for every real token, as the router's own indices say text by text."""
    model = build(arch)
    picks: dict[str, torch.Tensor] = {}
    handles = []
    for m in layout.moe_layers(model):
        def hook(module, args, out, path=m.experts, n=m.n_experts):
            picks[path] = picks.get(path, 0) + torch.bincount(out[-1].reshape(-1), minlength=n)
        handles.append(model.get_submodule(m.router).register_forward_hook(hook))
    with torch.no_grad():
        for s in ids:
            model(input_ids=torch.tensor([s]))
    for h in handles:
        h.remove()
    params = tiny_params("unused", sensitivity={"metrics": ("magnitude",), "micro_batch_size": 3})
    compute_shards(model, architectures.tokenizer(), ids, params, tmp_path / "s", Timings("t"), {})
    layers = shards.read_meta(tmp_path / "s")["moe_layers"]
    assert [m["block"] for m in layers] == [0, 1]
    for m in layers:
        assert m["tokens"] == sum(LENGTHS)
        assert m["router_picks"] == picks[m["experts"]].tolist()
        assert sum(m["router_picks"]) == 2 * sum(LENGTHS)  # two experts per token


@pytest.mark.parametrize("arch", ["gemma2", "granite", "cohere"])
def test_the_output_path_guard_catches_a_skipped_logit_transform(arch, ids, monkeypatch):
    """check_output_path passes on the model's own output path, and names the model when the
    logits would come from the head alone (the old path, which skipped these transforms)."""
    model = build(arch)
    loss.check_output_path(model, ids[1])
    monkeypatch.setattr(loss, "output_logits", lambda m, h: m.get_output_embeddings()(h))
    with pytest.raises(ModelError, match=rf"^model.name: {type(model).__name__}: the logits through its output head "
                                         r"differ from model\(\.\.\.\)\.logits by .* this architecture's output path is not supported$"):
        loss.check_output_path(model, ids[1])


def test_multimodal_gemma3_blocks_sit_under_the_language_model(ids):
    """Gemma3ForConditionalGeneration: blocks are `model.language_model.layers.N` (not the
    vision tower's), components are paths inside them, and L is the model's own text loss."""
    model = architectures.build_gemma3_multimodal()
    assert layout.block_list(model) == "model.language_model.layers"
    places = layout.describe(model)
    down = places["model.language_model.layers.1.mlp.down_proj.weight"]
    assert (down.block, down.component) == (1, "mlp.down_proj")
    assert places["model.vision_tower.encoder.layers.0.mlp.fc1.weight"].block is None
    assert layout.mlp_output_projections(model) == {b: [f"model.language_model.layers.{b}.mlp.down_proj.weight"]
                                                    for b in (0, 1)}
    text_ids = [[t % (VOCAB - 3) for t in s] for s in ids]  # no image tokens
    batch, mask = pad_batch(text_ids, torch.device("cpu"))
    with torch.no_grad():
        theirs = _model_loss(model, text_ids)
        ours = token_loss_sum(model, batch, mask) / int(mask[:, 1:].sum())
    torch.testing.assert_close(ours, theirs, atol=_tol(theirs), rtol=0)
    loss.check_output_path(model, text_ids[1])
