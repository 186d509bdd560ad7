"""Host memory: hand large freed blocks back to the system at once.

glibc's malloc serves a block above its mmap threshold with its own mapping and unmaps it on
free, but it raises that threshold to the size of every such block freed (up to 32 MiB). A
stage that builds and drops a few MiB of temporaries per tensor, tensor after tensor, then
carves them from the heap, whose holes it rarely returns: on the default model the quantize
stage's choice of the kept weights grew the process by 0.8 GB that way. Fixing the threshold
(mallopt M_MMAP_THRESHOLD, which also stops the raising) keeps each such block a mapping of
its own. On a C library without mallopt this does nothing, and says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)
M_MMAP_THRESHOLD = -3  # glibc's malloc.h
THRESHOLD = 1 << 20  # bytes: blocks of 1 MiB and more get their own mapping


def unmap_large_blocks(threshold: int = THRESHOLD) -> bool:
    """Fix malloc's mmap threshold at `threshold` bytes; whether the C library took it."""
    name = ctypes.util.find_library("c")
    mallopt = getattr(ctypes.CDLL(name), "mallopt", None) if name else None
    if mallopt is None or mallopt(M_MMAP_THRESHOLD, threshold) != 1:
        log.info("memory: this C library has no mallopt(M_MMAP_THRESHOLD); freed temporaries may stay with the process")
        return False
    return True
