"""critical_weights.superweights.damage: the restored-activation control puts back exactly the
original output at its peak token, and nothing else."""

from __future__ import annotations

import torch

from critical_weights.superweights.damage import _restore_hook


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
