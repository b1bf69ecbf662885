"""Per-sample gradient-norm kernels as functions on tensors.

Backends: "cpu" and "cuda" (compiled ops ``torch.ops.gradnoise.*``, chosen by
the dispatcher from the inputs' device), "triton" (its own ops, for GPUs; runs
on CPU tensors under TRITON_INTERPRET=1) and "reference" (pure PyTorch). The
default is the compiled op of the inputs' device; set GRADNOISE_BACKEND or pass
``backend=`` to choose. See ``python -m gradnoise info``.
"""
from __future__ import annotations

from .. import _extension
from . import conv, embedding, linear, norm_layers, reductions
from .conv import (conv_sq_norms, conv_sq_norms_ref, conv_weight_grad_and_sq_norms,
                   conv_weight_grad_and_sq_norms_ref)
from .embedding import embedding_sq_norms, embedding_sq_norms_ref
from .norm_layers import (group_norm_backward_and_sq_norms, group_norm_backward_and_sq_norms_ref,
                          group_norm_sq_norms, group_norm_sq_norms_ref,
                          layer_norm_backward_and_sq_norms, layer_norm_backward_and_sq_norms_ref,
                          layer_norm_sq_norms,
                          layer_norm_sq_norms_ref)
from .reductions import sq_norms, sq_norms_ref
from .linear import (linear_sq_norms, linear_sq_norms_ref, linear_weight_grad_and_sq_norms,
                     linear_weight_grad_and_sq_norms_ref)

__all__ = [
    "linear_sq_norms",
    "linear_weight_grad_and_sq_norms",
    "linear_sq_norms_ref",
    "linear_weight_grad_and_sq_norms_ref",
    "conv_sq_norms",
    "conv_weight_grad_and_sq_norms",
    "conv_sq_norms_ref",
    "conv_weight_grad_and_sq_norms_ref",
    "layer_norm_sq_norms",
    "layer_norm_sq_norms_ref",
    "group_norm_sq_norms",
    "group_norm_sq_norms_ref",
    "group_norm_backward_and_sq_norms",
    "group_norm_backward_and_sq_norms_ref",
    "layer_norm_backward_and_sq_norms",
    "layer_norm_backward_and_sq_norms_ref",
    "sq_norms",
    "sq_norms_ref",
    "embedding_sq_norms",
    "embedding_sq_norms_ref",
]

# The compiled ops' shapes for fake tensors, once the compiled library is loaded.
if _extension.compiled_status("cpu") is None:
    for _family in (linear, conv, norm_layers, embedding, reductions):
        _family.register_fakes()
