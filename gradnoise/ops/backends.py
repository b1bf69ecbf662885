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


_RESOLVED: dict[tuple[str, str | None], str] = {}


def resolve_backend(device: torch.device, requested: str | None = None) -> str:
    """The backend for inputs on `device`: the requested one (argument, then
    GRADNOISE_BACKEND) or, by default, the compiled kernels of that device
    with the pure-PyTorch reference as the fallback."""
    requested = requested or os.environ.get(ENV_VAR) or None
    # Called for every op on every step: a resolved choice is remembered
    # (what can run where does not change within a process).
    key = (device.type, requested)
    if key in _RESOLVED:
        return _RESOLVED[key]
    _RESOLVED[key] = be = _resolve(device, requested)
    return be


def _resolve(device: torch.device, requested: str | None) -> str:
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
    if device.type in ("cpu", "cuda") and backend_status(device.type, device) is None:
        return device.type
    if device.type == "cuda" and triton_status(device) is None:
        return "triton"
    if device.type == "cpu":
        _extension.warn_missing_once()
    return "reference"
