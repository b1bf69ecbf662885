"""Independent ground truth: per-sample gradients from torch.func in float64.

Nothing here uses gradnoise; the Linear layer's per-sample gradient is
obtained by differentiating sample i's loss ⟨y_i, dY_i⟩ (whose gradient with
respect to y_i is exactly dY_i) through torch.nn.functional.linear.
"""
from __future__ import annotations

import torch
from torch.func import grad, vmap


def linear_per_sample_grads(x: torch.Tensor, grad_out: torch.Tensor, with_bias: bool):
    """Per-sample (weight [B, p, d], bias [B, p] or None) gradients in float64."""
    x64, g64 = x.detach().double(), grad_out.detach().double()
    d, p = x64.shape[-1], g64.shape[-1]
    params = (torch.zeros(p, d, dtype=torch.float64),)
    if with_bias:
        params += (torch.zeros(p, dtype=torch.float64),)

    def sample_loss(params, xi, gi):
        return (torch.nn.functional.linear(xi, *params) * gi).sum()

    grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x64, g64)
    return grads[0], (grads[1] if with_bias else None)

def linear_sq_norms_truth(x: torch.Tensor, grad_out: torch.Tensor, with_bias: bool = False):
    """‖∇_W ℓ_i‖² (+ ‖∇_b ℓ_i‖²) per sample, float64 [B]."""
    if x.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float64)
    gw, gb = linear_per_sample_grads(x, grad_out, with_bias)
    norms = gw.square().flatten(1).sum(1)
    if with_bias:
        norms = norms + gb.square().sum(1)
    return norms


def linear_weight_grad_truth(x: torch.Tensor, grad_out: torch.Tensor):
    """Σ_i G_i in float64, [p, d]."""
    d, p = x.shape[-1], grad_out.shape[-1]
    rows = x[..., 0].numel() if d else grad_out[..., 0].numel()
    return grad_out.detach().double().reshape(rows, p).T @ x.detach().double().reshape(rows, d)


def model_per_sample_sq_norms(model: torch.nn.Module, inputs: torch.Tensor, targets,
                              sample_loss, params: list[str] | None = None) -> torch.Tensor:
    """‖∇θ ℓ_i‖² per sample, float64 [B], by torch.func on a float64 copy of `model`.

    `sample_loss(output_i, target_i)` is sample i's term of the loss, given its
    output with a batch dimension of 1. `params` restricts θ to those names
    (default: every parameter that requires grad). Call before attaching
    anything to `model`: the copy is made here.
    """
    import copy

    from torch.func import functional_call

    m = copy.deepcopy(model).double()
    names = params or [n for n, p in m.named_parameters() if p.requires_grad]
    theta = {n: p.detach() for n, p in m.named_parameters() if n in names}
    x = inputs.double() if inputs.is_floating_point() else inputs

    def loss_i(th, xi, ti):
        out = functional_call(m, th, (xi.unsqueeze(0),))
        return sample_loss(out, ti.unsqueeze(0))

    grads = vmap(grad(loss_i), in_dims=(None, 0, 0))(theta, x, targets)
    return sum(g.flatten(1).square().sum(1) for g in grads.values())


def conv_per_sample_grads(x: torch.Tensor, grad_out: torch.Tensor, weight_shape, stride,
                          padding, dilation, groups: int, with_bias: bool):
    """Per-sample (weight [B, *weight_shape], bias [B, C_out] or None) gradients of
    a zero-padded convolution in float64, differentiating ⟨conv(x_i), dY_i⟩."""
    x64, g64 = x.detach().double(), grad_out.detach().double()
    conv = {3: torch.nn.functional.conv1d, 4: torch.nn.functional.conv2d,
            5: torch.nn.functional.conv3d}[x.dim()]
    params = (torch.zeros(weight_shape, dtype=torch.float64),)
    if with_bias:
        params += (torch.zeros(weight_shape[0], dtype=torch.float64),)

    def sample_loss(params, xi, gi):
        bias = params[1] if with_bias else None
        out = conv(xi[None], params[0], bias, stride=stride, padding=padding, dilation=dilation,
                   groups=groups)
        return (out[0] * gi).sum()

    grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x64, g64)
    return grads[0], (grads[1] if with_bias else None)
