"""GradNoiseTracker on the model classes people train: `transformers` models
built from small configs (nothing downloaded), in train mode with dropout 0,
against float64 per-sample gradients from a loop over the samples with plain
autograd (independent of gradnoise), per sample and per layer."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F

import gradnoise
from gradnoise import GradNoiseTracker

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

V, D, LAYERS, HEADS, T, B = 97, 32, 2, 4, 10, 4
# models whose loss shifts the labels by one position (causal language models)
CAUSAL = {"gpt2", "llama", "qwen2", "mistral", "neox", "opt"}


def build(name: str):
    t = transformers
    common = dict(vocab_size=V, num_hidden_layers=LAYERS, num_attention_heads=HEADS)
    if name == "gpt2":
        return t.GPT2LMHeadModel(t.GPT2Config(vocab_size=V, n_embd=D, n_layer=LAYERS,
                                              n_head=HEADS, n_positions=32, resid_pdrop=0,
                                              embd_pdrop=0, attn_pdrop=0))
    if name == "bert":
        return t.BertForMaskedLM(t.BertConfig(hidden_size=D, intermediate_size=64,
                                              max_position_embeddings=32, hidden_dropout_prob=0,
                                              attention_probs_dropout_prob=0, **common))
    if name == "roberta":
        return t.RobertaForMaskedLM(t.RobertaConfig(
            hidden_size=D, intermediate_size=64, max_position_embeddings=40, pad_token_id=1,
            hidden_dropout_prob=0, attention_probs_dropout_prob=0, **common))
    if name == "distilbert":
        return t.DistilBertForMaskedLM(t.DistilBertConfig(
            vocab_size=V, dim=D, n_layers=LAYERS, n_heads=HEADS, hidden_dim=64,
            max_position_embeddings=32, dropout=0, attention_dropout=0))
    if name in ("llama", "qwen2", "mistral"):
        config, model = {"llama": (t.LlamaConfig, t.LlamaForCausalLM),
                         "qwen2": (t.Qwen2Config, t.Qwen2ForCausalLM),
                         "mistral": (t.MistralConfig, t.MistralForCausalLM)}[name]
        return model(config(hidden_size=D, intermediate_size=64, num_key_value_heads=2,
                            max_position_embeddings=32, **common))
    if name == "neox":
        return t.GPTNeoXForCausalLM(t.GPTNeoXConfig(hidden_size=D, intermediate_size=64,
                                                    max_position_embeddings=32, hidden_dropout=0,
                                                    attention_dropout=0, **common))
    if name == "t5":
        return t.T5ForConditionalGeneration(t.T5Config(
            vocab_size=V, d_model=D, d_kv=8, d_ff=64, num_layers=LAYERS, num_heads=HEADS,
            dropout_rate=0, relative_attention_num_buckets=8, decoder_start_token_id=0,
            pad_token_id=0))
    if name == "vit":
        return t.ViTForImageClassification(t.ViTConfig(
            image_size=16, patch_size=4, num_channels=3, hidden_size=D, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, intermediate_size=64, num_labels=5,
            hidden_dropout_prob=0, attention_probs_dropout_prob=0))
    raise KeyError(name)


def batch(name: str) -> dict:
    """Token ids with padding (labels -100 there, attention mask 0), or images."""
    g = torch.Generator().manual_seed(1)
    if name == "vit":
        return dict(pixel_values=torch.randn(B, 3, 16, 16, generator=g),
                    labels=torch.randint(0, 5, (B,), generator=g))
    ids = torch.randint(3, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 7:] = 0
    mask[3, 5:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    if name == "t5":
        return dict(input_ids=ids, attention_mask=mask, labels=labels[:, :6].contiguous())
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def _counted(name: str, labels: torch.Tensor) -> torch.Tensor:
    """The tokens each sample adds to the model's own (token-mean) loss."""
    if labels.dim() == 1:
        return torch.ones_like(labels)
    kept = labels[:, 1:] if name in CAUSAL else labels
    return (kept != -100).sum(1)


def sum_loss(name, model, inputs):
    """Σ over samples and tokens of the cross-entropy, from the logits."""
    logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits \
        if name != "t5" else model(**inputs).logits
    labels = inputs["labels"]
    if name in CAUSAL:
        logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=-100, reduction="sum")


def truth(name, model, inputs, reduction):
    """{module: float64 [B]} of ‖∂ℓ_i/∂θ‖², θ its own parameters, by a loop
    over the samples in float64; ℓ_i is sample i's term of the loss (for the
    model's token-mean loss, scaled by B as the tracker reports it)."""
    m = copy.deepcopy(model).double()
    owner = {}
    # each parameter under its first owner, except one that a module holds with
    # a module inside it (BERT's LM head and its decoder's bias): the inner one
    holders = {}
    for pname, p in m.named_parameters(remove_duplicate=False):
        holders.setdefault(id(p), []).append(pname.rsplit(".", 1)[0] if "." in pname else "")
    for pname, p in m.named_parameters():
        names = holders[id(p)]
        inner = [n for n in names if any(n.startswith(o + ".") or o == "" and n for o in names)]
        owner[pname] = max(inner, key=len) if inner else names[0]
    counts = _counted(name, inputs["labels"])
    per_layer = {}
    for i in range(B):
        sample = {k: (v[i:i + 1].double() if v.is_floating_point() else v[i:i + 1])
                  for k, v in inputs.items()}
        m.zero_grad()
        if reduction == "mean":
            loss = m(**sample).loss * counts[i] / counts.sum() * B
        else:
            loss = sum_loss(name, m, sample)
        loss.backward()
        for pname, p in m.named_parameters():
            if p.grad is not None:
                layer = per_layer.setdefault(owner[pname], torch.zeros(B, dtype=torch.float64))
                layer[i] += p.grad.square().sum()
    return per_layer


MODELS = ["gpt2", "bert", "roberta", "distilbert", "llama", "qwen2", "neox", "t5", "vit"]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", MODELS)
def test_per_sample_and_per_layer_norms_match_a_loop_over_samples(name, reduction):
    if name == "vit" and reduction == "sum":
        pytest.skip("one label per image: the sum loss is the mean loss times B")
    torch.manual_seed(0)
    model = build(name).train()
    inputs = batch(name)
    want = truth(name, model, inputs, reduction)
    with GradNoiseTracker(model, loss_reduction=reduction) as tracker:
        loss = model(**inputs).loss if reduction == "mean" else sum_loss(name, model, inputs)
        loss.backward()
        got = {k: v.double() for k, v in tracker.per_layer_sq_norms().items()}
        fallback = dict(tracker.fallback_reasons)
    assert not fallback, fallback
    zero = [k for k, v in want.items() if not v.any()]
    assert set(got) | set(zero) == set(want), (set(got) ^ set(want))
    for layer, values in got.items():
        torch.testing.assert_close(values, want[layer], rtol=2e-4, atol=1e-9,
                                   msg=lambda m, layer=layer: f"{layer}: {m}")
    total = sum(want.values())
    torch.testing.assert_close(tracker.per_sample_sq_norms().double(), total, rtol=1e-4, atol=0)


@pytest.mark.parametrize("name", ["gpt2", "llama", "t5"])
def test_layers_norm_measures_the_models_own_norm_classes(name):
    torch.manual_seed(0)
    model = build(name).train()
    inputs = batch(name)
    want = truth(name, model, inputs, "mean")
    with GradNoiseTracker(model, layers="norm") as tracker:
        model(**inputs).loss.backward()
        got = tracker.per_layer_sq_norms()
    kinds = {type(model.get_submodule(k)).__name__ for k in got}
    assert kinds and all(k.endswith("Norm") for k in kinds), kinds
    assert len(got) == 2 * LAYERS + 1 if name != "t5" else len(got) == 5 * LAYERS + 2
    for layer, values in got.items():
        torch.testing.assert_close(values.double(), want[layer], rtol=2e-4, atol=1e-9)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_gradient_checkpointing(name):
    torch.manual_seed(0)
    model = build(name).train()
    inputs = batch(name)
    want = sum(truth(name, model, inputs, "mean").values())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with GradNoiseTracker(model) as tracker:
        model(**inputs).loss.backward()
        torch.testing.assert_close(tracker.per_sample_sq_norms().double(), want, rtol=1e-4,
                                   atol=0)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_bfloat16_autocast(name):
    """Under bf16 autocast the step's own gradients are rounded to bf16; the
    norms stay within that rounding of the float64 truth."""
    torch.manual_seed(0)
    model = build(name).train()
    inputs = batch(name)
    want = sum(truth(name, model, inputs, "mean").values())
    with GradNoiseTracker(model) as tracker, torch.autocast("cpu", dtype=torch.bfloat16):
        model(**inputs).loss.backward()
        got = tracker.per_sample_sq_norms().double()
    torch.testing.assert_close(got, want, rtol=2e-2, atol=0)


def test_the_noise_scale_and_the_adaptive_batch_choose_per_sample_norms():
    torch.manual_seed(0)
    model = build("gpt2").train()
    ids = torch.randint(3, V, (64, T))
    data = torch.utils.data.TensorDataset(ids)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    controller = gradnoise.AdaptiveBatch(model, opt, data, initial_batch=8, max_batch=32,
                                         micro_batch=8)
    assert controller.noise_source == "per_sample", controller.noise_source_reason
    for (x,) in controller.run(max_steps=3):
        controller.backward(model(input_ids=x, labels=x).loss)
        controller.step()
    assert controller.history[-1]["b_simple"] is not None


def test_an_unmeasurable_model_is_refused_with_the_module_and_the_remedy():
    """OPT flattens [B, T, d] into [B·T, d] rows through a layer norm, whose
    output is no longer a view of the batch: refused, naming the module."""
    model = transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=V, hidden_size=D, num_hidden_layers=1, num_attention_heads=HEADS, ffn_dim=64,
        max_position_embeddings=32, dropout=0, attention_dropout=0, word_embed_proj_dim=D))
    inputs = batch("opt")
    with GradNoiseTracker(model):
        with pytest.raises(RuntimeError, match=r"module 'model\.decoder\.layers\.0\.fc1' "
                                               r"\(Linear\).*batch.*`layers=`"):
            model(**inputs).loss.backward()


@pytest.mark.parametrize("name", ["gpt2", "bert", "t5"])
def test_verify_reports_each_layer_against_exact_per_sample_gradients(name):
    torch.manual_seed(0)
    model = build(name).train()
    inputs = batch(name)
    with GradNoiseTracker(model) as tracker:
        model(**inputs).loss.backward()                  # the user's step, kept
        before = tracker.per_layer_sq_norms()
        grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
        report = tracker.verify(inputs, lambda out: out.loss)
        assert report.ok(1e-4) and report.samples == B, str(report)
        assert list(report.layers) == list(before)
        assert all(c.fallback == (c.name in tracker.fallback_modules)
                   for c in report.layers.values())
        assert "worst rel. error" in str(report)
        after = tracker.per_layer_sq_norms()
        assert all(torch.equal(after[k], before[k]) for k in before)
    assert all((p.grad is None and g is None) or torch.equal(p.grad, g)
               for p, g in zip(model.parameters(), grads))


def test_verify_finds_a_wrong_rule():
    """A rule that reports half the true norms is caught, by layer."""
    from gradnoise.layers import register_rule
    from gradnoise.layers.linear import LinearRule

    class Halved(torch.nn.Linear):
        pass

    @register_rule(Halved)
    class HalvedRule(LinearRule):
        replaces_backward = False

        def sq_norms(self, module, calls, params):
            return super().sq_norms(module, calls, params) / 2

    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), Halved(4, 3))
    with GradNoiseTracker(model, loss_reduction="sum") as tracker:
        report = tracker.verify(torch.randn(6, 5), lambda out: out.square().sum())
    assert not report.ok()
    assert report.layers["0"].worst_relative_error < 1e-5
    assert report.layers["2"].worst_relative_error == pytest.approx(0.5, rel=1e-4)
