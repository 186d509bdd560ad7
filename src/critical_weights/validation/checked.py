"""The model to measure: loaded fresh, and checked to be the model the shards were made from.

Any stage that perturbs weights the shards named (validate, superweights) loads through
`load_checked`: every weight it will touch must hold the value the shards recorded, and every
token id it will be given must fit the model's vocabulary, else one line says what to rerun.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from critical_weights.config.params import ModelParams
from critical_weights.core.errors import ShardError
from critical_weights.model.loading import check_vocabulary, load_model, resolve_device
from critical_weights.model.source import resolve_source
from critical_weights.validation.perturbation import flat_view


def load_checked(model_params: ModelParams, sizes: dict[str, int], expected: pa.Table,
                 ids: Sequence[Sequence[int]]) -> tuple[torch.nn.Module, torch.device]:
    """A fresh copy of the model, checked against the shards and against `ids`.

    `sizes`: the weights of each parameter that will be touched, as the shards describe it;
    `expected`: parameter, flat_index and weight of every shard row that will be used (each
    must hold that exact value); `ids`: every token-id list the model will be given."""
    source = resolve_source(model_params.name)
    device, dtype = resolve_device(model_params)
    model = load_model(source, model_params, device, dtype)
    check_vocabulary(source.name, model, ids)
    weights = dict(model.named_parameters())
    for name, size in sizes.items():
        w = weights.get(name)
        if w is None or w.numel() != size:
            raise ShardError(f"parameter {name}: the shards describe {size} weights, the model "
                             f"{'none' if w is None else w.numel()}; rerun the sensitivity stage (dvc repro)")
        rows = expected.filter(pc.equal(expected["parameter"], name))
        index = torch.from_numpy(np.array(rows["flat_index"].to_numpy())).to(w.device)  # (n,) int64
        got = flat_view(w)[index].float().cpu().numpy()  # (n,) float32
        if not np.array_equal(got, rows["weight"].to_numpy(), equal_nan=True):
            raise ShardError(f"parameter {name}: the model's weights differ from those the shards recorded; "
                             "rerun the sensitivity stage (dvc repro)")
    return model, device
