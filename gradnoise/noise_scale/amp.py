"""Mixed precision: the GradScaler's scale on the gradients the noise scale
reads, undone in one place."""
from __future__ import annotations


def grad_scales_sq(scaler, optimizer) -> tuple[float, float]:
    """(s², s²_grad): the GradScaler's scale squared, which multiplies every
    gradient captured during backward, and the factor still on .grad (1 once
    the scaler has unscaled the gradients for `optimizer`, or for any
    optimizer it serves when `optimizer` is None).

    Whether .grad is unscaled yet is the scaler's per-optimizer stage, which
    GradScaler keeps in `_per_optimizer_states` and exposes no other way."""
    if scaler is None or not scaler.is_enabled():
        return 1.0, 1.0
    states = getattr(scaler, "_per_optimizer_states", {})
    if optimizer is not None:
        stages = {getattr(states[id(optimizer)].get("stage"), "name", "READY")
                  if id(optimizer) in states else "READY"}
    else:
        stages = {getattr(st.get("stage"), "name", "READY") for st in states.values()}
        if len(stages) > 1:
            raise RuntimeError(
                "GradientNoiseScale.step: the GradScaler serves several optimizers, in "
                "different stages; pass GradientNoiseScale(..., optimizer=...) so that it "
                "knows whether this model's gradients are unscaled yet")
    if "STEPPED" in stages:
        raise RuntimeError(
            "GradientNoiseScale.step: the GradScaler has already stepped the optimizer "
            "this iteration; call gns.step() before scaler.step(optimizer) (after "
            "scaler.unscale_(optimizer) is fine)")
    s2 = float(scaler.get_scale()) ** 2
    return s2, (1.0 if "UNSCALED" in stages else s2)
