"""GradNoiseTracker under what a training loop also does: double backward,
copies and pickling, two trackers, replaced forwards, keyword calls,
eval-mode submodules, inputs shared by every sample, attention masks, the
fallback."""
from __future__ import annotations

import gc

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gradnoise import GradNoiseTracker
from tests.ground_truth import model_per_sample_sq_norms


# ------------------------------------------------ what a training loop also does
def _penalised_step(model, x):
    """A gradient penalty: ‖∂out/∂x‖² differentiated again (create_graph)."""
    model.zero_grad()
    x = x.clone().requires_grad_(True)
    out = model(x).sum()
    gx, = torch.autograd.grad(out, x, create_graph=True)
    (out + gx.square().sum()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("norm", ["layer", "rms", "group"])
def test_double_backward_gives_autograds_gradients_and_is_not_measured(norm):
    torch.manual_seed(0)
    if norm == "group":
        model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(),
                              nn.Linear(16, 1))
        x = torch.randn(3, 2, 4, 4)
    else:
        model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4) if norm == "layer" else nn.RMSNorm(4),
                              nn.Tanh(), nn.Linear(4, 1))
        x = torch.randn(3, 4)
    plain = _penalised_step(model, x)
    tracker = GradNoiseTracker(model)
    assert tracker.fused_modules
    tracked = _penalised_step(model, x)
    for n in plain:
        torch.testing.assert_close(tracked[n], plain[n], rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="create_graph"):
        tracker.per_sample_sq_norms()
    # an ordinary step afterwards is measured again
    model.zero_grad()
    model(x).sum().backward()
    assert tracker.per_sample_sq_norms().shape == (3,)


def test_copies_of_a_tracked_model_run_their_own_weights_and_pickle():
    import copy
    import io
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    tracker = GradNoiseTracker(model)
    assert tracker.fused_modules
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for p in copied.parameters():
            p.zero_()
    x = torch.randn(3, 5, 4)
    assert torch.equal(copied(x), torch.zeros(3, 5, 2))
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(loaded(x), model(x))
    # the tracker still measures the original, and only it
    model(x).square().sum().backward()
    assert tracker.per_sample_sq_norms().shape == (3,)
    copied(x).sum().backward()
    assert tracker.per_sample_sq_norms().shape == (3,)


def test_two_trackers_on_one_model_both_measure_and_detach_their_own():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 3))
    x = torch.randn(5, 2, 4)
    truth = model_per_sample_sq_norms(model, x, torch.zeros(x.shape[0]), lambda o, t: o.square().sum(),
                                      params=["1.weight", "1.bias"])
    norm_only = GradNoiseTracker(model, layers="norm", loss_reduction="sum")
    every = GradNoiseTracker(model, loss_reduction="sum")
    model(x).square().sum().backward()
    torch.testing.assert_close(norm_only.per_sample_sq_norms().double(), truth, rtol=1e-5, atol=0)
    torch.testing.assert_close(every.per_layer_sq_norms()["1"].double(), truth, rtol=1e-5, atol=0)
    every.detach()
    assert norm_only.attached and "forward" in model[1].__dict__
    norm_only.detach()
    assert not any("forward" in m.__dict__ for m in model.modules())
    # a module taken over by another tracker while this one was detached
    first = GradNoiseTracker(model)
    first.detach()
    second = GradNoiseTracker(model)
    with pytest.raises(ValueError, match="already measured by another"):
        first.attach()
    assert not first.attached and second.attached
    assert all("forward" in model[k].__dict__ for k in (0, 2))


def test_forward_replaced_on_the_instance_is_kept():
    import functools
    lin = nn.Linear(4, 4)
    lin.forward = functools.partial(lambda x, f: f(x) * 2.0, f=lin.forward)
    model = nn.Sequential(lin, nn.Linear(4, 2))
    x = torch.randn(3, 5, 4)
    truth = model_per_sample_sq_norms(model, x, torch.zeros(x.shape[0]), lambda o, t: o.sum())
    before = model(x)
    tracker = GradNoiseTracker(model, loss_reduction="sum")
    # '0' runs its replaced forward, measured from its functional calls
    assert tracker.fused_modules == ["1"] and tracker.fallback_modules == []
    out = model(x)
    assert torch.equal(out, before)
    out.sum().backward()
    torch.testing.assert_close(tracker.per_sample_sq_norms().double(), truth, rtol=1e-5, atol=0)
    tracker.detach()
    assert torch.equal(model(x), before) and "forward" in lin.__dict__


def test_layers_called_by_keyword():
    class ByKeyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.norm = nn.RMSNorm(3)

        def forward(self, x):
            return self.norm(x=self.fc(input=x))

    torch.manual_seed(0)
    model = ByKeyword()
    x = torch.randn(2, 5, 4)
    truth = model_per_sample_sq_norms(model, x, torch.zeros(x.shape[0]), lambda o, t: o.square().sum())
    tracker = GradNoiseTracker(model, loss_reduction="sum")
    assert set(tracker.fused_modules) == {"fc", "norm"}
    model(x).square().sum().backward()
    torch.testing.assert_close(tracker.per_sample_sq_norms().double(), truth, rtol=1e-5, atol=0)


def test_modules_in_eval_mode_inside_a_training_forward_are_measured():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    model[1].eval()
    x = torch.randn(3, 4)
    truth = model_per_sample_sq_norms(model, x, torch.zeros(x.shape[0]), lambda o, t: o.sum())
    tracker = GradNoiseTracker(model, loss_reduction="sum")
    model(x).sum().backward()
    assert set(tracker.per_layer_sq_norms()) == {"0", "1", "2"}
    torch.testing.assert_close(tracker.per_sample_sq_norms().double(), truth, rtol=1e-5, atol=0)


def test_parameter_shared_with_an_untracked_module_is_refused():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(9, 4)
            self.mix = nn.Linear(4, 4)
            self.head = nn.Linear(4, 9, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, idx):
            return self.head(torch.tanh(self.mix(self.emb(idx))))

    with pytest.raises(ValueError, match=r"\['emb'\] is also used by \['head'\]"):
        GradNoiseTracker(Tied(), layers=lambda name, m: name == "emb")
    GradNoiseTracker(Tied(), layers=lambda name, m: name in ("emb", "head")).detach()


class _SharedQuery(nn.Module):
    """`mod` called on the batch and on a tensor of `rows` rows shared by every sample."""
    def __init__(self, mod, rows):
        super().__init__()
        self.mod = mod
        self.register_buffer("q", torch.randn(rows, 4, 5, generator=torch.Generator().manual_seed(3)))
        self.head = nn.Linear(20, 2)

    def forward(self, x):
        shared = self.mod(self.q)
        if shared.shape[0] != 1:
            shared = shared.mean(0, keepdim=True)
        return self.head((self.mod(x) * shared).flatten(1))


@pytest.mark.parametrize("mod, kw, rows", [(nn.Linear(5, 5), {}, 1), (nn.Linear(5, 5), {}, 2),
                                           (nn.Linear(5, 5), dict(fused_backward=False), 2),
                                           (nn.GroupNorm(2, 4), dict(fused_backward=False), 1),
                                           (nn.GroupNorm(2, 4), {}, 1),
                                           (nn.BatchNorm1d(4).eval(), {}, 1)],
                         ids=["linear", "linear-2-rows", "linear-2-rows-hooked", "groupnorm",
                              "groupnorm-fused", "batchnorm-eval"])
def test_a_module_called_on_the_batch_and_on_an_input_shared_by_every_sample(mod, kw, rows):
    """The call on the shared input broadcasts over the batch: sample i's
    share of its gradient is the part that flows into sample i's outputs."""
    model = _SharedQuery(mod, rows)
    x, y = torch.randn(3, 4, 5), torch.randn(3, 2)
    truth = model_per_sample_sq_norms(model, x, y, lambda o, t: ((o - t) ** 2).sum())
    plain = model(x)
    with GradNoiseTracker(model, loss_reduction="sum", **kw) as tracker:
        out = model(x)
        torch.testing.assert_close(out, plain, rtol=1e-6, atol=1e-7)
        ((out - y) ** 2).sum().backward()
        assert tracker.fallback_modules == []
        torch.testing.assert_close(tracker.per_sample_sq_norms().double(), truth, rtol=1e-5,
                                   atol=1e-6)


def test_a_shared_input_of_several_rows_is_refused_where_rows_cannot_be_split():
    for mod, kw in [(nn.GroupNorm(2, 4), dict(fused_backward=False)), (nn.GroupNorm(2, 4), {}),
                    (nn.BatchNorm1d(4).eval(), {})]:
        model = _SharedQuery(mod, rows=2)
        tracker = GradNoiseTracker(model, **kw)
        with pytest.raises(RuntimeError, match=r"module 'mod' .* input of 2 rows along dim 0 in "
                                               r"a batch of 3"):
            model(torch.randn(3, 4, 5)).sum().backward()
        tracker.detach()


def test_batchnorm_with_batch_statistics_in_eval_mode_is_refused_and_all_are_named():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, affine=False, track_running_stats=False),
                          nn.Linear(4, 2))
    model[1].eval()
    with pytest.raises(ValueError, match=r"'1' \(BatchNorm1d\)"):
        GradNoiseTracker(model)
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.Flatten(), nn.Linear(8, 3),
                          nn.BatchNorm1d(3, affine=False))
    model.eval()
    model[0].train()
    model[3].train()
    GradNoiseTracker(model)
    model.train()
    with pytest.raises(RuntimeError, match=r"'1' \(BatchNorm1d\), '4' \(BatchNorm1d\)"):
        model(torch.randn(4, 2, 4))


def test_attention_masks_shared_and_per_sample():
    class Attend(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x, mask):
            return self.head(self.mha(x, x, x, attn_mask=mask, need_weights=False)[0].mean(1))

    torch.manual_seed(0)
    # a causal [T, T] mask with T = B, and a per-sample [B·heads, T, T] one
    for B, T, mask in [(4, 4, nn.Transformer.generate_square_subsequent_mask(4)),
                       (3, 5, torch.randn(6, 5, 5))]:
        model = Attend()
        x = torch.randn(B, T, 8)
        tracker = GradNoiseTracker(model, loss_reduction="sum")
        model(x, mask).square().sum().backward()
        tracker.detach()
        truth = []
        for i in range(B):
            model.zero_grad()
            m_i = mask if mask.dim() == 2 else mask.reshape(B, 2, T, T)[i]
            model.double()(x[i:i + 1].double(), m_i.double()).square().sum().backward()
            truth.append(sum(p.grad.square().sum() for p in model.parameters()))
            model.float()
        torch.testing.assert_close(tracker.per_sample_sq_norms().double(), torch.stack(truth),
                                   rtol=1e-4, atol=0)


class _BiasedMix(nn.Module):
    """A fallback module that takes one of the model's buffers as an input."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d) * 0.5)

    def forward(self, x, bias):
        return ((x * self.w) @ x.transpose(1, 2) + bias).softmax(-1) @ x


class _BufferAsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix = _BiasedMix(3)
        self.register_buffer("bias", torch.randn(4, 4))

    def forward(self, x):
        # a view of the buffer, as a causal mask sliced to the length is
        return self.mix(x, self.bias[:x.shape[1], :x.shape[1]]).mean(1).sum(1)


def test_fallback_keeps_the_models_own_tensors_shared_whatever_their_dim_0():
    torch.manual_seed(1)
    model = _BufferAsInput()
    x = torch.randn(4, 4, 3)                              # B = T = 4 = the buffer's dim 0
    truth = model_per_sample_sq_norms(model, x, torch.zeros(x.shape[0]), lambda o, t: o.sum())
    tracker = GradNoiseTracker(model, loss_reduction="sum")
    model(x).sum().backward()
    torch.testing.assert_close(tracker.per_sample_sq_norms().double(), truth, rtol=1e-5, atol=0)


def test_fallback_refuses_what_it_cannot_recompute_with_the_modules_name():
    from torch.nn.utils.parametrizations import weight_norm

    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(4, 5, batch_first=True)
            self.head = nn.Linear(5, 3)

        def forward(self, x):
            return self.head(self.rnn(x)[1][-1])          # h_n: [layers, B, H]

    model = Recurrent()
    GradNoiseTracker(model)
    with pytest.raises(ValueError, match=r"module 'rnn' \(GRU\).*dim 0 is not the batch"):
        model(torch.randn(3, 6, 4)).sum().backward()
    with pytest.raises(ValueError, match=r"'0' .*parametrized"):
        GradNoiseTracker(nn.Sequential(weight_norm(nn.Linear(4, 4)), nn.Linear(4, 3)))
    with pytest.raises(ValueError, match=r"'0.self_attn' \(MultiheadAttention\) has dropout 0.1"):
        GradNoiseTracker(nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)))

    class Noisy(nn.Module):          # cumsum of its parameter: the fallback re-runs it
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(4))
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            return self.drop(x * self.w.cumsum(0))

    model = nn.Sequential(Noisy())
    GradNoiseTracker(model)
    with pytest.raises(ValueError, match=r"'0.drop' \(Dropout\) has dropout 0.5"):
        model(torch.randn(3, 4)).sum().backward()

    class FunctionalDropout(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return F.dropout(x * self.w.cumsum(0), 0.5, self.training)

    model = nn.Sequential(FunctionalDropout())
    GradNoiseTracker(model)
    with pytest.raises(RuntimeError, match=r"module '0' \(FunctionalDropout\).*random"):
        model(torch.randn(3, 4)).sum().backward()


def test_dropout_after_a_captured_use_is_measured_exactly():
    """x·w then dropout: sample i's gradient of w is Σ_j c_j m_ij x_ij / (1 − p),
    with the step's own mask m read off the output."""
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.linspace(0.5, 2.0, 4))
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            return self.drop(x * self.w)

    model = nn.Sequential(Noisy(), nn.Linear(4, 1, bias=False))
    model[1].requires_grad_(False)
    x = torch.randn(6, 4)
    seen = []
    model[0].register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    with GradNoiseTracker(model, loss_reduction="sum") as tracker:
        model(x).sum().backward()
        hidden = seen[-1]
        assert tracker.fallback_modules == []
        kept = (hidden != 0).double() / 0.5
        truth = (model[1].weight.double() * kept * x.double()).square().sum(1)
        torch.testing.assert_close(tracker.per_sample_sq_norms().double(), truth, rtol=1e-5,
                                   atol=0)


def test_a_dropped_tracker_keeps_nothing_alive():
    import weakref
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 1))
    tracker = GradNoiseTracker(model)
    assert tracker.fused_modules
    refs = weakref.ref(model), weakref.ref(tracker)
    del model, tracker
    gc.collect()
    assert all(r() is None for r in refs)


def test_a_loaded_copy_of_a_tracked_model_is_planned_as_a_fresh_one():
    import copy
    import io
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    GradNoiseTracker(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for other in (torch.load(buf, weights_only=False), copy.deepcopy(model)):
        tracker = GradNoiseTracker(other)
        assert tracker.fused_modules == ["0", "1", "2"] and not tracker.fallback_modules
        assert GradNoiseTracker(other, layers="norm").tracked_modules == ["1"]
        tracker.detach()


def test_double_backward_under_autocast_through_fused_linear():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    x = torch.randn(3, 5, 4)

    def step():
        model.zero_grad()
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(xi).float().sum()
        gx, = torch.autograd.grad(out, xi, create_graph=True)
        (out + gx.square().sum()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = step()
    tracker = GradNoiseTracker(model)
    assert tracker.fused_modules == ["0", "2"]
    tracked = step()
    for n in plain:
        # the same bfloat16 products, summed in another order
        torch.testing.assert_close(tracked[n], plain[n], rtol=1.6e-2, atol=1e-3)


def test_fallback_shared_tensors_follow_the_model_after_it_is_converted():
    torch.manual_seed(1)

    model = _BufferAsInput()
    x = torch.randn(4, 4, 3, dtype=torch.float64)
    tracker = GradNoiseTracker(model, loss_reduction="sum")
    model.double()                                        # new buffer and parameter objects
    truth = model_per_sample_sq_norms(model, x, torch.zeros(4), lambda o, t: o.sum())
    model(x).sum().backward()
    torch.testing.assert_close(tracker.per_sample_sq_norms().double(), truth, rtol=1e-5, atol=0)
