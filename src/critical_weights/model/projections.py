"""The MLP output projection of every block, and a way to watch (or edit) what flows through it.

Which weights are the MLP output projections, and what their coordinates mean, is the layout
module's business (`layout.mlp_output_projections`, `layout.describe`): Llama's
`mlp.down_proj`, GPT-2's `mlp.c_proj` (a Conv1D), NeoX's `mlp.dense_4h_to_h`, and for a
Mixture of Experts the 3-D `mlp.experts.down_proj` (one matrix per expert) plus any shared
expert's own. `row` is the output unit and `col` the input feature in every layout; see
critical_weights.model.layout for the flat-index formula of each kind.

`watch` calls a function with the input x (n, in) and output y (n, out) of every call of a
projection, per expert for MoE; what the function returns replaces y. nn.Linear and Conv1D
use forward hooks; expert tensors are watched through a TorchFunctionMode that recognises
`F.linear(x, W[e])` and `x @ W[e]` on a slice of the watched 3-D weight, so the expert index
and the orientation come from the call itself, not from a model-specific copy of its maths.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from critical_weights.core.errors import ModelError
from critical_weights.model import layout

log = logging.getLogger(__name__)

WATCHABLE = ("linear", "conv1d", "experts", "experts_in_out")  # layout kinds `watch` can see
_PRODUCTS = (F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)  # how an expert is applied


@dataclass(frozen=True)
class Projection:
    """One MLP output projection: its block and its layout."""

    block: int
    tensor: layout.TensorLayout

    @property
    def parameter(self) -> str:
        return self.tensor.parameter

    @property
    def component(self) -> str:
        return self.tensor.component

    @property
    def layout(self) -> str:
        return self.tensor.kind

    @property
    def n_experts(self) -> int:
        return self.tensor.n_experts or 0

    def flat_index(self, expert: int | None, row: int, col: int) -> int:
        """Index into the stored tensor of the weight at (expert, row = output, col = input)."""
        return int(self.tensor.flat_index(expert, row, col))

    def coordinates(self, flat_index: int) -> tuple[int | None, int, int]:
        """(expert, row, col) of a flat index: the inverse of flat_index."""
        e, row, col = self.tensor.coordinates([flat_index])
        return (None if e is None else int(e[0])), int(row[0]), int(col[0])


def output_projections(model: torch.nn.Module) -> tuple[list[Projection], dict[str, str]]:
    """Every block's MLP output projection(s), blocks in order (a block may hold several:
    routed and shared experts), and the ones `watch` cannot see, with the reason."""
    tensors = layout.describe(model)
    found, skipped = [], {}
    for block, names in layout.mlp_output_projections(model).items():
        for name in names:
            t = tensors[name]
            if t.kind in WATCHABLE:
                found.append(Projection(block, t))
            else:
                skipped[name] = f"stored as {t.kind} {t.shape}, whose (row, col) orientation is unknown"
                log.warning("superweights skips %s: %s", name, skipped[name])
    if not found:
        raise ModelError(f"{type(model).__name__}: no MLP output projection that can be watched "
                         f"({', '.join(f'{n}: {why}' for n, why in skipped.items()) or 'none found in its blocks'})")
    return found, skipped


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
