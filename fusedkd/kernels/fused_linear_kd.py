"""The Triton backend (backend="triton"): the autograd.Function over the fused kernels.

Forward: the statistics pass (statistics.py), and for the JSD its second pass (jsd.py), leave O(N)
per-token statistics and the per-token divergence and cross-entropy. Backward: the gradient pass
(gradient.py) recomputes the logit tiles and forms G from those statistics, weighted per token by
the incoming gradients. Nothing of size N x V is ever allocated; what the passes hold besides the
inputs and the student's gradients is O(N) floats, a float32 [N, H_s] accumulator for the hidden-state
gradient (the gradient itself for float32 inputs), for 16-bit weights a float32 scratch of
(gradient programs) x (vocabulary group) x H_s, the G staging of (gradient programs) x (1024 tokens)
x (vocabulary group) entries and one parked float32 logit tile per program (two in the forward):
271 MiB in all at Qwen3-0.6B shapes and N = 16,384 on an H200 (64 MiB dh, 132 MiB dW rows, 66 MiB
staging, 8 MiB parking; benchmarks/gpu_model.py, RESULTS.md).

Tokens are processed in an order that puts the valid ones (label != ignore_index) first, computed on
the device without a host sync; blocks of ignored tokens are skipped by the kernels.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from fusedkd._autograd import (
    gradient_weights,
    input_grads,
    no_output_grad,
    once_differentiable,
    reduce,
    reduction_scale,
    unit_gradient_weights,
)
from fusedkd._options import KDOptions
from fusedkd._shard import VocabShard
from fusedkd.kernels import INTERPRETER, launch_device, unavailable_reason
from fusedkd.kernels.config import (
    KernelConfig,
    TileConfig,
    config_dtype,
    default_config,
    dot_precision,
    multiprocessor_count,
    select_config,
)
from fusedkd.kernels.gradient import launch_gradient
from fusedkd.kernels.jsd import launch_jsd
from fusedkd.kernels.statistics import NUM_STAT_FIELDS, launch_statistics
from fusedkd.kernels.tl_utils import head_arguments, label_order

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class _Problem:
    """Flattened inputs and the token order shared by every pass."""

    student_hidden: torch.Tensor  # [N, H_s]
    student_weight: torch.Tensor  # [V, H_s]
    student_bias: torch.Tensor | None  # [V]
    teacher_hidden: torch.Tensor  # [N, H_t]
    teacher_weight: torch.Tensor  # [V, H_t]
    teacher_bias: torch.Tensor | None  # [V]
    labels: torch.Tensor | None  # [N] int64
    token_index: torch.Tensor  # [N] int64: position -> token, valid tokens first
    num_valid: torch.Tensor  # [1] int64, on the device
    options: KDOptions
    multiprocessors: int = 0  # the grids are sized for (0: the device's; compile_check sets its own)
    # This rank's block of a vocabulary-parallel head (the passes' per-token states are combined across
    # the ranks: `combine_partials`), or None.
    shard: VocabShard | None = None

    def __post_init__(self):
        if not self.multiprocessors:
            self.multiprocessors = multiprocessor_count(self.device)

    @property
    def num_tokens(self) -> int:
        return self.student_hidden.shape[0]

    @property
    def vocab_size(self) -> int:
        return self.student_weight.shape[0]

    @property
    def device(self) -> torch.device:
        return self.student_hidden.device

    @property
    def separate_ce(self) -> bool:
        """Whether the cross-entropy softmax (T = 1) differs from the distillation one (T)."""
        return self.options.has_labels and self.options.temperature != 1.0

    def tile_args(self) -> tuple:
        """Tensors, sizes and strides in the order the tile kernels take them."""
        sh, sw, th, tw = self.student_hidden, self.student_weight, self.teacher_hidden, self.teacher_weight
        # An absent bias is never read (HAS_*_BIAS is False): any pointer will do.
        sb, tb = self.student_bias, self.teacher_bias
        return (
            (sh, sw, sw if sb is None else sb),
            (th, tw, tw if tb is None else tb),
            (sh.stride(0), sh.stride(1), sw.stride(0), sw.stride(1), 1 if sb is None else sb.stride(0)),
            (th.stride(0), th.stride(1), tw.stride(0), tw.stride(1), 1 if tb is None else tb.stride(0)),
        )

    def label_args(self) -> tuple:
        """(labels pointer, its stride): the labels as they are (any stride, int32 or int64); without
        labels any int64 tensor (never read)."""
        if self.labels is None:
            return self.token_index, 1
        return self.labels, self.labels.stride(0)

    def tile_flags(self, tile: TileConfig) -> dict:
        """Compile-time features shared by the tile kernels."""
        return dict(
            HAS_STUDENT_BIAS=self.student_bias is not None,
            HAS_TEACHER_BIAS=self.teacher_bias is not None,
            EVEN_STUDENT_DIM=self.student_hidden.shape[1] % tile.block_h == 0,
            EVEN_TEACHER_DIM=self.teacher_hidden.shape[1] % tile.block_h == 0,
            # Triton's interpreter computes bf16 dots wrongly: upcast those tiles there (docs/design.md §7).
            STUDENT_UPCAST=INTERPRETER and self.student_hidden.dtype == torch.bfloat16,
            TEACHER_UPCAST=INTERPRETER and self.teacher_hidden.dtype == torch.bfloat16,
            DOT_PRECISION=dot_precision(),
            **head_arguments(self.options),
            BLOCK_N=tile.block_n,
            BLOCK_V=tile.block_v,
            BLOCK_H=tile.block_h,
            num_warps=tile.num_warps,
            num_stages=tile.num_stages,
        )


def _statistics(problem: _Problem, config: KernelConfig):
    """The forward passes on the inputs' device (statistics.py, and jsd.py for the JSD): (stats
    [fields, N], distill [N], ce [N]), float32."""
    if problem.num_tokens == 0:  # no token: nothing to launch (an empty grid is not valid everywhere)
        f32 = dict(dtype=torch.float32, device=problem.device)
        return torch.zeros((NUM_STAT_FIELDS, 0), **f32), torch.zeros(0, **f32), torch.zeros(0, **f32)
    with launch_device(problem.student_hidden):
        stats, distill, ce, park = launch_statistics(problem, config)
        if problem.options.divergence == "jsd":
            launch_jsd(problem, config, stats, distill, park)
    return stats, distill, ce


def _gradients(problem: _Problem, config: KernelConfig, stats, weight_distill, weight_ce, wanted):
    """The gradient pass on the inputs' device: see `gradient.launch_gradient`. Vocabulary-parallel: this
    rank's columns' share of the hidden-state gradient, summed over the ranks."""
    shard = problem.shard
    if shard is not None and (problem.vocab_size == 0 or problem.num_tokens == 0):
        grads = _empty_gradients(problem, wanted)
    else:
        with launch_device(problem.student_hidden):
            grads = launch_gradient(problem, config, stats, weight_distill, weight_ce, wanted)
    if shard is not None and grads[0] is not None:
        shard.all_reduce_(grads[0])
    return grads


def _empty_gradients(problem: _Problem, wanted):
    """The gradients of a rank whose block holds no counted row (or of no token): zeros."""
    hidden, weight, bias = problem.student_hidden, problem.student_weight, problem.student_bias
    return (
        torch.zeros_like(hidden) if wanted[0] else None,
        torch.zeros_like(weight) if wanted[1] else None,
        torch.zeros_like(bias) if wanted[2] else None,
    )


def _reduction_scale(problem: _Problem) -> torch.Tensor:
    return reduction_scale(problem.num_valid, problem.options.reduction, torch.float32)


def _outputs(problem: _Problem, distill: torch.Tensor, ce: torch.Tensor, scale: torch.Tensor):
    """(loss, distill, ce) reduced per options.reduction; ignored tokens hold zeros already."""
    options = problem.options
    loss = options.distill_weight * distill + options.ce_weight * ce
    return tuple(reduce(x, options.reduction, scale) for x in (loss, distill, ce))


def _unit_gradients(problem: _Problem, config: KernelConfig, stats: torch.Tensor):
    """The gradient pass for grad_output = 1 (what autotuning times)."""
    weights = unit_gradient_weights(
        problem.options, _reduction_scale(problem), num_tokens=problem.num_tokens, dtype=torch.float32
    )
    wanted = (True, True, problem.student_bias is not None)
    return _gradients(problem, config, stats, *weights, wanted)


def _select_config(problem: _Problem) -> KernelConfig:
    hidden, teacher = problem.student_hidden, problem.teacher_hidden
    key = (
        hidden.dtype,
        teacher.dtype,
        hidden.shape[1],
        teacher.shape[1],
        problem.vocab_size,
        problem.options.divergence,
        1 << max(0, problem.num_tokens - 1).bit_length(),  # token count, to the next power of two
    )

    def run(config: KernelConfig):
        stats, _, _ = _statistics(problem, config)
        return _unit_gradients(problem, config, stats)

    if problem.shard is not None:
        # Every rank runs one configuration (their splits pair up), with the vocabulary splits of one
        # device divided among the ranks: the gathered states are what one device's pass would hold.
        config = default_config(config_dtype(hidden.dtype, teacher.dtype))
        return dataclasses.replace(config, vocab_splits=-(-config.vocab_splits // problem.shard.world))
    return select_config(key, config_dtype(hidden.dtype, teacher.dtype), problem.device, run)


class _FusedLinearKDFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *inputs):
        """inputs: the seven tensors of `fused_linear_kd` (student_hidden ... labels), then the options."""
        *tensors, options, shard = inputs
        problem = _make_problem(*tensors, options, shard=shard)
        config = _select_config(problem)
        stats, distill, ce = _statistics(problem, config)
        scale = _reduction_scale(problem)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*tensors, problem.token_index, problem.num_valid, stats, scale)
        ctx.options, ctx.config, ctx.shard = options, config, shard
        return _outputs(problem, distill, ce, scale)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, grad_distill, grad_ce):
        *tensors, token_index, num_valid, stats, scale = ctx.saved_tensors
        wanted = ctx.needs_input_grad
        if no_output_grad(grad_loss, grad_distill, grad_ce):
            return input_grads(wanted, {})
        problem = _Problem(*tensors, token_index, num_valid, ctx.options, shard=ctx.shard)
        # Ignored tokens are never visited by the kernels: their weights do not matter.
        weight_distill, weight_ce = gradient_weights(
            ctx.options,
            scale,
            grad_loss,
            grad_distill,
            grad_ce,
            num_tokens=problem.num_tokens,
            dtype=torch.float32,
        )
        want_bias = problem.student_bias is not None and wanted[2]
        grads = _gradients(problem, ctx.config, stats, weight_distill, weight_ce, (*wanted[:2], want_bias))
        return input_grads(wanted, dict(enumerate(grads)))


def _make_problem(*inputs, shard: VocabShard | None = None) -> _Problem:
    """inputs: the seven tensors of `fused_linear_kd` (student_hidden ... labels), then the options."""
    *tensors, labels, options = inputs
    hidden = tensors[0]
    token_index, num_valid = label_order(labels, options.ignore_index, hidden.shape[0], hidden.device)
    return _Problem(*tensors, labels, token_index, num_valid, options, shard=shard)


def _check_supported(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> None:
    reason = unavailable_reason(student_hidden.device)
    if reason is not None:
        raise RuntimeError(f"backend='triton' cannot run here: {reason}")
    for name, tensor in (("student", student_hidden), ("teacher", teacher_hidden)):
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"backend='triton' takes float32, bfloat16 or float16 inputs (it accumulates in float32); "
                f"the {name} tensors are {tensor.dtype}: use backend='torch' for {tensor.dtype}"
            )


def fused_linear_kd(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: torch.Tensor | None,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    teacher_bias: torch.Tensor | None,
    labels: torch.Tensor | None,
    options: KDOptions,
    *,
    shard: VocabShard | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backend entry point: checked, flattened inputs -> (loss, distill, ce), float32, reduced per `options`.

    Inputs are [N, H] hidden states and [V, H] heads (already cut to `options.vocab_size` rows), [V]
    biases, [N] int64 or int32 labels (or None), each of any strides; float32, bfloat16 or float16
    (the teacher's dtype may differ from the student's). The teacher gets no gradient. Under
    torch.no_grad, or when no student tensor requires grad, only the forward passes run and nothing
    is saved. The backward is once-differentiable (double backward raises).

    `shard`: the heads are this rank's block of a vocabulary-parallel head (`fusedkd.vocab_parallel`),
    `labels` global vocabulary indices: each pass's per-split states are gathered from every rank and
    merged as one rank's splits are (`config.combine_partials`), the label's logit and one-hot on the
    rank that owns it, and the hidden-state gradient summed over the ranks.
    """
    _check_supported(student_hidden, teacher_hidden)
    if labels is not None and labels.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"labels must be int32 or int64, got {labels.dtype}")
    if shard is not None:
        labels = shard.local_labels(labels, options.ignore_index)
    teacher_hidden, teacher_weight = teacher_hidden.detach(), teacher_weight.detach()
    teacher_bias = None if teacher_bias is None else teacher_bias.detach()
    args = (
        student_hidden,
        student_weight,
        student_bias,
        teacher_hidden,
        teacher_weight,
        teacher_bias,
        labels,
    )
    needs_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (student_hidden, student_weight, student_bias)
    )
    if needs_grad:
        return _FusedLinearKDFunction.apply(*args, options, shard)
    with torch.no_grad():
        problem = _make_problem(*args, options, shard=shard)
        _, distill, ce = _statistics(problem, _select_config(problem))
        return _outputs(problem, distill, ce, _reduction_scale(problem))
