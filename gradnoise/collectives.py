"""Scalars all-reduced over the processes, on the device the process group's
backend takes: CPU tensors for gloo (and for a group that has a CPU backend
beside NCCL), the current CUDA device for NCCL alone, which takes no CPU
tensor."""
from __future__ import annotations

import torch
import torch.distributed as dist

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def world_size(group=None) -> int:
    """Processes in `group` (default: the world); 1 without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group)
    return 1


def collective_device(group=None) -> torch.device:
    """Where a tensor must be for a collective of `group`."""
    if str(dist.get_backend(group)) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(values, op: str = "sum", group=None, dtype=torch.float64) -> list:
    """`values` (numbers) reduced elementwise over `group` by "sum", "max" or
    "min", in one collective; returned as Python numbers (unchanged on one
    process)."""
    values = list(values)
    if world_size(group) == 1:
        return values
    t = torch.tensor(values, dtype=dtype, device=collective_device(group))
    dist.all_reduce(t, op=_OPS[op], group=group)
    return t.tolist()
