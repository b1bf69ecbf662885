"""`python -m gradnoise critical-batch`: the three methods on the built-in
byte-level LM (or on the noisy quadratic model, whose answers are known),
with a table, JSON and plots in `--out`."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

METHODS = ("sweep", "branch", "noise")


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}")


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}")


def _methods(text: str) -> list[str]:
    chosen = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in METHODS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"methods are {', '.join(METHODS)}; got {text!r}")
    return chosen


def add_parser(sub) -> None:
    p = sub.add_parser("critical-batch", help="measure the critical batch size: fixed-batch "
                       "sweep and Pareto fit, branching, and the noise scale, side by side")
    p.add_argument("--task", choices=("byte-lm", "quadratic"), default="byte-lm",
                   help="the built-in LM (default), or the noisy quadratic model with its "
                        "exact answers printed beside the measured ones")
    p.add_argument("--methods", type=_methods, default=list(METHODS),
                   help="any of sweep,branch,noise (default: all three)")
    p.add_argument("--batches", type=_ints, default=None,
                   help="sweep batch sizes, e.g. 8,16,32,64,128")
    p.add_argument("--targets", type=_floats, default=None, help="target losses, e.g. 2.4,2.2,2.0")
    p.add_argument("--lr", type=float, default=None, help="starting learning rate of the search")
    p.add_argument("--lr-rule", choices=("none", "sqrt", "linear"), default="none",
                   help="starting rate at larger batches relative to the smallest")
    p.add_argument("--lr-factor", type=float, default=2.0, help="learning-rate grid spacing")
    p.add_argument("--lr-points", type=int, default=3, help="grid rates before extensions")
    p.add_argument("--max-extensions", type=int, default=4,
                   help="rates added beyond the grid's edge while the best sits on it")
    p.add_argument("--max-steps", type=int, default=None, help="step budget of a run")
    p.add_argument("--noise-interval", type=int, default=4,
                   help="with the noise method: measure B_simple one step in this many")
    p.add_argument("--hessian-interval", type=int, default=None,
                   help="with the noise method: B_noise (Hessian-aware, 16 samples) one step in "
                        "this many (default: 10 on the quadratic model, off on the LM, where "
                        "one reading costs about ten steps)")
    p.add_argument("--per-layer", action="store_true",
                   help="with the noise method: B_simple of each layer too (in the JSON)")
    p.add_argument("--branch-batch", type=int, default=None, help="trunk batch of the branches")
    p.add_argument("--branch-steps", type=_ints, default=None, help="trunk steps to branch from")
    p.add_argument("--branch-factors", type=_ints, default=[1, 2, 4, 8, 16])
    p.add_argument("--epsilon", type=float, default=0.01,
                   help="relative loss gap at which a branch still counts as equal")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0,
                   help="parallel runs (default: one per core, torch threads split)")
    p.add_argument("--engine", choices=("local", "serial", "submitit"), default="local",
                   help="where runs go: a local process pool, this process, or submitit "
                        "(Slurm when present, else its local executor)")
    p.add_argument("--resume", action="store_true", help="reuse the finished runs in --out")
    p.add_argument("--out", default="gradnoise-critical-batch", help="folder for results")


def _defaults(args) -> dict:
    """The task and its defaults: sized so that the byte-LM default finishes
    in about 15 minutes on 2 cores."""
    if args.task == "quadratic":
        from .nqm import NoisyQuadratic, quadratic_task
        problem = NoisyQuadratic(dim=128, power=0.5, noise=4.0)
        return dict(task=quadratic_task(problem), problem=problem, batches=[2, 4, 8, 16, 32, 64,
                    128], targets=[1.0, 0.6], lr=0.2, max_steps=3000, window=20,
                    noise_source="micro_batch", branch_batch=2, branch_steps=[20, 100],
                    branch_examples=512, hessian_interval=10)
    from .builtin import byte_lm_task
    return dict(task=byte_lm_task(), problem=None, batches=[8, 16, 32, 64, 128, 256],
                targets=[2.6, 2.4, 2.2, 2.0], lr=1e-3, max_steps=3000, window=20,
                noise_source="per_sample", branch_batch=8, branch_steps=[100, 400],
                branch_examples=4096, hessian_interval=0)


def _engine(args):
    if args.engine == "serial":
        return "serial", 0
    if args.engine == "submitit":
        import submitit
        executor = submitit.AutoExecutor(folder=Path(args.out) / "submitit")
        executor.update_parameters(timeout_min=60)
        return executor, 0
    return None, 0


def run(args: argparse.Namespace, console: Console) -> int:
    from .branching import BranchConfig, branch_result, run_branches
    from .report import TABLE_HEADER, table_rows, write_json, write_plots
    from .sweep import SweepConfig, run_sweep

    d = _defaults(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sweep = branches = None
    if "sweep" in args.methods or "noise" in args.methods:
        config = SweepConfig(batches=args.batches or d["batches"],
                             targets=args.targets or d["targets"], lr=args.lr or d["lr"],
                             lr_rule=args.lr_rule, lr_factor=args.lr_factor,
                             lr_points=args.lr_points, max_extensions=args.max_extensions,
                             seed=args.seed,
                             max_steps=args.max_steps or d["max_steps"], window=d["window"],
                             noise_interval=args.noise_interval if "noise" in args.methods else 0,
                             noise_source=d["noise_source"], noise_per_layer=args.per_layer,
                             hessian_interval=(d["hessian_interval"] if args.hessian_interval
                                               is None else args.hessian_interval)
                             if "noise" in args.methods else 0)
        console.print(f"Fixed-batch sweep on {d['task'].name}: batches {config.batches}, "
                      f"targets {config.targets}, learning rates from {config.lr:g} "
                      f"(×{config.lr_factor:g} grid, extended at its edges)")
        engine, threads = _engine(args)
        try:
            sweep = run_sweep(d["task"], config, out=out / "sweep", engine=engine,
                              threads=threads, resume=args.resume, workers=args.workers or None)
        except (FileExistsError, ValueError) as exc:     # the folder holds another sweep
            print(f"error: {exc}", file=sys.stderr)
            return 2
        table = Table(title="the steps–examples front of each target")
        for col in TABLE_HEADER:
            table.add_column(col, justify="right")
        for row in table_rows(sweep):
            table.add_row(*row)
        console.print(table)
        console.print("best learning rate per batch: " + ", ".join(
            f"B={b}: {lr:.3g}" for b, lr in sorted(sweep.best_lr.items()) if lr is not None))
        if d["problem"] is not None:
            _print_known_answers(console, d["problem"], config)
    if "branch" in args.methods:
        batch = args.branch_batch or d["branch_batch"]
        lr = (sweep.best_lr.get(batch) if sweep else None) or args.lr or d["lr"]
        # the sweep's best rate at each k·B it measured: branches tuned, not ruled
        rates = {k: sweep.best_lr[k * batch] for k in args.branch_factors
                 if sweep is not None and sweep.best_lr.get(k * batch)}
        bconfig = BranchConfig(batch=batch, lr=lr, checkpoints=args.branch_steps or
                               d["branch_steps"], factors=args.branch_factors, rates=rates,
                               epsilon=args.epsilon, window=min(d["window"], 10),
                               branch_examples=d["branch_examples"],
                               seed=args.seed, lr_rule="sqrt" if d["problem"] is None else "linear")
        console.print(f"Branching from a trunk at B={batch}, lr {lr:.3g}, at steps "
                      f"{bconfig.checkpoints}, to ×{bconfig.factors}, rates "
                      + ", ".join(f"×{k}: {bconfig.branch_lr(k):.3g}" for k in bconfig.factors)
                      + (" (the sweep's best)" if rates else f" ({bconfig.lr_rule} rule)"))
        points = run_branches(d["task"], bconfig)
        branches = branch_result(bconfig, points)["points"]
        for p in points:
            console.print(f"  step {p.step} (loss {p.trunk_loss:.3f}): critical batch "
                          f"{'≥ ' if not p.bounded else ''}{p.critical_batch}")
        (out / "branches.json").write_text(json.dumps(branch_result(bconfig, points), indent=1))
    path = write_json(out / "critical_batch.json", sweep, branches)
    console.print(f"results: {path}")
    for plot in write_plots(out, sweep, branches):
        console.print(f"plot: {plot}")
    return 0


def _print_known_answers(console: Console, problem, config) -> None:
    """The quadratic model's exact S(B) over the same rates, and its B_crit."""
    from .fit import fit_front
    for t in config.targets:
        points = []
        for b in config.batches:
            s, _ = problem.best_analytic_steps(b, t, config.max_steps, window=config.window)
            if s < float("inf"):
                points.append((b, s))
        if len(points) >= 2:
            fit = fit_front(*zip(*points), target=t, bootstrap=0)
            console.print(f"  exact answer at loss {t:g}: S_min {fit.s_min:.4g}, "
                          f"B_crit {fit.b_crit:.4g}")


def add_compare_parser(sub) -> None:
    p = sub.add_parser("compare", help="the adaptive batch placed on the fixed-batch front of the "
                       "built-in task: the Pareto product of each policy and LR rule")
    p.add_argument("--front", default=None,
                   help="a `critical-batch --out` folder whose sweep is the front; with '{seed}' "
                        "in it, one per seed (default: measure each seed's into "
                        "OUT/front-seed{seed}, resumable)")
    p.add_argument("--policies", default="critical,goodput", help="policies to place")
    p.add_argument("--lr-rules", default="sqrt,none", help="LR rules to place (Adam family)")
    p.add_argument("--seeds", type=_ints, default=[0], help="seeds, e.g. 0,1,2")
    p.add_argument("--lr", type=float, default=None,
                   help="Adam rate at the initial batch (default: the demo's)")
    p.add_argument("--confidence", type=float, default=None,
                   help="z of the bound on B_simple the policies act on (default 1.645)")
    p.add_argument("--minutes", type=float, default=10.0, help="time budget per adaptive run")
    p.add_argument("--samples", type=int, default=200_000, help="example budget per adaptive run")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--out", default="gradnoise-compare", help="folder for results and plots")


def run_compare(args: argparse.Namespace, console: Console) -> int:
    from ..demo import DemoConfig
    from .compare import Variant, run_variant, summary_rows, verdict, write_plot
    from .sweep import load_sweep

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fronts = {}
    for seed in args.seeds:     # each seed's runs are judged by the same seed's front
        if args.front is None:
            folder = out / f"front-seed{seed}"
            sweep_args = build_default_args(folder)
            sweep_args.methods, sweep_args.seed = ["sweep"], seed
            sweep_args.resume = (folder / "sweep" / "sweep.json").exists()
            code = run(sweep_args, console)
            if code:
                return code
        else:
            folder = Path(args.front.replace("{seed}", str(seed)))
        fronts[seed] = load_sweep(folder / "sweep")
    config = DemoConfig(max_seconds=args.minutes * 60, max_samples=args.samples,
                        threads=args.threads)
    if args.lr:
        config.lr = args.lr
    if args.confidence is not None:
        config.confidence = args.confidence
    variants = [Variant(p, r, s) for s in args.seeds for p in args.policies.split(",")
                for r in args.lr_rules.split(",")]
    results = {}
    for v in variants:
        console.print(f"adaptive {v.name}: lr {config.lr:g} at batch {config.initial_batch}")
        results[v] = run_variant(v, config, fronts[v.seed])[1]
    table = Table(title="adaptive runs on the fixed-batch front "
                        "(Pareto product ≤ 1: inside every fixed batch's front)")
    for col in ("run", "target loss", "steps", "examples", "Pareto product"):
        table.add_column(col, justify="right")
    for row in summary_rows(results):
        table.add_row(*row)
    console.print(table)
    judged = verdict(results)
    for (policy, rule), v in judged.items():
        console.print(f"{policy}/{rule}: product ≤ 1 in every seed at targets "
                      f"{v['targets_met'] or 'none'}")
    (out / "compare.json").write_text(json.dumps(
        {"fronts": {s: f.task for s, f in fronts.items()}, "lr": config.lr,
         "runs": {v.name: [p.__dict__ for p in ps] for v, ps in results.items()},
         "verdict": {f"{p}/{r}": {"worst_product": {repr(t): x for t, x in v["worst_product"]
                                                    .items()}, "targets_met": v["targets_met"]}
                     for (p, r), v in judged.items()}}, indent=1, default=float))
    for seed, front in fronts.items():
        mine = {v: p for v, p in results.items() if v.seed == seed}
        console.print(f"plot: {write_plot(out / f'adaptive_on_front_seed{seed}.png', front, mine)}")
    return 0


def build_default_args(out: Path) -> argparse.Namespace:
    """The critical-batch command's defaults, as parsed."""
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["critical-batch", "--out", str(out)])
