"""Held-out evaluation: perplexities, next-token agreement and KL between student and teacher.

Per target token of the evaluation samples (same target rule as training):

- cross-entropy ``-log softmax(s)[y]`` of the student (and of the teacher): perplexity ``exp(mean CE)``;
- agreement: whether the student's most likely next token is the teacher's (top-1 argmax);
- KL(teacher || student) at temperature 1.

The logits are evaluated over token chunks (one ``chunk x vocab`` tile per model at a time), like the
PyTorch backend of the loss. The evaluation set is split across processes and the sums all-reduced.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from fusedkd.distill.data import IGNORE_INDEX, TokenizedSamples, collate
from fusedkd.distill.distributed import DistContext, all_reduce_sum
from fusedkd.distill.models import hidden_states, lm_head
from fusedkd.torch_backend.tiles import default_chunk_size


@dataclass(frozen=True)
class EvalResult:
    """Means per target token over the evaluation set (teacher fields are None without a teacher)."""

    tokens: int
    student_ce: float
    teacher_ce: float | None = None
    agreement: float | None = None
    kl: float | None = None

    @property
    def student_ppl(self) -> float:
        return math.exp(self.student_ce)

    @property
    def teacher_ppl(self) -> float | None:
        return None if self.teacher_ce is None else math.exp(self.teacher_ce)

    def as_dict(self, prefix: str = "eval_") -> dict:
        values = {"tokens": self.tokens, "student_ce": self.student_ce, "student_ppl": self.student_ppl}
        if self.teacher_ce is not None:
            values.update(teacher_ce=self.teacher_ce, teacher_ppl=self.teacher_ppl)
            values.update(agreement=self.agreement, kl=self.kl)
        return {prefix + key: value for key, value in values.items()}


def _logits(hidden: torch.Tensor, model, vocab: int) -> torch.Tensor:
    """float32 logits of `hidden`: in the autocast dtype inside an autocast region (as in training), else
    in the hidden states' dtype."""
    head = lm_head(model)
    weight, bias = head.weight[:vocab], None if head.bias is None else head.bias[:vocab]
    if not torch.is_autocast_enabled(hidden.device.type):
        weight, bias = weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype)
    return head.transform(F.linear(hidden, weight, bias).float())  # the model's logit scale and soft cap


def _shard(num_samples: int, batch_size: int, ctx: DistContext) -> list[tuple[list[int], list[bool]]]:
    """This process's evaluation batches; every process gets the same number (padded with dead rows)."""
    per_step = batch_size * ctx.world_size
    steps = -(-num_samples // per_step)
    batches = []
    for step in range(steps):
        start = step * per_step + ctx.rank * batch_size
        rows = list(range(start, start + batch_size))
        live = [i < num_samples for i in rows]
        if any(live) or ctx.distributed:
            batches.append(([i if i < num_samples else 0 for i in rows], live))
    return batches


@torch.no_grad()
def evaluate(
    student,
    samples: TokenizedSamples,
    *,
    vocab_size: int,
    pad_id: int,
    batch_size: int,
    ctx: DistContext,
    teacher=None,
    autocast: Callable[[], object] = nullcontext,
    teacher_cache: dict | None = None,
    student_hidden: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> EvalResult:
    """Evaluate `student` (and compare it with `teacher`, if given) on `samples`.

    `teacher_cache`: a dict to keep the teacher's hidden states in between calls on the same samples
    (the teacher is frozen), so that evaluating several students runs the teacher once.
    `student_hidden(input_ids, attention_mask)`: how to get the student's hidden states (default: its
    base model; under FSDP2, the sharded objective's ``forward(..., hidden_only=True)``).

    Example:
        >>> from fusedkd.distill.models import qwen3_config, build_model, TINY_STUDENT_SHAPE
        >>> from fusedkd.distill.distributed import DistContext
        >>> config = qwen3_config(TINY_STUDENT_SHAPE, vocab_size=50, max_positions=16, eos_token_id=0)
        >>> model = build_model(config, seed=0)
        >>> samples = TokenizedSamples.from_lists([([1, 2, 3, 0], [False, True, True, True])])
        >>> ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
        >>> result = evaluate(model, samples, vocab_size=50, pad_id=0, batch_size=4, ctx=ctx, teacher=model)
        >>> result.tokens, round(result.agreement, 3), abs(result.kl) < 1e-5
        (3, 1.0, True)
    """
    models = [student] if teacher is None else [student, teacher]  # evaluated in eval mode, then restored
    modes = [m.training for m in models]
    for model in models:
        model.eval()
    # sums: student CE, teacher CE, agreements, KL, tokens
    sums = torch.zeros(5, dtype=torch.float64, device=ctx.device)
    chunk = default_chunk_size(vocab_size)
    if student_hidden is None:
        student_hidden = partial(hidden_states, student)
    try:
        for number, (indices, live) in enumerate(_shard(len(samples), batch_size, ctx)):
            batch = collate(samples, indices, pad_id=pad_id, weight_mask=live).to(ctx.device)
            valid = batch.labels.reshape(-1) != IGNORE_INDEX
            labels = batch.labels.reshape(-1)[valid]
            with autocast():
                hidden = student_hidden(batch.input_ids, batch.attention_mask)
            hidden = hidden.reshape(-1, hidden.shape[-1])[valid]
            teacher_hidden = None
            if teacher is not None:
                if teacher_cache is not None and number in teacher_cache:
                    teacher_hidden = teacher_cache[number]
                else:
                    with autocast():
                        teacher_hidden = hidden_states(teacher, batch.input_ids, batch.attention_mask)
                    teacher_hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])[valid]
                    if teacher_cache is not None:
                        teacher_cache[number] = teacher_hidden
            for start in range(0, labels.numel(), chunk):
                rows = slice(start, start + chunk)
                with autocast():  # the student's logits as training computes them
                    student_logits = _logits(hidden[rows], student, vocab_size)
                sums[0] += F.cross_entropy(student_logits, labels[rows], reduction="sum").double()
                sums[4] += student_logits.shape[0]
                if teacher is None:
                    continue
                teacher_logits = _logits(teacher_hidden[rows], teacher, vocab_size)
                sums[1] += F.cross_entropy(teacher_logits, labels[rows], reduction="sum").double()
                sums[2] += (student_logits.argmax(-1) == teacher_logits.argmax(-1)).sum()
                log_p = F.log_softmax(teacher_logits, -1)
                sums[3] += (log_p.exp() * (log_p - F.log_softmax(student_logits, -1))).sum().double()
    finally:
        for model, mode in zip(models, modes):
            model.train(mode)
    all_reduce_sum(sums, ctx)
    student_ce, teacher_ce, agreements, kl, tokens = sums.tolist()
    tokens_int = int(tokens)
    if tokens_int == 0:
        return EvalResult(tokens=0, student_ce=float("nan"))
    if teacher is None:
        return EvalResult(tokens=tokens_int, student_ce=student_ce / tokens)
    return EvalResult(
        tokens=tokens_int,
        student_ce=student_ce / tokens,
        teacher_ce=teacher_ce / tokens,
        agreement=agreements / tokens,
        kl=kl / tokens,
    )
