"""The GPU benchmarks of `python -m gradnoise gpu-check`: each Linear op against
cuBLAS's weight-gradient GEMM, and whole training steps of transformers models
in bf16 autocast, timed with CUDA events.

Targets (docs/design.md §2, for an H100/H200 in bf16): the weight gradient
with its norms ≤ 1.10× cuBLAS's GEMM at T ≥ 512; a step with layers="all"
≤ 1.10× the plain step; layers="norm" ≤ 1.02×. A result that disagrees with
cuBLAS's gradient or with float64 norms raises: a fast wrong kernel is a
failure, not a row of the table.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from .. import ops
from ..ops import fusion
from ..ops.backends import backend_status, resolve_backend
from ..ops.linear import op_family
from .linear import SHAPES as CPU_SHAPES

#: the CPU benchmark's Linear shapes and two LLM layers: (B, T, d, p) of a
#: 4096-wide attention projection and of its 14336-wide MLP, at T = 2048
LLM_SHAPES = [(8, 2048, 4096, 4096), (8, 2048, 4096, 14336)]
KERNEL_TARGET = 1.10          # weight gradient + norms / cuBLAS GEMM, bf16, T ≥ 512
STEP_TARGETS = {"gradnoise all": 1.10, "gradnoise norm": 1.02}


class KernelMismatch(AssertionError):
    """A GPU kernel's result disagrees with cuBLAS's."""


def cuda_time_ms(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median milliseconds of `fn` over `repeats` runs, by CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


@dataclass
class KernelRow:
    shape: tuple
    dtype: str
    cublas_ms: float
    tflops: float                                  # cuBLAS's GEMM rate
    ratios: dict = field(default_factory=dict)     # candidate -> time / cuBLAS GEMM
    tracker_path: str = ""                         # what the tracker's op ran: fused / separate

    @property
    def target(self) -> float | None:
        return KERNEL_TARGET if self.dtype == "bfloat16" and self.shape[1] >= 512 else None

    def to_dict(self) -> dict:
        return asdict(self) | {"target": self.target}


def _usable(device: torch.device) -> list[str]:
    return [be for be in ("triton", "cuda") if backend_status(be, device) is None]


def _check(name: str, got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    """|got − want| ≤ rtol · max|want| elementwise, else KernelMismatch."""
    scale = want.float().abs().max().item() or 1.0
    err = (got.float() - want.float()).abs().max().item()
    if not err <= rtol * scale:  # also catches NaN
        raise KernelMismatch(f"{name}: max error {err:.3g} > {rtol:g} × {scale:.3g}")


def _float64_norms(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """‖dY_iᵀ X_i‖²_F per sample from torch's float64 GEMM, one sample at a
    time (‖x_i‖²‖dy_i‖² for T = 1): independent of every gradnoise kernel."""
    if x.dim() == 2:
        return x.double().square().sum(1) * g.double().square().sum(1)
    return torch.stack([(g[i].double().T @ x[i].double()).square().sum()
                        for i in range(x.shape[0])])


def bench_linear(B: int, T: int, d: int, p: int, dtype: torch.dtype, repeats: int = 10,
                 device: torch.device | str = "cuda") -> KernelRow:
    """One shape: cuBLAS's weight-gradient GEMM; each backend's fused weight
    gradient + norms and its norms alone; and the op the tracker calls
    (gradnoise.ops.fusion's choice). Each is checked first: gradients against
    cuBLAS's, norms against per-sample float64 GEMMs."""
    device = torch.device(device)
    gen = torch.Generator(device).manual_seed(0)
    shape = (B, T) if T > 1 else (B,)
    x = torch.randn(*shape, d, generator=gen, device=device, dtype=dtype)
    g = torch.randn(*shape, p, generator=gen, device=device, dtype=dtype)
    x2, g2 = x.reshape(-1, d), g.reshape(-1, p)
    reference_grad = g2.T @ x2
    reference_norms = _float64_norms(x, g)
    grad_rtol = 1e-4 if dtype == torch.float32 else 2.0 ** -6
    candidates = {"cuBLAS GEMM": lambda: g2.T @ x2}
    for be in _usable(device):
        norms = ops.linear_sq_norms(x, g, backend=be)
        _check(f"norms[{be}] {B, T, d, p} {dtype}", norms, reference_norms, 1e-3)
        candidates[f"norms[{be}]"] = lambda be=be: ops.linear_sq_norms(x, g, backend=be)
        if T > 1:
            gw, _, n = ops.linear_weight_grad_and_sq_norms(x, g, method="fused", backend=be)
            _check(f"fused[{be}] grad {B, T, d, p} {dtype}", gw, reference_grad, grad_rtol)
            _check(f"fused[{be}] norms {B, T, d, p} {dtype}", n, reference_norms, 1e-3)
            candidates[f"fused[{be}]"] = lambda be=be: ops.linear_weight_grad_and_sq_norms(
                x, g, method="fused", backend=be)
    gw, _, n = ops.linear_weight_grad_and_sq_norms(x, g)
    _check(f"tracker op grad {B, T, d, p} {dtype}", gw, reference_grad, grad_rtol)
    _check(f"tracker op norms {B, T, d, p} {dtype}", n, reference_norms, 1e-3)
    candidates["tracker op"] = lambda: ops.linear_weight_grad_and_sq_norms(x, g)
    times = {name: cuda_time_ms(fn, repeats) for name, fn in candidates.items()}
    gemm = times.pop("cuBLAS GEMM")
    be = resolve_backend(device, None, op_family(x))
    path = fusion.chosen_path(be, x, B, T, d, p, with_bias=False) or "not probed"
    return KernelRow((B, T, d, p), str(dtype).removeprefix("torch."), gemm,
                     2 * B * T * d * p / gemm / 1e9, {k: v / gemm for k, v in times.items()}, path)


@dataclass
class StepRow:
    model: str
    description: str
    plain_ms: float
    ratios: dict = field(default_factory=dict)   # candidate -> step time / plain step

    def to_dict(self) -> dict:
        return asdict(self) | {"targets": STEP_TARGETS}


def gpu_models(quick: bool = False) -> dict[str, tuple]:
    """(builder arguments, description) of the step benchmark's transformers
    models: GPT-2 and Llama at d = 1024, 8 layers, T = 1024, B = 8 (smaller
    with `quick`)."""
    width, blocks, context, batch = (256, 2, 256, 4) if quick else (1024, 8, 1024, 8)
    kw = dict(width=width, blocks=blocks, context=context, batch=batch, vocab=8192,
              heads=width // 64)
    text = f"d={width} {blocks} layers, T={context}, B={batch}, bf16 autocast"
    return {"gpt2": (kw, f"transformers GPT-2 {text}"),
            "llama": (kw, f"transformers Llama {text}")}


def bench_steps(name: str, kw: dict, description: str, repeats: int = 10) -> StepRow:
    """Forward and backward of one transformers model on the GPU in bf16
    autocast: plain, then tracked with layers="all" and with layers="norm"."""
    from ..tracker import GradNoiseTracker
    from .models import build_transformers
    model, ids, labels, loss_fn = build_transformers(name, **kw)
    model = model.cuda()
    ids, labels = ids.cuda(), labels.cuda()

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model(ids), labels)
        loss.backward()

    plain = cuda_time_ms(step, repeats, warmup=3)
    ratios = {}
    for candidate, layers in (("gradnoise all", "all"), ("gradnoise norm", "norm")):
        with GradNoiseTracker(model, loss_reduction="mean", layers=layers) as tracker:
            ratios[candidate] = cuda_time_ms(step, repeats, warmup=3) / plain
            norms = tracker.per_sample_sq_norms()
        if not torch.isfinite(norms).all() or norms.shape != (ids.shape[0],):
            raise KernelMismatch(f"{name} / {candidate}: per-sample norms {norms}")
    # the plain step again, after the tracked ones: a drift in clocks shows here
    ratios["plain, again"] = cuda_time_ms(step, repeats, warmup=1) / plain
    return StepRow(name, description, plain, ratios)


def kernel_cases(quick: bool = False) -> list[tuple]:
    shapes = CPU_SHAPES[:2] if quick else CPU_SHAPES + LLM_SHAPES
    return [(shape, dtype) for dtype in (torch.bfloat16, torch.float32) for shape in shapes]
