"""The Lightning callbacks with the real Trainer on CPU: the readings of a
plain loop, accumulation changed exactly at step boundaries (the weights of a
hand-written loop over the same steps), the LR factor only inside the
optimizer step, the schedule by samples, a resumed fit, refusals, and DDP on
2 processes over gloo."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip("lightning.pytorch")

from gradnoise.integrations.lightning import AdaptiveBatchSize, NoiseScaleMonitor  # noqa: E402
from gradnoise.noise_scale import GradientNoiseScale  # noqa: E402

pytestmark = pytest.mark.timeout(300)


def regression_data(n=96, d=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    w = torch.randn(d, 1, generator=gen, dtype=torch.float64)
    y = x @ w + 1.0 + 0.5 * torch.randn(n, 1, generator=gen, dtype=torch.float64)
    return TensorDataset(x, y)


class Regression(L.LightningModule):
    def __init__(self, lr=0.05, d=4, schedule=None, batchnorm=False):
        super().__init__()
        torch.manual_seed(0)
        layers = [nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, 1)]
        if batchnorm:
            layers.insert(1, nn.BatchNorm1d(8))
        self.net = nn.Sequential(*layers).double()
        self.lr, self.schedule = lr, schedule

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        if self.schedule is None:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def trainer(callback, **kw):
    args = dict(accelerator="cpu", devices=1, max_epochs=2, logger=False,
                enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False)
    args.update(kw)
    return L.Trainer(callbacks=[callback], **args)


def loader(micro=4, n=96):
    return DataLoader(regression_data(n), batch_size=micro, shuffle=False)


def test_monitor_logs_the_reading_of_a_plain_loop():
    module = Regression()
    monitor = NoiseScaleMonitor(source="per_sample", beta=0.5)
    t = trainer(monitor, accumulate_grad_batches=3)
    t.fit(module, loader())
    assert monitor.source == "per_sample"

    plain = Regression()
    opt = torch.optim.SGD(plain.parameters(), lr=0.05)
    gns = GradientNoiseScale(plain.net, source="per_sample", beta=0.5)
    for _ in range(2):
        batches = list(loader())
        for s in range(0, len(batches), 3):
            for x, y in batches[s:s + 3]:
                (plain.training_step((x, y), 0) / 3).backward()
                gns.after_backward(1 / 3, len(x))
            gns.step()
            opt.step()
            opt.zero_grad()
    a, b = monitor.noise.read(), gns.read()
    assert a.steps == b.steps == 16
    assert a.b_simple == pytest.approx(b.b_simple, rel=1e-9)
    assert a.sq_norm == pytest.approx(b.sq_norm, rel=1e-9)
    logged = t.logged_metrics
    assert float(logged["noise/b_simple"]) == pytest.approx(a.b_simple, rel=1e-6)
    low, high = a.interval()
    assert float(logged["noise/b_simple_low"]) == pytest.approx(low, rel=1e-6)
    assert float(logged["noise/b_simple_high"]) == pytest.approx(high, rel=1e-6)


def _hand_loop(steps, lr, micro=4, epochs=1, schedule=None, initial=8):
    """SGD over `steps` = [(micro-batches, factor)], in data order, each step
    the mean gradient over its samples; what AdaptiveBatchSize must do."""
    module = Regression()
    batches = [b for _ in range(epochs) for b in loader(micro)]
    at, seen = 0, 0
    for k, factor in steps:
        chunk = batches[at:at + k]
        at += k
        n = sum(len(x) for x, _ in chunk)
        module.zero_grad()
        for x, y in chunk:
            (module.training_step((x, y), 0) * len(x) / n).backward()
        sched = 1.0 if schedule is None else schedule(seen // initial)
        with torch.no_grad():
            for p in module.parameters():
                p -= lr * sched * factor * p.grad
        seen += n
    return module


def test_accumulation_changes_exactly_at_step_boundaries():
    """A given ramp 8 → 16 → 32 (micro-batch 4): the accumulation becomes 2,
    4, 8 where the epoch's micro-batches allow (the ramp asks for 32 after
    12 micro-batches, 32 waits for the 16th), the step's gradient is the
    mean over its samples and the linear rule's factor is B/8."""
    callback = AdaptiveBatchSize(max_batch=32, policy="schedule", lr_rule="linear",
                                 warmup_steps=0, schedule=[(0, 8), (16, 16), (48, 32)])
    module = Regression()
    t = trainer(callback, accumulate_grad_batches=2, max_epochs=1)
    t.fit(module, loader())
    history = callback.history
    assert [h["batch_size"] for h in history] == [8, 8, 16, 16, 16, 32]
    assert [h["accumulation"] for h in history] == [2, 2, 4, 4, 4, 8]
    steps = [(h["batch_size"] // 4, h["lr_factor"]) for h in history]
    assert [f for _, f in steps] == [1, 1, 2, 2, 2, 4]
    expected = _hand_loop(steps, lr=0.05)
    for p, q in zip(module.parameters(), expected.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    # the factor lived only inside optimizer.step()
    assert t.optimizers[0].param_groups[0]["lr"] == 0.05


def test_schedule_by_samples_and_the_lr_factor_on_top_of_it():
    decay = lambda step: 1.0 / (1 + step)   # noqa: E731
    callback = AdaptiveBatchSize(max_batch=32, policy="schedule", lr_rule="linear",
                                 warmup_steps=0, schedule=[(0, 8), (16, 16), (48, 32)])
    module = Regression(schedule=decay)
    t = trainer(callback, accumulate_grad_batches=2, max_epochs=1)
    t.fit(module, loader())
    steps = [(h["batch_size"] // 4, h["lr_factor"]) for h in callback.history]
    expected = _hand_loop(steps, lr=0.05, schedule=decay)
    for p, q in zip(module.parameters(), expected.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    sched = t.lr_scheduler_configs[0].scheduler
    assert sched.last_epoch == 96 // 8
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05 * decay(12))


def test_critical_policy_grows_and_a_resumed_fit_continues_the_same_trajectory(tmp_path):
    def run(epochs, ckpt=None, save=None):
        callback = AdaptiveBatchSize(max_batch=48, policy="critical", lr_rule="sqrt",
                                     warmup_steps=2, hysteresis=0.0, confidence=0.0)
        module = Regression()
        t = trainer(callback, accumulate_grad_batches=1, max_epochs=epochs)
        t.fit(module, loader(), ckpt_path=ckpt)
        if save:
            t.save_checkpoint(save)
        return module, callback

    full, cb_full = run(6)
    assert max(h["batch_size"] for h in cb_full.history) > 4      # the batch grew
    half, _ = run(3, save=tmp_path / "half.ckpt")
    resumed, cb_resumed = run(6, ckpt=str(tmp_path / "half.ckpt"))
    tail = cb_full.history[-len(cb_resumed.history):]
    assert [h["batch_size"] for h in cb_resumed.history] == [h["batch_size"] for h in tail]
    for p, q in zip(full.parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_refusals_name_the_culprit():
    with pytest.raises(ValueError, match="max_steps"):
        trainer(AdaptiveBatchSize(max_batch=32), max_steps=5).fit(Regression(), loader())
    with pytest.raises(ValueError, match="schedule_by"):
        AdaptiveBatchSize(max_batch=32, schedule_by="epochs")
    step_lr = Regression()
    step_lr.configure_optimizers = lambda: {
        "optimizer": (o := torch.optim.SGD(step_lr.parameters(), lr=0.1)),
        "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(o, 3), "interval": "step"}}
    with pytest.raises(TypeError, match="StepLR.*schedule_by='steps'"):
        trainer(AdaptiveBatchSize(max_batch=32)).fit(step_lr, loader())
    with pytest.raises(ValueError, match="max_batch"):
        trainer(AdaptiveBatchSize(max_batch=4), accumulate_grad_batches=2).fit(Regression(),
                                                                              loader())
    with pytest.raises(ValueError, match="BatchNorm"):
        trainer(NoiseScaleMonitor(source="per_sample")).fit(Regression(batchnorm=True), loader())
    with pytest.raises(ValueError, match="accumulate_grad_batches"):
        trainer(NoiseScaleMonitor()).fit(Regression(batchnorm=True), loader())


def test_batchnorm_takes_the_micro_batches():
    monitor = NoiseScaleMonitor()
    trainer(monitor, accumulate_grad_batches=2).fit(Regression(batchnorm=True), loader(8))
    assert monitor.source == "micro_batch" and "BatchNorm" in monitor.source_reason
    assert monitor.noise.read().steps == 12


# ---------------------------------------------------------------------- DDP
class _Record(L.Callback):
    def on_fit_end(self, trainer, pl_module):
        cb = next(c for c in trainer.callbacks if isinstance(c, AdaptiveBatchSize))
        torch.save({"rank": trainer.global_rank, "source": cb.source,
                    "history": cb.history, "reading": cb.noise.read().b_simple,
                    "params": [p.detach().clone() for p in pl_module.parameters()]},
                   f"{self.out}/rank{trainer.global_rank}.pt")


class _Shared(Regression):
    """Rank r reads samples r, r + 2, ... in order (the DataLoader is made
    once the process group exists)."""

    def train_dataloader(self):
        from torch.utils.data.distributed import DistributedSampler
        data = regression_data()
        return DataLoader(data, batch_size=2, sampler=DistributedSampler(data, shuffle=False))


def test_ddp_on_two_processes_takes_the_global_batches_of_one(tmp_path):
    """ddp_spawn over gloo: the ranks' shares (DistributedSampler) make the
    single process's batches; the same ramp gives the same weights, and the
    replicas give the noise scale."""
    schedule = [(0, 8), (16, 16), (48, 32)]
    record = _Record()
    record.out = str(tmp_path)
    callback = AdaptiveBatchSize(max_batch=32, policy="schedule", lr_rule="linear",
                                 warmup_steps=0, schedule=schedule)
    t = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1,
                  accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False,
                  callbacks=[callback, record], use_distributed_sampler=False)
    t.fit(_Shared())
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["source"] == "distributed"
    assert ranks[0]["history"] == ranks[1]["history"]
    assert ranks[0]["reading"] == ranks[1]["reading"] and math.isfinite(ranks[0]["reading"])

    single = AdaptiveBatchSize(max_batch=32, policy="schedule", lr_rule="linear",
                               warmup_steps=0, schedule=schedule, source="micro_batch")
    module = Regression()
    trainer(single, accumulate_grad_batches=2, max_epochs=1).fit(module, loader())
    assert [h["batch_size"] for h in ranks[0]["history"]] == [
        h["batch_size"] for h in single.history]
    for p, q in zip(ranks[0]["params"], module.parameters()):
        torch.testing.assert_close(p, q.detach(), rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------ the edge cases
def test_a_callback_used_for_a_second_fit_starts_afresh():
    callback = AdaptiveBatchSize(max_batch=32, policy="schedule", lr_rule="linear",
                                 warmup_steps=0, schedule=[(0, 8), (16, 16), (48, 32)])
    runs = []
    for _ in range(2):
        module = Regression()
        t = trainer(callback, accumulate_grad_batches=2, max_epochs=1)
        t.fit(module, loader())
        runs.append(([(h["batch_size"], h["lr_factor"], h["skipped"]) for h in callback.history],
                     [p.detach().clone() for p in module.parameters()]))
        assert t.accumulate_grad_batches == 2           # the Trainer as it was given
    assert runs[0][0] == runs[1][0]
    for p, q in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


class _SkipsSome(Regression):
    def training_step(self, batch, batch_idx):
        return None if batch_idx % 3 == 2 else super().training_step(batch, batch_idx)


@pytest.mark.parametrize("source", ["per_sample", "micro_batch"])
def test_skipped_backwards_and_short_last_steps_are_left_unmeasured(source):
    """training_step returning None skips a backward (Lightning's way to skip
    a batch); 10 micro-batches in steps of 3 end on a step of one."""
    per_sample = source == "per_sample"
    monitor = NoiseScaleMonitor(source=source)
    trainer(monitor, accumulate_grad_batches=3, max_epochs=1).fit(Regression(), loader(n=40))
    assert monitor.noise.read().steps == (4 if per_sample else 3)   # 4 samples suffice per sample
    monitor = NoiseScaleMonitor(source=source)
    trainer(monitor, accumulate_grad_batches=2, max_epochs=1).fit(_SkipsSome(), loader(n=24))
    # steps of batches (0, 1), (2, 3), (4, 5); batches 2 and 5 skip their backward
    assert monitor.noise.read().steps == (3 if per_sample else 1)
