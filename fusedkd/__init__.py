"""fusedkd: fused-kernel knowledge-distillation losses for large-vocabulary language models.

The losses never hold a ``[tokens x vocab]`` logits tensor: the lm_head projections of the student
and the teacher, the temperature softmax, the divergence (forward KL, reverse KL, JSD) and the
hard-label cross-entropy are streamed over vocabulary blocks with an online log-sum-exp.
"""

from fusedkd import reference
from fusedkd.loss import FusedLinearKDLoss, fused_linear_kd_loss

__version__ = "0.1.0"

__all__ = [
    "FusedLinearKDLoss",
    "fused_linear_kd_loss",
    "reference",
    "__version__",
]
