"""Argument checking and preparation of every public entry point: one place, before any backend runs.

Each loss has one `prepare_*` that checks every argument (raising a TypeError / ValueError that names it)
and hands the backends what they rely on: hidden states flattened to [N, H] (views where
possible), heads cut to the vocabulary size, contiguous biases, contiguous int64 [N] labels, and,
under `torch.autocast`, the projections' inputs in the autocast dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fusedkd._options import (
    KDOptions,
    SupportOptions,
    TopKOptions,
    check_logit_scale,
    check_positive_int,
    check_softcap,
    check_temperature,
    check_vocab_size,
    compute_dtype,
    tail_precision,
)
from fusedkd._values import check_finite_rows, check_topk_values, check_values, counted_tokens

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# The dtypes autocast casts to its dtype (float64 is left alone), as for torch.nn.functional.linear.
AUTOCAST_ELIGIBLE = (torch.float32, torch.bfloat16, torch.float16)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype of the `torch.autocast` region active for `device`'s type, or None outside one."""
    try:
        enabled = torch.is_autocast_enabled(device.type)
    except RuntimeError:  # a device type autocast does not know
        return None
    return torch.get_autocast_dtype(device.type) if enabled else None


def autocast_cast(x: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    """`x` in the autocast dtype, as torch.nn.functional.linear casts its inputs under autocast (a
    differentiable cast: the gradient flows back in `x`'s own dtype); float64 and non-float tensors,
    and everything outside autocast (`dtype` None), are left as they are."""
    if (
        not isinstance(x, torch.Tensor)
        or dtype is None
        or x.dtype not in AUTOCAST_ELIGIBLE
        or x.dtype == dtype
    ):
        return x
    return x.to(dtype)


@dataclass
class LinearKDInputs:
    """Flattened, checked inputs of `fused_linear_kd_loss`: N tokens, heads cut to `vocab_size` rows."""

    student_hidden: torch.Tensor  # [N, H_s]
    student_weight: torch.Tensor  # [V, H_s] (a view of the first V rows)
    student_bias: torch.Tensor | None  # [V]
    teacher_hidden: torch.Tensor  # [N, H_t]
    teacher_weight: torch.Tensor  # [V, H_t]
    teacher_bias: torch.Tensor | None  # [V]
    labels: torch.Tensor | None  # [N] int64
    leading_shape: torch.Size
    options: KDOptions


def check_tensor(name: str, value, *, ndim: int | None = None, min_ndim: int | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(value.shape)}")
    if min_ndim is not None and value.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(value.shape)}")
    return value


def check_float(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {tensor.dtype}")


def check_sizes(name: str, tensor: torch.Tensor, what: str = "hidden size") -> None:
    """The last dimension (a hidden size, or a vocabulary) of `tensor` is not empty."""
    if tensor.shape[-1] == 0:
        raise ValueError(f"{name} has {what} 0 (shape {tuple(tensor.shape)}): there is nothing to project")


def check_same_dtype(name: str, tensor: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if tensor.dtype != ref.dtype:
        raise TypeError(
            f"{name} has dtype {tensor.dtype} but {ref_name} has dtype {ref.dtype}; they must match "
            f"(cast one, e.g. {name}.to({ref.dtype}))"
        )


def check_no_functorch() -> None:
    """The losses are autograd Functions with eager checks and host-side chunking: `torch.func`
    transforms (vmap, grad, jacrev, ...) cannot batch or differentiate them. Refused by name."""
    if torch._C._are_functorch_transforms_active():
        raise RuntimeError(
            "fusedkd's losses do not run under torch.func transforms (vmap, grad, jacrev, ...): call the "
            "loss on the whole batch instead of vmap (it takes any leading shape, e.g. [batch, seq, hidden], "
            "and reduction='none' gives per-token values), and use torch.autograd.grad or .backward() "
            "instead of torch.func.grad"
        )


def check_devices(named: dict[str, torch.Tensor | None]) -> torch.device:
    present = {k: v for k, v in named.items() if v is not None}
    devices = {k: v.device for k, v in present.items()}
    first_name, first_device = next(iter(devices.items()))
    for name, device in devices.items():
        if device != first_device:
            raise ValueError(
                f"all tensors must be on one device: {first_name} is on {first_device} "
                f"but {name} is on {device}"
            )
    return first_device


def check_labels(
    labels, leading_shape: torch.Size, vocab_size: int, ignore_index: int, *, shape_name: str
) -> torch.Tensor:
    labels = check_tensor("labels", labels)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (int64), got {labels.dtype}")
    if labels.shape != leading_shape:
        raise ValueError(
            f"labels must have the leading shape of {shape_name}, {tuple(leading_shape)}, "
            f"got {tuple(labels.shape)}"
        )
    # Every backend gets contiguous int64 [N] labels, whatever the caller's view (a column of a table,
    # `big[::2]`) or integer type.
    labels = labels.reshape(-1).to(torch.int64).contiguous()
    out_of_range = ((labels < 0) | (labels >= vocab_size)) & (labels != ignore_index)
    expected = f"labels must be in [0, {vocab_size}) or equal ignore_index={ignore_index}"
    check_values(out_of_range, expected, lambda: f"found {labels[out_of_range][0].item()}")
    return labels


def resolve_vocab_size(requested: int | None, sizes: dict[str, str | int], unit: str = "rows") -> int:
    """The number of vocabulary entries shared by the tensors in `sizes` ({name: size}): `requested`, or
    their common size. `unit` says what a size counts: "rows" (of a head) or "entries" (the last dimension
    of logits)."""

    def described(name: str, size: int) -> str:
        return (
            f"{name}, which has {size} rows" if unit == "rows" else f"the last dimension of {name} ({size})"
        )

    for name, size in sizes.items():
        if size == 0:
            raise ValueError(f"{described(name, size)}: an empty vocabulary (it needs at least one entry)")
    if requested is None:
        if len(set(sizes.values())) > 1:
            listed = " and ".join(described(name, size) for name, size in sizes.items())
            raise ValueError(
                f"vocabulary sizes differ: {listed}; pass vocab_size= (e.g. "
                f"vocab_size={min(sizes.values())}) to use the shared first entries of both"
            )
        return next(iter(sizes.values()))
    check_vocab_size(requested)
    for name, size in sizes.items():
        if requested > size:
            raise ValueError(f"vocab_size={requested} is larger than {described(name, size)}")
    return requested


def check_model(role: str, hidden, weight, bias) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One model's projection inputs (``<role>_hidden``, ``<role>_weight``, ``<role>_bias``): tensors of a
    float dtype, non-empty, one dtype after the autocast cast (as torch.nn.functional.linear), a bias of one
    entry per head row, a head as wide as the hidden states. Returns them cast."""
    hidden_name, weight_name, bias_name = f"{role}_hidden", f"{role}_weight", f"{role}_bias"
    check_tensor(hidden_name, hidden, min_ndim=1)
    check_tensor(weight_name, weight, ndim=2)
    for name, tensor in ((hidden_name, hidden), (weight_name, weight)):
        check_float(name, tensor)
        check_sizes(name, tensor)
    # Under torch.autocast the projection runs in its dtype, as torch.nn.functional.linear does.
    cast = autocast_dtype(hidden.device)
    hidden, weight, bias = (autocast_cast(x, cast) for x in (hidden, weight, bias))
    check_same_dtype(hidden_name, hidden, weight_name, weight)
    bias = check_bias(bias_name, bias, weight_name, weight)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{weight_name} must be [vocab, {hidden.shape[-1]}] to match {hidden_name}'s hidden size; got "
            f"{tuple(weight.shape)}"
        )
    return hidden, weight, bias


def check_same_leading(name: str, tensor: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if tensor.shape[:-1] != ref.shape[:-1]:
        raise ValueError(
            f"{ref_name} and {name} must have the same leading (token) shape; got {tuple(ref.shape)} and "
            f"{tuple(tensor.shape)}"
        )


def prepare_labels(labels, leading_shape: torch.Size, vocab: int, options: KDOptions, *, shape_name: str):
    """Flat, checked int64 labels (None stays None), shifted first when `options.shift_labels`."""
    if labels is None:
        return None
    check_tensor("labels", labels)
    if options.shift_labels:
        labels = shift_labels(labels, options.ignore_index)
    return check_labels(labels, leading_shape, vocab, options.ignore_index, shape_name=shape_name)


def shift_labels(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Hugging Face's convention to fusedkd's: ``labels[..., i]`` is the token at position i, so position i
    is trained to predict ``labels[..., i + 1]``; the last position predicts nothing (`ignore_index`)."""
    if labels.dim() == 0:
        raise ValueError("shift_labels=True needs labels with a sequence dimension, got a 0-d tensor")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        return labels  # check_labels names the dtype
    labels = labels.to(torch.int64)  # ignore_index in a narrower dtype (uint8: -100 -> 156) would wrap
    last = torch.full_like(labels[..., :1], ignore_index)
    return torch.cat([labels[..., 1:], last], dim=-1)


def check_bias(name: str, bias, weight_name: str, weight: torch.Tensor) -> torch.Tensor | None:
    if bias is None:
        return None
    check_tensor(name, bias, ndim=1)
    if bias.shape[0] != weight.shape[0]:
        raise ValueError(
            f"{name} must have one entry per row of {weight_name} ({weight.shape[0]}), got {bias.shape[0]}"
        )
    check_same_dtype(name, bias, weight_name, weight)
    return bias


def first_rows(x: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    """x[:rows], without an autograd slice node (and its full-size gradient copy) when nothing is cut."""
    if x is None or x.shape[0] == rows:
        return x
    return x[:rows]


def contiguous(x: torch.Tensor | None) -> torch.Tensor | None:
    """`x` made contiguous (a differentiable copy when it is a strided view, such as a column of a
    [V, 2] tensor), or None: every backend reads biases with stride 1."""
    return None if x is None else x.contiguous()


def prepare_linear_kd(
    student_hidden,
    student_weight,
    teacher_hidden,
    teacher_weight,
    labels,
    student_bias,
    teacher_bias,
    options: KDOptions,
) -> LinearKDInputs:
    """Check every tensor of `fused_linear_kd_loss` (raising a TypeError / ValueError that names it) and
    resolve `options` for this call, before any work."""
    check_no_functorch()
    student_hidden, student_weight, student_bias = check_model(
        "student", student_hidden, student_weight, student_bias
    )
    teacher_hidden, teacher_weight, teacher_bias = check_model(
        "teacher", teacher_hidden, teacher_weight, teacher_bias
    )
    if labels is not None:
        check_tensor("labels", labels)
    check_devices(
        {
            "student_hidden": student_hidden,
            "student_weight": student_weight,
            "teacher_hidden": teacher_hidden,
            "teacher_weight": teacher_weight,
            "labels": labels,
            "student_bias": student_bias,
            "teacher_bias": teacher_bias,
        }
    )
    check_same_leading("teacher_hidden", teacher_hidden, "student_hidden", student_hidden)
    leading_shape = student_hidden.shape[:-1]
    vocab = resolve_vocab_size(
        options.vocab_size,
        {"student_weight": student_weight.shape[0], "teacher_weight": teacher_weight.shape[0]},
    )
    options = options.resolve(vocab_size=vocab, has_labels=labels is not None)
    labels = prepare_labels(labels, leading_shape, vocab, options, shape_name="student_hidden")
    inputs = LinearKDInputs(
        student_hidden=student_hidden.reshape(-1, student_hidden.shape[-1]),
        student_weight=first_rows(student_weight, vocab),
        student_bias=contiguous(first_rows(student_bias, vocab)),
        teacher_hidden=teacher_hidden.reshape(-1, teacher_hidden.shape[-1]),
        teacher_weight=first_rows(teacher_weight, vocab),
        teacher_bias=contiguous(first_rows(teacher_bias, vocab)),
        labels=labels,
        leading_shape=leading_shape,
        options=options,
    )
    if options.check_finite:
        counts = counted_tokens(labels, options)
        for role in ("student", "teacher"):
            check_finite_rows(f"{role}_hidden", getattr(inputs, f"{role}_hidden"), "token", counts)
            check_finite_rows(f"{role}_weight", getattr(inputs, f"{role}_weight"), "vocabulary row")
            check_finite_rows(
                f"{role}_bias", getattr(inputs, f"{role}_bias"), "vocabulary entry", logits=True
            )
    return inputs


@dataclass
class LogitsKDInputs:
    """Checked inputs of `kd_loss`: logits untouched (any strides), labels flattened to [N] int64."""

    student_logits: torch.Tensor  # [..., V_s]
    teacher_logits: torch.Tensor  # [..., V_t], same leading shape
    labels: torch.Tensor | None  # [N] int64
    leading_shape: torch.Size
    options: KDOptions


def prepare_logits_kd(student_logits, teacher_logits, labels, options: KDOptions) -> LogitsKDInputs:
    """Check every tensor of `kd_loss` (raising a ValueError / TypeError that names it) and resolve
    `options` for this call, before any work."""
    check_no_functorch()
    for name, logits in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        check_tensor(name, logits, min_ndim=1)
        check_float(name, logits)
        check_sizes(name, logits, "vocabulary size")
    if labels is not None:
        check_tensor("labels", labels)
    check_devices({"student_logits": student_logits, "teacher_logits": teacher_logits, "labels": labels})
    check_same_leading("teacher_logits", teacher_logits, "student_logits", student_logits)
    leading_shape = student_logits.shape[:-1]
    vocab = resolve_vocab_size(
        options.vocab_size,
        {"student_logits": student_logits.shape[-1], "teacher_logits": teacher_logits.shape[-1]},
        unit="entries",
    )
    options = options.resolve(vocab_size=vocab, has_labels=labels is not None)
    labels = prepare_labels(labels, leading_shape, vocab, options, shape_name="student_logits")
    if options.check_finite:
        counts = counted_tokens(labels, options)
        for name, logits in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
            check_finite_rows(name, logits[..., :vocab], "token", counts, logits=True)
    return LogitsKDInputs(student_logits, teacher_logits, labels, leading_shape, options)


@dataclass
class TopKKDInputs:
    """Checked, flattened inputs of `fused_linear_topk_kd_loss`."""

    student_hidden: torch.Tensor  # [N, H]
    student_weight: torch.Tensor  # [V, H] (the first V rows)
    student_bias: torch.Tensor | None  # [V]
    ids: torch.Tensor  # [N, k] int64, distinct per row, in [0, V)
    logprobs: torch.Tensor  # [N, k], <= 0, as given (any float dtype)
    labels: torch.Tensor | None  # [N] int64
    leading_shape: torch.Size
    options: TopKOptions
    support: SupportOptions


def prepare_topk_kd(
    student_hidden, student_weight, ids, logprobs, labels, student_bias, options: TopKOptions
):
    """Check every tensor of `fused_linear_topk_kd_loss` and resolve `options` for this call, before any
    work; raise naming the argument."""
    check_no_functorch()
    student_hidden, student_weight, student_bias = check_model(
        "student", student_hidden, student_weight, student_bias
    )
    check_tensor("ids", ids, min_ndim=1)
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"ids must be an integer tensor (int64 or int32), got {ids.dtype}")
    check_tensor("logprobs", logprobs, min_ndim=1)
    check_float("logprobs", logprobs)
    if labels is not None:
        check_tensor("labels", labels)
    check_devices(
        {
            "student_hidden": student_hidden,
            "student_weight": student_weight,
            "ids": ids,
            "logprobs": logprobs,
            "labels": labels,
            "student_bias": student_bias,
        }
    )
    leading_shape = student_hidden.shape[:-1]
    if ids.shape[:-1] != leading_shape:
        raise ValueError(
            f"ids must be [..., k] with the leading shape of student_hidden, {tuple(leading_shape)}; "
            f"got {tuple(ids.shape)}"
        )
    if logprobs.shape != ids.shape:
        raise ValueError(
            f"logprobs must have the shape of ids, {tuple(ids.shape)}; got {tuple(logprobs.shape)}"
        )
    vocab = resolve_vocab_size(options.vocab_size, {"student_weight": student_weight.shape[0]})
    k = ids.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"ids lists k={k} tokens per position; k must be in [1, vocabulary size = {vocab}]")
    options = options.resolve(vocab_size=vocab, has_labels=labels is not None)
    flat_labels = prepare_labels(labels, leading_shape, vocab, options, shape_name="student_hidden")
    flat_ids = ids.reshape(-1, k).long()
    flat_logprobs = logprobs.reshape(-1, k)
    counts = counted_tokens(flat_labels, options)
    check_topk_values(flat_ids, flat_logprobs, vocab, counts)
    inputs = TopKKDInputs(
        student_hidden=student_hidden.reshape(-1, student_hidden.shape[-1]),
        student_weight=first_rows(student_weight, vocab),
        student_bias=contiguous(first_rows(student_bias, vocab)),
        ids=flat_ids,
        logprobs=flat_logprobs,
        labels=flat_labels,
        leading_shape=leading_shape,
        options=options,
        support=SupportOptions(
            tail=options.tail,
            precision=tail_precision(flat_logprobs.dtype, compute_dtype(student_hidden.dtype)),
            need_ce=options.has_labels and (options.ce_weight != 0.0 or options.return_components),
        ),
    )
    if options.check_finite:
        check_finite_rows("student_hidden", inputs.student_hidden, "token", counts)
        check_finite_rows("student_weight", inputs.student_weight, "vocabulary row")
        check_finite_rows("student_bias", inputs.student_bias, "vocabulary entry", logits=True)
    return inputs


@dataclass
class TeacherTopKInputs:
    """Checked, flattened inputs of `teacher_topk`."""

    teacher_hidden: torch.Tensor  # [N, H]
    teacher_weight: torch.Tensor  # [V, H] (the first V rows)
    teacher_bias: torch.Tensor | None  # [V], contiguous
    k: int
    temperature: float
    chunk_size: int | None
    block_size: int
    leading_shape: torch.Size
    logit_scale: float = 1.0
    softcap: float | None = None


def prepare_teacher_topk(
    teacher_hidden,
    teacher_weight,
    k,
    temperature,
    vocab_size,
    *,
    teacher_bias,
    chunk_size,
    block_size,
    teacher_logit_scale: float = 1.0,
    teacher_softcap: float | None = None,
) -> TeacherTopKInputs:
    """Check every argument of `teacher_topk` before any work; raise naming the argument."""
    check_no_functorch()
    teacher_hidden, teacher_weight, teacher_bias = check_model(
        "teacher", teacher_hidden, teacher_weight, teacher_bias
    )
    if teacher_hidden.device.type == "meta":
        raise ValueError(
            "teacher_hidden is on the meta device: teacher_topk computes values (token ids and "
            "log-probabilities), which a meta tensor has none of; pass real tensors"
        )
    check_devices(
        {"teacher_hidden": teacher_hidden, "teacher_weight": teacher_weight, "teacher_bias": teacher_bias}
    )
    vocab = resolve_vocab_size(vocab_size, {"teacher_weight": teacher_weight.shape[0]})
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, vocabulary size = {vocab}], got k={k}")
    temperature = check_temperature(temperature)
    block_size = check_positive_int("block_size", block_size)
    if chunk_size is not None:
        check_positive_int("chunk_size", chunk_size)
    return TeacherTopKInputs(
        teacher_hidden=teacher_hidden.reshape(-1, teacher_hidden.shape[-1]),
        teacher_weight=first_rows(teacher_weight, vocab),
        teacher_bias=contiguous(first_rows(teacher_bias, vocab)),
        k=k,
        temperature=temperature,
        chunk_size=chunk_size,
        block_size=block_size,
        leading_shape=teacher_hidden.shape[:-1],
        logit_scale=check_logit_scale("teacher_logit_scale", teacher_logit_scale),
        softcap=check_softcap("teacher_softcap", teacher_softcap),
    )
