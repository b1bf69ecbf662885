"""`python -m gradnoise gpu-check`: everything that needs an NVIDIA GPU, in one
command that finishes within 10 minutes on one H100/H200:

1. build: the CUDA extension, compiled for this GPU's architecture, and
   loaded in a fresh process (a failure to build or load ends the check);
2. tests: tests/test_gpu.py on the GPU, with GRADNOISE_REQUIRE_GPU=1 so that
   a CUDA or Triton kernel that cannot run fails instead of skipping;
3. kernels: each Linear op against cuBLAS's weight-gradient GEMM, bf16 and
   fp32, at the CPU benchmark's shapes and two LLM layers
   (gradnoise.benchmarking.gpu), each result checked first (gradients against
   cuBLAS's, norms against per-sample float64 GEMMs);
4. steps: forward and backward of transformers GPT-2 and Llama in bf16
   autocast, plain, layers="all" and layers="norm".

It writes gpu-check.json and prints a short table. The exit status is 0 only
when every stage ran and passed; missed speed targets are reported, not
failures. Without a CUDA device it exits with status 2 and says so.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
_BUILT = "GRADNOISE_GPU_CHECK_BUILT"  # the build's record, handed to the stages after it


class StageFailed(RuntimeError):
    pass


def _environment() -> dict:
    props = torch.cuda.get_device_properties(0)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"gpu": props.name, "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1), "sms": props.multi_processor_count,
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
            "python": platform.python_version()}


def _run(cmd: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=REPO, env={**os.environ, **(env or {})}, timeout=timeout,
                              capture_output=True, text=True)
    except subprocess.TimeoutExpired as e:
        raise StageFailed(f"`{' '.join(cmd)}` ran past {timeout:.0f} s") from e


def build(console: Console, timeout: float = 300) -> dict:
    """Compile the extensions in place with CUDA for this GPU, then load them
    in a fresh process."""
    if not (REPO / "setup.py").exists():
        raise StageFailed(f"no setup.py beside the package ({REPO}): gpu-check builds from a "
                          "source checkout (pip install -e .)")
    props = torch.cuda.get_device_properties(0)
    env = {"TORCH_CUDA_ARCH_LIST": f"{props.major}.{props.minor}",
           "MAX_JOBS": str(os.cpu_count() or 4), "GRADNOISE_NO_CUDA": "0"}
    done = _run([sys.executable, "setup.py", "build_ext", "--inplace"], timeout, env)
    if done.returncode != 0:
        raise StageFailed("building the extensions failed:\n" + done.stderr[-4000:])
    probe = _run([sys.executable, "-c", "from gradnoise import _extension as e; "
                  "print(e.compiled_status('cuda') or 'ok')"], 120)
    status = probe.stdout.strip().splitlines()[-1] if probe.stdout.strip() else probe.stderr
    if probe.returncode != 0 or status != "ok":
        raise StageFailed(f"the CUDA extension was built but does not load: {status}")
    return {"arch": env["TORCH_CUDA_ARCH_LIST"]}


def tests(console: Console, out: Path, timeout: float = 330) -> dict:
    """tests/test_gpu.py on the GPU, skips turned into failures."""
    report = out / "gpu-tests.xml"
    env = {"GRADNOISE_REQUIRE_GPU": "1", "TRITON_INTERPRET": "0"}
    done = _run([sys.executable, "-m", "pytest", "tests/test_gpu.py", "-q", "-p",
                 "no:cacheprovider", f"--junitxml={report}"], timeout, env)
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if report.exists():
        suite = ElementTree.parse(report).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in counts}
    if done.returncode != 0 or counts["tests"] == 0 or counts["skipped"]:
        raise StageFailed(f"GPU tests failed ({counts}):\n" + done.stdout[-6000:])
    return counts


def kernels(console: Console, quick: bool) -> list[dict]:
    from .benchmarking.gpu import bench_linear, kernel_cases
    from .ops.backends import backend_status
    missing = {be: backend_status(be, torch.device("cuda")) for be in ("cuda", "triton")}
    missing = {be: why for be, why in missing.items() if why is not None}
    if missing:  # a backend that cannot run would drop out of the table unseen
        raise StageFailed("GPU backends that cannot run: " + "; ".join(
            f"{be}: {why}" for be, why in missing.items()))
    rows = []
    for (B, T, d, p), dtype in kernel_cases(quick):
        console.print(f"  kernels {B, T, d, p} {str(dtype).removeprefix('torch.')}")
        rows.append(bench_linear(B, T, d, p, dtype, repeats=5 if quick else 10).to_dict())
        torch.cuda.empty_cache()
    return rows


def steps(console: Console, quick: bool) -> list[dict]:
    from .benchmarking.gpu import bench_steps, gpu_models
    rows = []
    for name, (kw, description) in gpu_models(quick).items():
        console.print(f"  steps {description}")
        rows.append(bench_steps(name, kw, description, repeats=5 if quick else 10).to_dict())
        torch.cuda.empty_cache()
    return rows


def _tables(result: dict, console: Console) -> None:
    kernel_rows = result.get("kernels") or []
    if kernel_rows:
        names = sorted({k for r in kernel_rows for k in r["ratios"]})
        table = Table(title=f"Linear ops / cuBLAS weight-gradient GEMM on {result['env']['gpu']}")
        for col in ["B, T, d, p", "dtype", "GEMM ms", "TFLOP/s", *names, "tracker path"]:
            table.add_column(col, justify="right")
        for r in kernel_rows:
            cells = []
            for n in names:
                v = r["ratios"].get(n)
                miss = n == "tracker op" and r["target"] and v > r["target"]
                cells.append("—" if v is None else f"[{'red' if miss else 'default'}]{v:.2f}×")
            table.add_row(",".join(map(str, r["shape"])), r["dtype"], f"{r['cublas_ms']:.3f}",
                          f"{r['tflops']:.0f}", *cells, r["tracker_path"])
        console.print(table)
    step_rows = result.get("steps") or []
    if step_rows:
        table = Table(title="training steps (forward + backward) / the plain step")
        for col in ["model", "plain ms", "gradnoise all", "gradnoise norm", "plain, again"]:
            table.add_column(col, justify="right")
        for r in step_rows:
            table.add_row(r["description"], f"{r['plain_ms']:.1f}",
                          *(f"{r['ratios'][k]:.3f}×" for k in
                            ("gradnoise all", "gradnoise norm", "plain, again")))
        console.print(table)


def run(out: Path, console: Console, quick: bool = False, skip_build: bool = False) -> int:
    if not torch.cuda.is_available():
        console.print("[red]gpu-check: no CUDA device is visible[/red] (torch "
                      f"{torch.__version__}, built with CUDA {torch.version.cuda}); it needs an "
                      "NVIDIA GPU and a CUDA build of torch")
        return 2
    out.mkdir(parents=True, exist_ok=True)
    if not skip_build:
        # This process loaded the extensions as they were; the stages after
        # the build run in a fresh one that loads what was just built.
        console.print("[bold]build[/bold]")
        start = time.perf_counter()
        try:
            info = build(console)
        except StageFailed as e:
            console.print(f"[red]build FAILED: {e}[/red]")
            (out / "gpu-check.json").write_text(json.dumps(
                {"env": _environment(), "stages": {"build": f"FAILED: {e}"}}, indent=1))
            return 1
        info["seconds"] = round(time.perf_counter() - start, 1)
        cmd = [sys.executable, "-m", "gradnoise", "gpu-check", "--skip-build", "--out", str(out)]
        return subprocess.call(cmd + (["--quick"] if quick else []), cwd=REPO,
                               env={**os.environ, _BUILT: json.dumps(info)})
    result: dict = {"env": _environment(), "quick": quick, "stages": {}}
    if _BUILT in os.environ:
        result["build"] = json.loads(os.environ[_BUILT])
        result["stages"]["build"] = "passed"
    console.print(f"gpu-check on {result['env']['gpu']} (sm_{result['env']['capability']}), "
                  f"torch {torch.__version__}, triton {result['env']['triton']}")
    result["stages"].setdefault("build", "skipped (--skip-build)")
    jobs = {"tests": lambda: tests(console, out),
            "kernels": lambda: kernels(console, quick),
            "steps": lambda: steps(console, quick)}
    failed = False
    for stage, job in jobs.items():
        start = time.perf_counter()
        console.print(f"[bold]{stage}[/bold]")
        try:
            result[stage] = job()
            status = "passed"
        except Exception as e:  # every stage runs; each failure is reported in full
            failed = True
            status = f"FAILED: {type(e).__name__}: {e}"
            console.print(f"[red]{stage} {status}[/red]")
        result["stages"][stage] = status
        result.setdefault("seconds", {})[stage] = round(time.perf_counter() - start, 1)
    from .ops import fusion
    result["fusion_decisions"] = [vars(d) | {"ratio": d.ratio} for d in fusion.decisions()]
    (out / "gpu-check.json").write_text(json.dumps(result, indent=1, default=str))
    _tables(result, console)
    for stage, status in result["stages"].items():
        console.print(f"{stage}: {status}")
    console.print(f"wrote {out / 'gpu-check.json'}")
    return 1 if failed else 0
