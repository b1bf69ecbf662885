"""Shape functions of the compiled ops, so that they trace under torch.compile
and torch.export (fake tensors carry shapes, dtypes and devices only)."""
from __future__ import annotations

import torch

from . import _validate


def _norm_backward_outputs(x, weight, B, C, need_input_grad, with_weight, with_bias):
    """(grad_input, grad_weight, grad_bias, norms) of a normalisation layer's backward op."""
    grad_input = torch.empty_like(x) if need_input_grad else x.new_empty((0,))
    wdt = weight.dtype if weight is not None else x.dtype
    grad_weight = x.new_empty((C,) if with_weight else (0,), dtype=wdt)
    grad_bias = x.new_empty((C,) if with_bias else (0,), dtype=wdt)
    return grad_input, grad_weight, grad_bias, x.new_empty(
        (B,), dtype=_validate.accumulation_dtype(x.dtype))


def register() -> None:
    @torch.library.register_fake("gradnoise::sq_norms")
    def _sq_norms_fake(tensors):
        return tensors[0].new_empty((len(tensors),), dtype=torch.float64)

    @torch.library.register_fake("gradnoise::embedding_sq_norms")
    def _embedding_sq_norms_fake(indices, grad_out, num_embeddings, padding_idx=-1):
        return grad_out.new_empty((indices.shape[0],),
                                  dtype=_validate.accumulation_dtype(grad_out.dtype))

    @torch.library.register_fake("gradnoise::linear_sq_norms")
    def _linear_sq_norms_fake(x, grad_out, with_bias=False, method="auto"):
        B, _, _, _ = _validate.linear_problem(x, grad_out, method)
        return x.new_empty((B,), dtype=_validate.accumulation_dtype(x.dtype))

    @torch.library.register_fake("gradnoise::linear_weight_grad_and_sq_norms")
    def _linear_weight_grad_and_sq_norms_fake(x, grad_out, with_bias=False, method="auto"):
        B, _, d, p = _validate.linear_problem(x, grad_out, method)
        grad_weight = x.new_empty((p, d))
        grad_bias = x.new_empty((p,) if with_bias else (0,))
        norms = x.new_empty((B,), dtype=_validate.accumulation_dtype(x.dtype))
        return grad_weight, grad_bias, norms

    from .conv import check_conv_args

    @torch.library.register_fake("gradnoise::conv_sq_norms")
    def _conv_sq_norms_fake(x, grad_out, kernel_size, stride, padding, dilation, groups,
                            with_bias=False):
        check_conv_args(x, grad_out, kernel_size, stride, padding, dilation, groups)
        return x.new_empty((x.shape[0],), dtype=_validate.accumulation_dtype(x.dtype))

    @torch.library.register_fake("gradnoise::conv_weight_grad_and_sq_norms")
    def _conv_weight_grad_and_sq_norms_fake(x, grad_out, kernel_size, stride, padding, dilation,
                                            groups, with_bias=False):
        check_conv_args(x, grad_out, kernel_size, stride, padding, dilation, groups)
        grad_weight = x.new_empty((grad_out.shape[1], x.shape[1] // groups, *kernel_size))
        grad_bias = x.new_empty((grad_out.shape[1],) if with_bias else (0,))
        norms = x.new_empty((x.shape[0],), dtype=_validate.accumulation_dtype(x.dtype))
        return grad_weight, grad_bias, norms

    from .norm_layers import check_group_norm_args, check_layer_norm_args

    @torch.library.register_fake("gradnoise::layer_norm_sq_norms")
    def _layer_norm_sq_norms_fake(x, grad_out, normalized_numel, eps, rms, with_weight,
                                  with_bias):
        B, _, _ = check_layer_norm_args(x, grad_out, normalized_numel, eps)
        return x.new_empty((B,), dtype=_validate.accumulation_dtype(x.dtype))

    @torch.library.register_fake("gradnoise::layer_norm_backward_and_sq_norms")
    def _layer_norm_backward_and_sq_norms_fake(x, grad_out, normalized_numel, eps, rms, weight,
                                               need_input_grad, with_weight, with_bias):
        B, _, C = check_layer_norm_args(x, grad_out, normalized_numel, eps)
        return _norm_backward_outputs(x, weight, B, C, need_input_grad, with_weight, with_bias)

    @torch.library.register_fake("gradnoise::group_norm_backward_and_sq_norms")
    def _group_norm_backward_and_sq_norms_fake(x, grad_out, mean, rstd, weight, groups,
                                               need_input_grad, with_weight, with_bias):
        B, C, _ = check_group_norm_args(x, grad_out, groups, 0.0)
        return _norm_backward_outputs(x, weight, B, C, need_input_grad, with_weight, with_bias)

    @torch.library.register_fake("gradnoise::group_norm_sq_norms")
    def _group_norm_sq_norms_fake(x, grad_out, groups, eps, with_weight, with_bias):
        B, _, _ = check_group_norm_args(x, grad_out, groups, eps)
        return x.new_empty((B,), dtype=_validate.accumulation_dtype(x.dtype))
