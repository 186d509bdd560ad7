"""What flows into the weights during the pass over the texts: the input norms `wanda` needs,
and how often each expert's router picked it.

Both watch forward hooks over the real tokens only (padding excluded), and only while
`active`: off during backward, where checkpointed blocks (`sensitivity.checkpointing`) and
Hutchinson's recomputed logit chunks rerun part of the forward.

`wanda` covers every weight that multiplies an input:
- nn.Linear weights and MoE routers (weight (E, hidden)): the module's input;
- the output head: the base model's final hidden states over every real token;
- Conv1D (GPT-2, stored (in, out)): the module's input;
- fused experts (3-D, either orientation): per expert, the tokens the router sent to it, for
  the first projection (`gate_up_proj` or `up_proj`) those tokens' hidden states, for
  `down_proj` their intermediate activations, recomputed with the module's own gate.
Embeddings (looked up, not multiplied) and tensors of any other kind are skipped, with the reason.

The sums of squares are stored shaped to broadcast against the stored matrix view that
`critical_weights.sensitivity.scoring` scores (see scoring._input_rows): (in,) per column for
(out, in) weights; (in, 1) per row for Conv1D; (E * in, 1) per row for experts stored
(E, in, out); (E, 1, in) for experts stored (E, out, in).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from critical_weights.model import layout

EXPERTS_INTERFACE = ("has_gate", "has_bias", "is_transposed", "down_proj")  # transformers' experts decorator


def real_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The rows of `x` (B, T, d) or (B*T, d) that are real tokens, as (n, d)."""
    if mask is not None and x.ndim == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.bool()]
    if mask is not None and x.ndim == 2 and x.shape[0] == mask.numel():
        return x[mask.reshape(-1).bool()]
    return x.reshape(-1, x.shape[-1])


def _routed(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states (N, H), expert indices (N, k)) from an experts module's call."""
    values = [*args, *kwargs.values()]
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    index = next(v for v in values if isinstance(v, torch.Tensor) and not v.is_floating_point())
    return hidden, index


class _Watcher:
    """Forward hooks that count only while `active`, over the real tokens of `mask`."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None
        self.active = False
        self.handles: list[Any] = []

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class InputNorms(_Watcher):
    """Sum over real tokens of x_j^2 for the input feature j of every scored weight that
    multiplies an input; `skipped` names the others with the reason."""

    def __init__(self, model: torch.nn.Module, params: list[tuple[str, torch.nn.Parameter]]):
        super().__init__()
        self.act_sq: dict[str, torch.Tensor] = {}
        self.skipped: dict[str, str] = {}
        places = layout.describe(model, [n for n, _ in params])
        head = model.get_output_embeddings()
        embedding = model.get_input_embeddings().weight
        experts: dict[str, list[str]] = {}
        for name, p in params:
            kind, module_path = places[name].kind, name.rpartition(".")[0]
            module = model.get_submodule(module_path) if module_path else model
            if p is embedding or kind == "embedding":
                self.skipped[name] = "used as an embedding table, not only as a weight multiplying an input"
            elif kind in ("experts", "experts_in_out"):
                if not all(hasattr(module, a) for a in EXPERTS_INTERFACE):
                    self.skipped[name] = "an experts tensor without transformers' experts interface"
                    continue
                e, d_in = p.shape[0], places[name].n_in
                shape = (e, 1, d_in) if kind == "experts" else (e * d_in, 1)
                self.act_sq[name] = torch.zeros(shape, dtype=torch.float32, device=p.device)
                experts.setdefault(module_path, []).append(name)
            elif kind in ("linear", "conv1d") and not layout.is_bias(name):
                d_in = places[name].n_in
                self.act_sq[name] = torch.zeros((d_in,) if kind == "linear" else (d_in, 1), dtype=torch.float32, device=p.device)
                if head is not None and module is head:
                    # the loss applies the head to predicting positions only; its input over every
                    # real token is the base model's output
                    base = getattr(model, model.base_model_prefix)
                    self.handles.append(base.register_forward_hook(self._linear(name, output=True)))
                else:
                    self.handles.append(module.register_forward_pre_hook(self._linear(name)))
            else:
                self.skipped[name] = "not a weight that multiplies an input (nn.Linear, Conv1D, router or experts)"
        for module_path, names in experts.items():
            module = model.get_submodule(module_path)
            self.handles.append(module.register_forward_pre_hook(self._experts(module, names), with_kwargs=True))

    def _linear(self, name: str, output: bool = False) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, *out: Any) -> None:
            if not self.active:
                return
            x = out[0][0] if output else args[0]  # (B, T, in) or (n, in)
            x = real_rows(x.detach(), self.mask).float()  # (n, in)
            self.act_sq[name].view(-1).add_((x * x).sum(dim=0))

        return hook

    def _experts(self, module: torch.nn.Module, names: list[str]) -> Callable:
        first_attr = "gate_up_proj" if module.has_gate else "up_proj"
        by_attr = {n.rpartition(".")[2]: n for n in names}

        def hook(mod: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            if not self.active:
                return
            hidden, index = _routed(args, kwargs)
            hidden = real_rows(hidden.detach(), self.mask)  # (n, H)
            index = real_rows(index, self.mask)  # (n, k)
            with torch.no_grad():
                for e in index.unique().tolist():
                    if not 0 <= e < mod.num_experts:
                        continue  # expert-parallel sentinel
                    x = hidden[(index == e).any(dim=-1)]  # (n_e, H) the tokens sent to expert e
                    self._add(by_attr.get(first_attr), e, x)
                    if "down_proj" in by_attr:
                        self._add(by_attr["down_proj"], e, _intermediate(mod, first_attr, e, x))

        return hook

    def _add(self, name: str | None, expert: int, x: torch.Tensor) -> None:
        if name is None:
            return
        sq = x.float().square().sum(dim=0)  # (in,)
        acc = self.act_sq[name]
        if acc.ndim == 3:
            acc[expert, 0].add_(sq)  # (E, 1, in)
        else:
            acc.view(-1, sq.shape[0])[expert].add_(sq)  # (E * in, 1)


def _intermediate(module: torch.nn.Module, first_attr: str, e: int, x: torch.Tensor) -> torch.Tensor:
    """The input of expert e's down projection for tokens x (n_e, H), computed as transformers'
    experts implementations do: first projection, bias, then the module's own gate."""
    w = getattr(module, first_attr)[e]  # (out, H), or (H, out) when transposed
    h = x @ w if module.is_transposed else x @ w.T  # (n_e, out)
    if module.has_bias:
        h = h + getattr(module, f"{first_attr}_bias")[e]
    return module._apply_gate(h) if module.has_gate else module.act_fn(h)


class RouterPicks(_Watcher):
    """For every Mixture-of-Experts layer, how many real tokens the router sent to each expert."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.layers = layout.moe_layers(model)
        self.picks: dict[str, torch.Tensor] = {}  # experts module path -> (E,) int64
        self.tokens: dict[str, torch.Tensor] = {}  # experts module path -> () int64 real tokens seen
        for m in self.layers:
            module = model.get_submodule(m.experts)
            device = next(module.parameters()).device
            self.picks[m.experts] = torch.zeros(m.n_experts, dtype=torch.int64, device=device)
            self.tokens[m.experts] = torch.zeros((), dtype=torch.int64, device=device)
            self.handles.append(module.register_forward_pre_hook(self._hook(m.experts), with_kwargs=True))

    def _hook(self, path: str) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            if not self.active:
                return
            _, index = _routed(args, kwargs)
            index = real_rows(index, self.mask)  # (n, k)
            n = self.picks[path].numel()
            valid = index[(index >= 0) & (index < n)]
            self.picks[path].add_(torch.bincount(valid.reshape(-1), minlength=n))
            self.tokens[path].add_(index.shape[0])

        return hook
