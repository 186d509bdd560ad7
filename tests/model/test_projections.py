"""critical_weights.model.projections: the watched input and output of every MLP output projection
are the module's own, and a weight's (expert, row, col) is the output row and input column it
joins, in every layout (linear, Conv1D, experts both ways)."""

from __future__ import annotations

import pytest
import torch

from _planted import ids, moe_model, conv1d_model
from _tiny import build_tiny_model
from critical_weights.model.projections import output_projections, watch


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
