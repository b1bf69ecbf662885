"""The Hugging Face Trainer callbacks with the real Trainer on CPU: the
readings of a plain loop (a GPT-2 built from a config, its loss divided by
the step's tokens), no second read of the gradients, accumulation changed
exactly at step boundaries (the weights of a hand-written loop), the
schedule driven by samples, checkpoints, refusals."""
from __future__ import annotations

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

from gradnoise.integrations.transformers import (AdaptiveBatchCallback,  # noqa: E402
                                                 NoiseScaleCallback)
from gradnoise.noise_scale import GradientNoiseScale  # noqa: E402
from gradnoise.noise_scale.gradients import GradSqNorms  # noqa: E402

pytestmark = pytest.mark.timeout(300)


def arguments(tmp_path, **kw):
    args = dict(output_dir=str(tmp_path), per_device_train_batch_size=4,
                gradient_accumulation_steps=2, num_train_epochs=1, learning_rate=0.05,
                lr_scheduler_type="constant", optim="sgd", weight_decay=0.0, max_grad_norm=0.0,
                logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0,
                train_sampling_strategy="sequential", dataloader_num_workers=0,
                disable_tqdm=True)
    args.update(kw)
    return TrainingArguments(**args)


# -------------------------------------------------------------- a GPT-2 LM
def tiny_gpt2():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def token_data(n=32, T=9, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 32, (n, T), generator=gen)
    return [{"input_ids": ids[i], "labels": ids[i]} for i in range(n)]


def test_monitor_on_gpt2_reads_as_a_plain_loop(tmp_path, monkeypatch):
    """The Trainer divides each micro-batch's summed token loss by the step's
    label tokens (72 here, of which GPT-2 predicts 64): its gradient is 64/72
    of the mean loss's, which the plain loop's learning rate matches. B_simple
    is that of the mean loss over samples, ‖G‖² that of the per-sample summed
    token loss (8 predicted tokens each). The gradients are never read twice:
    ‖G_B‖ is the Trainer's own norm (computed even when nothing is clipped)."""
    data = token_data()
    monkeypatch.setattr(GradSqNorms, "per_layer", lambda self: pytest.fail("gradient read"))
    model = tiny_gpt2()
    callback = NoiseScaleCallback(source="per_sample", beta=0.5)
    trainer = Trainer(model=model, args=arguments(tmp_path), train_dataset=data)
    callback.attach(trainer)
    trainer.train()
    got = callback.noise.read()
    monkeypatch.undo()
    assert callback.source == "per_sample" and got.steps == 4

    plain = tiny_gpt2()
    opt = torch.optim.SGD(plain.parameters(), lr=0.05 * 64 / 72)
    gns = GradientNoiseScale(plain, source="per_sample", beta=0.5)
    ids = torch.stack([d["input_ids"] for d in data])
    sq_norms = []
    for step in range(4):
        for j in range(2):
            x = ids[8 * step + 4 * j: 8 * step + 4 * j + 4]
            (plain(input_ids=x, labels=x).loss / 2).backward()
            gns.after_backward(0.5)
        sq_norms.append(gns.step(8).sq_norm)
        opt.step()
        opt.zero_grad()
    want = gns.read()
    # float32 model: the two runs round differently over 4 steps
    assert got.b_simple == pytest.approx(want.b_simple, rel=1e-4)
    assert got.sq_norm == pytest.approx(want.sq_norm * 8 ** 2, rel=1e-4)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 4 and all("noise/sq_norm" in h for h in logs)
    # a step whose ‖G‖² estimate is not positive has no B_simple: left out, not zero
    assert [("noise/b_simple" in h) for h in logs] == [r > 0 for r in sq_norms]
    assert logs[-1]["noise/b_simple"] == pytest.approx(got.b_simple)


# ---------------------------------------------------- a regression, exactly
class Regression(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()

    def forward(self, x, labels):
        return {"loss": nn.functional.mse_loss(self.net(x), labels)}


def regression_data(n=96, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    y = x.sum(1, keepdim=True) + 1.0 + 0.5 * torch.randn(n, 1, generator=gen, dtype=torch.float64)
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


def hand_loop(steps, lr, schedule=lambda s: 1.0, initial=8):
    """SGD over [(samples, factor)] in data order, each step the mean gradient."""
    model, data = Regression(), regression_data()
    at, seen = 0, 0
    for n, factor in steps:
        x = torch.stack([d["x"] for d in data[at:at + n]])
        y = torch.stack([d["labels"] for d in data[at:at + n]])
        at += n
        model.zero_grad()
        model(x, y)["loss"].backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= lr * schedule(seen // initial) * factor * p.grad
        seen += n
    return model


def adaptive_run(tmp_path, **kw):
    callback = AdaptiveBatchCallback(max_batch=32, policy="schedule", lr_rule="linear",
                                     warmup_steps=0, schedule=[(0, 8), (16, 16), (48, 32)])
    model = Regression()
    trainer = Trainer(model=model, args=arguments(tmp_path, **kw), train_dataset=regression_data(),
                      eval_dataset=regression_data(16) if "eval_strategy" in kw else None)
    callback.attach(trainer)
    trainer.train()
    return model, callback, trainer


def test_accumulation_grows_exactly_at_step_boundaries(tmp_path):
    model, callback, trainer = adaptive_run(tmp_path)
    history = callback.history
    assert [h["batch_size"] for h in history] == [8, 8, 16, 16, 16, 32]
    assert [h["accumulation"] for h in history] == [2, 2, 4, 4, 4, 8]
    assert [h["lr_factor"] for h in history] == [1, 1, 2, 2, 2, 4]
    expected = hand_loop([(h["batch_size"], h["lr_factor"]) for h in history], lr=0.05)
    for p, q in zip(model.parameters(), expected.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    assert trainer.optimizer.param_groups[0]["lr"] == 0.05


def test_linear_schedule_runs_by_samples(tmp_path):
    """transformers' linear decay over max_steps = 12 steps of B0 = 8: by
    samples, its step after s samples is s/8 whatever the batch."""
    model, callback, trainer = adaptive_run(tmp_path, lr_scheduler_type="linear")
    steps = [(h["batch_size"], h["lr_factor"]) for h in callback.history]
    expected = hand_loop(steps, lr=0.05, schedule=lambda s: (12 - s) / 12)
    for p, q in zip(model.parameters(), expected.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    assert trainer.lr_scheduler.last_epoch == 12
    assert trainer.state.global_step == 6


def test_max_steps_reads_as_steps_at_the_initial_batch(tmp_path):
    """max_steps=5 at B0 = 8: training stops after 40 samples."""
    _, callback, trainer = adaptive_run(tmp_path, max_steps=5)
    assert callback.plan.samples_seen == 48     # the step that passes 40 ends it
    assert [h["batch_size"] for h in callback.history] == [8, 8, 16, 16]


def test_resume_before_the_batch_grew_and_refusal_after(tmp_path):
    callback = AdaptiveBatchCallback(max_batch=32, policy="schedule", lr_rule="linear",
                                     warmup_steps=0, schedule=[(0, 8), (32, 16)])
    trainer = Trainer(model=Regression(), args=arguments(tmp_path, save_strategy="steps",
                                                         save_steps=1),
                      train_dataset=regression_data())
    callback.attach(trainer)
    trainer.train()
    full = [h["batch_size"] for h in callback.history]
    assert full[:5] == [8, 8, 8, 8, 16]

    def resume(step):
        cb = AdaptiveBatchCallback(max_batch=32, policy="schedule", lr_rule="linear",
                                   warmup_steps=0, schedule=[(0, 8), (32, 16)])
        model = Regression()
        t = Trainer(model=model, args=arguments(tmp_path), train_dataset=regression_data())
        cb.attach(t)
        t.train(resume_from_checkpoint=str(tmp_path / f"checkpoint-{step}"))
        return cb

    resumed = resume(2)
    assert [h["batch_size"] for h in resumed.history] == full[2:]
    with pytest.raises(ValueError, match="grown from 2"):
        resume(5)


def test_refusals_name_the_culprit(tmp_path):
    with pytest.raises(ValueError, match="schedule_by"):
        AdaptiveBatchCallback(max_batch=32, schedule_by="epochs")
    trainer = Trainer(model=Regression(), args=arguments(tmp_path),
                      train_dataset=regression_data())
    trainer.add_callback(NoiseScaleCallback())
    with pytest.raises(RuntimeError, match=r"attach\(trainer\)"):
        trainer.train()
    trainer = Trainer(model=Regression(), args=arguments(tmp_path),
                      train_dataset=regression_data())
    AdaptiveBatchCallback(max_batch=4).attach(trainer)
    with pytest.raises(ValueError, match="max_batch"):
        trainer.train()


# ------------------------------------------------------------ the edge cases
def test_evaluation_during_training_changes_nothing(tmp_path):
    """Evaluation runs the model (and compute_loss) between training steps:
    it is neither a micro-batch nor samples of a step."""
    model, callback, trainer = adaptive_run(tmp_path, eval_strategy="steps", eval_steps=1,
                                            per_device_eval_batch_size=8)
    assert [h["batch_size"] for h in callback.history] == [8, 8, 16, 16, 16, 32]
    expected = hand_loop([(h["batch_size"], h["lr_factor"]) for h in callback.history], lr=0.05)
    for p, q in zip(model.parameters(), expected.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def _trainer_with_eval(tmp_path, **kw):
    return Trainer(model=Regression(), args=arguments(tmp_path, **kw),
                   train_dataset=regression_data(), eval_dataset=regression_data(16))


def test_a_second_train_starts_afresh_and_the_arguments_are_given_back(tmp_path):
    callback = AdaptiveBatchCallback(max_batch=32, policy="schedule", lr_rule="linear",
                                     warmup_steps=0, schedule=[(0, 8), (16, 16), (48, 32)])
    trainer = _trainer_with_eval(tmp_path)
    callback.attach(trainer)
    trainer.train()
    first = [h["batch_size"] for h in callback.history]
    assert trainer.args.gradient_accumulation_steps == 2
    trainer.evaluate()
    trainer.train()
    assert [h["batch_size"] for h in callback.history] == first
    assert not any(h["skipped"] for h in callback.history)


def test_monitor_resumes_its_estimates(tmp_path):
    def run(**kw):
        callback = NoiseScaleCallback(source="micro_batch", beta=0.5)
        t = Trainer(model=Regression(), args=arguments(tmp_path, **kw),
                    train_dataset=regression_data())
        callback.attach(t)
        return callback, t
    full, t = run(save_strategy="steps", save_steps=4)
    t.train()
    resumed, t = run()
    t.train(resume_from_checkpoint=str(tmp_path / "checkpoint-8"))
    a, b = full.noise.read(), resumed.noise.read()
    assert a.steps == b.steps == 12
    assert b.b_simple == pytest.approx(a.b_simple, rel=1e-9)


def test_an_epochs_short_last_step_is_not_measured_by_micro_batches(tmp_path):
    """10 micro-batches in steps of 3: the last step has one, which the
    micro-batch source cannot measure; it is left out, not an error."""
    callback = NoiseScaleCallback(source="micro_batch")
    trainer = Trainer(model=Regression(), args=arguments(tmp_path, gradient_accumulation_steps=3),
                      train_dataset=regression_data(40))
    callback.attach(trainer)
    trainer.train()
    assert trainer.state.global_step == 4 and callback.noise.read().steps == 3


def test_datasets_without_length_or_loss_factor_are_refused(tmp_path):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(regression_data())
    trainer = Trainer(model=Regression(), args=arguments(tmp_path, max_steps=4),
                      train_dataset=Stream())
    AdaptiveBatchCallback(max_batch=32).attach(trainer)
    with pytest.raises(ValueError, match="no length"):
        trainer.train()
    trainer = Trainer(model=Regression(), args=arguments(tmp_path), train_dataset=regression_data())
    NoiseScaleCallback().attach(trainer)
    trainer.loss_is_scaled_for_ga = True
    with pytest.raises(ValueError, match="num_items_in_batch is None"):
        trainer.train()
