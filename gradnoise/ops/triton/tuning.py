"""Tile configurations of the fused Linear kernel, chosen by Triton's autotuner.

The autotuner times the configurations that survive `prune_fused_configs`
the first time it sees a key (d, p, T and the samples per split rounded to
powers of two, which norms and which outputs are computed, the dtypes) and
keeps the fastest for the life of the process. The sets:

- bf16 / fp16 (tensor cores, fp32 accumulation): 64–128-wide tiles with
  32–64 rows a step, 4–8 warps and 3–4 pipeline stages, the ranges that
  Hopper's and Ampere's mma/wgmma instructions fill;
- fp32: the same shapes at most 128 × 128 with 32 rows (IEEE products run on
  CUDA cores, TF32 on tensor cores when torch allows it);
- fp64: one small tile (no tensor cores, twice the registers);
- under the Triton interpreter: two tiny tiles, so that the tests exercise
  the choice and its workspace handling at a cost the interpreter can bear.

A tile wider than the problem (a 128-wide tile for p = 40) or taller than a
sample's rows (for the norms, 64 rows when T = 20) is pruned: it would do
masked work. The per-tile norm workspace is sized for the smallest tiles of
the dtype's set, and zeroed, so that any configuration fills part of it
correctly; the autotuner zeroes it again after timing the candidates.
"""
from __future__ import annotations

import time

import torch
import triton

from .common import INTERPRETED


def _config(block_p, block_d, block_t, warps, stages):
    return triton.Config({"BLOCK_P": block_p, "BLOCK_D": block_d, "BLOCK_T": block_t},
                         num_warps=warps, num_stages=stages)


HALF = [_config(128, 128, 64, 8, 3), _config(128, 128, 32, 4, 4), _config(128, 64, 64, 4, 4),
        _config(64, 128, 64, 4, 4), _config(64, 64, 64, 4, 4), _config(64, 64, 32, 4, 3)]
FLOAT = [_config(128, 128, 32, 8, 3), _config(128, 64, 32, 4, 3), _config(64, 64, 32, 4, 3),
         _config(64, 64, 16, 4, 3)]
DOUBLE = [_config(32, 32, 16, 4, 2)]
INTERPRETER = [_config(16, 16, 16, 1, 1), _config(32, 32, 16, 1, 1)]


def fused_configs() -> list:
    """Every configuration the fused kernel may take on this process's devices."""
    return INTERPRETER if INTERPRETED else HALF + FLOAT + DOUBLE


def min_tile(dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_D) of the smallest tiles `dtype`'s configurations
    take: the workspace's tile count, and the programs a launch has at most."""
    family = _family(dtype)
    return (min(c.kwargs["BLOCK_P"] for c in family),
            min(c.kwargs["BLOCK_D"] for c in family))


def _family(dtype: torch.dtype) -> list:
    if INTERPRETED:
        return INTERPRETER
    if dtype == torch.float64:
        return DOUBLE
    return HALF if dtype in (torch.float16, torch.bfloat16) else FLOAT


def _fits(extent: int, block: int, smallest: int) -> bool:
    """A tile no wider than the problem rounded up to a power of two."""
    return block <= max(smallest, triton.next_power_of_2(max(extent, 1)))


def prune_fused_configs(configs, named_args, **kwargs) -> list:
    """The configurations of the input's dtype whose tiles fit the problem."""
    family = _family(named_args["x_ptr"].dtype)
    smallest_p = min(c.kwargs["BLOCK_P"] for c in family)
    smallest_d = min(c.kwargs["BLOCK_D"] for c in family)
    smallest_t = min(c.kwargs["BLOCK_T"] for c in family)
    rows = named_args["T"] * (1 if kwargs.get("COMPUTE_NORMS") else named_args["B"])
    ours = {id(c) for c in family}  # by identity: a Config compares equal by its values
    kept = [c for c in configs if id(c) in ours
            and _fits(named_args["p"], c.kwargs["BLOCK_P"], smallest_p)
            and _fits(named_args["d"], c.kwargs["BLOCK_D"], smallest_d)
            and _fits(rows, c.kwargs["BLOCK_T"], smallest_t)]
    if kept:
        return kept
    return [min(family, key=lambda c: (c.kwargs["BLOCK_P"] * c.kwargs["BLOCK_D"],
                                       c.kwargs["BLOCK_T"]))]


def _wall_clock_bench(kernel_call, quantiles):
    """The interpreter's stand-in for Triton's GPU benchmarker: one timed call."""
    kernel_call()
    start = time.perf_counter()
    kernel_call()
    ms = (time.perf_counter() - start) * 1e3
    return [ms] * len(quantiles) if quantiles else ms


def benchmarker():
    """Triton's own GPU benchmarker (None), or wall clock under the interpreter."""
    return _wall_clock_bench if INTERPRETED else None
