"""The adaptive-batch controller's arguments: checked, with errors that name
the argument, and resolved into the objects it uses."""
from __future__ import annotations

from torch.utils.data import DataLoader, IterableDataset, default_collate

from ..checks import is_int
from .lr_rules import LR_RULES
from .policies import POLICIES, CriticalBatchPolicy, GoodputPolicy, SchedulePolicy


def positive_int(name: str, value, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if not is_int(value) or value < 1:
        raise ValueError(f"AdaptiveBatch: `{name}` must be a positive integer, got {value!r}")
    return value


def require_methods(obj, methods, what: str) -> None:
    """Raise naming the methods a user-supplied object lacks."""
    missing = [m for m in methods if not hasattr(obj, m)]
    if missing:
        raise ValueError(f"AdaptiveBatch: {what}; {type(obj).__name__} lacks {missing}")


def resolve_data(data, collate_fn):
    """(map-style dataset, collate function) from a Dataset or a DataLoader over one."""
    if isinstance(data, DataLoader):
        dataset = data.dataset
        collate_fn = collate_fn or data.collate_fn
    else:
        dataset = data
    if isinstance(dataset, IterableDataset) or not (hasattr(dataset, "__len__")
                                                    and hasattr(dataset, "__getitem__")):
        raise TypeError("AdaptiveBatch: `data` must be a map-style Dataset (with __len__ and "
                        "__getitem__) or a DataLoader over one; the controller samples it "
                        f"itself. Got {type(dataset).__name__}")
    return dataset, collate_fn or default_collate

def resolve_lr_rule(lr_rule):
    """A rule name of LR_RULES, or a callable (batch, initial_batch, reading) -> factor."""
    if callable(lr_rule):
        return lr_rule
    if lr_rule not in LR_RULES:
        raise ValueError(f"AdaptiveBatch: unknown `lr_rule` {lr_rule!r}; expected one of "
                         f"{LR_RULES} or a callable (batch, initial_batch, reading) -> factor")
    return lr_rule

def resolve_policy(policy, schedule, critical_factor):
    """The policy object for a name of POLICIES, or the user's own policy object."""
    if not isinstance(policy, str):
        require_methods(policy, ("decide", "observe", "state_dict", "load_state_dict"),
                         f"`policy` must be one of {POLICIES} or a policy object")
        return policy
    if policy not in POLICIES:
        raise ValueError(f"AdaptiveBatch: unknown `policy` {policy!r}; expected one of "
                         f"{POLICIES}")
    if policy == "schedule":
        if schedule is None:
            raise ValueError("AdaptiveBatch: policy='schedule' needs `schedule` (a callable "
                             "samples_seen -> batch or a list of (samples, batch) pairs)")
        return SchedulePolicy(schedule)
    if schedule is not None:
        raise ValueError(f"AdaptiveBatch: `schedule` is only used with policy='schedule', "
                         f"but policy={policy!r}")
    if policy == "goodput":
        return GoodputPolicy()
    return CriticalBatchPolicy(critical_factor)


#: the optimizers each rule was derived for: linear for SGD (Goyal et al. 2017),
#: sqrt for the Adam family (Malladi et al. 2022)
_RULE_FAMILIES = {"linear": ("SGD",), "sqrt": ("Adam", "AdamW", "NAdam", "RAdam", "Adamax",
                                               "Adafactor", "Adagrad", "RMSprop")}


def check_optimizer_lr(optimizer, lr_rule, who: str = "AdaptiveBatch") -> None:
    """Every param group must have a learning rate a factor can multiply (a
    number or a tensor): an error names the optimizer otherwise (Adafactor
    with relative_step=True has none). A named rule paired with an optimizer
    of the other family is warned about: linear scaling is SGD's, sqrt
    scaling the Adam family's."""
    import warnings

    import torch
    name = type(optimizer).__name__
    for i, group in enumerate(optimizer.param_groups):
        lr = group.get("lr")
        if isinstance(lr, bool) or not isinstance(lr, (int, float, torch.Tensor)):
            raise ValueError(
                f"{who}: param group {i} of the {name} optimizer has lr={lr!r}; the learning-rate "
                "rule multiplies each group's lr, so the optimizer must have one (for "
                "transformers' Adafactor: relative_step=False and an lr)")
    if not isinstance(lr_rule, str):
        return
    for rule, family in _RULE_FAMILIES.items():
        other = [r for r in _RULE_FAMILIES if r != rule]
        if lr_rule == rule and any(name == f for r in other for f in _RULE_FAMILIES[r]):
            warnings.warn(
                f"{who}: lr_rule={lr_rule!r} was derived for {', '.join(family)}; the {name} "
                f"optimizer is usually scaled by the {other[0]!r} rule (linear for SGD, Goyal et "
                "al. 2017; sqrt for the Adam family, Malladi et al. 2022)",
                RuntimeWarning, stacklevel=3)
