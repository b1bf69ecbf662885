"""The three models of the training-step benchmark, each with a fixed batch.

Every builder returns (model, inputs, targets, loss_fn), with loss_fn(output,
targets) -> scalar loss, mean-reduced (over samples, and over tokens for the
LM), and the same weights and batch on every call (fixed seeds; the LM's bytes
come from this Python's standard-library sources, so nothing is downloaded).

- "mlp": 784→1024→1024→10 with ReLU, B = 256.
- "lm":  byte-level pre-LN transformer, vocab 256, d = 256, 4 heads, 2 blocks,
         T = 128, B = 16; token embedding tied to the LM head.
- "cnn": three 3×3 convolutions with GroupNorm(8) on 3×32×32 images, B = 64.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from ..byte_lm import ByteLM, lm_loss, stdlib_bytes

Batch = tuple[nn.Module, torch.Tensor, torch.Tensor, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]


# ---------------------------------------------------------------------- MLP
def build_mlp(seed: int = 0, batch: int = 256) -> Batch:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                          nn.Linear(1024, 10))
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, 784, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    return model, x, y, F.cross_entropy


# ----------------------------------------------------------------------- LM
def build_lm(seed: int = 0, batch: int = 16, context: int = 128) -> Batch:
    torch.manual_seed(seed)
    model = ByteLM(context=context)
    data = torch.frombuffer(bytearray(stdlib_bytes()), dtype=torch.uint8).long()
    gen = torch.Generator().manual_seed(seed + 1)
    starts = torch.randint(0, data.numel() - context - 1, (batch,), generator=gen)
    windows = torch.stack([data[s:s + context + 1] for s in starts.tolist()])
    return model, windows[:, :-1].contiguous(), windows[:, 1:].contiguous(), lm_loss


# ---------------------------------------------------------------------- CNN
def build_cnn(seed: int = 0, batch: int = 64) -> Batch:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.GroupNorm(8, 64), nn.ReLU(),
        nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.GroupNorm(8, 64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    return model, x, y, F.cross_entropy


# ------------------------------------------------------- transformers models
def _causal_lm_loss(out, labels: torch.Tensor) -> torch.Tensor:
    logits = out.logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def build_transformers(kind: str, seed: int = 0, batch: int = 8, context: int = 128,
                       width: int = 256, blocks: int = 4, vocab: int = 512,
                       heads: int = 4) -> Batch:
    """A `transformers` GPT-2 or Llama built from a config (by default d = 256,
    4 layers, 4 heads, T = 128, B = 8; Llama's MLP 688 wide there, else about
    8d/3 as Llama's own configs), on windows of standard-library source bytes."""
    try:
        import transformers
    except ImportError as e:
        raise RuntimeError("gradnoise benchmark: the transformers models need the "
                           "`transformers` package (the test or bench extra)") from e
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    if kind == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=vocab, n_embd=width, n_layer=blocks, n_head=heads, n_positions=context,
            resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=width,
            intermediate_size=688 if width == 256 else 64 * round(8 * width / 3 / 64),
            num_hidden_layers=blocks, num_attention_heads=heads, num_key_value_heads=heads,
            max_position_embeddings=context,
            bos_token_id=0, eos_token_id=1))
    data = torch.frombuffer(bytearray(stdlib_bytes()), dtype=torch.uint8).long() % vocab
    gen = torch.Generator().manual_seed(seed + 1)
    starts = torch.randint(0, data.numel() - context, (batch,), generator=gen)
    ids = torch.stack([data[s:s + context] for s in starts.tolist()])
    return model.train(), ids, ids, _causal_lm_loss


MODELS: dict[str, Callable[..., Batch]] = {
    "mlp": build_mlp, "lm": build_lm, "cnn": build_cnn,
    "gpt2": lambda seed=0: build_transformers("gpt2", seed),
    "llama": lambda seed=0: build_transformers("llama", seed),
}
#: the models a training-step benchmark runs by default
DEFAULT_MODELS = ("mlp", "lm", "cnn", "gpt2", "llama")

DESCRIPTIONS = {
    "mlp": "MLP 784→1024→1024→10, B=256",
    "lm": "byte LM d=256 4 heads 2 blocks, T=128, B=16, tied embedding",
    "cnn": "GroupNorm CNN 3×32×32, B=64",
    "gpt2": "transformers GPT-2 d=256 4 layers, T=128, B=8, tied embedding",
    "llama": "transformers Llama d=256 4 layers, T=128, B=8, RMSNorm",
}


def build(name: str, seed: int = 0) -> Batch:
    if name not in MODELS:
        raise ValueError(f"unknown benchmark model {name!r}; choose from {sorted(MODELS)}")
    return MODELS[name](seed)
