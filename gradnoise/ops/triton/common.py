"""Helpers the Triton launchers share: whether the kernels run under the
interpreter, sizes of the launch grid, dtypes, and the device a launch
runs on."""
from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _probe():
    pass


#: whether kernels run on CPU tensors under the Triton interpreter
#: (TRITON_INTERPRET=1 set before triton's kernels were defined)
INTERPRETED = type(_probe).__name__ == "InterpretedFunction"


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """The device's streaming multiprocessors; under the interpreter, which
    runs programs one by one, a small nominal 2, so that the paths that split
    work over programs are exercised by small inputs."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def tl_dtype(dtype: torch.dtype):
    """The Triton accumulation dtype for a torch accumulation dtype."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def on_device(device: torch.device):
    """A context that makes `device` current for a launch (none needed on CPU)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def check_device(x: torch.Tensor, module: str) -> None:
    """Refuse CPU tensors unless the kernels run under the interpreter."""
    if x.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            "gradnoise: the Triton kernels were compiled for a GPU, but the inputs are CPU "
            f"tensors; set TRITON_INTERPRET=1 before {module} is first imported to run them "
            "under the Triton interpreter, or use another backend")
