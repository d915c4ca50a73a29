"""The autograd.Function of the logits-level KD loss over the Triton kernels (backend="triton").

Forward: kd_logits_forward_kernel, one program per token row, writes the per-row statistics, D and C;
for reductions "mean" and "sum" it also writes G = dloss/dstudent_logits for an output gradient of 1,
and backward only scales it. For reduction="none", or when the returned components are themselves
differentiated, backward runs kd_logits_backward_kernel with per-row weights built from the output
gradients. The only [N, V] allocation is G, in the student-logits dtype; everything else is O(N).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedkd._autograd import (
    EagerGradients,
    gradient_weights,
    input_grads,
    no_output_grad,
    once_differentiable,
    reduce,
    reduction_scale,
    unit_gradient_weights,
)
from fusedkd._options import KDOptions, head_chain_rule
from fusedkd.kernels import launch_device
from fusedkd.kernels.kd_logits_backward import NUM_STATS, kd_logits_backward_kernel
from fusedkd.kernels.kd_logits_forward import kd_logits_forward_kernel
from fusedkd.kernels.tl_utils import DIVERGENCE_CODES, head_arguments, inverse_temperature, label_order

# Fixed launch configuration (autotuning needs a GPU driver, docs/design.md §7): one row per program,
# vocabulary blocks of up to 2048 entries over 8 warps. Compiled for sm_90 this uses 56-64 registers
# per thread and spills nothing (ptxas -v); not yet timed on a GPU.
MAX_BLOCK_V = 2048


def _block_and_warps(vocab_size: int) -> tuple[int, int]:
    block_v = min(MAX_BLOCK_V, triton.next_power_of_2(vocab_size))
    return block_v, 8 if block_v >= 2048 else 4


def row_offsets(x: torch.Tensor) -> torch.Tensor:
    """int64 element offset of the start of every row of a [..., V] tensor, for any leading strides."""
    offsets = torch.zeros((), dtype=torch.int64, device=x.device)
    for size, stride in zip(x.shape[:-1], x.stride()[:-1]):
        offsets = offsets[..., None] + torch.arange(size, dtype=torch.int64, device=x.device) * stride
    return offsets.reshape(-1)


def _acc_dtype(dtype: torch.dtype) -> tuple[torch.dtype, tl.dtype]:
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def _launch_args(student_logits, teacher_logits, labels, options: KDOptions, order):
    """Arguments shared by both kernels: row addressing, labels, sizes, scalars and flags.

    Labels arrive contiguous int64 (`kd_logits` converts any other layout). As for the fused kernels,
    the tokens that count come as `order`, `tl_utils.label_order`'s (token_index, num_valid), computed
    once per call, and the
    temperature as 1/T (`tl_utils.inverse_temperature`), a float64 argument that the kernels round once
    to their accumulation dtype (so float64 rows keep float64 precision).
    """
    has_labels = labels is not None
    student_offsets = row_offsets(student_logits)
    block_v, num_warps = _block_and_warps(options.vocab_size)
    leading = (
        student_logits,
        student_offsets,
        student_logits.stride(-1),
        teacher_logits,
        row_offsets(teacher_logits),
        teacher_logits.stride(-1),
        labels if has_labels else student_offsets,  # never read without labels
        *order,
    )
    scalars = (
        options.vocab_size,
        student_logits.shape[-1],
        inverse_temperature(options),
        options.beta,
    )
    flags = dict(
        **head_arguments(options),
        DIVERGENCE=DIVERGENCE_CODES[options.divergence],
        HAS_LABELS=has_labels,
        ACC_DTYPE=_acc_dtype(student_logits.dtype)[1],
        BLOCK_V=block_v,
        num_warps=num_warps,
    )
    return leading, scalars, flags


class KDLogitsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, teacher_logits, labels, options: KDOptions):
        n = student_logits[..., 0].numel()
        dtype = _acc_dtype(student_logits.dtype)[0]
        device = student_logits.device
        order = label_order(labels, options.ignore_index, n, device)
        leading, scalars, flags = _launch_args(student_logits, teacher_logits, labels, options, order)
        scale = reduction_scale(order[1].reshape(()), options.reduction, dtype)

        stats = torch.empty(n, NUM_STATS, dtype=dtype, device=device)
        divergence = torch.empty(n, dtype=dtype, device=device)
        ce = torch.empty(n, dtype=dtype, device=device)
        fuse_grad = ctx.needs_input_grad[0] and options.reduction != "none"
        if fuse_grad:
            grad = torch.empty(student_logits.shape, dtype=student_logits.dtype, device=device)
            # Weights for an output gradient of 1; one element each (the kernel reads element 0).
            w_distill, w_ce, _ = head_chain_rule(
                options.student_head, *unit_gradient_weights(options, scale, num_tokens=1, dtype=dtype)
            )
            if w_ce is None:
                w_ce = torch.zeros_like(w_distill)
        else:
            grad = w_distill = w_ce = divergence  # never written or read without FUSE_GRAD
        if n > 0:
            with launch_device(student_logits):
                kd_logits_forward_kernel[(n,)](
                    *leading,
                    stats,
                    divergence,
                    ce,
                    grad,
                    w_distill,
                    w_ce,
                    *scalars,
                    FUSE_GRAD=fuse_grad,
                    **flags,
                )
        loss = options.distill_weight * divergence + options.ce_weight * ce

        ctx.set_materialize_grads(False)
        ctx.save_for_backward(student_logits, teacher_logits, labels, stats, scale, *order)
        ctx.options = options
        ctx.eager = EagerGradients([grad] if fuse_grad else None)
        return tuple(reduce(x, options.reduction, scale) for x in (loss, divergence, ce))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, grad_divergence, grad_ce):
        student_logits, teacher_logits, labels, stats, scale, *order = ctx.saved_tensors
        options: KDOptions = ctx.options
        if not ctx.needs_input_grad[0] or no_output_grad(grad_loss, grad_divergence, grad_ce):
            return input_grads(ctx.needs_input_grad, {})
        eager = ctx.eager.take(grad_loss, grad_divergence, grad_ce)
        if eager is not None:
            # G was formed in the forward for an output gradient of 1, now scaled by grad_loss (once; a
            # second backward through a retained graph takes the recomputing path below).
            return input_grads(ctx.needs_input_grad, {0: eager[0]})

        n = stats.shape[0]
        w_distill, w_ce, _ = head_chain_rule(
            options.student_head,
            *gradient_weights(
                options, scale, grad_loss, grad_divergence, grad_ce, num_tokens=n, dtype=stats.dtype
            ),
        )
        if w_ce is None:
            w_ce = torch.zeros_like(w_distill)
        leading, scalars, flags = _launch_args(student_logits, teacher_logits, labels, options, order)
        grad = torch.empty(student_logits.shape, dtype=student_logits.dtype, device=student_logits.device)
        if n > 0:
            with launch_device(student_logits):
                kd_logits_backward_kernel[(n,)](*leading, stats, grad, w_distill, w_ce, 1, *scalars, **flags)
        return input_grads(ctx.needs_input_grad, {0: grad})


def kd_logits(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    options: KDOptions,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backend entry point: checked inputs -> (loss, distill, ce), reduced per `options`, flat for "none".

    `student_logits` [..., V_s] and `teacher_logits` [..., V_t] (same leading shape, any strides, only the
    first `options.vocab_size` entries used); `labels` flat [N] int64 or int32 of any stride, or None.
    Outputs are float32 (float64 for float64 student logits); the gradient has the student logits'
    shape and dtype. The backward is once-differentiable (double backward raises).
    """
    teacher_logits = teacher_logits.detach()
    if labels is not None and labels.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"labels must be int32 or int64, got {labels.dtype}")
    if labels is not None:
        # The kernels read labels as contiguous int64: a no-op for the public path, an O(N) copy for
        # a direct call with a strided view or int32 labels.
        labels = labels.to(torch.int64).contiguous()
    if torch.is_grad_enabled() and student_logits.requires_grad:
        return KDLogitsFunction.apply(student_logits, teacher_logits, labels, options)
    with torch.no_grad():
        return KDLogitsFunction.apply(student_logits.detach(), teacher_logits, labels, options)
