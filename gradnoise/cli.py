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
from .ops.backends import BACKENDS, ENV_VAR, OPS, backend_status, default_backend


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
    policy = Table(title="default backend of each op family, by device")
    policy.add_column("op family")
    for device in ("cpu", "cuda"):
        policy.add_column(device)
    for op in OPS:
        cells = []
        for device in ("cpu", "cuda"):
            be, why = default_backend(device, op, lambda name, d=device: backend_status(
                name, torch.device(d) if name in ("cpu", "cuda") else None))
            cells.append(f"{be}: {why}")
        policy.add_row(op, *cells)
    console.print(policy)
    chosen = os.environ.get(ENV_VAR)
    console.print(f"{ENV_VAR}={chosen!r}" if chosen else
                  f"{ENV_VAR} unset: each op uses the compiled kernels of its inputs' device")
    from .ops import fusion
    console.print(f"{fusion.ENV_VAR}={fusion.mode()}: " + {
        "auto": "a Linear weight gradient (T > 1) comes from the fused kernel only where a probe "
                "on the first call of each shape measured it faster than torch's GEMM with the "
                "norms beside it; otherwise, and for T = 1, from torch's GEMM",
        "fused": "every Linear weight gradient from the fused kernel",
        "separate": "every Linear weight gradient from torch's GEMM, the norms beside it"}[
        fusion.mode()])
    console.print(f"threads: {torch.get_num_threads()}")
    return 0 if _extension.compiled_status("cpu") is None else 1


def cmd_bench(args: argparse.Namespace, console: Console) -> int:
    """The Linear-kernel table: each op's time as a ratio to the plain GEMM;
    with --tracker, the training-step table against torch.func, Opacus and BackPACK."""
    from .benchmarking.linear import NORMS_T1_TARGET, SHAPES, bench_shape

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tracker:
        from .benchmarking.models import DEFAULT_MODELS
        from .benchmarking.peers import CANDIDATES, COMPILED_CANDIDATES
        from .benchmarking.tracker_step import print_report, run

        with Progress(TextColumn("{task.description}"), BarColumn(),
                      TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                      console=console, transient=True) as progress:
            task = progress.add_task("timing", total=1)
            models = args.model or list(DEFAULT_MODELS)
            candidates = list(args.candidate or CANDIDATES) + (
                list(COMPILED_CANDIDATES) if args.compile else [])
            rows = run(models=models, repeats=args.repeats, candidates=candidates,
                       on_progress=lambda desc, done, total: progress.update(
                           task, description=desc, completed=done, total=total))
        print_report(rows, console)
        return 0
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
    for col in ("B", "T", "d", "p", "GEMM ms", "GFLOP/s", "norms by", "grad from", "grad+norms",
                "target", "norms only"):
        table.add_column(col, justify="right")
    missed = 0
    for r in rows:
        ok = r.weight_grad_and_norms <= r.target
        norms_ok = r.T != 1 or r.norms_only <= NORMS_T1_TARGET
        missed += (not ok) + (not norms_ok)
        table.add_row(str(r.B), str(r.T), str(r.d), str(r.p), f"{r.gemm_ms:.2f}", f"{r.gemm_gflops:.0f}",
                      r.method, r.path,
                      f"[{'green' if ok else 'red'}]{r.weight_grad_and_norms:.3f}×",
                      f"≤{r.target:.2f}×",
                      f"[{'green' if norms_ok else 'red'}]{r.norms_only:.3f}×" if r.T == 1
                      else f"{r.norms_only:.3f}×")
    console.print(table)
    console.print("targets: grad+norms ≤ 1.10× the GEMM (≤ 1.06× where T ≥ 512); "
                  f"norms only at T = 1 ≤ {NORMS_T1_TARGET}×. "
                  + ("all met." if not missed else f"{missed} missed on this run."))
    return 0


def _demo_config(args: argparse.Namespace):
    from .demo import DemoConfig

    config = DemoConfig(max_seconds=args.minutes * 60, seed=args.seed, policy=args.policy,
                        lr_rule=args.lr_rule, threads=args.threads)
    if args.samples:
        config.max_samples = args.samples
    if args.max_batch:
        config.max_batch = args.max_batch
    return config


def _live_training(console: Console, config, name: str, fixed_batch=None, log_path=None):
    """One training run with a progress bar and a live line of its numbers."""
    from .demo import run_training

    columns = (TextColumn("[bold]{task.fields[name]}"), BarColumn(),
               TextColumn("{task.completed:,.0f}/{task.total:,.0f} examples"),
               TimeElapsedColumn(), TextColumn("{task.fields[line]}"))
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("train", total=config.max_samples, name=name, line="")

        def on_step(rec):
            bs = rec["b_simple"]
            line = (f"step {rec['step']}  loss {rec['loss']:.3f}  "
                    f"B_simple {'—' if bs is None else f'{bs:,.0f}'}  "
                    f"batch {rec['batch_size']}  lr {rec['lr']:.2e}")
            progress.update(task, completed=rec["samples"], line=line)

        return run_training(config, name, fixed_batch, log_path, on_step)


def cmd_demo(args: argparse.Namespace, console: Console) -> int:
    """Train the byte-level LM with the adaptive batch; summary, plots, log."""
    from pathlib import Path

    from .demo import write_plots

    config = _demo_config(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    console.print(f"Training a byte-level LM ({config.blocks} blocks, width {config.width}, "
                  f"context {config.context}) on the Python standard library's source, "
                  f"adaptive batch from {config.initial_batch} up to {config.max_batch}, "
                  f"policy '{config.policy}', LR rule '{config.lr_rule}'.")
    result = _live_training(console, config, "adaptive", log_path=out / "adaptive.csv")
    table = Table(title=f"adaptive run: {len(result.history)} optimizer steps, "
                        f"{result.history[-1]['samples']:,} examples, {result.seconds:.0f} s")
    for col in ("step", "examples", "loss", "B_simple (±95%)", "batch", "accumulation", "lr"):
        table.add_column(col, justify="right")
    shown = sorted({0, len(result.history) - 1} | {
        i for i in range(1, len(result.history))
        if result.history[i]["batch_size"] != result.history[i - 1]["batch_size"]})
    for i in shown[:25]:
        rec = result.history[i]
        bs, err = rec["b_simple"], rec["b_simple_stderr"]
        table.add_row(str(rec["step"]), f"{rec['samples']:,}", f"{rec['loss']:.3f}",
                      "—" if bs is None else (f"{bs:,.0f}" + ("" if err is None else f" ± {1.96 * err:,.0f}")),
                      str(rec["batch_size"]), str(rec["accumulation"]), f"{rec['lr']:.2e}")
    console.print(table)
    for path in write_plots([result], out):
        console.print(f"plot: {path}")
    console.print(f"per-step log: {out / 'adaptive.csv'}")
    return 0


def cmd_compare(args: argparse.Namespace, console: Console) -> int:
    """The adaptive batch placed on the fixed-batch front (gradnoise.critical_batch.compare)."""
    from .critical_batch.command import run_compare
    return run_compare(args, console)


def cmd_critical_batch(args: argparse.Namespace, console: Console) -> int:
    """The critical batch measured three ways (gradnoise.critical_batch)."""
    from .critical_batch.command import run
    return run(args, console)


def cmd_gpu_check(args: argparse.Namespace, console: Console) -> int:
    """Build with CUDA, GPU tests, kernel and step benchmarks (gradnoise.gpu_check)."""
    from pathlib import Path

    from .gpu_check import run
    return run(Path(args.out), console, quick=args.quick, skip_build=args.skip_build)


def build_parser() -> argparse.ArgumentParser:
    from .benchmarking.peers import CANDIDATES
    parser = argparse.ArgumentParser(prog="python -m gradnoise", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="what was built, and which backends can run here")
    bench = sub.add_parser("bench", help="time the Linear kernels against the plain GEMM")
    bench.add_argument("--repeats", type=int, default=15, help="interleaved repetitions per shape")
    bench.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    bench.add_argument("--shape", action="append", metavar="B,T,d,p",
                       help="a shape to time instead of the standard set (repeatable)")
    bench.add_argument("--model", action="append", choices=("mlp", "lm", "cnn", "gpt2", "llama"),
                       help="with --tracker: a model to run (repeatable; default: all five)")
    bench.add_argument("--candidate", action="append", choices=CANDIDATES,
                       help="with --tracker: a candidate to run (repeatable; default: all; the "
                            "plain step always runs)")
    bench.add_argument("--compile", action="store_true",
                       help="with --tracker: also the model compiled by torch.compile, plain and "
                            "tracked (layers 'all' and 'norm'), with its graph breaks")
    bench.add_argument("--tracker", action="store_true",
                       help="time whole training steps with per-sample norms against peers")
    bench.add_argument("--backend", choices=BACKENDS, default=None,
                       help=f"backend to time (default: as {ENV_VAR} or by device)")
    for name, helptext in (("demo", "train a byte-level LM with the adaptive batch (the main job)"),):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--minutes", type=float, default=4.0, help="time budget of the run")
        p.add_argument("--samples", type=int, default=0, help="examples per run (default 60,000)")
        p.add_argument("--max-batch", type=int, default=0, help="largest batch (default 512)")
        p.add_argument("--policy", choices=("critical", "goodput"), default="goodput")
        p.add_argument("--lr-rule", choices=("none", "linear", "sqrt"), default="sqrt")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
        p.add_argument("--out", default="gradnoise-out", help="folder for plots and logs")
    gpu = sub.add_parser("gpu-check", help="on an NVIDIA GPU: build with CUDA, run the GPU tests, "
                                           "time the kernels against cuBLAS and training steps")
    gpu.add_argument("--out", default="gradnoise-out", help="folder for gpu-check.json")
    gpu.add_argument("--quick", action="store_true", help="small shapes and models (a smoke run)")
    gpu.add_argument("--skip-build", action="store_true",
                     help="use the extensions as built (no compile step)")
    from .critical_batch.command import add_compare_parser
    from .critical_batch.command import add_parser as add_critical_batch
    add_compare_parser(sub)
    add_critical_batch(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Wide enough for the tables when the output is a file or a CI log.
    console = Console(width=None if sys.stdout.isatty() else 120)
    handler = {"info": cmd_info, "bench": cmd_bench, "demo": cmd_demo,
               "compare": cmd_compare, "critical-batch": cmd_critical_batch,
               "gpu-check": cmd_gpu_check}[args.command]
    return handler(args, console)


if __name__ == "__main__":
    sys.exit(main())
