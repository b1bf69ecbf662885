"""The fixed-batch sweep, its learning-rate search and pruning, resuming,
the engines, and branching, against the noisy quadratic model's known
answers."""
import json
import math
import statistics
import subprocess
import sys

import numpy as np
import pytest
import torch

from gradnoise.critical_batch import (BranchConfig, NoisyQuadratic, RunSpec, SweepConfig, Task,
                                      fit_front, quadratic_task, run_branches, run_sweep,
                                      train_run)
from gradnoise.critical_batch.runs import draw_batches
from gradnoise.critical_batch.search import BatchSearch
from gradnoise.critical_batch.sweep import SerialEngine

PROBLEM = NoisyQuadratic(dim=128, power=0.5, noise=4.0)
TASK = quadratic_task(PROBLEM)
TARGETS = [1.0, 0.6]
WINDOW = 20


def small_config(seed=0, **kw):
    base = dict(batches=[2, 4, 8, 16, 32, 64, 128], targets=TARGETS, lr=0.2, lr_factor=2.0,
                lr_points=3, max_steps=3000, window=WINDOW, seed=seed, bootstrap=100)
    base.update(kw)
    return SweepConfig(**base)


class CountingEngine(SerialEngine):
    def __init__(self):
        self.submitted = []

    def submit(self, fn, *args):
        self.submitted.append(args[1])
        return super().submit(fn, *args)


def test_sweep_recovers_the_exact_front_of_the_quadratic_model():
    """Each batch's best steps, and B_crit, against the recursion's over the
    same learning rates, read through the same trailing mean. Tolerance: four
    standard errors of the mean over five seeds (plus one step for the
    rounding of steps)."""
    sweeps = [run_sweep(TASK, small_config(seed), engine="serial", progress=False)
              for seed in range(5)]
    for target in TARGETS:
        exact_points = []
        for b in small_config().batches:
            rates = sorted({r.spec["lr"] for s in sweeps for r in s.records
                            if r.spec["batch"] == b})
            exact, _ = PROBLEM.best_analytic_steps(b, target, 3000, lrs=rates, window=WINDOW)
            got = [s.best[b][target][0] for s in sweeps]
            se = statistics.stdev(got) / math.sqrt(len(got))
            assert abs(statistics.mean(got) - exact) <= 4 * se + 1.0, (target, b, got, exact)
            exact_points.append((b, exact))
        exact_fit = fit_front(*zip(*exact_points), bootstrap=0)
        measured = [s.fits[target].b_crit for s in sweeps]
        se = statistics.stdev(measured) / math.sqrt(len(measured))
        assert abs(statistics.mean(measured) - exact_fit.b_crit) <= 4 * se, (measured,
                                                                             exact_fit.b_crit)
    # larger batches need fewer steps and, past B_crit, more examples
    best = sweeps[0].best
    target = TARGETS[-1]
    steps = [best[b][target][0] for b in sorted(best)]
    assert all(a >= b for a, b in zip(steps, steps[1:]))
    assert best[128][target][0] * 128 > 2 * best[2][target][0] * 2


def test_search_extends_the_grid_while_the_best_rate_is_on_its_edge():
    # a starting rate 16× too small: the search must walk up to the best one
    result = run_sweep(TASK, small_config(batches=[16], lr=0.2 / 16, max_extensions=6),
                       engine="serial", progress=False)
    rates = sorted(r.spec["lr"] for r in result.records)
    best = result.best_lr[16]
    assert rates[0] < best < rates[-1]
    scores = {r.spec["lr"]: r.steps_to(TARGETS[-1]) for r in result.records}
    assert scores[best] == min(scores.values())


def test_a_run_that_cannot_beat_the_best_stops_at_its_steps():
    search = BatchSearch(small_config().template(8), start_lr=0.2)
    first = search.next_spec()
    assert search.next_spec() is None        # one at a time: the next one gets a budget
    record = train_run(TASK, first)
    search.finish(first, record)
    nxt = search.next_spec()
    # S updates show in the mean at step S + 1 + lag: the budget to still tie
    assert nxt.max_steps == math.ceil(record.steps_to(min(TARGETS)) + 1 + (WINDOW - 1) / 2)
    pruned = train_run(TASK, nxt)
    assert len(pruned.losses) <= nxt.max_steps
    assert pruned.status in ("done", "budget", "diverged")


def test_resume_reuses_finished_runs_and_refuses_other_settings(tmp_path):
    config = small_config(batches=[4, 16, 64])
    first = run_sweep(TASK, config, out=tmp_path, engine="serial", progress=False)
    files = sorted((tmp_path / "runs").glob("*.json"))
    assert len(files) == len(first.records)
    counting = CountingEngine()
    again = run_sweep(TASK, config, out=tmp_path, engine=counting, resume=True, progress=False)
    assert counting.submitted == []
    assert again.best == first.best
    # a sweep stopped half-way: only the missing runs are trained
    files[0].unlink()
    counting = CountingEngine()
    run_sweep(TASK, config, out=tmp_path, engine=counting, resume=True, progress=False)
    assert [s.key for s in counting.submitted] == [files[0].stem]
    with pytest.raises(FileExistsError, match="--resume"):
        run_sweep(TASK, config, out=tmp_path, engine="serial", progress=False)
    with pytest.raises(ValueError, match="max_steps"):
        run_sweep(TASK, small_config(batches=[4, 16, 64], max_steps=50), out=tmp_path,
                  engine="serial", resume=True, progress=False)
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert saved["config"]["max_steps"] == 3000            # the refused call changed nothing


def test_process_pool_gives_the_serial_results():
    config = small_config(batches=[4, 32])
    serial = run_sweep(TASK, config, engine="serial", progress=False)
    pooled = run_sweep(TASK, config, progress=False)         # local spawn pool
    assert pooled.best == serial.best
    assert [r.losses for r in pooled.records] == [r.losses for r in serial.records]


def test_submitit_local_executor_runs_the_sweep(tmp_path):
    submitit = pytest.importorskip("submitit")
    executor = submitit.LocalExecutor(folder=tmp_path / "jobs")
    executor.update_parameters(timeout_min=5)
    config = small_config(batches=[8, 32])
    got = run_sweep(TASK, config, engine=executor, progress=False)
    serial = run_sweep(TASK, config, engine="serial", progress=False)
    assert got.best == serial.best


def test_noise_scale_along_the_runs():
    config = small_config(batches=[8], noise_interval=2, noise_source="micro_batch", window=1,
                          noise_per_layer=True)
    result = run_sweep(TASK, config, engine="serial", progress=False)
    run = next(r for r in result.records if r.spec["lr"] == result.best_lr[8])
    assert run.noise and all(math.isfinite(n["b_simple"]) for n in run.noise)
    # one module owns θ: its per-layer reading is the whole model's
    assert all(n["layers"][""] == pytest.approx(n["b_simple"]) for n in run.noise)
    # at the start B_simple is Σc/Σh² (a few estimates in)
    assert run.noise[0]["b_simple"] == pytest.approx(PROBLEM.b_simple(), rel=0.6)
    # it grows as the loss falls (‖G‖ shrinks faster than tr Σ)
    assert np.mean([n["b_simple"] for n in run.noise[-3:]]) > PROBLEM.b_simple()


@pytest.mark.parametrize("bad,match", [(dict(batches=[0, 4]), "positive integers"),
                                       (dict(targets=[math.nan]), "finite"),
                                       (dict(lr=-1.0), "lr"),
                                       (dict(lr_rule="cube"), "lr_rule"),
                                       (dict(window=0), "window"),
                                       (dict(batches=[3, 8], noise_interval=2,
                                             noise_source="micro_batch"), "halves")])
def test_sweep_config_names_what_is_wrong(bad, match):
    with pytest.raises(ValueError, match=match):
        small_config(**bad)


def test_branching_reads_what_the_quadratic_model_predicts():
    """Each branch's smoothed loss against its expectation from the recursion
    (started from the trunk's expected moments at the checkpoint, read by the
    same rules), within 4 standard errors over 8 seeds; and the median critical
    batch of the seeds is the one the expected losses give, within one factor."""
    config = dict(batch=2, lr=0.1, checkpoints=[5, 100], factors=[1, 2, 4, 8, 16],
                  lr_rule="linear", epsilon=0.05, window=8, branch_examples=256)
    runs = [run_branches(TASK, BranchConfig(**config, seed=s), progress=False)
            for s in range(8)]
    rates = {k: 0.1 * k for k in config["factors"]}
    for i, step in enumerate(config["checkpoints"]):
        exact = PROBLEM.branch_losses(2, 0.1, step, config["factors"], rates,
                                      config["branch_examples"], config["window"])
        for k in config["factors"]:
            got = [r[i].losses[k] for r in runs]
            se = statistics.stdev(got) / math.sqrt(len(got))
            assert abs(statistics.mean(got) - exact[k]) <= 4 * se, (step, k, got, exact[k])
        largest = 1
        for k in config["factors"][1:]:
            if exact[k] - exact[1] > 0.05 * exact[1]:
                break
            largest = k
        # one trunk's answer moves by a factor 2 or more between seeds (the ε test
        # on single runs); their median stays within one factor of the expected one
        measured = [r[i].critical_batch for r in runs]
        assert largest <= statistics.median(measured) <= 4 * largest, (measured, largest)
        for r in runs:
            p = r[i]
            assert p.step == step and p.examples == 2 * step and set(p.lrs) == set(rates)
            assert p.bounded == (p.critical_batch < 2 * 16)


def test_branching_refuses_a_diverged_base_branch():
    config = BranchConfig(batch=2, lr=50.0, checkpoints=[3], factors=[1, 2], window=1,
                          branch_examples=32, lr_rule="none")
    with pytest.raises(RuntimeError, match="diverged"):
        run_branches(TASK, config, progress=False)


def _pair_model():
    return torch.nn.Linear(1, 1)


def _sgd(params, lr):
    return torch.optim.SGD(params, lr=lr)


def _pair_loss(model, batch):
    x, y = batch
    assert torch.equal(y, 10 * x), "inputs and targets of a batch come from different samples"
    return (model(x.float()) - y.float()).square().mean()


def _pairs():
    x = torch.arange(40).reshape(40, 1)
    return torch.utils.data.TensorDataset(x, 10 * x)


def test_a_dataset_task_draws_whole_samples_without_replacement():
    task = Task("pairs", model=_pair_model, optimizer=_sgd, loss=_pair_loss, data=_pairs)
    draw = draw_batches(task, seed=3)
    seen = torch.cat([draw(8)[0] for _ in range(5)]).flatten().tolist()
    assert sorted(seen) == list(range(40))                  # one epoch: each sample once
    # 40 = 2·16 + 8: the third batch takes 8 of this epoch and 8 of the next, never fewer
    draw = draw_batches(task, seed=4)
    batches = [draw(16)[0].flatten().tolist() for _ in range(5)]
    assert [len(b) for b in batches] == [16] * 5
    assert sorted(batches[0] + batches[1] + batches[2][:8]) == list(range(40))
    record = train_run(task, RunSpec(batch=8, lr=1e-3, seed=0, targets=(-1.0,), max_steps=7))
    assert len(record.losses) == 7 and record.status == "budget"


def test_the_command_runs_on_the_quadratic_model(tmp_path):
    out = tmp_path / "cb"
    code = subprocess.run([sys.executable, "-m", "gradnoise", "critical-batch", "--task",
                           "quadratic", "--batches", "4,16,64", "--targets", "1.0",
                           "--engine", "serial", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert code.returncode == 0, code.stderr[-3000:]
    assert "exact answer at loss 1" in code.stdout
    data = json.loads((out / "critical_batch.json").read_text())
    assert data["sweep"]["fits"]["1.0"]["b_crit"] > 0 and data["branches"]
    assert data["noise_scale"]
    for name in ("front.png", "best_lr.png", "critical_batch.png"):
        assert (out / name).stat().st_size > 10_000
    again = subprocess.run([sys.executable, "-m", "gradnoise", "critical-batch", "--task",
                            "quadratic", "--batches", "4,16,64", "--targets", "1.0",
                            "--engine", "serial", "--out", str(out), "--methods", "sweep"],
                           capture_output=True, text=True, timeout=600)
    assert again.returncode != 0 and "--resume" in again.stderr


def _failing_loss(model, z):
    if z.shape[0] == 16:
        raise FloatingPointError("the model's loss cannot be computed")
    return model(z)


def test_a_failing_run_is_named_and_the_finished_ones_are_kept(tmp_path):
    bad = Task(TASK.name, model=TASK.model, optimizer=TASK.optimizer, loss=_failing_loss,
               batches=TASK.batches)
    with pytest.raises(RuntimeError, match=r"the run B16_lr0\.2_seed0 failed: the model's loss") \
            as info:
        run_sweep(bad, small_config(batches=[8, 16]), out=tmp_path, engine="serial",
                  progress=False)
    assert isinstance(info.value.__cause__, FloatingPointError)
    assert [p.stem for p in (tmp_path / "runs").glob("*.json")] == ["B8_lr0.2_seed0"]
