"""Command line: `python -m gradnoise COMMAND`.

argparse (standard library) parses the commands; rich draws tables and
progress bars, which the terminal user sees while long benchmarks run.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__, _extension
from .ops.backends import BACKENDS, ENV_VAR, backend_status


def cmd_info(args: argparse.Namespace, console: Console) -> int:
    """What was built and which backends can run here, and why not."""
    console.print(f"gradnoise {__version__}  torch {torch.__version__}  "
                  f"python {platform.python_version()}  {platform.machine()}")
    info = _extension.build_info()
    console.print(f"compiled CPU kernels: {info if info else 'not loaded'}")
    table = Table(title="backends")
    table.add_column("backend")
    table.add_column("usable")
    table.add_column("why not / notes")
    devices = {"cpu": torch.device("cpu"), "cuda": torch.device("cuda"),
               "triton": None, "reference": None}
    for name in BACKENDS:
        why = backend_status(name, devices[name])
        table.add_row(name, "yes" if why is None else "no", why or "")
    console.print(table)
    chosen = os.environ.get(ENV_VAR)
    console.print(f"{ENV_VAR}={chosen!r}" if chosen else
                  f"{ENV_VAR} unset: each op uses the compiled kernels of its inputs' device")
    console.print(f"threads: {torch.get_num_threads()}")
    return 0 if _extension.compiled_status("cpu") is None else 1


def cmd_bench(args: argparse.Namespace, console: Console) -> int:
    """The Linear-kernel table: each op's time as a ratio to the plain GEMM."""
    from .benchmarking.linear import NORMS_T1_TARGET, SHAPES, bench_shape

    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = SHAPES if not args.shape else [tuple(int(v) for v in s.split(",")) for s in args.shape]
    rows = []
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task("timing", total=len(shapes) * args.repeats)
        for B, T, d, p in shapes:
            progress.update(task, description=f"B={B} T={T} d={d} p={p}")
            rows.append(bench_shape(B, T, d, p, args.repeats, args.backend,
                                    on_repeat=lambda: progress.advance(task)))
    table = Table(title=f"Linear kernels, time as a multiple of the weight-gradient GEMM "
                        f"({torch.get_num_threads()} threads, median of {args.repeats} interleaved runs)")
    for col in ("B", "T", "d", "p", "GEMM ms", "GFLOP/s", "auto", "grad+norms", "target",
                "norms only"):
        table.add_column(col, justify="right")
    missed = 0
    for r in rows:
        ok = r.weight_grad_and_norms <= r.target
        norms_ok = r.T != 1 or r.norms_only <= NORMS_T1_TARGET
        missed += (not ok) + (not norms_ok)
        table.add_row(str(r.B), str(r.T), str(r.d), str(r.p), f"{r.gemm_ms:.2f}", f"{r.gemm_gflops:.0f}",
                      r.method, f"[{'green' if ok else 'red'}]{r.weight_grad_and_norms:.3f}×",
                      f"≤{r.target:.2f}×",
                      f"[{'green' if norms_ok else 'red'}]{r.norms_only:.3f}×" if r.T == 1
                      else f"{r.norms_only:.3f}×")
    console.print(table)
    console.print("targets: grad+norms ≤ 1.10× the GEMM (≤ 1.06× where T ≥ 512); "
                  f"norms only at T = 1 ≤ {NORMS_T1_TARGET}×. "
                  + ("all met." if not missed else f"{missed} missed on this run."))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gradnoise", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="what was built, and which backends can run here")
    bench = sub.add_parser("bench", help="time the Linear kernels against the plain GEMM")
    bench.add_argument("--repeats", type=int, default=15, help="interleaved repetitions per shape")
    bench.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    bench.add_argument("--shape", action="append", metavar="B,T,d,p",
                       help="a shape to time instead of the standard set (repeatable)")
    bench.add_argument("--backend", choices=BACKENDS, default=None,
                       help=f"backend to time (default: as {ENV_VAR} or by device)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Wide enough for the tables when the output is a file or a CI log.
    console = Console(width=None if sys.stdout.isatty() else 120)
    handler = {"info": cmd_info, "bench": cmd_bench}[args.command]
    return handler(args, console)


if __name__ == "__main__":
    sys.exit(main())
