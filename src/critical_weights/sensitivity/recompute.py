"""Activation checkpointing per transformer block, for `sensitivity.checkpointing`.

Each block keeps only its input for backward and runs its forward again when backward
reaches it, so the activations of one block (not of every block) exist at once. The
gradients are the same bits: the second forward is the same computation on the same inputs.
It costs one more forward of the blocks: 1.2x the time of forward+backward on the default model
(docs/performance-and-reproducibility.md, "Where the time and the memory go").
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from critical_weights.core.errors import ModelError
from critical_weights.model.layout import block_list


@contextmanager
def checkpointed_blocks(model: torch.nn.Module) -> Iterator[int]:
    """Within the context, every block of `layout.block_list` recomputes its forward in
    backward; yields the number of blocks. Hooks on modules inside a block run again in the
    recomputation (the `activations` watchers are inactive by then)."""
    path = block_list(model)
    if path is None:
        raise ModelError(f"sensitivity.checkpointing: {type(model).__name__} has no list of blocks to checkpoint; "
                         "set sensitivity.checkpointing false")
    blocks = list({id(b): b for b in model.get_submodule(path)}.values())  # a block listed twice is wrapped once
    before = [vars(block).get("forward") for block in blocks]  # accelerate's device hooks live there
    for block in blocks:
        block.forward = _recomputed(block.forward)  # an instance attribute over the class's forward
    try:
        yield len(blocks)
    finally:
        for block, forward in zip(blocks, before):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


def _recomputed(forward: Any) -> Any:
    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run
