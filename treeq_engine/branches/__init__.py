"""High-precision branches beside quantized weights: the General Monarch Branch (and low rank as its b = 1 case).

    monarch   the canonical factor layout and math (stage1, stage2, to_dense, project)
    module    MonarchBranch: the trainable nn.Module (w1, w2) a QuantLinear carries as its ``branch``
    init      closed-form initialisation ("weight": Π(W), "residual": Π(W − Q(W)))
    budget    branch parameters and a plan's bits with and without them
"""
from . import monarch
from .budget import branch_params, default_branch, layer_weight_bits, plan_weight_bits
from .init import INIT_MODES, init_branch
from .module import MonarchBranch
from .monarch import MonarchShape

__all__ = ["INIT_MODES", "MonarchBranch", "MonarchShape", "branch_params", "default_branch", "init_branch",
           "layer_weight_bits", "monarch", "plan_weight_bits"]
