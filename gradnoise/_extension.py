"""Loading of the compiled kernels, and what to tell the user when they are missing."""
from __future__ import annotations

import importlib
import warnings

import torch

REBUILD_COMMAND = 'python3 -m pip install --no-build-isolation -e .'

# name -> None when loaded, or the reason it is not usable
_status: dict[str, str | None] = {}
_warned = False


def _load(module: str) -> str | None:
    try:
        importlib.import_module(module)
        return None
    except Exception as exc:  # a broken build must not break `import gradnoise`
        return f"{type(exc).__name__}: {exc}"


def load_all() -> None:
    if _status:
        return
    _status["cpu"] = _load("gradnoise._C")
    if not torch.version.cuda:
        _status["cuda"] = "this torch build has no CUDA support"
    elif _status["cpu"] is not None:
        _status["cuda"] = "needs gradnoise._C, which did not load"
    else:
        _status["cuda"] = _load("gradnoise._C_cuda")


def compiled_status(name: str) -> str | None:
    """None if the compiled backend `name` ('cpu' or 'cuda') is loaded, else why not."""
    load_all()
    return _status[name]


def warn_missing_once() -> None:
    """Warn once per process that the reference implementation is used instead."""
    global _warned
    if _warned:
        return
    _warned = True
    warnings.warn(
        "gradnoise: the compiled CPU kernels did not load "
        f"({compiled_status('cpu')}); falling back to the slow pure-PyTorch reference. "
        f"Rebuild them from the repository root with: {REBUILD_COMMAND}",
        RuntimeWarning, stacklevel=3)


def build_info() -> str | None:
    if compiled_status("cpu") is not None:
        return None
    return torch.ops.gradnoise.build_info()
