"""The critical batch size, measured three ways on the user's own task
(docs/design.md, "Measuring the critical batch"):

1. a fixed-batch sweep with a learning-rate search at each batch, and the
   steps–examples front of each target loss fitted (McCandlish et al. 2018;
   Zhang et al. 2025's definition beside it): `run_sweep`;
2. branching from checkpoints of one run (Merrill et al. 2025): `run_branches`;
3. the gradient noise scale B_simple along the same runs
   (`SweepConfig.noise_interval`).

The noisy quadratic model (`NoisyQuadratic`, Zhang et al. 2019) has known
answers to check all of it against.
"""
from .branching import BranchConfig, BranchPoint, run_branches
from .builtin import byte_lm_task
from .fit import FrontFit, fit_front, linear_scaling_limit, pareto_product
from .nqm import NoisyQuadratic, quadratic_task
from .runs import RunRecord, RunSpec, Task, train_run
from .sweep import SweepConfig, SweepResult, run_sweep

__all__ = ["BranchConfig", "BranchPoint", "run_branches", "byte_lm_task", "FrontFit",
           "fit_front", "linear_scaling_limit", "pareto_product", "NoisyQuadratic",
           "quadratic_task", "RunRecord", "RunSpec", "Task", "train_run", "SweepConfig",
           "SweepResult", "run_sweep"]
