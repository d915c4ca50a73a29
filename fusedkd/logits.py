"""Distillation loss over logits the caller already holds: `kd_loss` and the `KDLoss` module.

A drop-in for the common ``DistillationLoss(alpha, temperature)`` recipe, with the semantics of
`fusedkd.fused_linear_kd_loss` (docs/design.md §2) on given ``[..., V]`` logits. Neither backend makes a
softmax, a log-softmax or a float32 copy of the inputs: the Triton kernels (fusedkd/kernels/kd_logits*)
stream each row with an online log-sum-exp, and the PyTorch backend (fusedkd/torch_backend/kd_logits.py)
works on `chunk x V` tiles. The only ``[N, V]`` allocation is the gradient of the student logits, in
their dtype. Options in `fusedkd._options.KDOptions`, checks in `fusedkd._inputs`, the backend rule in
`fusedkd._dispatch`.
"""

from __future__ import annotations

import torch

from fusedkd import _compile, vocab_parallel
from fusedkd._autograd import autocast_off
from fusedkd._dispatch import backend_for, shaped_outputs
from fusedkd._inputs import prepare_logits_kd
from fusedkd._options import LogitsKDOptions
from fusedkd.torch_backend import kd_logits as torch_kd_logits


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    alpha: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "mean",
    vocab_size: int | None = None,
    backend: str = "auto",
    return_components: bool = False,
    chunk_size: int | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    check_finite: bool = False,
    shift_labels: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Distillation loss of student logits against frozen teacher logits, without softmax copies.

    The loss of `fusedkd.fused_linear_kd_loss` (docs/design.md §2), for callers that already hold the logits.
    For every token ``i`` whose label is not ``ignore_index``, with ``s``, ``t`` its logit rows::

        q = softmax(s / T)    p = softmax(t / T)
        loss_i = alpha * T^2 * D(p, q) + (1 - alpha) * (-log softmax(s)[y_i])

    with ``D`` the forward KL ``KL(p || q)``, the reverse KL ``KL(q || p)`` or the generalized JSD
    ``beta KL(p || m) + (1 - beta) KL(q || m)``, ``m = beta p + (1 - beta) q``. Logits of ``-inf`` are
    tokens of probability 0 (with a soft cap ``c``, ``-inf`` becomes ``-c``, as the capped head computes
    it). No softmax, log-softmax or float32 copy of the logits is made: the only
    ``[N, V]`` allocation is the gradient of ``student_logits``, in their dtype (peak memory of forward
    and backward: the inputs, one student-logits-sized gradient and O(N)). Views such as
    ``logits[:, :-1]`` are read in place, not copied.

    Args:
        student_logits: ``[..., V_s]`` float32 / bfloat16 / float16 / float64 student logits; receives a
            gradient of the same shape and dtype (zero past ``vocab_size`` and on ignored tokens).
        teacher_logits: ``[..., V_t]`` teacher logits with the same leading shape, any float dtype. The
            teacher is frozen: no gradient flows to it.
        labels: ``[...]`` integer targets, already shifted (position i predicts token i+1; see
            `shift_labels` for the Hugging Face convention); ``ignore_index`` marks tokens that count
            for nothing, whose logits are never read. ``None``: every token counts and there is no
            cross-entropy term, which requires ``alpha == 1``.
        divergence: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"``.
        beta: JSD mixture weight in [0, 1]; ``beta=0`` is forward KL and ``beta=1`` reverse KL.
            Used only by ``"jsd"``.
        student_logit_scale, teacher_logit_scale: each model's logit scale (Cohere's ``logit_scale``):
            the given logits are multiplied by it first. Finite, > 0; default 1.
        student_softcap, teacher_softcap: each model's final-logit soft cap ``c`` (Gemma's
            ``final_logit_softcapping``), applied after the scale: ``c * tanh(logits / c)``. ``None``
            (default): no cap. The gradient carries the cap's derivative ``1 - tanh^2``.
        temperature: softmax temperature ``T > 0`` of the distillation term (the cross-entropy uses
            the plain logits); the divergence is scaled by ``T^2``.
        alpha: weight in [0, 1] of the distillation term; ``1 - alpha`` weights the cross-entropy.
        ignore_index: label value of ignored tokens.
        reduction: ``"mean"`` (over valid tokens; 0 when none is valid), ``"sum"`` or ``"none"``
            (per-token losses of the leading shape, 0 where ignored).
        vocab_size: use only the first ``vocab_size`` entries of both logits' last dimension (padded
            vocabularies). Required when ``V_s != V_t``.
        backend: ``"auto"`` (the Triton kernel on CUDA tensors when Triton is importable, else
            PyTorch), ``"torch"`` (token-chunked, any device) or ``"triton"``.
        return_components: also return the two terms, ``(loss, distill, ce)``, each reduced like
            ``loss``: ``loss = alpha * T^2 * distill + (1 - alpha) * ce``.
        chunk_size: tokens per chunk of the PyTorch backend (default: one ``chunk x V`` compute-dtype
            tile of `fusedkd.torch_backend.tiles.TILE_BYTES`, 32 MiB). Not accepted by the Triton backend.
        check_finite: check the logits of the tokens that count first and raise a ValueError naming the
            tensor and the first token with a NaN or +inf, or with -inf everywhere. Without it, such a
            token's loss and the gradients it feeds are NaN (docs/design.md §9). Synchronizes.
        shift_labels: take ``labels`` unshifted, as Hugging Face causal LMs do (``labels[..., i]`` is the
            token at position i), with the logits of every position: position i is trained on
            ``labels[..., i + 1]``, the last position on nothing.

    Returns:
        The loss (a float32 scalar, float64 for float64 logits, or ``[...]`` for ``reduction="none"``),
        or ``(loss, distill, ce)``.

    Example:
        >>> import torch
        >>> from fusedkd.logits import kd_loss
        >>> student_logits = torch.randn(2, 9, 100, requires_grad=True)
        >>> teacher_logits = torch.randn(2, 9, 100)
        >>> labels = torch.randint(0, 100, (2, 9))
        >>> labels[:, :3] = -100  # e.g. prompt tokens
        >>> loss = kd_loss(student_logits, teacher_logits, labels, alpha=0.7, temperature=5.0)
        >>> loss.backward()
        >>> student_logits.grad.shape, student_logits.grad.dtype
        (torch.Size([2, 9, 100]), torch.float32)
    """
    if torch.compiler.is_compiling():  # one opaque op in the compiled graph (fusedkd._compile)
        return _compile.compiled_call("kd_loss", locals())
    options = LogitsKDOptions.of(locals())
    return logits_kd(student_logits, teacher_logits, labels, options)


def logits_kd(student_logits, teacher_logits, labels, options: LogitsKDOptions):
    """`kd_loss` with its options already validated: the checks, then the chosen backend."""
    if vocab_parallel.any_dtensor(student_logits, teacher_logits):
        return vocab_parallel.logits_kd(student_logits, teacher_logits, labels, options)
    inputs = prepare_logits_kd(student_logits, teacher_logits, labels, options)
    tensors = (inputs.student_logits, inputs.teacher_logits, inputs.labels)
    device = inputs.student_logits.device
    with autocast_off(device):
        if backend_for(inputs.options, device, inputs.student_logits.dtype) == "triton":
            from fusedkd.kernels.kd_logits import kd_logits

            outputs = kd_logits(*tensors, inputs.options)
        else:
            outputs = torch_kd_logits.kd_logits(
                *tensors, inputs.options, chunk_size=inputs.options.chunk_size
            )
    return shaped_outputs(outputs, inputs.options, inputs.leading_shape)


_compile.register_eager(
    "kd_loss", lambda t, options: logits_kd(t["student_logits"], t["teacher_logits"], t["labels"], options)
)


class KDLoss(torch.nn.Module):
    """`kd_loss` as a module, a drop-in for the common ``DistillationLoss(alpha, temperature)``.

    ``forward(student_logits, teacher_logits, labels=None)`` returns
    ``alpha * T^2 * KL(p || q) + (1 - alpha) * CE`` (or the divergence chosen); the other options of
    `kd_loss` are keyword arguments.

    Example:
        >>> import torch
        >>> from fusedkd.logits import KDLoss
        >>> criterion = KDLoss(0.7, 5.0)  # alpha, temperature
        >>> loss = criterion(torch.randn(6, 50), torch.randn(6, 50), torch.randint(0, 50, (6,)))
        >>> loss.dim()
        0
    """

    def __init__(self, alpha: float = 0.5, temperature: float = 1.0, **options) -> None:
        super().__init__()
        self.options = LogitsKDOptions.of(dict(options, alpha=alpha, temperature=temperature), strict=True)
        self._compile_key = _compile.register_options("kd_loss", self.options)

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None
    ):
        if torch.compiler.is_compiling():
            return _compile.run("kd_loss", [student_logits, teacher_logits, labels], self._compile_key)
        return logits_kd(student_logits, teacher_logits, labels, self.options)

    def extra_repr(self) -> str:
        return self.options.describe()
