"""fusedkd: fused-kernel knowledge-distillation losses for large-vocabulary language models.

The losses never hold a ``[tokens x vocab]`` logits tensor: the lm_head projections of the student
and the teacher, the temperature softmax, the divergence (forward KL, reverse KL, JSD) and the
hard-label cross-entropy are streamed over vocabulary blocks with an online log-sum-exp.

- `fused_linear_kd_loss` / `FusedLinearKDLoss`: from hidden states and lm_head weights.
- `kd_loss` / `KDLoss`: from logits the caller already holds.
- `teacher_topk`, `fused_linear_topk_kd_loss` / `FusedLinearTopKKDLoss`, `topk_cache`: offline
  distillation from a sparse top-k teacher.
- `head_transform` / `HeadTransform`: a model's logit scale and soft cap, read from its config.
- `reference`: the naive, exact losses the tests compare against.
"""

from fusedkd import reference, topk_cache
from fusedkd.heads import HeadTransform, head_transform
from fusedkd.logits import KDLoss, kd_loss
from fusedkd.loss import FusedLinearKDLoss, fused_linear_kd_loss
from fusedkd.topk import FusedLinearTopKKDLoss, fused_linear_topk_kd_loss, teacher_topk

__version__ = "0.1.0"

__all__ = [
    "FusedLinearKDLoss",
    "FusedLinearTopKKDLoss",
    "HeadTransform",
    "KDLoss",
    "fused_linear_kd_loss",
    "fused_linear_topk_kd_loss",
    "head_transform",
    "kd_loss",
    "reference",
    "teacher_topk",
    "topk_cache",
    "__version__",
]
