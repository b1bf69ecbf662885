"""Which backend runs an op, and why the others cannot."""
from __future__ import annotations

import importlib.util
import os

import torch

from .. import _extension

BACKENDS = ("cpu", "cuda", "triton", "reference")
ENV_VAR = "GRADNOISE_BACKEND"


def triton_status(device: torch.device | None = None) -> str | None:
    """None if Triton kernels can run on `device`, else why not."""
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if device is not None and device.type == "cpu" and not interpret:
        return "CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter)"
    if device is None and not interpret and not torch.cuda.is_available():
        return "no GPU, and TRITON_INTERPRET=1 is not set"
    return None


def backend_status(name: str, device: torch.device | None = None) -> str | None:
    """None if backend `name` can run on `device` (any device if None), else why not."""
    if name == "reference":
        return None
    if name == "triton":
        return triton_status(device)
    if name in ("cpu", "cuda"):
        why = _extension.compiled_status(name)
        if why is not None:
            return f"compiled {name} kernels not available ({why})"
        if device is not None and device.type != name:
            return f"inputs are on {device}, the {name} backend needs {name} tensors"
        if name == "cuda" and not torch.cuda.is_available():
            return "built, but no CUDA device is visible"
        return None
    raise ValueError(f"gradnoise: unknown backend {name!r}; choose one of {BACKENDS}")


#: the op families, by the shape of their work (docs/design.md §2): "linear_matrix" is
#: the Linear ops with positions (T > 1: the fused weight gradient and norms, the ghost
#: Gram products), matrix products, and so is "conv" off the CPU, where each group's
#: unfolded patches run through the Linear op (T = the output positions); the rest read
#: their inputs about once (T = 1 norms, norm layers, embeddings, reductions) and are
#: memory-bound.
OPS = ("linear_matrix", "linear_rows", "conv", "norm_layers", "embedding", "reductions")
MATRIX_OPS = frozenset({"linear_matrix", "conv"})


def default_backend(device_type: str, op: str, status) -> tuple[str, str]:
    """(backend, why) for op family `op` on a `device_type` device, given
    `status(backend)` -> None if it can run there, else why not.

    On CUDA devices matrix-shaped work goes to the Triton kernels, whose
    tl.dot runs on tensor cores (the CUDA C++ Linear kernel accumulates with
    FMAs on CUDA cores, a tenth of the bf16 tensor-core rate on an H100/H200);
    memory-bound work keeps the CUDA C++ kernels. On the CPU, the compiled
    CPU kernels. The pure-PyTorch reference is the fallback everywhere."""
    if op not in OPS:
        raise ValueError(f"gradnoise: unknown op family {op!r}; one of {OPS}")
    if device_type == "cuda":
        if op in MATRIX_OPS and status("triton") is None:
            return "triton", "matrix products on tensor cores (Triton tl.dot)"
        if status("cuda") is None:
            return "cuda", ("memory-bound: the CUDA kernels" if op not in MATRIX_OPS else
                            f"Triton unavailable ({status('triton')}): CUDA cores")
        if op in ("linear_matrix", "linear_rows", "conv", "norm_layers") and \
                status("triton") is None:
            return "triton", f"the CUDA kernels are unavailable ({status('cuda')})"
        return "reference", f"no compiled GPU kernels ({status('cuda')})"
    if device_type == "cpu" and status("cpu") is None:
        return "cpu", "the compiled CPU kernels"
    return "reference", ("no compiled kernels for this device" if device_type != "cpu" else
                         f"the compiled CPU kernels are unavailable ({status('cpu')})")


_RESOLVED: dict[tuple[str, str | None, str], str] = {}


def resolve_backend(device: torch.device, requested: str | None = None,
                    op: str = "linear_rows") -> str:
    """The backend for op family `op` on inputs on `device`: the requested one
    (argument, then GRADNOISE_BACKEND) or, by default, `default_backend`'s."""
    requested = requested or os.environ.get(ENV_VAR) or None
    # Called for every op on every step: a resolved choice is remembered
    # (what can run where does not change within a process).
    key = (device.type, requested, op)
    if key in _RESOLVED:
        return _RESOLVED[key]
    _RESOLVED[key] = be = _resolve(device, requested, op)
    return be


def _resolve(device: torch.device, requested: str | None, op: str) -> str:
    if requested is not None:
        requested = requested.lower()
        if requested not in BACKENDS:
            raise ValueError(
                f"gradnoise: unknown backend {requested!r} (from the `backend` argument or "
                f"{ENV_VAR}); choose one of {BACKENDS}")
        why = backend_status(requested, device)
        if why is not None:
            raise RuntimeError(f"gradnoise: backend {requested!r} cannot run: {why}")
        return requested
    be, _ = default_backend(device.type, op, lambda name: backend_status(name, device))
    if be == "reference" and device.type == "cpu":
        _extension.warn_missing_once()
    return be
