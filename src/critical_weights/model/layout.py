"""Where each weight sits in the architecture, and what its (expert, row, col) mean.

Nothing here assumes Llama's module names. For every scored tensor it finds:
- `block`: the index of the transformer block that holds it (`model.layers.N`,
  `transformer.h.N`, `gpt_neox.layers.N`, `model.language_model.layers.N`, ...): the blocks are
  the nn.ModuleList holding the most parameters; None outside blocks;
- `component`: the module path inside the block (`self_attn.q_proj`, `attn.c_attn`,
  `mlp.gate`), with the parameter's own name appended unless it is `weight`
  (`mlp.experts.down_proj`, `self_attn.q_proj.bias`); outside blocks, the path below the
  base model (`embed_tokens`, `wte`) or from the top (`lm_head`);
- `kind` and the coordinates. `row` is always the output unit and `col` the input feature;
  `expert` is the expert index of a 3-D expert tensor. `flat_index` stays the index into the
  tensor as stored, `param.view(-1)[flat_index]`:

| kind | stored shape | flat_index |
|---|---|---|
| `linear` (nn.Linear, routers, any (out, in) matrix) | (out, in) | row * in + col |
| `conv1d` (GPT-2's Conv1D) | (in, out) | col * out + row |
| `experts` | (E, out, in) | (expert * out + row) * in + col |
| `experts_in_out` (gpt-oss) | (E, in, out) | (expert * in + col) * out + row |
| `embedding` (rows are token ids) | (vocab, hidden) | row * hidden + col |
| `expert_bias` | (E, out) | expert * out + row, col 0 |
| `tensor` (any other, as stored) | (d0, d1, ...) | row * (d1 * ...) + col |
| `vector` (norms, biases) | (n,) | row, col 0 |
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

KINDS = ("linear", "conv1d", "experts", "experts_in_out", "embedding", "expert_bias", "tensor", "vector")


@dataclass(frozen=True)
class TensorLayout:
    """One parameter's place in the model and the meaning of its coordinates."""

    parameter: str  # the name named_parameters() gives
    block: int | None  # transformer block index, None outside blocks
    component: str  # module path inside the block (or below the base model)
    kind: str  # one of KINDS
    shape: tuple[int, ...]  # as stored

    @property
    def n_experts(self) -> int | None:
        return self.shape[0] if self.kind in ("experts", "experts_in_out", "expert_bias") else None

    @property
    def n_out(self) -> int:
        """Output units (rows)."""
        if self.kind in ("conv1d", "experts_in_out"):
            return self.shape[-1]
        return self.shape[1] if self.kind in ("experts", "expert_bias") else self.shape[0]

    @property
    def n_in(self) -> int:
        """Input features (cols); 1 for vectors and expert biases."""
        if self.kind in ("vector", "expert_bias"):
            return 1
        if self.kind in ("conv1d", "experts_in_out"):
            return self.shape[-2]
        return math.prod(self.shape[1:]) if self.kind == "tensor" else self.shape[-1]

    def coordinates(self, flat_index: np.ndarray) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        """(expert or None, row, col) of flat indices into the tensor as stored; (n,) int64 each."""
        flat = np.asarray(flat_index, dtype=np.int64)
        expert = None
        if self.kind == "conv1d":
            col, row = np.divmod(flat, self.n_out)
        elif self.kind == "experts":
            expert, rest = np.divmod(flat, self.n_out * self.n_in)
            row, col = np.divmod(rest, self.n_in)
        elif self.kind == "experts_in_out":
            expert, rest = np.divmod(flat, self.n_out * self.n_in)
            col, row = np.divmod(rest, self.n_out)
        elif self.kind == "expert_bias":
            expert, row = np.divmod(flat, self.n_out)
            col = np.zeros_like(flat)
        else:  # linear, embedding, tensor, vector: row-major over (n_out, n_in)
            row, col = np.divmod(flat, self.n_in)
        return expert, row, col

    def flat_index(self, expert: int | None, row: int, col: int) -> int:
        """The inverse of `coordinates`: the index into the tensor as stored."""
        e = expert or 0
        if self.kind == "conv1d":
            return col * self.n_out + row
        if self.kind == "experts":
            return (e * self.n_out + row) * self.n_in + col
        if self.kind == "experts_in_out":
            return (e * self.n_in + col) * self.n_out + row
        if self.kind == "expert_bias":
            return e * self.n_out + row
        return row * self.n_in + col


@dataclass(frozen=True)
class MoeLayer:
    """One Mixture-of-Experts layer: its experts module and its router."""

    block: int | None
    experts: str  # module path of the experts (e.g. model.layers.3.mlp.experts)
    n_experts: int
    router: str | None  # module path of the router (e.g. model.layers.3.mlp.gate), if found


def block_list(model: torch.nn.Module) -> str | None:
    """Path of the nn.ModuleList holding the transformer blocks: the one with most parameters."""
    best, best_size = None, 0
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = path, size
    return best


def _base_prefix(model: torch.nn.Module) -> str:
    prefix = getattr(model, "base_model_prefix", "")
    return prefix if prefix and isinstance(getattr(model, prefix, None), torch.nn.Module) else ""


def place(parameter: str, blocks: str | None, base: str) -> tuple[int | None, str]:
    """(block, component) of a parameter name, given the block list's path and the base prefix."""
    module, _, attr = parameter.rpartition(".")
    path = module if attr == "weight" else parameter
    if blocks and path.startswith(blocks + "."):
        index, _, inner = path[len(blocks) + 1:].partition(".")
        if index.isdigit():
            return int(index), inner or attr
    if base and path.startswith(base + "."):
        path = path[len(base) + 1:]
    return None, path or attr


def is_experts_module(module: torch.nn.Module) -> bool:
    """Fused experts: a module with an int `num_experts` that holds (E, ., .) tensors itself."""
    n = getattr(module, "num_experts", None)
    return isinstance(n, int) and any(p.ndim == 3 and p.shape[0] == n for p in module.parameters(recurse=False))


def _is_experts(module: torch.nn.Module, p: torch.Tensor) -> bool:
    return is_experts_module(module) and p.ndim >= 2 and p.shape[0] == module.num_experts


def _kind(module: torch.nn.Module, attr: str, p: torch.Tensor, is_router: bool, is_embedding: bool) -> str:
    from transformers.pytorch_utils import Conv1D

    if p.ndim == 1:
        return "vector"
    if _is_experts(module, p) and p.ndim in (2, 3):
        transposed = getattr(module, "is_transposed", None)  # set by transformers' experts decorator
        if p.ndim == 2:
            return "expert_bias"
        if transposed is not None:
            return "experts_in_out" if transposed else "experts"
    if is_embedding or attr == "weight" and isinstance(module, torch.nn.Embedding):
        return "embedding"
    if attr == "weight" and isinstance(module, Conv1D):
        return "conv1d"
    if p.ndim == 2 and attr == "weight" and (isinstance(module, torch.nn.Linear) or is_router):
        return "linear"
    return "tensor"  # read as stored; 3-D experts without transformers' is_transposed flag land here


def moe_layers(model: torch.nn.Module) -> list[MoeLayer]:
    """Every experts module (one with `num_experts` and 3-D weights), with its router: the
    sibling module whose 2-D weight has one row per expert."""
    blocks, base = block_list(model), _base_prefix(model)
    found = []
    for path, module in model.named_modules():
        if not is_experts_module(module):
            continue
        n = module.num_experts
        parent_path = path.rpartition(".")[0]
        parent = model.get_submodule(parent_path) if parent_path else model
        router = None
        for name, sibling in parent.named_children():
            w = getattr(sibling, "weight", None)
            if sibling is not module and isinstance(w, torch.Tensor) and w.ndim == 2 and w.shape[0] == n:
                router = f"{parent_path}.{name}" if parent_path else name
                break
        found.append(MoeLayer(place(path + ".weight", blocks, base)[0], path, n, router))
    return found


def describe(model: torch.nn.Module, names: list[str] | None = None) -> dict[str, TensorLayout]:
    """The layout of every parameter in `names` (default: all), in named_parameters() order."""
    routers = {m.router for m in moe_layers(model)}
    blocks, base = block_list(model), _base_prefix(model)
    embedding = model.get_input_embeddings().weight
    wanted = set(names) if names is not None else None
    out = {}
    for name, p in model.named_parameters():
        if wanted is not None and name not in wanted:
            continue
        module_path, _, attr = name.rpartition(".")
        module = model.get_submodule(module_path) if module_path else model
        block, component = place(name, blocks, base)
        kind = _kind(module, attr, p, module_path in routers, p is embedding)
        out[name] = TensorLayout(name, block, component, kind, tuple(p.shape))
    return out


def is_bias(name: str) -> bool:
    """Biases, including expert biases such as `gate_up_proj_bias`."""
    return name.rpartition(".")[2].endswith("bias")


def mlp_output_projections(model: torch.nn.Module) -> dict[int, list[str]]:
    """Per block, the weights that write the MLP's output back into the residual stream
    (`mlp.down_proj`, `mlp.c_proj`, `mlp.dense_4h_to_h`, `mlp.experts.down_proj` with one
    slice per expert, `mlp.shared_expert.down_proj`).

    Rule: outside the attention (any component whose first part contains `attn` or
    `attention`), the weights whose output width is the hidden size and whose input width is
    not; if every candidate maps hidden to hidden, the last one declared."""
    hidden = model.get_input_embeddings().weight.shape[-1]
    by_block: dict[int, list[TensorLayout]] = {}
    for t in describe(model).values():
        first = t.component.split(".")[0].lower()
        if t.block is None or t.kind in ("vector", "expert_bias", "embedding") or is_bias(t.parameter):
            continue
        if "attn" in first or "attention" in first or t.n_out != hidden:
            continue
        by_block.setdefault(t.block, []).append(t)
    out = {}
    for block, cands in sorted(by_block.items()):
        narrowing = [t.parameter for t in cands if t.n_in != hidden]
        out[block] = narrowing or [cands[-1].parameter]
    return out
