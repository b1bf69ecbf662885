"""Peak memory of one training step, measured in a fresh process from
/proc/self/status (VmHWM − VmRSS around the step, the peak reset through
/proc/self/clear_refs)."""
from __future__ import annotations

import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

from . import models as models_mod
from .peers import prepare, quiet


def _status_kb(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def trim_heap() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _clear_state(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None
        for attr in ("grad_sample", "batch_l2"):
            if getattr(p, attr, None) is not None:
                setattr(p, attr, None)


def measure_step_peak(model_name: str, candidate: str, samples: int = 3) -> float:
    """MB: peak resident memory of one step of `candidate` above what the
    process held before it (model, batch, libraries; gradients freed), in
    this process; the median over `samples` steps (one if a step takes over
    5 s). Run in a fresh process (see `peak_memory_mb`)."""
    with quiet():
        model, x, y, loss_fn = models_mod.build(model_name)
        prepared = prepare(candidate, model, x, y, loss_fn)
        for _ in range(prepared.warmup_steps - 1):
            prepared.step()                   # compiling
        t = time.perf_counter()
        prepared.step()                       # warm-up: one-time allocations
        slow = time.perf_counter() - t > 5.0
        peaks = []
        for _ in range(1 if slow else samples):
            _clear_state(model)
            trim_heap()
            base = _status_kb("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")                  # resets VmHWM to the current RSS
            prepared.step()
            peaks.append(_status_kb("VmHWM") - base)
    return statistics.median(peaks) / 1024


def peak_memory_mb(model_name: str, candidate: str, timeout: float = 600.0) -> float:
    """`measure_step_peak` in a fresh Python process (so that neither the
    allocator's cache nor the other candidates' tensors blur the number)."""
    pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    # A fixed mmap threshold: every allocation over 128 KiB is a mapping of its
    # own, returned to the OS when freed, so resident memory follows the live
    # allocations (scratch inside ops included) instead of glibc's adaptive
    # heap, whose reuse pattern would move the peak by ±10 MB from run to run.
    env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    code = ("import json, torch, warnings; warnings.simplefilter('ignore'); "
            f"torch.set_num_threads({torch.get_num_threads()}); "
            "from gradnoise.benchmarking.memory import measure_step_peak; "
            f"print('PEAK', json.dumps(measure_step_peak({model_name!r}, {candidate!r})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("PEAK "):
            return float(json.loads(line[5:]))
    raise RuntimeError(f"memory subprocess for {model_name}/{candidate} failed "
                       f"(exit {proc.returncode}): {proc.stderr.strip()[-600:]}")


def memory_supported() -> str | None:
    """None if step peaks can be measured here, else why not."""
    try:
        _status_kb("VmHWM")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except (OSError, RuntimeError) as e:
        return f"cannot reset the peak RSS here ({e})"
    return None
