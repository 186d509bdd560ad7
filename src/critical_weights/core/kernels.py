"""Which CPU kernels decide the rounding, pinned so that outputs are byte-identical across CPUs.

Float sums round differently under AVX2 and AVX-512 kernels, so on the CPU the same code
and params would give other bits on another machine. Before torch runs its first operation,
the package pins every library that picks kernels by CPU to AVX2, which every x86-64 CPU
of the last decade has:

- ATen's own vectorised kernels: ATEN_CPU_CAPABILITY=avx2;
- MKL (torch's BLAS on x86-64): MKL_CBWR=AVX2, its conditional numerical reproducibility;
- oneDNN: ONEDNN_MAX_CPU_ISA=AVX2.

A value already set in the environment wins. CRITICAL_WEIGHTS_CPU_KERNELS=native leaves all
three alone (the fastest kernels of this CPU, and outputs that reproduce only on CPUs like
it). GPUs are not affected. The manifest records what was in force (see `describe`).
"""

from __future__ import annotations

import os
from typing import Any

SWITCH = "CRITICAL_WEIGHTS_CPU_KERNELS"  # "avx2" (default) or "native"
PINNED = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def pin() -> None:
    """Pin the CPU kernels unless the user asked for native ones. Import-time, torch-free."""
    if os.environ.get(SWITCH, "avx2").lower() == "native":
        return
    for key, value in PINNED.items():
        os.environ.setdefault(key, value)


def describe() -> dict[str, Any]:
    """What decides the rounding on this run: kernels in force, BLAS, torch build, threads."""
    import torch

    return {
        "cpu_kernels": os.environ.get(SWITCH, "avx2").lower(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "environment": {key: os.environ.get(key) for key in PINNED},
        "blas": "mkl" if torch.backends.mkl.is_available() else "other",
        "torch": torch.__version__,
        "torch_git": torch.version.git_version,
        "threads": torch.get_num_threads(),
    }
