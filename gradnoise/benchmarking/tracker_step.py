"""The training-step benchmark: one forward + backward + per-sample gradient
norms, with gradnoise and with its peers, side by side in one process.

Candidates (each a callable doing one full step on its own copy of the model,
same weights, same batch, gradients set to None first, returning float [B]
per-sample squared norms in gradnoise's convention ‖∇θ ℓ_i‖², i.e. ‖B·g_i‖²
for a mean-reduced loss, or None for the plain step):

- "plain": the step without norms (the baseline of every ratio);
- "gradnoise all", "gradnoise norm": GradNoiseTracker(layers="all" / "norm");
- "gradnoise + noise scale": layers="all" feeding GradientNoiseScale (per-sample
  source); the estimator's own share of the step is reported beside it;
- "torch.func vmap": functional_call + vmap(grad) over the batch; the batch
  gradient is the mean of the per-sample gradients;
- "opacus hooks": opacus.GradSampleModule (per-sample gradients in
  p.grad_sample, then their norms);
- "opacus ghost": opacus GradSampleModuleFastGradientClipping with ghost
  clipping, first backward only (norms + the unclipped gradient; DP training
  adds a second, clipped backward);
- "backpack": BackPACK's BatchL2Grad;
- "compiled plain", "compiled gradnoise all", "compiled gradnoise norm" (on
  request, peers.COMPILED_CANDIDATES): the model compiled by torch.compile,
  plain and tracked; the tracked steps' ratios are to the compiled plain step,
  after the steps that compile (their time is in the notes), and the graph
  breaks of the tracked forward are counted.

Per candidate: median step time, the median over repetitions of its time /
the plain step's time in the same repetition, the peak memory of one step
(measured in a fresh subprocess: VmHWM − VmRSS around the step, after a
warm-up step, with the peak reset through /proc/self/clear_refs), and the
largest relative disagreement of its norms with gradnoise layers="all" and
with a float64 torch.func truth over the parameters the candidate covers.
"""
from __future__ import annotations

import copy
import json
import statistics
import sys
import time
import warnings
from typing import Callable, Iterable

import torch

from . import models as models_mod
from .memory import memory_supported, peak_memory_mb, trim_heap
from .peers import (CANDIDATES, COMPILED_CANDIDATES, QUIET_WARNINGS, Prepared, Unavailable,
                    first_step_warnings, prepare, quiet, trainable_params)
from .report import TIME_TARGETS, TrackerRow, print_report
from .timing import interleaved_pairs
from .truth import max_rel_err, truth_per_param


def run(models: Iterable[str] = models_mod.DEFAULT_MODELS, repeats: int = 10,
        on_progress: Callable[[str, int, int], None] | None = None,
        candidates: Iterable[str] = CANDIDATES, memory: bool = True, check: bool = True,
        warmup: int = 2, slow_budget_s: float = 30.0, min_repeats: int = 3) -> list[TrackerRow]:
    """Time every candidate on every model; one TrackerRow per (model, candidate).

    on_progress(description, completed, total) is called as the work advances
    (units: per model, one check, `repeats` repetitions, one memory run per
    available candidate).
    """
    models = list(models)
    candidates = list(candidates)
    if "plain" not in candidates:
        candidates = ["plain"] + candidates
    if any(c.startswith("compiled ") for c in candidates) and "compiled plain" not in candidates:
        candidates.insert(1, "compiled plain")
    mem_why = memory_supported() if memory else "not requested"
    total = len(models) * (1 + repeats + (len(candidates) if mem_why is None else 0))
    done = 0

    def progress(desc: str, advance: int = 0):
        nonlocal done
        done += advance
        if on_progress is not None:
            on_progress(desc, done, total)

    rows: list[TrackerRow] = []
    with quiet():
        for mname in models:
            model, x, y, loss_fn = models_mod.build(mname)
            progress(f"{mname}: preparing")
            prepared: dict[str, Prepared] = {}
            out: dict[str, TrackerRow] = {}
            for c in candidates:
                out[c] = TrackerRow(mname, c, True, threads=torch.get_num_threads(),
                                    target=TIME_TARGETS.get((c, mname)))
                try:
                    prepared[c] = prepare(c, copy.deepcopy(model), x, y, loss_fn)
                except Unavailable as e:
                    out[c].available, out[c].reason, out[c].short_reason = False, str(e), e.short
                except ImportError as e:
                    out[c].available, out[c].reason = False, f"not installed ({e})"
                    out[c].short_reason = "not installed"
                except Exception as e:  # the peer refuses the model: a result too
                    out[c].available, out[c].reason = False, f"{type(e).__name__}: {e}"
                    out[c].short_reason = type(e).__name__
            # One step each: the check of the norms, and the first warm-up.
            norms, first = {}, {}
            said: dict[str, list[str]] = {}
            for c, p in list(prepared.items()):
                try:
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        for msg in QUIET_WARNINGS:
                            warnings.filterwarnings("ignore", message=f".*{msg}")
                        t = time.perf_counter()
                        for _ in range(p.warmup_steps - 1):
                            p.step()
                        if p.warmup_steps > 1:   # the steps that compile
                            out[c].note = f"compile {time.perf_counter() - t:.1f} s"
                        t = time.perf_counter()
                        n = p.step()
                        first[c] = time.perf_counter() - t
                    norms[c] = None if n is None else n.detach().double()
                    said[c] = first_step_warnings(caught)
                except Exception as e:  # a peer failing on this model is a result
                    out[c].available, out[c].reason = False, f"{type(e).__name__}: {e}"
                    out[c].short_reason = f"fails: {type(e).__name__}"
                    del prepared[c]
            if "plain" not in prepared:
                raise RuntimeError(f"the plain step failed on {mname}: {out['plain'].reason}")
            if check:
                truth = truth_per_param(model, x, y, loss_fn)
                all_names = [n for n, _ in trainable_params(model)]
                gn = norms.get("gradnoise all")
                for c, n in norms.items():
                    if n is None:
                        continue
                    covered = prepared[c].covered() or all_names
                    ref = sum(truth[k] for k in covered)
                    out[c].err_vs_truth = max_rel_err(n, ref)
                    # a compiled tracked step against the same tracking, eager
                    same = norms.get(c[len("compiled "):]) if c.startswith("compiled ") else gn
                    if same is not None and c not in ("gradnoise all", "gradnoise norm"):
                        out[c].err_vs_gradnoise = max_rel_err(n, same)
                    if len(covered) != len(all_names):
                        cov = sum(int(dict(trainable_params(model))[k].numel()) for k in covered)
                        tot = sum(int(p.numel()) for _, p in trainable_params(model))
                        out[c].coverage = f"{len(covered)}/{len(all_names)} ({cov / tot:.1%})"
                        if c.endswith("gradnoise norm"):
                            frac = statistics.median((n / gn).tolist()) if gn is not None else float("nan")
                            out[c].coverage = f"norm ({cov / tot:.2%})"
                            out[c].note = ", ".join(filter(None, [out[c].note, f"= {frac:.1%} of all"]))
            progress(f"{mname}: checked", 1)
            for c, p in prepared.items():
                note, detail = p.describe() if p.describe else (p.note, p.detail)
                if any(w.startswith("no vmap batching rule") for w in said.get(c, [])):
                    note = ", ".join(filter(None, [note, "vmap loops"]))
                out[c].note = ", ".join(filter(None, [out[c].note, note]))
                out[c].detail = "; ".join(filter(None, [detail] + said.get(c, [])))
            steps = {c: p.step for c, p in prepared.items()}
            for p in prepared.values():
                if p.estimator_times is not None:
                    p.estimator_times.clear()  # the check and warm-up steps do not count
            own = {c: p.own_plain for c, p in prepared.items() if p.own_plain is not None}
            baselines = {c: p.baseline for c, p in prepared.items()}
            for c, b in baselines.items():
                if c not in own and b != "plain" and b in steps:
                    own[c] = (_nothing, steps[b], _nothing)
                    out[c].baseline = b
            times, paired = interleaved_pairs(steps, first, repeats, warmup, slow_budget_s,
                                         min_repeats, lambda: progress(f"{mname}: timing", 1),
                                         own)
            for c, ts in times.items():
                out[c].repeats = len(ts)
                out[c].median_ms = statistics.median(ts) * 1e3
                out[c].ratio = statistics.median(a / b for a, b in zip(ts, paired[c]))
                est = prepared[c].estimator_times
                if est:
                    # the last len(ts) entries are the timed steps (warm-up ran first)
                    share = statistics.median(e / b for e, b in zip(est[-len(ts):], paired[c]))
                    out[c].estimator_share = share
                    out[c].note = ", ".join(filter(None, [out[c].note, f"estimator {share:.2%}"]))
            for c, p in prepared.items():
                if p.graph_breaks is not None:   # after the timing: it resets torch.compile
                    out[c].graph_breaks = p.graph_breaks()
                    out[c].note = ", ".join(filter(None, [out[c].note,
                                                          f"{out[c].graph_breaks} graph breaks"]))
            del steps, prepared
            trim_heap()
            if mem_why is None:
                for c in candidates:
                    if out[c].available:
                        progress(f"{mname}: memory of {c}")
                        try:
                            out[c].peak_mb = peak_memory_mb(mname, c)
                        except Exception as e:
                            out[c].detail = "; ".join(filter(None, [out[c].detail, f"memory: {e}"]))
                    progress(f"{mname}: memory", 1)
            elif memory:
                out["plain"].detail = "; ".join(filter(None, [out["plain"].detail,
                                                              f"memory not measured: {mem_why}"]))
            if mem_why is None:
                for c in candidates:
                    base = out[out[c].baseline].peak_mb
                    if out[c].peak_mb is not None and base:
                        out[c].peak_ratio = out[c].peak_mb / base
            rows.extend(out[c] for c in candidates)
    return rows


def _nothing() -> None:
    pass


if __name__ == "__main__":
    from rich.console import Console
    import argparse
    ap = argparse.ArgumentParser(description="training-step benchmark against peers")
    ap.add_argument("--models", nargs="*", default=["mlp", "lm", "cnn"])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--compile", action="store_true",
                    help="also the steps of the model compiled by torch.compile")
    ap.add_argument("--candidates", nargs="*", default=None,
                    help="the candidates to run (default: all; plain always runs)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    console = Console(width=None if sys.stdout.isatty() else 200)
    chosen = list(a.candidates or CANDIDATES) + (list(COMPILED_CANDIDATES) if a.compile else [])
    res = run(a.models, a.repeats, memory=not a.no_memory, candidates=chosen,
              on_progress=lambda d, k, n: print(f"[{k}/{n}] {d}", file=sys.stderr, flush=True))
    print_report(res, console)
    if a.json:
        with open(a.json, "w") as f:
            json.dump([r.to_dict() for r in res], f, indent=1)
