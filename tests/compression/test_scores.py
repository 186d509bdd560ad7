"""Scores rebuilt from the saved sums equal the sensitivity stage's own dense scores bit for
bit, for every metric; the (out, in) view turns Conv1D and (E, in, out) experts and back."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pytest
import torch
from transformers import AutoModelForCausalLM

from _tiny import SHARD_METRICS
from critical_weights.artifacts import shards
from critical_weights.artifacts.sums import Sums
from critical_weights.compression.scores import RANDOM, scores, to_out_in, to_stored


def test_rebuilt_scores_are_the_sensitivity_stage_s_bits(dense_shards, tiny_model_dir):
    sens, _ = dense_shards
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    weights = dict(model.named_parameters())
    sums = Sums(sens)
    stats = shards.read_stats(sens)
    checked = 0
    for row in stats.filter(pc.equal(stats["metric"], SHARD_METRICS[0])).to_pylist():
        name, kind = row["parameter"], row["layout"]
        dense = shards.read_dense(sens, row["param_index"], name)
        for metric in SHARD_METRICS:
            want = dense.filter(pc.equal(dense["metric"], metric))["score"].to_numpy()
            if not len(want):
                continue  # wanda skips what has no input norms
            got = to_stored(scores(metric, name, weights[name], kind, sums, 0, 0), kind, tuple(row["shape"]))
            assert got.reshape(-1).numpy().tobytes() == want.astype(np.float32).tobytes(), (name, metric)
            checked += 1
    assert checked >= 4 * 7


@pytest.mark.parametrize(("kind", "shape"), [("linear", (3, 5)), ("conv1d", (5, 3)), ("experts", (2, 3, 5)),
                                              ("experts_in_out", (2, 5, 3))])
def test_the_out_in_view_has_a_row_per_output_unit_and_turns_back(kind, shape):
    stored = torch.arange(int(np.prod(shape)), dtype=torch.float32).reshape(shape)
    matrix = to_out_in(stored, kind)
    assert matrix.shape[-1] == 5, "columns are the input features"
    if kind == "conv1d":
        assert torch.equal(matrix[1], stored[:, 1]), "row 1 is output unit 1: stored column 1"
    if kind == "experts_in_out":
        assert torch.equal(matrix[3 + 1], stored[1, :, 1]), "expert 1's output unit 1"
    assert torch.equal(to_stored(matrix, kind, shape), stored)


def test_random_scores_are_drawn_per_tensor_with_the_seed():
    w = torch.zeros(4, 6)
    a = scores(RANDOM, "w", w, "linear", None, seed=1, index=0)
    assert torch.equal(a, scores(RANDOM, "w", w, "linear", None, seed=1, index=0))
    assert not torch.equal(a, scores(RANDOM, "w", w, "linear", None, seed=1, index=1))
    assert not torch.equal(a, scores(RANDOM, "w", w, "linear", None, seed=2, index=0))
    assert a.shape == (4, 6) and a.dtype == torch.float32 and 0 <= float(a.min()) and float(a.max()) < 1
