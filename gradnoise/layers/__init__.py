"""Per-layer norm rules, one per module type, in a registry keyed by type.

Built-in rules: Linear and Conv1d/2d/3d (fused backward), Embedding,
MultiheadAttention, LayerNorm,
RMSNorm, GroupNorm, eval-mode BatchNorm, and the exact torch.func fallback
for any other module with parameters of its own. Users add rules for their
own module types with `register_rule`.
"""
from . import (attention, broadcast, conv, embedding, functional, fused_backward, linear,
               normalization, outside_uses, tied, watch)
from .base import NormRule, find_rule, register_rule
from .calls import Call
from .generic import GenericRule

GENERIC_RULE = GenericRule()

__all__ = ["Call", "NormRule", "register_rule", "find_rule", "GENERIC_RULE",
           "linear", "embedding", "conv", "normalization", "fused_backward", "tied", "broadcast"]
