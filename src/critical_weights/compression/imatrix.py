"""An importance matrix in llama.cpp's GGUF format, from the sums of x² that `wanda` needs.

llama.cpp's quantiser weighs each input column of a weight by the mean of x² over the tokens
it saw (`llama-imatrix`). This project's `act_sq` sums are that statistic, over every real
token of the prepared texts. The file holds, per weight tensor, `<gguf name>.in_sum2`
(float32, (n_mat, in): one row per expert for expert tensors, else one) and
`<gguf name>.counts` (float32, (n_mat, 1): the tokens summed, per expert the tokens its router
sent it), with `general.type = imatrix` and `imatrix.datasets`, `imatrix.chunk_count` (texts)
and `imatrix.chunk_size` (`texts.max_length`). Names are the model's GGUF names
(`blk.N.attn_q.weight`), mapped by the gguf package's own tensor-name map for the model's
architecture. Embeddings (looked up, not multiplied) and tensors the map does not know are
left out and listed.

The gradient-weighted variant (`statistic="fisher"`, `compress.imatrix_fisher`) puts in
`in_sum2` the column sums of the Fisher diagonal instead (per input column j, the sum over the
tensor's rows, per expert for experts, of the mean over texts of g_n²), times the number of
texts, with that number as `counts`: what llama.cpp divides by, so its importance is the
Fisher column sum itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np

from critical_weights.artifacts.sums import Sums
from critical_weights.core.errors import ModelError

_ARCHES = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}


def name_map(model_type: str, n_blocks: int) -> Any:
    """The gguf package's tensor-name map for a transformers `model_type`, or a one-line error."""
    arch = _ARCHES.get(model_type)
    if arch is None:
        raise ModelError(f"compress.imatrix: model type {model_type!r} has no GGUF name mapping in the gguf package; "
                         "set compress.imatrix false")
    return gguf.get_tensor_name_map(arch, n_blocks)


def gguf_name(names: Any, parameter: str) -> str | None:
    """`model.layers.0.self_attn.q_proj.weight` -> `blk.0.attn_q.weight`; None if unknown."""
    mapped = names.get_name(parameter, try_suffixes=(".weight", ".bias"))
    if mapped is None:
        return None
    return mapped if mapped.endswith((".weight", ".bias")) else mapped + ".weight"


MULTIPLIED = ("linear", "conv1d", "experts", "experts_in_out")  # layouts whose last axes are (out, in) or (in, out)
_ROW_AXIS = {"linear": 0, "conv1d": 1, "experts": 1, "experts_in_out": 2}  # summed over for Fisher's column sums


def fisher_columns(fisher: np.ndarray, kind: str) -> np.ndarray:
    """(n_mat, in) float32: Fisher summed over each input column's rows (per expert for experts)."""
    sums = fisher.astype(np.float64).sum(axis=_ROW_AXIS[kind])
    return sums.reshape(-1 if kind in ("experts", "experts_in_out") else 1, sums.shape[-1]).astype(np.float32)


def build(sums: Sums, layouts: dict[str, str], meta: dict[str, Any],
          statistic: str = "act_sq") -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors of the file (in parameter order) and the parameters left out, with the reason.

    `layouts`: parameter -> layout kind, for every scored parameter; `meta`: the shards' meta.json;
    `statistic`: `act_sq` (llama.cpp's own, x²) or `fisher` (see the module docstring)."""
    model = meta.get("model", {})
    names = name_map(str(model.get("model_type")), int(model.get("n_blocks") or 0))
    tokens = int(meta["n_tokens"]) + int(meta["n_sequences"])  # every real token, the first of each text too
    picks = {m["experts"]: m["router_picks"] for m in meta.get("moe_layers", [])}
    tensors: dict[str, np.ndarray] = {}
    left_out: dict[str, str] = {}
    for parameter, kind in layouts.items():
        if not sums.has(statistic, parameter) or (statistic == "fisher" and kind not in (*MULTIPLIED, "embedding")):
            continue
        if kind == "embedding":
            left_out[parameter] = "an embedding is looked up, not multiplied: no input columns to weigh"
            continue
        target = gguf_name(names, parameter)
        if target is None:
            left_out[parameter] = "the gguf package's name map has no GGUF name for it"
            continue
        if statistic == "fisher":
            n_texts = int(meta["n_sequences"])
            tensors[f"{target}.in_sum2"] = np.ascontiguousarray(
                fisher_columns(sums.get("fisher", parameter), kind) * np.float32(n_texts))
            tensors[f"{target}.counts"] = np.full((tensors[f"{target}.in_sum2"].shape[0], 1), n_texts, dtype=np.float32)
            continue
        act = sums.get("act_sq", parameter)
        if kind in ("experts", "experts_in_out"):
            n_experts = len(picks.get(parameter.rpartition(".")[0], []))
            if not n_experts:
                left_out[parameter] = "no router picks recorded for its experts"
                continue
            in_sum2 = act.reshape(n_experts, -1)
            counts = np.asarray(picks[parameter.rpartition(".")[0]], dtype=np.float32).reshape(n_experts, 1)
        else:
            in_sum2 = act.reshape(1, -1)
            counts = np.full((1, 1), tokens, dtype=np.float32)
        tensors[f"{target}.in_sum2"] = np.ascontiguousarray(in_sum2, dtype=np.float32)
        tensors[f"{target}.counts"] = counts
    return tensors, left_out


def write(path: Path, tensors: dict[str, np.ndarray], datasets: list[str], chunk_count: int, chunk_size: int,
          arch: str) -> None:
    """The GGUF file, written with the gguf package."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type("imatrix")
    writer.add_array("imatrix.datasets", datasets)
    writer.add_uint32("imatrix.chunk_count", chunk_count)
    writer.add_uint32("imatrix.chunk_size", chunk_size)
    for name, values in tensors.items():
        writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
