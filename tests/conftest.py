"""Shared fixtures, built by the helpers in _tiny (tiny seeded models from a config, a model
folder on disk, params pointed at it). Nothing here downloads anything."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from _tiny import SHARD_METRICS, VOCAB, build_tiny_model, build_tokenizer, run_prepare_and_sensitivity, save_model_dir, tiny_params
from critical_weights.config.params import Params


@pytest.fixture(autouse=True)
def close_figures():
    """Figures a test leaves open (to inspect them) are closed after it, so none pile up."""
    yield
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        pyplot.close("all")


@pytest.fixture
def tiny_model():
    """Untied tiny Llama (embed_tokens and lm_head are separate matrices), SDPA attention."""
    return build_tiny_model(tie=False)


@pytest.fixture
def tiny_tied_model():
    """Tied tiny Llama (lm_head.weight is embed_tokens.weight), like the embedded default."""
    return build_tiny_model(tie=True)


@pytest.fixture
def tiny_eager_model():
    """Untied tiny Llama with eager attention, for double backward (Hessian) tests."""
    return build_tiny_model(tie=False, attn="eager")


@pytest.fixture
def tiny_ids() -> list[list[int]]:
    """Six token-id sequences of different lengths between 5 and 20, ids < VOCAB."""
    rng = np.random.default_rng(1234)
    lengths = [5, 20, 9, 14, 7, 17]
    return [rng.integers(0, VOCAB, size=n).tolist() for n in lengths]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A Hugging Face model folder (safetensors + tokenizer) holding an untied tiny Llama."""
    return save_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_tied_model_dir(tmp_path_factory) -> Path:
    """The same with tied embeddings (lm_head.weight is embed_tokens.weight)."""
    return save_model_dir(tmp_path_factory.mktemp("tiny-llama-tied"), tie=True)


@pytest.fixture
def write_params(tmp_path) -> Callable[..., Path]:
    """Write a params.yaml from nested dicts into tmp_path and return its path."""
    import yaml

    def write(data: dict, name: str = "params.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        return path

    return write


@pytest.fixture(scope="session")
def dense_shards(tmp_path_factory, tiny_model_dir) -> tuple[Path, Params]:
    """Dense sensitivity shards of the untied tiny model over 8 corpus texts (keep 40)."""
    params = tiny_params(tiny_model_dir, sensitivity={"metrics": SHARD_METRICS})
    _, sens = run_prepare_and_sensitivity(tmp_path_factory.mktemp("run"), params)
    return sens, params


@pytest.fixture(scope="session")
def validate_run(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path, Path, Params]:
    """Prepared texts, dense shards (grad_x_weight, magnitude, fisher) and the per-tensor
    ranking of the tiny model over 8 texts (keep 40, rank.k 3): the inputs of validate."""
    from critical_weights.ranking.stage import run_rank

    params = tiny_params(tiny_model_dir, sensitivity={"metrics": ("grad_x_weight", "magnitude", "fisher")},
                         rank={"k": 3}, validate={"k_values": (1, 5, 20), "n_texts": 0})
    folder = tmp_path_factory.mktemp("validate")
    prepared, sens = run_prepare_and_sensitivity(folder, params)
    run_rank(sens, params.rank, folder / "ranked")
    return prepared, sens, folder / "ranked", params
