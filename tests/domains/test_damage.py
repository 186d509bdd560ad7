"""critical_weights.domains.damage: a cell of the damage matrix equals zeroing that group's
top-N by hand and measuring the other group's held-out texts with validate's loss; the
controls and the dominance summary."""

from __future__ import annotations

import csv
import math

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from critical_weights.domains import groups
from critical_weights.domains.damage import dominance, matched_counts
from critical_weights.validation.evaluation import mean_loss


def test_dominance_of_a_diagonal_matrix_and_of_a_flat_one():
    diag = dominance([[4.0, 1.0, 1.0], [2.0, 6.0, 2.0], [1.0, 1.0, 1.0]])
    assert diag["row"]["per_group"] == [4.0, 3.0, 1.0] and diag["row"]["mean"] == 8 / 3
    assert diag["row"]["std"] == float(np.std([4.0, 3.0, 1.0], ddof=1))
    assert diag["column"]["per_group"] == [4.0 / 1.5, 6.0, 1.0 / 1.5]
    flat = dominance([[1.0, 1.0], [1.0, 1.0]])
    assert flat["row"]["mean"] == 1.0


def test_a_cell_equals_zeroing_by_hand_and_measuring(grouped, tiny_model_dir):
    report, out, params, _, folder = grouped
    d = report["damage"]
    rows = list(csv.DictReader(out.critical.open()))
    math_set = [(r["parameter"], int(r["flat_index"])) for r in rows if r["group"] == "math"]
    assert len(math_set) == 12
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        weights = dict(model.named_parameters())
        for name, flat in math_set:
            weights[name].view(-1)[flat] = 0.0
    shown, _ = groups.read(folder)
    code = next(g for g in shown if g.name == "code")
    i, j = d["groups"].index("math"), d["groups"].index("code")
    loss = mean_loss(model, code.heldout, params.sensitivity.micro_batch_size, params.sensitivity.batch_tokens)
    assert loss == d["heldout"]["loss"][i][j]
    assert math.isclose(d["heldout"]["loss_increase"][i][j], loss - d["baseline"]["heldout"][j], rel_tol=1e-12)


def test_the_controls_are_spread_as_the_groups_sets_and_have_a_mean_and_spread_per_group(grouped):
    report, *_ = grouped
    c = report["damage"]["controls"]
    assert c["draws"] == 2 and len(c["loss_increase"]) == 2 and len(c["mean"]) == len(c["std"]) == 3
    assert c["n_weights"] == 12 == sum(c["per_tensor"].values())
    for h in range(3):
        drawn = [d[h] for d in c["loss_increase"]]
        assert c["mean"][h] == float(np.mean(drawn)) and c["std"][h] == float(np.std(drawn, ddof=1))
    own = report["damage"]["own_vs_random"]
    assert len(own["per_group"]) == 3 and all({"ratio", "z", "reason"} <= set(o) for o in own["per_group"])


def test_matched_counts_follow_the_union_by_largest_remainder():
    a = {"x": np.array([0, 1, 2]), "y": np.array([5])}
    b = {"x": np.array([2, 3]), "z": np.array([1, 2])}
    # union: x 4, y 1, z 2 (7 weights); 5 of them: x 2.86, y 0.71, z 1.43 -> floors 2, 0, 1, then the two
    # largest remainders (x .86, y .71) get one more each
    assert matched_counts([a, b], 5) == {"x": 3, "y": 1, "z": 1}
