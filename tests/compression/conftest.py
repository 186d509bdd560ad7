"""The compress run the tests of this package share: the tiny model, three metrics, both groups."""

from __future__ import annotations

from pathlib import Path

import pytest

from _tiny import run_prepare_and_sensitivity, tiny_params
from critical_weights.compression.stage import Outputs, run_compress
from critical_weights.core.progress import Timings
from critical_weights.core.streams import STREAM_HOLDOUT
from critical_weights.texts import sources


@pytest.fixture(scope="package")
def compressed(tmp_path_factory, tiny_model_dir):
    params = tiny_params(tiny_model_dir, sensitivity={"metrics": ("grad_x_weight", "magnitude", "wanda"), "dense": False},
                         compress={"sparsities": (0.25, 0.5), "groups": ("per_row", "per_tensor"), "n_texts": 4})
    folder = tmp_path_factory.mktemp("compress")
    prepared, sens = run_prepare_and_sensitivity(folder, params)
    out = Outputs(folder / "compression.json", folder / "compression_report.json", folder / "pruning.csv",
                  folder / "pruning.png", folder / "exports")
    report = run_compress(prepared, sens, Path(params.texts.source), params, out, Timings("compress"))
    ids, _ = sources.unchosen_ids(Path(params.texts.source), prepared, 4, params.texts.max_length, params.seed, STREAM_HOLDOUT)
    return report, out, params, ids
