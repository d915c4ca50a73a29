"""`fused_linear_kd_loss` and `FusedLinearKDLoss`: the dense distillation loss from hidden states and
lm_head weights. Options in `fusedkd._options.KDOptions`, checks in `fusedkd._inputs`, the backend rule
in `fusedkd._dispatch`; `linear_kd` calls the chosen backend, `fusedkd.torch_backend.fused_linear_kd` or
`fusedkd.kernels.fused_linear_kd`."""

from __future__ import annotations

import torch

from fusedkd import _compile, vocab_parallel
from fusedkd._autograd import autocast_off
from fusedkd._dispatch import backend_for, shaped_outputs, tiles_chunk_size
from fusedkd._inputs import prepare_linear_kd
from fusedkd._options import KDOptions
from fusedkd.torch_backend import fused_linear_kd as torch_linear_kd


def fused_linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    alpha: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "mean",
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
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
    memory_budget: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Distillation loss of a student against a frozen teacher, from hidden states and lm_head weights.

    Never holds the ``[tokens x vocab]`` logits of either model: the projection, the temperature
    softmax, the divergence and the cross-entropy are fused and streamed. For every token ``i`` whose
    label is not ``ignore_index``::

        s = W_s h_s,i + b_s    t = W_t h_t,i + b_t    q = softmax(s / T)    p = softmax(t / T)
        loss_i = alpha * T^2 * D(p, q) + (1 - alpha) * (-log softmax(s)[y_i])

    with ``D`` the forward KL ``KL(p || q)``, the reverse KL ``KL(q || p)`` or the generalized JSD
    ``beta KL(p || m) + (1 - beta) KL(q || m)``, ``m = beta p + (1 - beta) q``.

    Args:
        student_hidden: ``[..., H_s]`` float32 / bfloat16 / float16 final hidden states of the student.
        student_weight: ``[V_s, H_s]`` student lm_head weight, same dtype; receives a gradient. Inside
            ``torch.autocast`` hidden states, weights and biases are cast to its dtype first, as
            ``torch.nn.functional.linear`` does (e.g. bfloat16 activations, float32 weights).
        teacher_hidden: ``[..., H_t]`` teacher hidden states, same leading shape as ``student_hidden``.
        teacher_weight: ``[V_t, H_t]`` teacher lm_head weight. The teacher is frozen: no gradient flows
            to ``teacher_hidden``, ``teacher_weight`` or ``teacher_bias``.
        labels: ``[...]`` integer targets, already shifted (position i predicts token i+1; see
            `shift_labels` for the Hugging Face convention); ``ignore_index`` marks tokens that count
            for nothing, whose inputs are never read. ``None``: every token counts and there is no
            cross-entropy term, which requires ``alpha == 1``.
        divergence: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"``.
        beta: JSD mixture weight in [0, 1]; ``beta=0`` is forward KL and ``beta=1`` reverse KL
            (TRL's GKD convention). Used only by ``"jsd"``.
        temperature: softmax temperature ``T > 0`` of the distillation term (the cross-entropy uses
            the plain logits); the divergence is scaled by ``T^2`` so its gradient keeps its size.
        alpha: weight in [0, 1] of the distillation term; ``1 - alpha`` weights the cross-entropy.
        ignore_index: label value of ignored tokens (padding, prompt).
        reduction: ``"mean"`` (sum over valid tokens divided by their number; 0 when none is
            valid), ``"sum"``, or ``"none"`` (per-token losses of the leading shape, 0 where ignored).
        student_bias, teacher_bias: optional ``[V_s]`` / ``[V_t]`` lm_head biases.
        student_logit_scale, teacher_logit_scale: each model's logit scale (Cohere's ``logit_scale``;
            Granite's ``logits_scaling`` is its reciprocal): ``s = scale * (W_s h + b_s)``. Finite,
            > 0; default 1. Folded into the projection: free.
        student_softcap, teacher_softcap: each model's final-logit soft cap ``c`` (Gemma's
            ``final_logit_softcapping``), applied after the scale: ``s = c * tanh(s / c)``. ``None``
            (default): no cap. The gradient carries the cap's derivative ``1 - tanh^2``.
        vocab_size: use only the first ``vocab_size`` rows of both heads (padded heads, or heads of
            different sizes over one tokenizer). Required when ``V_s != V_t``.
        backend: ``"torch"`` (pure PyTorch, token-chunked, any device), ``"tiles"`` (per chunk of
            tokens, both logit tiles on cuBLAS and one Triton pass over them for the divergence, the
            cross-entropy and G; the fast path on a GPU), ``"triton"`` (the fused Triton kernels: no
            logit tile at all, O(tokens) memory, the logits recomputed in the backward) or ``"auto"``:
            on CUDA with Triton, ``"tiles"`` when chunks of at least 256 tokens fit `memory_budget`,
            else ``"triton"``; ``"torch"`` elsewhere and for float64.
        return_components: also return the two terms, ``(loss, distill, ce)``, each reduced like
            ``loss`` and unweighted: ``loss = alpha * T^2 * distill + (1 - alpha) * ce``.
        chunk_size: tokens per chunk of the PyTorch and tiles backends (default for the tiles: from
            `memory_budget`; for the PyTorch backend: sized so that one
            ``chunk x V`` float32 tile is about 64 MiB; the backend holds two, and up to four scratch
            blocks of a few rows on a CPU, of the chunk's rows elsewhere). Not accepted by the
            Triton backend.
        check_finite: check the inputs first and raise a ValueError naming the first tensor and the
            first token (or vocabulary row) holding a NaN or an inf (-inf is allowed in biases: a masked
            entry). Without it, a NaN or +inf in a counted token's logits makes that token's loss and the
            gradients it feeds NaN (docs/design.md §9). Reads a flag on the host: a synchronization.
        memory_budget: bytes of logit tiles the ``"tiles"`` backend may hold: its chunk of c tokens
            holds two float32 ``c x V`` tiles, 8 bytes per entry, G written over the student's
            (default 1,200 MiB: 1,024-token chunks at V = 151,936). ``"auto"`` takes the fused kernels
            instead when fewer than 256 tokens fit. The ``"torch"`` backend sizes its chunks by
            ``chunk_size``.
        shift_labels: take ``labels`` as Hugging Face causal LMs do, unshifted (``labels[..., i]`` is the
            token at position i, the same tensor as ``input_ids`` with ignored positions), with the hidden
            states of every position: position i is trained on ``labels[..., i + 1]`` and the last
            position on nothing, as ``transformers``' own causal-LM loss does.

    Returns:
        The loss (a float32 scalar, or ``[...]`` for ``reduction="none"``; float32 for bfloat16 and
        float16 inputs too, float64 for float64 ones), or ``(loss, distill, ce)``.

    Example:
        >>> import torch, fusedkd
        >>> student_hidden = torch.randn(2, 7, 16, requires_grad=True)
        >>> student_weight = torch.randn(100, 16, requires_grad=True)
        >>> teacher_hidden, teacher_weight = torch.randn(2, 7, 32), torch.randn(100, 32)
        >>> labels = torch.randint(0, 100, (2, 7))
        >>> labels[:, :2] = -100  # e.g. prompt tokens
        >>> loss = fusedkd.fused_linear_kd_loss(
        ...     student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
        ...     temperature=2.0, alpha=0.7)
        >>> loss.backward()
        >>> student_weight.grad.shape
        torch.Size([100, 16])
    """
    if torch.compiler.is_compiling():  # one opaque op in the compiled graph (fusedkd._compile)
        return _compile.compiled_call("fused_linear_kd", locals())
    options = KDOptions.of(locals())
    return linear_kd(
        student_hidden,
        student_weight,
        teacher_hidden,
        teacher_weight,
        labels,
        student_bias,
        teacher_bias,
        options,
    )


def linear_kd(
    student_hidden,
    student_weight,
    teacher_hidden,
    teacher_weight,
    labels,
    student_bias,
    teacher_bias,
    options: KDOptions,
):
    """`fused_linear_kd_loss` with its options already validated: the checks, then the chosen backend."""
    if vocab_parallel.any_dtensor(
        student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias
    ):
        return vocab_parallel.linear_kd(
            student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias,
            teacher_bias, options,
        )  # fmt: skip
    inputs = prepare_linear_kd(
        student_hidden,
        student_weight,
        teacher_hidden,
        teacher_weight,
        labels,
        student_bias,
        teacher_bias,
        options,
    )
    tensors = (
        inputs.student_hidden,
        inputs.student_weight,
        inputs.student_bias,
        inputs.teacher_hidden,
        inputs.teacher_weight,
        inputs.teacher_bias,
        inputs.labels,
    )
    device, options = inputs.student_hidden.device, inputs.options
    with autocast_off(device):
        backend = backend_for(options, device, inputs.student_hidden.dtype)
        if backend == "triton":
            from fusedkd.kernels.fused_linear_kd import fused_linear_kd

            outputs = fused_linear_kd(*tensors, options)
        elif backend == "tiles":  # the torch backend's chunks, each chunk's tiles in one Triton pass
            from fusedkd.kernels.kd_tile import kd_tile_terms_triton

            chunk = options.chunk_size or tiles_chunk_size(options.vocab_size, options.memory_budget)
            outputs = torch_linear_kd.fused_linear_kd(
                *tensors, options, chunk_size=chunk, tile_terms=kd_tile_terms_triton
            )
        else:
            outputs = torch_linear_kd.fused_linear_kd(*tensors, options, chunk_size=options.chunk_size)
    return shaped_outputs(outputs, inputs.options, inputs.leading_shape)


_compile.register_eager(
    "fused_linear_kd",
    lambda t, options: linear_kd(
        t["student_hidden"], t["student_weight"], t["teacher_hidden"], t["teacher_weight"], t["labels"],
        t["student_bias"], t["teacher_bias"], options,
    ),
)  # fmt: skip


class FusedLinearKDLoss(torch.nn.Module):
    """`fused_linear_kd_loss` as a module: its keyword options at construction (validated then, kept as
    `options`, a `fusedkd._options.KDOptions`), tensors at call.

    Example:
        >>> import torch, fusedkd
        >>> criterion = fusedkd.FusedLinearKDLoss(temperature=2.0, alpha=0.5)
        >>> loss = criterion(torch.randn(5, 8), torch.randn(50, 8), torch.randn(5, 12),
        ...                  torch.randn(50, 12), torch.randint(0, 50, (5,)))
        >>> loss.dim()
        0
    """

    def __init__(self, **options) -> None:
        super().__init__()
        self.options = KDOptions.of(options, strict=True)
        self._compile_key = _compile.register_options("fused_linear_kd", self.options)

    def forward(
        self,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_hidden: torch.Tensor,
        teacher_weight: torch.Tensor,
        labels: torch.Tensor | None = None,
        student_bias: torch.Tensor | None = None,
        teacher_bias: torch.Tensor | None = None,
    ):
        if torch.compiler.is_compiling():
            return _compile.run(
                "fused_linear_kd",
                [
                    student_hidden,
                    student_weight,
                    student_bias,
                    teacher_hidden,
                    teacher_weight,
                    teacher_bias,
                    labels,
                ],
                self._compile_key,
            )
        return linear_kd(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            labels,
            student_bias,
            teacher_bias,
            self.options,
        )

    def extra_repr(self) -> str:
        return self.options.describe()
