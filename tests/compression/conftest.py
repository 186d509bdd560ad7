"""The runs the tests of this package share: one prepare and sensitivity of the tiny model (three
metrics), then compress (both groups) and quantize (two widths, a smaller last group) on it."""

from __future__ import annotations

from pathlib import Path

import pytest

from _tiny import run_prepare_and_sensitivity, tiny_params
from critical_weights.compression import quantization
from critical_weights.compression.stage import Outputs, run_compress
from critical_weights.core.progress import Timings
from critical_weights.core.streams import STREAM_HOLDOUT
from critical_weights.texts import sources


@pytest.fixture(scope="package")
def scored(tmp_path_factory, tiny_model_dir):
    """(params, folder, prepared, sensitivity, held-out ids) of one sensitivity run."""
    params = tiny_params(tiny_model_dir, sensitivity={"metrics": ("grad_x_weight", "magnitude", "wanda"), "dense": False},
                         compress={"sparsities": (0.25, 0.5), "groups": ("per_row", "per_tensor"), "n_texts": 4},
                         quantize={"bits": (2, 4), "group_size": 12, "keep": (0.02, 0.1), "channels": 0.25})
    folder = tmp_path_factory.mktemp("compress")
    prepared, sens = run_prepare_and_sensitivity(folder, params)
    ids, _ = sources.unchosen_ids(Path(params.texts.source), prepared, 4, params.texts.max_length, params.seed, STREAM_HOLDOUT)
    return params, folder, prepared, sens, ids


@pytest.fixture(scope="package")
def compressed(scored):
    params, folder, prepared, sens, ids = scored
    out = Outputs(folder / "compression.json", folder / "compression_report.json", folder / "pruning.csv",
                  folder / "pruning.png", folder / "exports")
    report = run_compress(prepared, sens, Path(params.texts.source), params, out, Timings("compress"))
    return report, out, params, ids


@pytest.fixture(scope="package")
def quantized(scored):
    params, folder, prepared, sens, ids = scored
    out = quantization.Outputs(folder / "quantization.json", folder / "quantization_report.json",
                               folder / "quantization.csv", folder / "quantization.png")
    report = quantization.run_quantize(prepared, sens, Path(params.texts.source), params, out, Timings("quantize"))
    return report, out, params, ids, sens
