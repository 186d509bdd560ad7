"""critical_weights.superweights.detect: recorded spikes equal hand-written hooks (dense and per
expert), and the iterative search finds a planted super weight at exactly its coordinate and
nothing without a spike."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from _planted import BLOCK, ROW, COL, plant, ids, moe_model
from _tiny import build_tiny_model
from critical_weights.config.params import SuperweightsParams
from critical_weights.model.projections import output_projections
from critical_weights.superweights.detect import record, search


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
