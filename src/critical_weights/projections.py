"""The MLP output projection of every block, and a way to watch (or edit) what flows through it.

The MLP output projection is the last weight an MLP applies: Llama's `mlp.down_proj`, GPT-2's
`mlp.c_proj` (a Conv1D), NeoX's `mlp.dense_4h_to_h`, OPT's `fc2`, and for a Mixture of Experts
the 3-D `mlp.experts.down_proj` (one matrix per expert) plus any shared expert's own.

Coordinates follow the project's convention for every layout: `row` is the output unit and
`col` the input feature. `flat_index` is the index into the tensor as stored:

| layout | stored | flat_index |
|---|---|---|
| nn.Linear | (out, in) | row * in + col |
| Conv1D | (in, out) | col * out + row |
| experts, `out_in` | (E, out, in) | (expert * out + row) * in + col |
| experts, `in_out` (gpt-oss) | (E, in, out) | (expert * in + col) * out + row |

`watch` calls a function with the input x (n, in) and output y (n, out) of every call of a
projection, per expert for MoE; what the function returns replaces y. nn.Linear and Conv1D
use forward hooks; expert tensors are watched through a TorchFunctionMode that recognises
`F.linear(x, W[e])` and `x @ W[e]` on a slice of the watched 3-D weight, so the expert index
and the orientation come from the call itself, not from a model-specific copy of its maths.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from critical_weights.errors import ModelError

MLP_SEGMENTS = ("mlp", "feed_forward", "ffn", "block_sparse_moe", "moe")  # module names of an MLP
OUTPUT_NAMES = ("down_proj", "c_proj", "dense_4h_to_h", "fc2", "fc_out", "w2", "wo")  # its last projection
STANDALONE = ("fc2", "dense_4h_to_h")  # unambiguous even outside an `mlp` module (OPT, Falcon)
_BLOCK_LISTS = ("layers", "h", "blocks", "block", "layer")
_PRODUCTS = (F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)  # how an expert is applied


@dataclass(frozen=True)
class Projection:
    """One MLP output projection: where it is and how its weight is stored."""

    block: int
    parameter: str  # as model.named_parameters() names it
    component: str  # module path inside the block, e.g. mlp.down_proj, mlp.experts.down_proj
    layout: str  # linear (out, in), conv1d (in, out), out_in (E, out, in), in_out (E, in, out)
    n_out: int
    n_in: int
    n_experts: int = 0  # 0 for a dense projection

    def flat_index(self, expert: int | None, row: int, col: int) -> int:
        """Index into the stored tensor of the weight at (expert, row = output, col = input)."""
        e = expert or 0
        if self.layout == "linear":
            return row * self.n_in + col
        if self.layout == "conv1d":
            return col * self.n_out + row
        if self.layout == "out_in":
            return (e * self.n_out + row) * self.n_in + col
        return (e * self.n_in + col) * self.n_out + row

    def coordinates(self, flat_index: int) -> tuple[int | None, int, int]:
        """(expert, row, col) of a flat index: the inverse of flat_index."""
        e, rest = divmod(flat_index, self.n_out * self.n_in) if self.n_experts else (None, flat_index)
        if self.layout in ("linear", "out_in"):
            row, col = divmod(rest, self.n_in)
        else:
            col, row = divmod(rest, self.n_out)
        return e, row, col


def decoder_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The ModuleList of transformer blocks and its qualified name (the longest such list)."""
    lists = [(n, m) for n, m in model.named_modules()
             if isinstance(m, torch.nn.ModuleList) and n.split(".")[-1] in _BLOCK_LISTS and len(m)]
    if not lists:
        raise ModelError(f"{type(model).__name__}: no list of transformer blocks found (looked for {', '.join(_BLOCK_LISTS)})")
    return max(lists, key=lambda item: len(item[1]))


def _is_output(path: str) -> bool:
    parts = path.split(".")
    return parts[-1] in OUTPUT_NAMES and (any(p in MLP_SEGMENTS for p in parts[:-1]) or parts[-1] in STANDALONE)


def output_projections(model: torch.nn.Module) -> list[Projection]:
    """Every block's MLP output projection(s), blocks in order; a block may hold several
    (routed experts and a shared expert). Raises ModelError when no block has one."""
    from transformers.pytorch_utils import Conv1D

    prefix, blocks = decoder_blocks(model)
    found: list[Projection] = []
    for b, block in enumerate(blocks):
        for path, module in block.named_modules():
            if not _is_output(path):
                continue
            name = f"{prefix}.{b}.{path}.weight"
            if isinstance(module, torch.nn.Linear):
                found.append(Projection(b, name, path, "linear", module.out_features, module.in_features))
            elif isinstance(module, Conv1D):
                n_in, n_out = module.weight.shape
                found.append(Projection(b, name, path, "conv1d", n_out, n_in))
        for path, p in block.named_parameters():
            if p.ndim == 3 and _is_output(path):
                found.append(_experts(model, b, f"{prefix}.{b}.{path}", path, p))
    if not found:
        raise ModelError(f"{type(model).__name__}: no MLP output projection found in its blocks "
                         f"(looked for {', '.join(OUTPUT_NAMES)} inside {', '.join(MLP_SEGMENTS)})")
    return found


def _experts(model: torch.nn.Module, block: int, name: str, path: str, p: torch.Tensor) -> Projection:
    """A 3-D expert tensor: (E, out, in) unless it is stored transposed, as gpt-oss does."""
    hidden = model.config.get_text_config().hidden_size
    n_experts, a, b = p.shape
    owner = model.get_submodule(name.rsplit(".", 1)[0])
    transposed = bool(getattr(owner, "is_transposed", False)) or (b == hidden and a != hidden)
    layout = "in_out" if transposed else "out_in"
    n_out, n_in = (b, a) if transposed else (a, b)
    return Projection(block, name, path, layout, n_out, n_in, n_experts)


Watcher = Callable[[Projection, "int | None", torch.Tensor, torch.Tensor], "torch.Tensor | None"]


@contextlib.contextmanager
def watch(model: torch.nn.Module, projections: list[Projection], fn: Watcher) -> Iterator[None]:
    """Call fn(projection, expert, x (n, in), y (n, out)) on every call of each projection
    (x and y flattened over tokens); a tensor it returns replaces y."""
    handles, experts = [], {}
    for proj in projections:
        if proj.n_experts:
            experts[id(model.get_parameter(proj.parameter))] = proj
            continue
        module = model.get_submodule(proj.parameter.rsplit(".", 1)[0])
        handles.append(module.register_forward_hook(_hook(proj, fn)))
    if experts:
        _eager_experts(model)
    try:
        with _ExpertCalls(experts, fn) if experts else contextlib.nullcontext():
            yield
    finally:
        for h in handles:
            h.remove()


def _hook(proj: Projection, fn: Watcher) -> Callable:
    def hook(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        x = args[0]  # (..., in)
        new = fn(proj, None, x.reshape(-1, x.shape[-1]), out.reshape(-1, out.shape[-1]))
        return None if new is None else new.reshape(out.shape)

    return hook


def _eager_experts(model: torch.nn.Module) -> None:
    """Fused kernels (grouped_mm) apply every expert in one call; the eager loop applies them
    one by one, which is what `watch` can see. Same weights, same maths."""
    if getattr(model.config, "_experts_implementation", None) not in (None, "eager"):
        model.set_experts_implementation("eager")


class _ExpertCalls(TorchFunctionMode):
    """Sees `W[e]` on a watched 3-D weight, then `F.linear(x, W[e])` or `x @ W[e]`."""

    def __init__(self, experts: dict[int, Projection], fn: Watcher):
        super().__init__()
        self.experts, self.fn = experts, fn
        self.slices: dict[int, tuple[Projection, int, torch.Tensor]] = {}  # id(slice) -> (proj, e, slice)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.Tensor.__getitem__ and id(args[0]) in self.experts and _is_index(args[1]):
            proj = self.experts[id(args[0])]
            self.slices[id(out)] = (proj, int(args[1]), out)  # keep the slice alive while its id is a key
        elif func in _PRODUCTS and len(args) >= 2 and id(args[1]) in self.slices:
            proj, e, _ = self.slices.pop(id(args[1]))
            x = args[0]
            new = self.fn(proj, e, x.reshape(-1, x.shape[-1]), out.reshape(-1, out.shape[-1]))
            if new is not None:
                out = new.reshape(out.shape)
        return out


def _is_index(key: object) -> bool:
    """An integer or a 0-d integer tensor: W[e] picks one expert."""
    return isinstance(key, int) or (isinstance(key, torch.Tensor) and key.ndim == 0 and not key.is_floating_point())
