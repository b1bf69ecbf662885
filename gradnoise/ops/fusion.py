"""Whether a Linear layer's or a convolution's weight gradient comes from the
fused kernel or from the vendor's kernel with the norms computed beside it
(docs/design.md §2).

The fused kernel (the weight-gradient GEMM with its reduction ordered by
sample, squaring each sample's tile at the sample boundary) costs 2BTdp + 4Bdp
flops against the GEMM's 2BTdp, so where it runs as fast as the vendor's GEMM
it makes the norms almost free. Where it does not (a Triton tile loop against
cuBLAS's tuned kernels on some shapes, the CPU engine against MKL on
others), the step would be slower than the simple alternative: the vendor's
weight gradient (torch's GEMM; for a convolution aten.convolution_backward,
cuDNN or oneDNN) and a separate norms pass, Goodfellow's for T = 1 and the
ghost norm or the fused norms-only kernel for T > 1. So the fused path is
taken only where it was measured to be at least as fast as that alternative
on this device, for this shape and dtype:

- a Linear layer with T = 1: always the vendor's GEMM (the norms are
  ‖x_i‖²‖dy_i‖², O(B(d + p)));
- the reference backend: the vendor's kernel (it has no kernel of its own);
- an empty problem: the backend's op, which returns zeros of the right shapes;
- otherwise a probe times both paths on the call's own tensors the first time
  a key is seen and caches the winner for the life of the process. The key:
  the op (a convolution's geometry and memory format), device, backend,
  dtype, B and T rounded up to powers of two, d, p, bias, and the settings
  that change either path's speed (float32 matmul precision; on GPUs cuDNN's
  TF32, benchmark and deterministic flags; on the CPU threads, instruction
  set and oneDNN). The alternative wins ties. Where a probe cannot run
  (inside a CUDA graph capture or a torch.compile trace), the alternative is
  taken, uncached: run a step of each shape before capturing a CUDA graph, as
  torch asks anyway, so that the probes and Triton's autotuner (which times
  its tiles on a shape's first call) have run.

GRADNOISE_WEIGHT_GRAD=fused or =separate forces one path (=auto, the default,
probes). :func:`decisions` lists what was measured, for reports.
"""
from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch

ENV_VAR = "GRADNOISE_WEIGHT_GRAD"
MODES = ("auto", "fused", "separate")

#: a probe stops repeating once it has spent this long on one path
_PROBE_BUDGET_S = 0.02
_PROBE_MAX_REPEATS = 5


@dataclass(frozen=True)
class Decision:
    """One measured choice: the key, the two paths' best times in ms, the winner."""
    device: str
    backend: str
    dtype: str
    shape: tuple  # (B, T, d, p)
    with_bias: bool
    fused_ms: float
    separate_ms: float
    path: str
    op: str = "linear"  # or "conv<geometry>"

    @property
    def ratio(self) -> float:
        """fused time / separate time (< 1: the fused kernel is faster)."""
        return self.fused_ms / self.separate_ms if self.separate_ms > 0 else float("inf")


_DECISIONS: dict[tuple, Decision] = {}


def mode() -> str:
    value = (os.environ.get(ENV_VAR) or "auto").lower()
    if value not in MODES:
        raise ValueError(f"gradnoise: {ENV_VAR}={value!r} is not one of {MODES}")
    return value


def decisions() -> list[Decision]:
    """The probes run so far in this process, in the order they ran."""
    return list(_DECISIONS.values())


def clear() -> None:
    """Forget the measured choices (the next call of each shape probes again)."""
    _DECISIONS.clear()


@functools.lru_cache(maxsize=None)
def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def _cannot_probe(device: torch.device) -> bool:
    if torch.compiler.is_compiling():
        return True
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def weight_grad_path(backend: str, x: torch.Tensor, B: int, T: int, d: int, p: int,
                     with_bias: bool, fused: Callable[[], object],
                     separate: Callable[[], object], op: str = "linear") -> str:
    """"fused" or "separate" for this call; `fused()` and `separate()` run the
    two paths on the call's tensors (the probe times them). For a convolution
    (`op` naming its geometry) T is its output positions, d = C_in/G·k and
    p = C_out/G, and "separate" is torch's convolution weight gradient (cuDNN,
    oneDNN) with the norms-only op."""
    fixed = _fixed_path(backend, x, B, T, d, p, op)
    if fixed is not None:
        return fixed
    key = _key(backend, x, B, T, d, p, with_bias, op)
    known = _DECISIONS.get(key)
    if known is not None:
        return known.path
    if _cannot_probe(x.device):
        return "separate"
    fused_ms, separate_ms = _time_pair(fused, separate, x.device)
    path = "fused" if fused_ms < separate_ms else "separate"
    _DECISIONS[key] = Decision(key[0], backend, str(x.dtype).replace("torch.", ""), (B, T, d, p),
                               with_bias, fused_ms, separate_ms, path, op)
    return path


def chosen_path(backend: str, x: torch.Tensor, B: int, T: int, d: int, p: int,
                with_bias: bool, op: str = "linear") -> str | None:
    """The path such a call takes now, by rule or by an earlier probe (None:
    it has not been probed), without running anything: for reports."""
    fixed = _fixed_path(backend, x, B, T, d, p, op)
    if fixed is not None:
        return fixed
    known = _DECISIONS.get(_key(backend, x, B, T, d, p, with_bias, op))
    return None if known is None else known.path


def _fixed_path(backend, x, B, T, d, p, op) -> str | None:
    """The path that a setting or the problem fixes, or None (the probe decides)."""
    forced = mode()
    if forced != "auto":
        return forced
    if backend == "reference":
        return "separate"
    if B * T * d * p == 0:
        return "fused"
    if T == 1 and op == "linear":
        return "separate"
    if backend == "triton" and x.device.type == "cpu":
        return "fused"  # the Triton interpreter: correctness runs, where timing means nothing
    return None


def _key(backend, x, B, T, d, p, with_bias, op) -> tuple:
    return (_device_name(x.device), backend, x.dtype, _bucket(B), _bucket(T), d, p, with_bias,
            _speed_settings(x.device), op)


def _bucket(n: int) -> int:
    """n rounded up to a power of two: B changes as the batch grows and T with
    each batch's padding, and one probe per bucket is enough to rank the paths."""
    return 1 << max(0, n - 1).bit_length()


def _speed_settings(device: torch.device) -> tuple:
    """What changes either path's speed besides the shape: torch's float32
    matmul precision (TF32 on GPUs), cuDNN's flags, and on the CPU the thread
    count, the instruction set the compiled kernels were told to use and
    whether oneDNN runs the convolutions."""
    precision = torch.get_float32_matmul_precision()
    if device.type == "cpu":
        return (precision, torch.get_num_threads(), os.environ.get("GRADNOISE_CPU_ISA"),
                torch.backends.mkldnn.enabled)
    cudnn = torch.backends.cudnn
    return precision, cudnn.allow_tf32, cudnn.benchmark, cudnn.deterministic


def _time_pair(first: Callable, second: Callable, device: torch.device) -> tuple[float, float]:
    """Best-of-n wall times (ms) of two callables, alternated so that drifts in
    clock speed or cache state touch both alike; one untimed run each first
    (Triton compiles on its first call)."""
    first(), second()
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    best = [float("inf"), float("inf")]
    spent = [0.0, 0.0]
    for _ in range(_PROBE_MAX_REPEATS):
        for k, fn in enumerate((first, second)):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            elapsed = time.perf_counter() - start
            best[k] = min(best[k], elapsed)
            spent[k] += elapsed
        if max(spent) > _PROBE_BUDGET_S:
            break
    return best[0] * 1e3, best[1] * 1e3
