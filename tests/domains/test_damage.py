"""critical_weights.domains.damage: a cell of the damage matrix equals zeroing that group's
top-N by hand and measuring the other group's held-out texts with validate's loss; the
controls and the dominance summary."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from critical_weights.artifacts.prepared_texts import TOKENIZER_DIR
from critical_weights.domains.damage import dominance
from critical_weights.domains.groups import draw
from critical_weights.model.tokenization import load_saved
from critical_weights.texts.sources import read_grouped
from critical_weights.validation.evaluation import mean_loss


def test_dominance_of_a_diagonal_matrix_and_of_a_flat_one():
    diag = dominance([[4.0, 1.0, 1.0], [2.0, 6.0, 2.0], [1.0, 1.0, 1.0]])
    assert diag["row"]["per_group"] == [4.0, 3.0, 1.0] and diag["row"]["mean"] == 8 / 3
    assert diag["row"]["std"] == float(np.std([4.0, 3.0, 1.0], ddof=1))
    assert diag["column"]["per_group"] == [4.0 / 1.5, 6.0, 1.0 / 1.5]
    flat = dominance([[1.0, 1.0], [1.0, 1.0]])
    assert flat["row"]["mean"] == 1.0


def test_a_cell_equals_zeroing_by_hand_and_measuring(grouped, tiny_model_dir):
    report, out, params, _ = grouped
    d = report["damage"]
    rows = list(csv.DictReader(out.critical.open()))
    math_set = [(r["parameter"], int(r["flat_index"])) for r in rows if r["group"] == "math"]
    assert len(math_set) == 12
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        weights = dict(model.named_parameters())
        for name, flat in math_set:
            weights[name].view(-1)[flat] = 0.0
    tokenizer = load_saved(grouped[3] / TOKENIZER_DIR)
    shown, _ = draw(read_grouped(Path(params.domains.source), "domain"), params.domains,
                    params.seed, params.texts.max_length, lambda t: tokenizer(t)["input_ids"])
    code = next(g for g in shown if g.name == "code")
    i, j = d["groups"].index("math"), d["groups"].index("code")
    loss = mean_loss(model, code.heldout, params.sensitivity.micro_batch_size, params.sensitivity.batch_tokens)
    assert loss == d["heldout"]["loss"][i][j]
    assert math.isclose(d["heldout"]["loss_increase"][i][j], loss - d["baseline"]["heldout"][j], rel_tol=1e-12)


def test_the_controls_have_a_mean_and_spread_per_group(grouped):
    report, *_ = grouped
    c = report["damage"]["controls"]
    assert c["draws"] == 2 and len(c["loss_increase"]) == 2 and len(c["mean"]) == len(c["std"]) == 3
    assert c["n_weights"] == 12
    assert report["damage"]["critical_over_random"] is None or report["damage"]["critical_over_random"] > 0
