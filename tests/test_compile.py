"""GradNoiseTracker on models compiled with torch.compile (CPU, the default
inductor backend): per-sample norms against float64 torch.func ground truth
(tests/ground_truth.py) on an MLP, a small transformer (Embedding, a torch.func
fallback module, LayerNorm, Linear, scaled_dot_product_attention, a tied head)
and nn.MultiheadAttention; the tracker attached before compiling, after a
compiled step, and to torch.compile's wrapper; layers="all" and "norm"; the
noise scale of a compiled model; and the graph breaks the tracker causes.

The tracker's hooks run Python with side effects at every tracked call (they
record the call, and its backward writes the norms into the step), so Dynamo
cannot trace them: each tracked module is a graph break, and runs as in eager
mode between compiled graphs. A module class without a rule, measured eagerly
from the functional calls its forward makes, cannot be watched inside a
compiled graph: it takes the exact torch.func fallback. These tests pin what
that gives: exact norms, no recompilation once the first steps have compiled,
and no break at all when the tracker is paused or detached. The number of
breaks is recorded (`record_property("graph_breaks", ...)`), not asserted,
except where it has a reason to be what it is. Two known limits close the
file: compiled autograd, and the check for parameters used outside their
modules, which a compiled forward hides (the tracker says so).

Shapes are tiny and each test compiles one model, with inductor where the
norms are checked, and with aot_eager (the same graphs and autograd nodes,
without code generation) where what is checked is the tracker's own
behaviour under Dynamo: the graphs counted, the fallback taken, a refusal.
The file runs in about a minute on two cores (a minute and a half with an
empty inductor cache).
"""
from __future__ import annotations

import copy
import gc

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gradnoise import GradientNoiseScale, GradNoiseTracker
from tests.ground_truth import model_per_sample_sq_norms
from tests.helpers import RTOL, TinyLM, make_case, lm_case

def _dynamo():
    """torch._dynamo, imported when a test runs: importing it imports triton,
    which tests/test_triton_linear.py must import first, in interpreter mode."""
    return torch._dynamo


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles its own models from scratch. The collection first
    drops the tracked modules of earlier tests, whose weak entries Dynamo
    would otherwise read while they die."""
    gc.collect()
    _dynamo().reset()
    yield
    _dynamo().reset()


def _graphs_compiled() -> int:
    return _dynamo().utils.counters["stats"]["unique_graphs"]


def _explain(model, x):
    """(graph breaks, their reasons' first lines) of one forward of `model`."""
    out = _dynamo().explain(model)(x)
    return out.graph_break_count, sorted(r.reason.splitlines()[0] for r in out.break_reasons)


def _lm(B: int, seed: int = 0):
    """A one-block TinyLM (tests/helpers.py): token embedding with padding and
    a tied head, a position parameter measured by the torch.func fallback,
    pre-LN attention through scaled_dot_product_attention, GELU MLP."""
    torch.manual_seed(seed)
    model = TinyLM(blocks=1)
    idx = torch.randint(0, 23, (B, 9))
    idx[:, -2] = 0
    idx[0, 1] = idx[0, 3] = 7
    return (model, idx) + lm_case(model, idx, "mean")


# ------------------------------------------------------------- exact norms
def test_mlp_compiled_gives_exact_norms_step_after_step():
    model, x, y, batch_loss, sample_loss = make_case("mlp", 6, "mean")
    gen = torch.Generator().manual_seed(1)
    batches = [(x, y)] + [(torch.randn(6, 20, generator=gen), torch.randint(0, 5, (6,), generator=gen))
                          for _ in range(2)]
    truths = [model_per_sample_sq_norms(model, xb, yb, sample_loss) for xb, yb in batches]
    tracker = GradNoiseTracker(model, loss_reduction="mean")
    compiled = torch.compile(model)
    graphs = []
    for (xb, yb), truth in zip(batches, truths):
        model.zero_grad()
        F.cross_entropy(compiled(xb), yb).backward()
        torch.testing.assert_close(tracker.per_sample_sq_norms().double(), truth, rtol=RTOL, atol=1e-8)
        graphs.append(_graphs_compiled())
    # the first measured step also checks for parameters used outside their
    # modules, and the second recompiles without that check; then nothing does
    assert graphs[2] == graphs[1]
    assert list(tracker.per_layer_sq_norms()) == ["net.0", "net.2", "net.4"]
    assert tracker.fallback_modules == []


@pytest.mark.parametrize("layers", ["all", "norm"])
def test_transformer_compiled_gives_exact_norms(layers):
    model, idx, y, batch_loss, sample_loss = _lm(4)
    eager = copy.deepcopy(model)
    if layers == "norm":
        names = [n for n, _ in model.named_parameters() if ".ln" in n or n.startswith("ln")]
        assert names == ["blocks.0.ln1.weight", "blocks.0.ln1.bias", "blocks.0.ln2.weight",
                         "blocks.0.ln2.bias", "ln_f.weight", "ln_f.bias"]
    else:
        names = None
    truth = model_per_sample_sq_norms(model, idx, y, sample_loss, names)
    tracker = GradNoiseTracker(model, loss_reduction="mean", layers=layers)
    eager_tracker = GradNoiseTracker(eager, loss_reduction="mean", layers=layers)
    compiled = torch.compile(model)
    for _ in range(2):
        model.zero_grad()
        out = compiled(idx)
        batch_loss(out).backward()
        norms = tracker.per_sample_sq_norms()
        torch.testing.assert_close(norms.double(), truth, rtol=RTOL, atol=1e-8)
    out_eager = eager(idx)
    batch_loss(out_eager).backward()
    torch.testing.assert_close(out, out_eager, rtol=1e-5, atol=1e-6)
    per_layer, eager_layers = tracker.per_layer_sq_norms(), eager_tracker.per_layer_sq_norms()
    assert list(per_layer) == list(eager_layers)
    for name in per_layer:
        torch.testing.assert_close(per_layer[name], eager_layers[name], rtol=1e-4, atol=1e-7)
    expected_fallback = ["pos"] if layers == "all" else []
    assert tracker.fallback_modules == eager_tracker.fallback_modules == expected_fallback
    for n, p in model.named_parameters():   # the compiled step's gradients are eager's
        torch.testing.assert_close(p.grad, dict(eager.named_parameters())[n].grad,
                                   rtol=1e-4, atol=1e-6)


def test_multihead_attention_compiled_gives_exact_norms():
    model, x, y, batch_loss, sample_loss = make_case("mha", 5, "sum")
    truth = model_per_sample_sq_norms(model, x, y, sample_loss)
    tracker = GradNoiseTracker(model, loss_reduction="sum")
    compiled = torch.compile(model)
    for _ in range(2):
        model.zero_grad()
        batch_loss(compiled(x)).backward()
        torch.testing.assert_close(tracker.per_sample_sq_norms().double(), truth, rtol=RTOL,
                                   atol=1e-8)
    assert list(tracker.per_layer_sq_norms()) == ["mha", "mha.out_proj", "head"]


class _Conv1D(nn.Module):
    """A module class without a rule (as GPT-2's Conv1D): y = x W + b."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_in, d_out) * 0.3)
        self.bias = nn.Parameter(torch.randn(d_out) * 0.1)

    def forward(self, x):
        return x @ self.weight + self.bias


class _WithConv1D(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = _Conv1D(8, 12), nn.Linear(12, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))).mean(1)


def test_module_without_a_rule_takes_the_exact_fallback_when_compiled():
    """Eager, its calls are watched and run through the fused kernel; a
    compiled forward cannot be watched, so it is measured by the torch.func
    fallback from then on, with the reason given (never left out)."""
    torch.manual_seed(0)
    model, x, y = _WithConv1D(), torch.randn(5, 4, 8), torch.randint(0, 3, (5,))
    truth = model_per_sample_sq_norms(model, x, y, lambda o, t: F.cross_entropy(o, t, reduction="sum"))
    tracker = GradNoiseTracker(model, loss_reduction="sum")
    F.cross_entropy(model(x), y, reduction="sum").backward()
    assert tracker.fallback_modules == []
    compiled = torch.compile(model, backend="aot_eager")
    for _ in range(2):
        model.zero_grad()
        F.cross_entropy(compiled(x), y, reduction="sum").backward()
        torch.testing.assert_close(tracker.per_sample_sq_norms().double(), truth, rtol=RTOL,
                                   atol=1e-8)
    assert list(tracker.per_layer_sq_norms()) == ["a", "b"]
    assert tracker.fallback_modules == ["a"]
    assert "torch.compile" in tracker.fallback_reasons["a"]


# ------------------------------------------------- where the tracker attaches
def test_tracker_attached_after_a_compiled_step_then_detached():
    model, x, y, batch_loss, sample_loss = make_case("mlp", 6, "sum")
    truth = model_per_sample_sq_norms(model, x, y, sample_loss)
    compiled = torch.compile(model)
    batch_loss(compiled(x)).backward()           # compiled without hooks
    plain_grads = [p.grad.clone() for p in model.parameters()]
    tracker = GradNoiseTracker(model, loss_reduction="sum")
    for _ in range(2):                            # the hooks are seen: recompiled
        model.zero_grad()
        batch_loss(compiled(x)).backward()
        torch.testing.assert_close(tracker.per_sample_sq_norms().double(), truth, rtol=RTOL,
                                   atol=1e-8)
    for p, g in zip(model.parameters(), plain_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
    measured = tracker.steps_measured
    tracker.detach()
    model.zero_grad()
    batch_loss(compiled(x)).backward()
    assert tracker.steps_measured == measured
    assert _explain(model, x)[0] == 0


def test_tracker_of_the_compiled_wrapper():
    """A tracker given torch.compile's wrapper measures the model inside it
    (its modules named under `_orig_mod`)."""
    model, x, y, batch_loss, sample_loss = make_case("mlp", 6, "mean")
    truth = model_per_sample_sq_norms(model, x, y, sample_loss)
    compiled = torch.compile(model)
    tracker = GradNoiseTracker(compiled, loss_reduction="mean")
    for _ in range(2):
        model.zero_grad()
        batch_loss(compiled(x)).backward()
        torch.testing.assert_close(tracker.per_sample_sq_norms().double(), truth, rtol=RTOL,
                                   atol=1e-8)
    assert list(tracker.per_layer_sq_norms()) == ["_orig_mod.net.0", "_orig_mod.net.2",
                                                   "_orig_mod.net.4"]


# ------------------------------------------------------------- noise scale
def test_noise_scale_per_sample_same_on_compiled_model():
    """GradientNoiseScale(source="per_sample") reads the same B_simple from a
    compiled model as from the same model uncompiled, on the same data."""
    model, _, _, _, _ = make_case("mlp", 8, "mean")
    twin = copy.deepcopy(model)
    gns = GradientNoiseScale(model, source="per_sample", beta=0.5)
    gns_twin = GradientNoiseScale(twin, source="per_sample", beta=0.5)
    compiled = torch.compile(model)
    gen = torch.Generator().manual_seed(3)
    for _ in range(4):
        x, y = torch.randn(8, 20, generator=gen), torch.randint(0, 5, (8,), generator=gen)
        for m, run, g in ((model, compiled, gns), (twin, twin, gns_twin)):
            m.zero_grad()
            F.cross_entropy(run(x), y).backward()
            g.step(8)
    a, b = gns.read(), gns_twin.read()
    assert a.b_simple == pytest.approx(b.b_simple, rel=1e-5)
    assert a.sq_norm == pytest.approx(b.sq_norm, rel=1e-5)
    assert a.trace == pytest.approx(b.trace, rel=1e-5)


# ------------------------------------------------------------- graph breaks
def _counting_backend(runs: list):
    """aot_eager (Dynamo's graphs and AOTAutograd's nodes, no code generation),
    appending to `runs` each time one of its graphs runs."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    def compiler(gm, example_inputs):
        def run(*args):
            runs.append(1)
            return gm(*args)
        return make_boxed_func(run)
    return aot_autograd(fw_compiler=compiler, bw_compiler=lambda gm, _: make_boxed_func(gm))


@pytest.mark.parametrize("name", ["mlp", "lm"])
def test_graph_breaks_are_the_trackers_and_stable(name, record_property):
    if name == "mlp":
        model, x = make_case("mlp", 6, "mean")[:2]
    else:
        model, x = _lm(4)[:2]
    assert _explain(model, x)[0] == 0             # the model alone is one graph
    tracker = GradNoiseTracker(model)
    runs = []
    compiled = torch.compile(model, backend=_counting_backend(runs))
    for _ in range(2):                            # first steps: compile, checks, recompile
        compiled(x).sum().backward()
    graphs, per_step = _graphs_compiled(), []
    for _ in range(3):
        runs.clear()
        compiled(x).sum().backward()
        per_step.append(len(runs))
    assert _graphs_compiled() == graphs           # no recompilation from step to step
    assert per_step[0] > 1 and per_step == per_step[:1] * 3
    breaks, reasons = _explain(model, x)
    record_property("graph_breaks", breaks)
    record_property("forward_graphs_per_step", per_step[0])
    record_property("graph_break_reasons", "; ".join(sorted(set(reasons))))
    # (explain counts the breaks of the model's frame; the graphs that run
    # include those of hook frames compiled on their own after a break)
    assert breaks > 0
    if name == "mlp":
        # one per Linear layer: the hook on its output, which writes the step's norms
        assert breaks == 3
    tracker.paused = True                         # an unmeasured step runs as one graph
    assert _explain(model, x)[0] == 0
    tracker.detach()
    assert _explain(model, x)[0] == 0
    if name == "lm":                              # fewer tracked modules, fewer breaks
        with GradNoiseTracker(model, layers="norm"):
            model(x).sum().backward()
            norm_breaks = _explain(model, x)[0]
        record_property("graph_breaks_layers_norm", norm_breaks)
        assert 0 < norm_breaks < breaks


# ------------------------------------------------------------- known limits
def test_compiled_autograd_is_never_silently_wrong():
    """Compiled autograd traces the backward hooks too; the tracker's hooks
    queue an end-of-backward callback, which compiled autograd refuses outside
    fullgraph mode. The step then fails; it must not return wrong norms."""
    model, x, y, batch_loss, sample_loss = make_case("mlp", 4, "sum")
    truth = model_per_sample_sq_norms(model, x, y, sample_loss)
    tracker = GradNoiseTracker(model, loss_reduction="sum")
    compiled = torch.compile(model, backend="aot_eager")
    loss = batch_loss(compiled(x))
    try:
        with _dynamo().compiled_autograd._enable(torch.compile(backend="eager")):
            loss.backward()
    except Exception:
        with pytest.raises(RuntimeError):
            tracker.per_sample_sq_norms()
        return
    torch.testing.assert_close(tracker.per_sample_sq_norms().double(), truth, rtol=RTOL, atol=1e-8)


class _OutsideUse(nn.Module):
    """A parent using its embedding's weight outside the embedding."""

    def __init__(self):
        super().__init__()
        self.embed, self.mix = nn.Embedding(13, 8), nn.Linear(8, 8)

    def forward(self, idx):
        return F.linear(torch.tanh(self.mix(self.embed(idx))), self.embed.weight).mean(1)


def test_outside_use_checked_on_an_eager_first_step_and_said_unchecked_when_compiled():
    """The check walks autograd nodes, and a compiled forward is one node per
    graph: compiled from the first step on, the tracker says the check did
    not run; one eager step first runs it and refuses the outside use."""
    torch.manual_seed(0)
    model, idx = _OutsideUse(), torch.randint(0, 13, (5, 6))
    GradNoiseTracker(model)
    with pytest.warns(RuntimeWarning, match="cannot see inside the compiled graphs"):
        torch.compile(model, backend="aot_eager")(idx).sum().backward()
    torch.manual_seed(0)
    model = _OutsideUse()
    GradNoiseTracker(model)
    with pytest.raises(RuntimeError, match="outside the forward of the modules"):
        model(idx).sum().backward()