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

import math
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
from fusedkd.kernels import INTERPRETER, launch_device, unavailable_reason
from fusedkd.kernels.config import KernelConfig, TileConfig, config_dtype, dot_precision, select_config
from fusedkd.kernels.gradient import gradient_kernel
from fusedkd.kernels.jsd import NUM_JSD_FIELDS, jsd_kernel, merge_jsd_kernel
from fusedkd.kernels.statistics import (
    NUM_PARTIAL_FIELDS,
    NUM_STAT_FIELDS,
    merge_statistics_kernel,
    statistics_kernel,
)
from fusedkd.kernels.tl_utils import DIVERGENCE_CODES

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MERGE_BLOCK = 256  # tokens per program of the (cheap, O(N)) merge kernels


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


def head_arguments(options: KDOptions) -> dict:
    """Each head's transform (`KDOptions`) as the tile kernels take it: the logit scale a runtime float,
    the soft cap a runtime float (1.0 when absent, unused) behind a STUDENT_SOFTCAP / TEACHER_SOFTCAP
    constexpr."""
    return dict(
        student_logit_scale=options.student_logit_scale,
        student_softcap=1.0 if options.student_softcap is None else options.student_softcap,
        teacher_logit_scale=options.teacher_logit_scale,
        teacher_softcap=1.0 if options.teacher_softcap is None else options.teacher_softcap,
        STUDENT_SOFTCAP=options.student_softcap is not None,
        TEACHER_SOFTCAP=options.teacher_softcap is not None,
    )


def inverse_temperature(options: KDOptions) -> float:
    """The one place where the temperature T of `KDOptions` becomes the kernels' `inv_temperature` = 1/T
    (the scale of the online log-sum-exp convention, tl_utils.py)."""
    return 1.0 / options.temperature


def _token_order(labels: torch.Tensor | None, options: KDOptions, n: int, device: torch.device):
    """(token_index [N] int64 with the valid tokens first, num_valid [1] int64): no host sync."""
    if labels is None:
        return torch.arange(n, device=device), torch.full((1,), n, dtype=torch.int64, device=device)
    ignored = labels == options.ignore_index
    token_index = torch.sort(ignored.to(torch.uint8), stable=True).indices
    return token_index, (n - ignored.sum()).reshape(1)


def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def statistics_grid(
    num_tokens: int, vocab_size: int, config: KernelConfig, multiprocessors: int, interpreter: bool = False
) -> tuple[int, int]:
    """(splits, vocabulary blocks per split) of the statistics grid.

    `config.vocab_splits` splits (more when there are too few token blocks to fill the GPU twice):
    with the grouped raster, a wave of `multiprocessors` programs covers about
    multiprocessors / splits token blocks, whose hidden states stay in L2 while the wave walks the
    vocabulary, and reads each weight tile from HBM once.
    """
    tile = config.statistics
    num_vocab_blocks = math.ceil(vocab_size / tile.block_v)
    num_token_blocks = math.ceil(num_tokens / tile.block_n)
    fill = math.ceil(2 * multiprocessors / max(1, num_token_blocks))
    wanted = 2 if interpreter else max(config.vocab_splits, fill)
    blocks_per_split = math.ceil(num_vocab_blocks / max(1, min(wanted, num_vocab_blocks)))
    return math.ceil(num_vocab_blocks / blocks_per_split), blocks_per_split


def _vocab_splits(problem: _Problem, config: KernelConfig) -> tuple[int, int]:
    sms = _multiprocessors(problem.device)
    return statistics_grid(problem.num_tokens, problem.vocab_size, config, sms, INTERPRETER)


def statistics_task(task: int, splits: int) -> tuple[int, int]:
    """(token block, split) of statistics task `task`: what the kernels compute from it (program `pid`
    takes tasks pid, pid + P, ...)."""
    return task // splits, task % splits


def statistics_programs(num_tokens: int, splits: int, tile: TileConfig, multiprocessors: int) -> int:
    """Programs of the persistent statistics (and JSD) grid: one per multiprocessor, at most one per task."""
    return max(1, min(multiprocessors, math.ceil(num_tokens / tile.block_n) * splits))


def _statistics(problem: _Problem, config: KernelConfig):
    """Pass 1 (and the JSD's pass 2), launched on the inputs' device: see `_launch_statistics`."""
    with launch_device(problem.student_hidden):
        return _launch_statistics(problem, config)


def _launch_statistics(problem: _Problem, config: KernelConfig):
    """Pass 1 (and the JSD's pass 2): (stats [fields, N], distill [N], ce [N]), float32."""
    options, n, device = problem.options, problem.num_tokens, problem.device
    tile = config.statistics
    student, teacher, student_strides, teacher_strides = problem.tile_args()
    splits, blocks_per_split = _vocab_splits(problem, config)
    programs = statistics_programs(n, splits, tile, _multiprocessors(problem.device))
    grid = (programs,)
    if n == 0:  # no token: nothing to launch (an empty grid is not valid everywhere)
        empty = torch.zeros(0, dtype=torch.float32, device=device)
        return torch.zeros((NUM_STAT_FIELDS, 0), dtype=torch.float32, device=device), empty, empty.clone()
    divergence = DIVERGENCE_CODES[options.divergence]
    inv_temperature = inverse_temperature(options)
    flags = problem.tile_flags(tile)
    sizes = (n, problem.vocab_size, problem.student_hidden.shape[1], problem.teacher_hidden.shape[1])

    partial = torch.empty((splits, NUM_PARTIAL_FIELDS, n), dtype=torch.float32, device=device)
    # Each program's parking place for its two logit tiles (tl_utils.park_tile).
    park = torch.empty((programs, 2, tile.block_n * tile.block_v), dtype=torch.float32, device=device)
    statistics_kernel[grid](
        *student,
        *teacher,
        *problem.label_args(),
        problem.token_index,
        problem.num_valid,
        partial,
        park,
        *sizes,
        blocks_per_split,
        splits,
        *student_strides,
        *teacher_strides,
        inv_temperature,
        DIVERGENCE=divergence,
        HAS_LABELS=problem.labels is not None,
        SEPARATE_CE=problem.separate_ce,
        FOLD_V=tile.fold_v,
        **flags,
    )
    stats = torch.empty((NUM_STAT_FIELDS, n), dtype=torch.float32, device=device)
    distill = torch.zeros(n, dtype=torch.float32, device=device)
    ce = torch.zeros(n, dtype=torch.float32, device=device)
    merge_grid = (math.ceil(n / MERGE_BLOCK),)
    merge_statistics_kernel[merge_grid](
        partial,
        stats,
        problem.token_index,
        problem.num_valid,
        distill,
        ce,
        n,
        splits,
        inv_temperature,
        DIVERGENCE=divergence,
        HAS_LABELS=problem.labels is not None,
        SEPARATE_CE=problem.separate_ce,
        BLOCK=MERGE_BLOCK,
    )
    if options.divergence == "jsd":
        beta = options.beta
        jsd_partial = torch.empty((splits, NUM_JSD_FIELDS, n), dtype=torch.float32, device=device)
        jsd_kernel[grid](
            *student,
            *teacher,
            problem.token_index,
            problem.num_valid,
            stats,
            jsd_partial,
            park,
            *sizes,
            blocks_per_split,
            splits,
            *student_strides,
            *teacher_strides,
            inv_temperature,
            math.log(beta),
            math.log1p(-beta),
            FOLD_V=tile.fold_v,
            **flags,
        )
        merge_jsd_kernel[merge_grid](
            jsd_partial,
            stats,
            problem.token_index,
            problem.num_valid,
            distill,
            n,
            splits,
            beta,
            BLOCK=MERGE_BLOCK,
        )
    return stats, distill, ce


def gradient_group_width(config: KernelConfig, tile: TileConfig) -> int:
    """Vocabulary columns a gradient program owns at a time (the width of its gradient products)."""
    return tile.block_v * config.gradient_vocab_sub_blocks


def gradient_programs(
    vocab_size: int, group_width: int, multiprocessors: int, interpreter: bool = False
) -> int:
    """Programs of the (persistent) gradient grid: one per multiprocessor, at most one per vocab group."""
    num_vocab_groups = math.ceil(vocab_size / group_width)
    return min(num_vocab_groups, 3 if interpreter else multiprocessors)


def _gradient_programs(problem: _Problem, group_width: int) -> int:
    return gradient_programs(problem.vocab_size, group_width, _multiprocessors(problem.device), INTERPRETER)


def staging_dtype(hidden_dtype: torch.dtype, interpreter: bool = False) -> torch.dtype:
    """The dtype G is staged in and the gradient products run in: the student's, except bf16 under the
    interpreter (float32: its bf16 dot is wrong, docs/design.md §7)."""
    if interpreter and hidden_dtype == torch.bfloat16:
        return torch.float32
    return hidden_dtype


def gradient_scale(
    options: KDOptions,
    weight_distill: torch.Tensor,
    weight_ce: torch.Tensor | None,
    staged_dtype: torch.dtype,
) -> torch.Tensor:
    """The power of two G is multiplied by before its cast to fp16 (and divided by after the products):
    a [1] float32 device tensor, no host sync; 1 for other dtypes.

    |G| <= bound = max_i (|w_D,i| c / T + |w_C,i|), with c = 1 for the KL and a small multiple for the
    log-ratio factors of the reverse KL and the JSD; the scale maps the bound to [2^-1, 2^0), so the
    largest entries of G stay far below fp16's maximum (65504) while the small ones, scaled by 1 / N
    under reduction "mean", no longer underflow fp16's 6e-8 at N >= 16k (docs/design.md §6).
    """
    one = torch.ones(1, dtype=torch.float32, device=weight_distill.device)
    if staged_dtype != torch.float16:
        return one
    bound = weight_distill.abs() * inverse_temperature(options)
    if weight_ce is not None:
        bound = bound + weight_ce.abs()
    largest = bound.max().reshape(1) if bound.numel() else one
    exponent = torch.ceil(torch.log2(largest.clamp(min=2.0**-100)))
    return torch.exp2(-exponent).clamp(max=2.0**100)


def _gradients(problem: _Problem, config: KernelConfig, stats, weight_distill, weight_ce, wanted):
    """Pass 2, launched on the inputs' device: see `_launch_gradients`."""
    with launch_device(problem.student_hidden):
        return _launch_gradients(problem, config, stats, weight_distill, weight_ce, wanted)


def _launch_gradients(
    problem: _Problem,
    config: KernelConfig,
    stats: torch.Tensor,
    weight_distill: torch.Tensor,
    weight_ce: torch.Tensor | None,
    wanted: tuple[bool, bool, bool],
):
    """Pass 2: (grad_student_hidden, grad_student_weight, grad_student_bias), None where not wanted.

    `weight_distill`, `weight_ce`: [N] float32 per-token weights of dD/ds and dC/ds (token order).
    """
    options, n, device = problem.options, problem.num_tokens, problem.device
    want_hidden, want_weight, want_bias = wanted
    if options.student_logit_scale != 1.0:
        # s = scale z (then capped): dloss/dz = scale dloss/ds, G being linear in the token weights.
        weight_distill = weight_distill * options.student_logit_scale
        weight_ce = None if weight_ce is None else weight_ce * options.student_logit_scale
    tile = config.gradient_tile(options.divergence)
    hidden, weight = problem.student_hidden, problem.student_weight
    vocab, student_dim = problem.vocab_size, hidden.shape[1]
    student, teacher, student_strides, teacher_strides = problem.tile_args()
    group_width = gradient_group_width(config, tile)
    programs = _gradient_programs(problem, group_width)
    f32 = dict(dtype=torch.float32, device=device)

    # float32 accumulators: the outputs themselves for float32 tensors.
    grad_hidden_acc = torch.zeros((n, student_dim), **f32) if want_hidden else None
    weight_scratch = want_weight and weight.dtype != torch.float32
    if not want_weight:
        grad_weight = grad_weight_acc = None
    elif weight_scratch:
        grad_weight = torch.empty((vocab, student_dim), dtype=weight.dtype, device=device)
        grad_weight_acc = torch.empty((programs * group_width, student_dim), **f32)
    else:
        grad_weight = grad_weight_acc = torch.zeros((vocab, student_dim), **f32)
    grad_bias = torch.zeros(vocab, **f32) if want_bias else None
    staged_dtype = staging_dtype(hidden.dtype, INTERPRETER)
    staging = torch.empty(
        (programs, config.gradient_sub_blocks * tile.block_n, group_width), dtype=staged_dtype, device=device
    )
    grad_scale = gradient_scale(options, weight_distill, weight_ce, staged_dtype)
    # Each program's parking place for its teacher logit tile (tl_utils.park_tile).
    park = torch.empty((programs, tile.block_n * tile.block_v), **f32)

    beta = options.beta if options.divergence == "jsd" else 0.5
    placeholder = stats  # for the pointers of outputs that are not computed (never touched)
    gradient_kernel[(programs,)](
        *student,
        *teacher,
        *problem.label_args(),
        problem.token_index,
        problem.num_valid,
        stats,
        weight_distill,
        placeholder if weight_ce is None else weight_ce,
        grad_scale,
        staging,
        park,
        placeholder if grad_hidden_acc is None else grad_hidden_acc,
        placeholder if grad_weight_acc is None else grad_weight_acc,
        placeholder if grad_weight is None else grad_weight,
        placeholder if grad_bias is None else grad_bias,
        n,
        vocab,
        student_dim,
        problem.teacher_hidden.shape[1],
        *student_strides,
        *teacher_strides,
        inverse_temperature(options),
        beta,
        math.log(beta),
        math.log1p(-beta),
        DIVERGENCE=DIVERGENCE_CODES[options.divergence],
        HAS_CE_GRAD=weight_ce is not None,
        SEPARATE_CE=problem.separate_ce,
        GRAD_HIDDEN=want_hidden,
        GRAD_WEIGHT=want_weight,
        GRAD_BIAS=want_bias,
        WEIGHT_SCRATCH=weight_scratch,
        TOKEN_GROUPS=config.token_groups,
        SUB_BLOCKS=config.gradient_sub_blocks,
        VOCAB_SUB_BLOCKS=config.gradient_vocab_sub_blocks,
        PRODUCT_M=min(config.gradient_product_m, group_width),
        PRODUCT_H=config.gradient_product_h,
        PRODUCT_K=config.gradient_product_k,
        PRODUCT_STAGES=config.gradient_product_stages,
        EVEN_PRODUCT_DIM=student_dim % config.gradient_product_h == 0,
        **problem.tile_flags(tile),
    )
    grad_hidden = None if grad_hidden_acc is None else grad_hidden_acc.to(hidden.dtype)
    if grad_bias is not None:
        grad_bias = grad_bias.to(problem.student_bias.dtype)
    return grad_hidden, grad_weight, grad_bias


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

    return select_config(key, config_dtype(hidden.dtype, teacher.dtype), problem.device, run)


class _FusedLinearKDFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        student_hidden,
        student_weight,
        student_bias,
        teacher_hidden,
        teacher_weight,
        teacher_bias,
        labels,
        options: KDOptions,
    ):
        problem = _make_problem(
            student_hidden,
            student_weight,
            student_bias,
            teacher_hidden,
            teacher_weight,
            teacher_bias,
            labels,
            options,
        )
        config = _select_config(problem)
        stats, distill, ce = _statistics(problem, config)
        scale = _reduction_scale(problem)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(
            student_hidden,
            student_weight,
            student_bias,
            teacher_hidden,
            teacher_weight,
            teacher_bias,
            labels,
            problem.token_index,
            problem.num_valid,
            stats,
            scale,
        )
        ctx.options, ctx.config = options, config
        return _outputs(problem, distill, ce, scale)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, grad_distill, grad_ce):
        (
            student_hidden,
            student_weight,
            student_bias,
            teacher_hidden,
            teacher_weight,
            teacher_bias,
            labels,
            token_index,
            num_valid,
            stats,
            scale,
        ) = ctx.saved_tensors
        wanted = ctx.needs_input_grad
        if no_output_grad(grad_loss, grad_distill, grad_ce):
            return input_grads(wanted, {})
        problem = _Problem(
            student_hidden,
            student_weight,
            student_bias,
            teacher_hidden,
            teacher_weight,
            teacher_bias,
            labels,
            token_index,
            num_valid,
            ctx.options,
        )
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
        grads = _gradients(
            problem,
            ctx.config,
            stats,
            weight_distill,
            weight_ce,
            (wanted[0], wanted[1], student_bias is not None and wanted[2]),
        )
        return input_grads(wanted, dict(enumerate(grads)))


def _make_problem(
    student_hidden,
    student_weight,
    student_bias,
    teacher_hidden,
    teacher_weight,
    teacher_bias,
    labels,
    options,
) -> _Problem:
    token_index, num_valid = _token_order(labels, options, student_hidden.shape[0], student_hidden.device)
    return _Problem(
        student_hidden,
        student_weight,
        student_bias,
        teacher_hidden,
        teacher_weight,
        teacher_bias,
        labels,
        token_index,
        num_valid,
        options,
    )


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backend entry point: checked, flattened inputs -> (loss, distill, ce), float32, reduced per `options`.

    Inputs are [N, H] hidden states and [V, H] heads (already cut to `options.vocab_size` rows), [V]
    biases, [N] int64 or int32 labels (or None), each of any strides; float32, bfloat16 or float16
    (the teacher's dtype may differ from the student's). The teacher gets no gradient. Under
    torch.no_grad, or when no student tensor requires grad, only the forward passes run and nothing
    is saved. The backward is once-differentiable (double backward raises).
    """
    _check_supported(student_hidden, teacher_hidden)
    if labels is not None and labels.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"labels must be int32 or int64, got {labels.dtype}")
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
        return _FusedLinearKDFunction.apply(*args, options)
    with torch.no_grad():
        problem = _make_problem(*args, options)
        _, distill, ce = _statistics(problem, _select_config(problem))
        return _outputs(problem, distill, ce, _reduction_scale(problem))
