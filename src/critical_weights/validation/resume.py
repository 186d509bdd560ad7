"""Measuring one text set many times under perturbations, without recomputing what they cannot change.

A perturbation confined to blocks s, s+1, ... leaves the hidden states that enter block s
exactly as the unperturbed model computes them. `Resumable` keeps them from its first,
unperturbed pass (the baseline), micro-batch by micro-batch, and a later measurement that
starts at block s hands them back in place of blocks 0..s-1: for that pass each of those
blocks is replaced by a stub that returns the kept output of block s-1. Everything else is
the model's own code: the embedding, the masks and rotary tables, blocks s and later, the
final norm and the head. The kept tensors are the same bits and blocks s and later do the same
computation on them, so the loss and the top-1 predictions are the same bits as a full pass.
That is checked, not assumed: the first measurement that starts at each block also runs its
shortest micro-batch in full and compares; on any difference the text set is never resumed
again (every block runs), and the log says so.

Which block a measurement may start at is `first_block`: the lowest block holding a touched
parameter, and 0 (every block runs) as soon as one touched parameter lies outside the blocks
(the embedding, a tied head, the final norm).

Memory: the outputs of every block are kept when they fit KEEP_BYTES for the text set; past
that only every r-th block's, and a measurement resumes from the nearest kept block at or
before its start. On the default model (30 blocks, 576 hidden, 16 texts) that is about 160 MB
per text set, every block kept.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from critical_weights.model.layout import block_list, place
from critical_weights.sensitivity.batching import make_batches
from critical_weights.sensitivity.loss import loss_sum_and_top1, pad_batch

log = logging.getLogger(__name__)

KEEP_BYTES = 1 << 30  # kept hidden states per text set, at most


def _blocks(model: torch.nn.Module) -> tuple[str | None, list[torch.nn.Module]]:
    """The block list's path and its blocks; none when a block module is listed twice (a
    stub would stand in for it at its later place too)."""
    path = block_list(model)
    if path is None:
        return None, []
    blocks = list(model.get_submodule(path))
    return (path, blocks) if len({id(b) for b in blocks}) == len(blocks) else (None, [])


def first_block(model: torch.nn.Module, parameters: Iterable[str]) -> int:
    """The first block a change to `parameters` can reach: their lowest block index; 0 when any
    of them lies outside the blocks, or the model's blocks cannot be stood in for."""
    path, blocks = _blocks(model)
    if not blocks:
        return 0
    base = getattr(model, "base_model_prefix", "") or ""
    start = len(blocks)
    for name in parameters:
        block, _ = place(name, path, base)
        if block is None:
            return 0
        start = min(start, block)
    return start if start < len(blocks) else 0


def _clone(out: Any) -> Any:
    """A copy of a block's output (a tensor, or a tuple or list holding tensors)."""
    if isinstance(out, torch.Tensor):
        return out.detach().clone()
    if isinstance(out, (tuple, list)):
        return type(out)(_clone(o) for o in out)
    return out


def _same(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> bool:
    """Two (loss sum, top-1) results hold the same bits."""
    return bool(a[0].view(torch.int32) == b[0].view(torch.int32)) and torch.equal(a[1], b[1])


class Resumable:
    """One text set with its batching, measured first unperturbed (`baseline`), then under
    perturbations from any block (`measure`)."""

    def __init__(self, model: torch.nn.Module, input_ids: Sequence[Sequence[int]], micro_batch_size: int,
                 batch_tokens: int = 0, keep_bytes: int = KEEP_BYTES):
        self.model, self.input_ids = model, [list(s) for s in input_ids]
        self.batches = make_batches([len(s) for s in input_ids], micro_batch_size, batch_tokens)
        _, self.blocks = _blocks(model)
        hidden = model.get_input_embeddings().weight.shape[-1]
        itemsize = model.get_input_embeddings().weight.element_size()
        per_block = sum(len(b) * max(len(self.input_ids[i]) for i in b) for b in self.batches) * hidden * itemsize
        self.every = max(1, -(-per_block * len(self.blocks) // keep_bytes)) if per_block else 1
        self.kept: dict[int, list[Any]] = {}  # block s -> per micro-batch, the output of block s-1
        self.checked: set[int] = set()  # starts whose first micro-batch matched a full pass
        self.refused = False  # True once a start did not: every block runs from then on
        self.device = model.get_input_embeddings().weight.device

    def _kept_start(self, start: int) -> int:
        """The nearest block at or before `start` whose input is kept (0: none)."""
        s = start - start % self.every
        return 0 if self.refused or s not in self.kept else s

    def baseline(self) -> tuple[float, torch.Tensor]:
        """The unperturbed loss and top-1 predictions; keeps the block inputs on the way."""
        keep = [s for s in range(self.every, len(self.blocks), self.every)]
        self.kept = {s: [] for s in keep}
        hooks = [self.blocks[s - 1].register_forward_hook(self._keeper(s)) for s in keep]
        try:
            return self._run(0)
        finally:
            for h in hooks:
                h.remove()

    def _keeper(self, start: int) -> Callable:
        def hook(module: torch.nn.Module, args: Any, out: Any) -> None:
            self.kept[start].append(_clone(out))

        return hook

    def measure(self, start: int = 0) -> tuple[float, torch.Tensor]:
        """The loss and top-1 predictions of the model as it is now, which must differ from the
        baseline's only in blocks `start` and later (`first_block`)."""
        s = self._kept_start(start)
        if s and s not in self.checked:
            last = len(self.batches) - 1  # the shortest micro-batch: the cheapest check
            if not _same(self._batch(last, 0), self._batch(last, s)):
                self.refused = True
                log.warning("resuming %s at block %d does not reproduce its full forward pass bit for bit; "
                            "every measurement of this text set runs every block", type(self.model).__name__, s)
                return self._run(0)
            self.checked.add(s)
        return self._run(s)

    def _run(self, start: int) -> tuple[float, torch.Tensor]:
        total, n, top1 = 0.0, 0, []
        for b in range(len(self.batches)):
            part, top = self._batch(b, start)
            total += float(part.double())
            n += sum(len(self.input_ids[i]) - 1 for i in self.batches[b])
            top1.append(top.cpu())
        return total / n, torch.cat(top1)

    def _batch(self, b: int, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = pad_batch([self.input_ids[i] for i in self.batches[b]], self.device)  # (B, T) int64
        with torch.no_grad(), self._from(start, b):
            return loss_sum_and_top1(self.model, ids, mask)

    @contextmanager
    def _from(self, start: int, b: int) -> Iterator[None]:
        """Blocks 0..start-1 stand aside for this micro-batch: each returns block start-1's kept output."""
        if not start:
            yield
            return
        kept = self.kept[start][b]
        stubbed = self.blocks[:start]
        before = [vars(block).get("forward") for block in stubbed]  # accelerate's device hooks live there
        for block in stubbed:
            block.forward = lambda *args, **kwargs: _clone(kept)
        try:
            yield
        finally:
            for block, forward in zip(stubbed, before):
                if forward is None:
                    del block.forward
                else:
                    block.forward = forward

