"""Data parallelism under `torchrun`: each process takes a share of the micro-batches and
torch.distributed all-reduces the float32 sums (gloo on CPU, nccl on GPU).

Outside torchrun (no WORLD_SIZE in the environment) everything here is a no-op, so one
process gives the same result as many, to float tolerance.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(use_cuda: bool) -> None:
    """Join the process group that torchrun describes in the environment, if any."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")


def local_device(device: torch.device) -> torch.device:
    """Under torchrun on GPUs, each process uses the GPU of its local rank."""
    if device.type == "cuda" and world()[1] > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def all_reduce_sum(tensors: Iterable[torch.Tensor]) -> None:
    """Sum each tensor in place over every process."""
    if world()[1] == 1:
        return
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)


def all_reduce_float(value: float, device: torch.device) -> float:
    """Sum a host float over every process (float64)."""
    if world()[1] == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())


def is_main() -> bool:
    return world()[0] == 0


def finish() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
