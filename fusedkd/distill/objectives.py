"""Training objectives: the student's forward and its loss as one module, the unit DDP / FSDP wrap.

Each objective maps a batch to summed loss terms ``(loss, distill, ce)`` over the batch's target tokens
(``distill`` is None for the cross-entropy-only objective); the trainer divides by the global number of
target tokens, so gradient accumulation and any number of processes give the same step. With
``hidden_only=True`` an objective returns the student's final hidden states instead: evaluation goes
through the objective's own forward, which under FSDP2 is what gathers the student's parameters.

- `KDObjective`: online teacher. `fusedkd.FusedLinearKDLoss` on (student hidden, student lm_head) and
  (teacher hidden, teacher lm_head): no ``[tokens x vocab]`` logits.
- `TopKObjective`: offline teacher. `fusedkd.topk.fused_linear_topk_kd_loss` against cached top-k
  teacher log-probabilities.
- `CrossEntropyObjective`: hard labels only (the default's teacher training and its baseline), with
  the lm_head evaluated over token chunks under activation checkpointing, so at most one
  ``chunk x vocab`` tile is alive at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import fusedkd
from fusedkd.distill.data import IGNORE_INDEX
from fusedkd.distill.models import hidden_states, lm_head
from fusedkd.heads import HeadTransform
from fusedkd.topk import fused_linear_topk_kd_loss
from fusedkd.torch_backend.tiles import default_chunk_size

LossSums = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]


class KDObjective(torch.nn.Module):
    """Student forward + fused KD loss against a teacher's hidden states and lm_head.

    Example:
        >>> import fusedkd
        >>> from fusedkd.distill.models import qwen3_config, build_model, TINY_STUDENT_SHAPE
        >>> config = qwen3_config(TINY_STUDENT_SHAPE, vocab_size=64, max_positions=16, eos_token_id=0)
        >>> student, teacher = build_model(config, seed=0), build_model(config, seed=1)
        >>> objective = KDObjective(student, fusedkd.FusedLinearKDLoss(
        ...     reduction="sum", return_components=True, alpha=0.5))
        >>> ids = torch.randint(0, 64, (2, 9)); mask = torch.ones_like(ids)
        >>> labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], 1)
        >>> th = teacher.base_model(input_ids=ids).last_hidden_state
        >>> loss, distill, ce = objective(ids, mask, labels, th, teacher.lm_head.weight)
        >>> loss.backward(); student.lm_head.weight.grad is not None
        True
    """

    def __init__(self, student: torch.nn.Module, criterion: fusedkd.FusedLinearKDLoss) -> None:
        super().__init__()
        self.student = student
        self.criterion = criterion

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        teacher_hidden: torch.Tensor | None = None,
        teacher_weight: torch.Tensor | None = None,
        teacher_bias: torch.Tensor | None = None,
        *,
        hidden_only: bool = False,
    ) -> LossSums | torch.Tensor:
        hidden = hidden_states(self.student, input_ids, attention_mask)
        if hidden_only:
            return hidden
        head = lm_head(self.student)
        # Called as it is, inside the caller's autocast region if any: under bf16 autocast the loss casts
        # hidden states, weights and biases to bf16 as F.linear would (the logit projections run in bf16;
        # the logit tiles and the loss are float32, and the weight gradient is accumulated in float32 and
        # rounded to bf16 once; on the torch backend its G^T h product is itself a float32 GEMM: see
        # docs/distill.md); outside autocast it runs in the tensors' dtypes.
        return self.criterion(
            hidden, head.weight, teacher_hidden, teacher_weight, labels, head.bias, teacher_bias
        )


class TopKObjective(torch.nn.Module):
    """Student forward + sparse KD loss against cached top-k teacher log-probabilities.

    `loss_options`: keyword arguments of `fusedkd.topk.fused_linear_topk_kd_loss` (divergence,
    temperature, alpha, tail, vocab_size, backend); the reduction is always a sum, with components.
    """

    def __init__(self, student: torch.nn.Module, **loss_options) -> None:
        super().__init__()
        self.student = student
        self.loss_options = dict(loss_options, reduction="sum", return_components=True)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        topk_ids: torch.Tensor | None = None,
        topk_logprobs: torch.Tensor | None = None,
        *,
        hidden_only: bool = False,
    ) -> LossSums | torch.Tensor:
        hidden = hidden_states(self.student, input_ids, attention_mask)
        if hidden_only:
            return hidden
        head = lm_head(self.student)
        # In the caller's autocast region, if any (see `KDObjective.forward`).
        return fused_linear_topk_kd_loss(
            hidden, head.weight, topk_ids, topk_logprobs, labels, student_bias=head.bias, **self.loss_options
        )


def _cross_entropy_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    vocab: int,
    transform: HeadTransform,
) -> torch.Tensor:
    logits = transform(F.linear(hidden, weight[:vocab], None if bias is None else bias[:vocab]).float())
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_cross_entropy_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
    transform: HeadTransform | None = None,
) -> torch.Tensor:
    """Summed cross-entropy of ``hidden @ weight.T`` against `labels`, one token chunk of logits at a time.

    `transform`: the head's logit scale and soft cap (`fusedkd.HeadTransform`), applied to each chunk's
    logits; None: plain logits.

    Each chunk is checkpointed: its logits are dropped after the forward and recomputed in backward.

    Example:
        >>> h, w = torch.randn(50, 8, requires_grad=True), torch.randn(30, 8)
        >>> y = torch.randint(0, 30, (50,))
        >>> full = F.cross_entropy(h @ w.T, y, reduction="sum")
        >>> torch.allclose(chunked_cross_entropy_sum(h, w, y, chunk_size=16), full)
        True
    """
    hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    vocab = weight.shape[0] if vocab_size is None else vocab_size
    chunk = chunk_size or default_chunk_size(vocab)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        piece = (
            hidden[start : start + chunk],
            weight,
            bias,
            labels[start : start + chunk],
            vocab,
            transform or HeadTransform(),
        )
        if torch.is_grad_enabled():
            total = total + checkpoint(_cross_entropy_sum, *piece, use_reentrant=False)
        else:
            total = total + _cross_entropy_sum(*piece)
    return total


class CrossEntropyObjective(torch.nn.Module):
    """Student forward + hard-label cross-entropy (no teacher): ``(ce, None, ce)``."""

    def __init__(self, student: torch.nn.Module, vocab_size: int | None = None) -> None:
        super().__init__()
        self.student = student
        self.vocab_size = vocab_size

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        hidden_only: bool = False,
    ) -> LossSums | torch.Tensor:
        hidden = hidden_states(self.student, input_ids, attention_mask)
        if hidden_only:
            return hidden
        head = lm_head(self.student)
        # In the caller's autocast region, if any: each chunk's F.linear runs in the autocast dtype.
        ce = chunked_cross_entropy_sum(
            hidden, head.weight, labels, head.bias, vocab_size=self.vocab_size, transform=head.transform
        )
        return ce, None, ce
