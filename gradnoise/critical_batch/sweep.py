"""Method 1 of the critical-batch measurement: a fixed-batch sweep
(McCandlish et al. 2018, appendix D), with its learning-rate search at each
batch (search.py), its runs as independent jobs, and the front of each
target fitted (fit.py).

Jobs go to an engine: a local process pool by default, sized to the
machine with torch's threads split among the workers so that the cores are
not oversubscribed; in this process ("serial"); or any executor whose
`submit(fn, *args)` returns an object with `done()` and `result()`:
concurrent.futures executors, and submitit's executors for Slurm (their
LocalExecutor runs the same jobs as local processes).

Each finished run is written to `<out>/runs/<key>.json` as it ends, so a
sweep stopped for any reason resumes (`resume=True`) without redoing them.
"""
from __future__ import annotations

import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from multiprocessing import get_context
from pathlib import Path

import torch

from .fit import FrontFit, fit_front
from .runs import RunRecord, RunSpec, Task, train_run
from .search import BatchSearch


@dataclass
class SweepConfig:
    batches: list[int]
    targets: list[float]
    lr: float                         # starting rate at `lr_batch`
    lr_batch: int | None = None       # default: the smallest batch
    lr_rule: str = "none"             # starting rate at other batches: "none", "sqrt", "linear"
    lr_factor: float = 2.0            # grid spacing
    lr_points: int = 3
    max_extensions: int = 4
    seed: int = 0
    max_steps: int = 2000
    window: int = 20
    diverge_factor: float = 1.5
    noise_interval: int = 0           # B_simple along the runs, one step in this many
    noise_source: str = "per_sample"
    noise_per_layer: bool = False
    hessian_interval: int = 0         # B_noise along the runs, one step in this many
    bootstrap: int = 500

    def __post_init__(self):
        if not self.batches or any(int(b) != b or b < 1 for b in self.batches):
            raise ValueError(f"SweepConfig: `batches` must be positive integers, got {self.batches}")
        if not self.targets or not all(math.isfinite(t) for t in self.targets):
            raise ValueError(f"SweepConfig: `targets` must be finite losses, got {self.targets}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"SweepConfig: `lr` must be a finite number > 0, got {self.lr!r}")
        if self.lr_rule not in ("none", "sqrt", "linear"):
            raise ValueError(f"SweepConfig: `lr_rule` must be 'none', 'sqrt' or 'linear', got "
                             f"{self.lr_rule!r}")
        if self.lr_factor <= 1 or self.lr_points < 1:
            raise ValueError(f"SweepConfig: need lr_factor > 1 and lr_points >= 1, got "
                             f"{self.lr_factor}, {self.lr_points}")
        if self.window < 1 or self.max_steps < 1 or self.bootstrap < 0:
            raise ValueError(f"SweepConfig: need window >= 1, max_steps >= 1 and bootstrap >= 0, "
                             f"got {self.window}, {self.max_steps}, {self.bootstrap}")
        odd = [b for b in self.batches if b < 2 or b % 2]
        if self.noise_interval and self.noise_source == "micro_batch" and odd:
            raise ValueError(f"SweepConfig: the micro-batch noise source splits each batch in "
                             f"two equal halves; batches {odd} cannot be")
        self.batches = sorted(int(b) for b in set(self.batches))
        self.targets = sorted(float(t) for t in set(self.targets))

    def start_lr(self, batch: int) -> float:
        ratio = batch / (self.lr_batch or self.batches[0])
        return self.lr * {"none": 1.0, "sqrt": math.sqrt(ratio), "linear": ratio}[self.lr_rule]

    def template(self, batch: int) -> RunSpec:
        return RunSpec(batch=batch, lr=self.start_lr(batch), seed=self.seed,
                       targets=tuple(self.targets), max_steps=self.max_steps,
                       window=self.window, diverge_factor=self.diverge_factor,
                       noise_interval=self.noise_interval, noise_source=self.noise_source,
                       noise_per_layer=self.noise_per_layer,
                       hessian_interval=self.hessian_interval)


@dataclass
class SweepResult:
    task: str
    config: SweepConfig
    records: list[RunRecord] = field(default_factory=list)
    best: dict = field(default_factory=dict)        # batch -> {target: (steps, lr)}
    best_lr: dict = field(default_factory=dict)     # batch -> rate of the best run
    fits: dict = field(default_factory=dict)        # target -> FrontFit or a reason (str)

    def to_dict(self) -> dict:
        return {"task": self.task, "config": asdict(self.config),
                "best": {str(b): {repr(t): v for t, v in d.items()} for b, d in self.best.items()},
                "best_lr": {str(b): lr for b, lr in self.best_lr.items()},
                "fits": {repr(t): (f.to_dict() if isinstance(f, FrontFit) else f)
                         for t, f in self.fits.items()},
                "runs": [r.to_dict() for r in self.records]}


class _Done:
    """A finished job of the serial engine: its value, or what it raised."""

    def __init__(self, fn, args):
        self.value = self.error = None
        try:
            self.value = fn(*args)
        except Exception as exc:
            self.error = exc

    def done(self) -> bool:
        return True

    def result(self):
        if self.error is not None:
            raise self.error
        return self.value


class SerialEngine:
    """Runs each job in this process when it is submitted."""

    def submit(self, fn, *args):
        return _Done(fn, args)


def _job(task: Task, spec: RunSpec, threads: int) -> dict:
    """One run in a worker: its torch threads set, its record as a dict."""
    if threads:
        torch.set_num_threads(threads)
    return train_run(task, spec).to_dict()


def local_engine(workers: int | None = None) -> tuple[ProcessPoolExecutor, int]:
    """A process pool of `workers` (default: one per core) and the torch
    threads each worker gets so that workers × threads = cores."""
    cores = os.cpu_count() or 1
    workers = max(1, min(workers or cores, cores))
    return ProcessPoolExecutor(workers, mp_context=get_context("spawn")), max(1, cores // workers)


def _check_folder(out: Path, task: Task, config: SweepConfig, resume: bool) -> None:
    """Refuse to mix runs of another sweep, or to write over one, by name."""
    meta = out / "sweep.json"
    mine = {"task": task.name, "config": asdict(config)}
    if meta.exists():
        theirs = json.loads(meta.read_text())
        if not resume:
            raise FileExistsError(f"critical batch: {out} already holds a sweep; pass resume=True "
                                  "(--resume) to continue it, or choose another folder")
        # a setting the saved sweep predates counts as its default
        defaults = {f.name: f.default for f in fields(SweepConfig)}
        changed = sorted(k for k in set(mine["config"]) | set(theirs["config"])
                         if mine["config"].get(k) != theirs["config"].get(k, defaults.get(k))
                         and k not in ("bootstrap",))
        if theirs["task"] != task.name or changed:
            raise ValueError(f"critical batch: the sweep in {out} was run with other settings "
                             f"({'task' if theirs['task'] != task.name else ', '.join(changed)}); "
                             "its runs cannot be reused. Choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / "runs").mkdir(exist_ok=True)
    meta.write_text(json.dumps(mine, indent=1))


def run_sweep(task: Task, config: SweepConfig, out: str | Path | None = None,
              engine=None, threads: int = 0, resume: bool = False,
              progress: bool = True, allow_parallel: bool = False,
              workers: int | None = None) -> SweepResult:
    """Run the sweep and fit its fronts.

    engine: None for a local process pool of `workers` (default: one per
        core); "serial"; or an executor (see the module docstring).
        threads: torch threads per job (0: the pool's share of the cores, or
        torch's default for another engine).
    allow_parallel: start a batch's grid rates side by side (faster on many
        workers, prunes less).
    """
    owned = None
    if engine is None:
        engine, pool_threads = local_engine(workers)
        owned, threads = engine, threads or pool_threads
    elif engine == "serial":
        engine = SerialEngine()
    out = Path(out) if out is not None else None
    if out is not None:
        _check_folder(out, task, config, resume)
    searches = [BatchSearch(config.template(b), config.start_lr(b), config.lr_factor,
                            config.lr_points, config.max_extensions) for b in config.batches]
    jobs: list[tuple] = []     # (future, search, spec)
    failure = None             # (spec, exception) of the first run that failed
    from rich.progress import Progress
    bar = Progress(disable=not progress, transient=False)
    try:
        with bar:
            task_id = bar.add_task("fixed-batch runs", total=len(searches) * config.lr_points)
            while True:
                if failure is not None and not jobs:    # every other run kept: now say it
                    spec, exc = failure
                    kept = f"; the finished runs are kept in {out}" if out else ""
                    raise RuntimeError(f"critical batch: the run {spec.key} failed: {exc}"
                                       f"{kept}") from exc
                for s in searches if failure is None else ():
                    while (spec := s.next_spec(allow_parallel)) is not None:
                        saved = out / "runs" / f"{spec.key}.json" if out is not None else None
                        if saved is not None and saved.exists():
                            s.finish(spec, RunRecord.from_dict(json.loads(saved.read_text())))
                            bar.advance(task_id)
                            continue
                        jobs.append((engine.submit(_job, task, spec, threads), s, spec))
                if not jobs and all(s.finished() for s in searches):
                    break
                if not jobs:
                    continue
                finished = [j for j in jobs if j[0].done()]
                if not finished:
                    time.sleep(0.05)
                    continue
                for job in finished:
                    jobs.remove(job)
                    future, s, spec = job
                    try:
                        record = RunRecord.from_dict(future.result())
                    except Exception as exc:
                        failure = failure or (spec, exc)
                        continue
                    if out is not None:
                        path = out / "runs" / f"{spec.key}.json"
                        path.with_suffix(".tmp").write_text(json.dumps(record.to_dict()))
                        path.with_suffix(".tmp").replace(path)
                    s.finish(spec, record)
                    extra = sum(x.extensions for x in searches)
                    bar.update(task_id, advance=1, total=len(searches) * config.lr_points + extra,
                               description=f"fixed-batch runs (last: B={spec.batch} "
                                           f"lr={spec.lr:.3g} {record.status})")
    finally:
        if owned is not None:
            owned.shutdown(cancel_futures=True)
    return summarise(task.name, config, searches)


def summarise(task_name: str, config: SweepConfig, searches: list[BatchSearch]) -> SweepResult:
    result = SweepResult(task=task_name, config=config)
    for s in searches:
        result.records.extend(s.records[lr] for lr in sorted(s.records))
        result.best[s.batch] = {t: s.best_steps(t) for t in config.targets}
        best = s.best()
        result.best_lr[s.batch] = best[0] if best else None
    for t in config.targets:
        points = [(b, d[t][0]) for b, d in result.best.items() if d[t][0] < math.inf]
        at_start = [b for b, s in points if s <= 0]
        points = [(b, s) for b, s in points if s > 0]
        if len({b for b, _ in points}) < 2:
            why = f"reached after some updates at {len(points)} batch size(s); a front needs two"
            if at_start:
                why += f" (below it before any update at B = {at_start}: choose a lower target)"
            result.fits[t] = why
            continue
        result.fits[t] = fit_front([b for b, _ in points], [s for _, s in points], target=t,
                                   bootstrap=config.bootstrap, seed=config.seed)
    return result


def load_sweep(folder: str | Path) -> SweepResult:
    """The sweep kept in `folder` (its sweep.json and runs/), summarised and
    fitted again: a finished sweep, or what an interrupted one has so far."""
    folder = Path(folder)
    meta = folder / "sweep.json"
    if not meta.exists():
        raise FileNotFoundError(f"critical batch: {folder} holds no sweep (no sweep.json); "
                                "run `python -m gradnoise critical-batch --out ...` first")
    saved = json.loads(meta.read_text())
    config = SweepConfig(**saved["config"])
    searches = {b: BatchSearch(config.template(b), config.start_lr(b)) for b in config.batches}
    for path in sorted((folder / "runs").glob("*.json")):
        record = RunRecord.from_dict(json.loads(path.read_text()))
        searches[record.spec["batch"]].records[record.spec["lr"]] = record
    return summarise(saved["task"], config, list(searches.values()))
