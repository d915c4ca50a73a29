r"""Sparse top-k teacher for offline distillation: `teacher_topk` and `fused_linear_topk_kd_loss`.

`teacher_topk` runs the teacher's lm_head once, block by block over the vocabulary, and keeps each
token's k most likely ids and their log-probabilities, normalized over the full vocabulary (a running
top-k merge and an online log-sum-exp; no ``[N, V]`` tensor). They can be stored compactly
(`fusedkd.topk_cache`) and later distilled into a student with `fused_linear_topk_kd_loss`, which
fuses the student's lm_head with its full-vocabulary log-sum-exp and compares the two distributions on
the teacher's support.

The divergence on a top-k support K (ids of one token, log-probabilities log p_j, j in K), with
q = softmax(s / T) the student's full-vocabulary distribution (docs/design.md §2 for the rest):

* ``tail="bucket"``: all tokens outside K are merged into one extra outcome, the tail, with the
  teacher's mass p_tail = max(1 - sum_K p_j, tau) and the student's q_tail = sum_{v not in K} q_v
  (computed as such, never as 1 - sum_K q_j). D is the exact KL between these coarse-grained
  distributions over k + 1 outcomes:
      forward_kl: D = sum_K p_j log(p_j / q_j) + p_tail log(p_tail / q_tail)
      reverse_kl: D = sum_K q_j log(q_j / p_j) + q_tail log(q_tail / p_tail)
  tau = eps (1 + sum_K p_j |log p_j|), with eps the relative precision of the log-probabilities (their
  dtype's eps, at least the compute dtype's: float32's unless everything is float64), bounds the
  rounding error of 1 - sum_K p_j: a tail that small is not resolved by the data. The floor keeps
  reverse KL finite when the listed mass rounds to 1 (a confident teacher, or renormalized
  log-probabilities) and changes forward KL by O(tau).
  By the chain rule of KL, D is the full KL minus the teacher-weighted KL inside the tail, so it does
  not exceed the dense loss, and it equals the dense loss when k = V (there is no tail outcome then).
* ``tail="renormalize"``: both distributions are restricted to K and renormalized,
  p^_j = p_j / sum_K p, q^_j = q_j / sum_K q, and D = KL(p^ || q^) (forward) or KL(q^ || p^)
  (reverse). The student's probability outside K gets no gradient; equal to the dense loss when k = V.

The gradients (per token, before the reduction scale; a = s / T, log q_j = a_j - LSE(a)):

    bucket, forward:  dD/ds_v = (M_p q_v - p_v) / T (v in K),  q_v (M_p - p_tail / q_tail) / T (v not in K)
                      with M_p = sum_K p_j + p_tail (1 up to rounding and tau)
    bucket, reverse:  dD/ds_v = q_v (log q~_v - log p~_v - D) / T, where ~ is the outcome of v
                      (v itself in K, the tail outside)
    renormalize:      dD/ds_v = (q^_v - p^_v) / T (forward), q^_v (log q^_v - log p^_v - D) / T
                      (reverse) for v in K, and 0 outside K
    cross-entropy:    dC/ds_v = softmax(s)_v - [v == y]
"""

from __future__ import annotations

import torch

from fusedkd import _compile
from fusedkd._autograd import autocast_off
from fusedkd._dispatch import TOPK_TILES_BYTES_PER_ENTRY, backend_for, shaped_outputs, tiles_chunk_size
from fusedkd._inputs import prepare_teacher_topk, prepare_topk_kd
from fusedkd._options import TopKOptions
from fusedkd.torch_backend import teacher_topk as torch_teacher_topk
from fusedkd.torch_backend import topk_kd as torch_topk_kd


def teacher_topk(
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    k: int,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    *,
    teacher_bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    block_size: int = 8192,
    teacher_logit_scale: float = 1.0,
    teacher_softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The teacher's k most likely tokens and their log-probabilities, without ``[N, V]`` logits.

    Equals ``torch.topk(torch.log_softmax(t / T, -1), k)``, ``t = h W^T + b`` (or the head transform of
    ``teacher_logit_scale`` and ``teacher_softcap``): the log-probabilities are
    normalized over the full vocabulary. The vocabulary is streamed in blocks of ``block_size`` rows of
    the head (a running top-k merge and an online log-sum-exp), for token chunks of ``chunk_size``: the
    working set is ``chunk x block`` logits. No gradient is computed (the teacher is frozen).

    Ties are broken deterministically: the ids come in order of decreasing log-probability and, among
    equal log-probabilities, of increasing id; the set is the first k in that order (what a stable
    descending sort of the whole row would give).

    Args:
        teacher_hidden: ``[..., H]`` float32 / bfloat16 / float16 / float64 final hidden states.
        teacher_weight: ``[V_t, H]`` lm_head weight, same dtype (inside ``torch.autocast`` both are cast
            to its dtype first, as ``torch.nn.functional.linear`` does).
        k: how many tokens to keep per position, ``1 <= k <= V``.
        temperature: the softmax temperature ``T > 0``; distill with the same ``temperature``.
        vocab_size: use only the first ``vocab_size`` rows of the head (a padded head).
        teacher_bias: optional ``[V_t]`` lm_head bias.
        chunk_size: tokens per chunk (default: sized so that a ``chunk x block`` float32 tile is about
            `fusedkd.torch_backend.tiles.TILE_BYTES`).
        block_size: vocabulary rows per block (default 8192).
        teacher_logit_scale: the teacher's logit scale (Cohere's ``logit_scale``): ``t = scale * (h W^T +
            b)``. Finite, > 0; default 1.
        teacher_softcap: the teacher's final-logit soft cap ``c`` (Gemma's ``final_logit_softcapping``),
            after the scale: ``t = c * tanh(t / c)``. ``None`` (default): no cap.

    Returns:
        ``(ids, logprobs)``: ``[..., k]`` int64 token ids and ``[..., k]`` log-probabilities, float32
        (float64 for float64 inputs), sorted by decreasing log-probability.

    Example:
        >>> import torch
        >>> from fusedkd.topk import teacher_topk
        >>> hidden, weight = torch.randn(2, 5, 16), torch.randn(1000, 16)
        >>> ids, logprobs = teacher_topk(hidden, weight, k=8, temperature=2.0)
        >>> ids.shape, logprobs.dtype
        (torch.Size([2, 5, 8]), torch.float32)
        >>> exact = torch.log_softmax(hidden @ weight.T / 2.0, dim=-1).topk(8)
        >>> torch.allclose(logprobs, exact.values, atol=1e-5)
        True
    """
    inputs = prepare_teacher_topk(
        teacher_hidden,
        teacher_weight,
        k,
        temperature,
        vocab_size,
        teacher_bias=teacher_bias,
        chunk_size=chunk_size,
        block_size=block_size,
        teacher_logit_scale=teacher_logit_scale,
        teacher_softcap=teacher_softcap,
    )
    # The PyTorch backend, on any device (no Triton kernel for the top-k functions).
    with torch.no_grad():
        ids, logprobs = torch_teacher_topk.teacher_topk(
            inputs.teacher_hidden,
            inputs.teacher_weight,
            inputs.teacher_bias,
            inputs.k,
            inputs.temperature,
            chunk_size=inputs.chunk_size,
            block_size=inputs.block_size,
            logit_scale=inputs.logit_scale,
            softcap=inputs.softcap,
        )
    leading_shape, k = inputs.leading_shape, inputs.k
    return ids.reshape(*leading_shape, k), logprobs.reshape(*leading_shape, k)


def fused_linear_topk_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    alpha: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "mean",
    tail: str = "bucket",
    student_bias: torch.Tensor | None = None,
    vocab_size: int | None = None,
    backend: str = "auto",
    return_components: bool = False,
    chunk_size: int | None = None,
    student_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    check_finite: bool = False,
    shift_labels: bool = False,
    memory_budget: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Distillation loss against a sparse top-k teacher (offline distillation), fused with the lm_head.

    The teacher is given by its top-k token ``ids`` and their ``logprobs`` (log p_T, normalized over
    the full vocabulary at the same ``temperature``: `teacher_topk`, or a `fusedkd.topk_cache`). The
    student's logits ``s = W_s h + b_s`` are never held as an ``[N, V]`` tensor. For every token ``i``
    whose label is not ``ignore_index``::

        q = softmax(s / T)     loss_i = alpha * T^2 * D + (1 - alpha) * C,    C = LSE(s) - s_y

    with ``C`` the hard-label cross-entropy on the student's full vocabulary at T = 1, and ``D`` on the
    teacher's support K (p_j = exp(logprobs_j)):

    * ``tail="bucket"``: the tokens outside K form one outcome, with masses p_tail = max(1 - sum_K p,
      tau) and q_tail = sum_{v not in K} q_v; forward KL ``D = sum_K p_j log(p_j / q_j) + p_tail log(p_tail
      / q_tail)``, reverse KL ``D = sum_K q_j log(q_j / p_j) + q_tail log(q_tail / p_tail)``: the exact KL
      between the coarse-grained distributions (k + 1 outcomes), equal to the dense loss when k = V.
      tau = eps (1 + sum_K p_j |log p_j|), eps the logprobs' dtype's precision (at least the compute dtype's:
      float32's unless everything is float64), is
      the rounding error of 1 - sum_K p: a tail too small for the data to resolve (it keeps reverse KL
      finite for a confident teacher).
    * ``tail="renormalize"``: ``D = KL(p^ || q^)`` (forward) or ``KL(q^ || p^)`` (reverse) between the
      distributions restricted to K and renormalized; tokens outside K get no distillation gradient.
      Without cross-entropy (``alpha=1``, and ``return_components=False`` or no labels) the loss
      touches only the k head rows ``W_s[ids]`` per token.

    Reductions, ignored tokens, components and ``labels=None`` work as in `fused_linear_kd_loss`.

    Args:
        student_hidden: ``[..., H]`` float32 / bfloat16 / float16 / float64 student hidden states.
        student_weight: ``[V_s, H]`` student lm_head weight, same dtype; receives a gradient. Inside
            ``torch.autocast`` hidden states, weight and bias are cast to its dtype first, as
            ``torch.nn.functional.linear`` does.
        ids: ``[..., k]`` integer teacher token ids (int64 or int32), distinct per position, in [0, V).
        logprobs: ``[..., k]`` teacher log-probabilities of ``ids`` (<= 0, any float dtype).
        labels: ``[...]`` integer targets (already shifted); ``None`` means no cross-entropy, every token
            counts, and requires ``alpha == 1``.
        divergence: ``"forward_kl"`` or ``"reverse_kl"``.
        temperature: ``T > 0`` of the student softmax in ``D``; must be the teacher's ``temperature``.
        alpha: weight in [0, 1] of ``T^2 D``; ``1 - alpha`` weights the cross-entropy.
        ignore_index: label value of ignored tokens.
        reduction: ``"mean"`` (over valid tokens; 0 when none), ``"sum"`` or ``"none"``.
        tail: ``"bucket"`` or ``"renormalize"`` (above).
        student_bias: optional ``[V_s]`` lm_head bias.
        vocab_size: use only the first ``vocab_size`` rows of the head (padded heads).
        backend: ``"auto"`` (default): on CUDA with Triton, ``"tiles"`` when chunks of at least 256
            tokens fit `memory_budget`, else ``"torch"``; elsewhere ``"torch"``. ``"torch"``: the
            token-chunked PyTorch backend, exact on any device. ``"tiles"``: per chunk of tokens, the
            student's float32 logit tile on the GEMM and two Triton passes over it
            (`fusedkd.kernels.topk_tile`; on a CPU, Triton's interpreter). There are no fused Triton
            kernels for this loss: ``"triton"`` raises.
        return_components: also return ``(loss, distill, ce)`` with
            ``loss = alpha * T^2 * distill + (1 - alpha) * ce``.
        chunk_size: tokens per chunk (default: for ``"tiles"``, from `memory_budget`; for ``"torch"``,
            one ``chunk x V`` float32 tile of `fusedkd.torch_backend.tiles.LINEAR_TILE_BYTES`, 64 MiB;
            with ``tail="renormalize"`` and no cross-entropy, gathered ``[chunk, k, H]`` head rows of
            `fusedkd.torch_backend.tiles.TILE_BYTES`).
        memory_budget: bytes of logit tile the ``"tiles"`` backend may hold: its chunk of c tokens
            keeps one float32 ``c x V`` tile (G is written into its bytes), so ``c = memory_budget /
            (4 V)``, rounded down to a multiple of 64. Default `fusedkd._dispatch.TILES_MEMORY_BUDGET`
            (1,200 MiB: 2,048-token chunks at V = 151,936).
        check_finite: check the student's hidden states (of the positions that count), head and bias
            first and raise a ValueError naming the tensor and the first bad token or row (NaN or inf;
            -inf allowed in the bias). Without it, such a token's loss and gradients are NaN
            (docs/design.md §9). Synchronizes.
        shift_labels: take ``labels`` unshifted, as Hugging Face causal LMs do: position i is trained on
            ``labels[..., i + 1]``, the last position on nothing (``ids`` / ``logprobs`` are the
            teacher's predictions at each position, as `teacher_topk` gives them, and are not shifted).
        student_logit_scale: the student's logit scale (Cohere's ``logit_scale``): ``s = scale * (W_s h
            + b_s)``. Finite, > 0; default 1. The teacher's is applied by `teacher_topk`.
        student_softcap: the student's final-logit soft cap ``c`` (Gemma's ``final_logit_softcapping``),
            after the scale: ``s = c * tanh(s / c)``. ``None`` (default): no cap. The gradient carries
            its derivative ``1 - tanh^2``.

    Returns:
        The loss (float32, float64 for float64 inputs; ``[...]`` for ``reduction="none"``), or
        ``(loss, distill, ce)``.

    Example:
        >>> import torch
        >>> from fusedkd.topk import fused_linear_topk_kd_loss, teacher_topk
        >>> teacher_hidden, teacher_weight = torch.randn(4, 7, 32), torch.randn(500, 32)
        >>> ids, logprobs = teacher_topk(teacher_hidden, teacher_weight, k=20, temperature=2.0)
        >>> student_hidden = torch.randn(4, 7, 16, requires_grad=True)
        >>> student_weight = torch.randn(500, 16, requires_grad=True)
        >>> labels = torch.randint(0, 500, (4, 7))
        >>> loss = fused_linear_topk_kd_loss(
        ...     student_hidden, student_weight, ids, logprobs, labels, temperature=2.0, alpha=0.7)
        >>> loss.backward()
        >>> student_weight.grad.shape
        torch.Size([500, 16])
    """
    if torch.compiler.is_compiling():  # one opaque op in the compiled graph (fusedkd._compile)
        return _compile.compiled_call("fused_linear_topk_kd", locals())
    options = TopKOptions.of(locals())
    return topk_kd(student_hidden, student_weight, ids, logprobs, labels, student_bias, options)


def topk_kd(student_hidden, student_weight, ids, logprobs, labels, student_bias, options: TopKOptions):
    """`fused_linear_topk_kd_loss` with its options already validated: the checks, then the backend:
    the PyTorch backend's chunks, each chunk's logit tile through torch element-wise passes, or, for the
    tiles backend, through two Triton passes (`fusedkd.kernels.topk_tile`) with chunks from
    `memory_budget`."""
    inputs = prepare_topk_kd(student_hidden, student_weight, ids, logprobs, labels, student_bias, options)
    device, options = inputs.student_hidden.device, inputs.options
    with autocast_off(device):
        backend = backend_for(
            options, device, inputs.student_hidden.dtype, tile_bytes_per_entry=TOPK_TILES_BYTES_PER_ENTRY
        )
        chunk_size, tile_terms = options.chunk_size, None
        if backend == "tiles" and not inputs.support.sparse:  # (the sparse path has no tile)
            from fusedkd.kernels.topk_tile import topk_tile_terms_triton as tile_terms

            if chunk_size is None:
                chunk_size = tiles_chunk_size(
                    options.vocab_size, options.memory_budget, TOPK_TILES_BYTES_PER_ENTRY
                )
        outputs = torch_topk_kd.fused_linear_topk_kd(
            inputs.student_hidden,
            inputs.student_weight,
            inputs.student_bias,
            inputs.ids,
            inputs.logprobs,
            inputs.labels,
            options,
            inputs.support,
            chunk_size=chunk_size,
            tile_terms=tile_terms,
        )
    return shaped_outputs(outputs, inputs.options, inputs.leading_shape)


_compile.register_eager(
    "fused_linear_topk_kd",
    lambda t, options: topk_kd(
        t["student_hidden"],
        t["student_weight"],
        t["ids"],
        t["logprobs"],
        t["labels"],
        t["student_bias"],
        options,
    ),
)


class FusedLinearTopKKDLoss(torch.nn.Module):
    """`fused_linear_topk_kd_loss` as a module: options at construction, tensors at call.

    Example:
        >>> import torch
        >>> from fusedkd.topk import FusedLinearTopKKDLoss, teacher_topk
        >>> criterion = FusedLinearTopKKDLoss(temperature=2.0, alpha=1.0, tail="renormalize")
        >>> teacher_hidden, teacher_weight = torch.randn(5, 12), torch.randn(50, 12)
        >>> ids, logprobs = teacher_topk(teacher_hidden, teacher_weight, k=4, temperature=2.0)
        >>> loss = criterion(torch.randn(5, 8), torch.randn(50, 8), ids, logprobs)
        >>> loss.dim()
        0
    """

    def __init__(self, **options) -> None:
        super().__init__()
        self.options = TopKOptions.of(options, strict=True)
        self._compile_key = _compile.register_options("fused_linear_topk_kd", self.options)

    def forward(
        self,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        ids: torch.Tensor,
        logprobs: torch.Tensor,
        labels: torch.Tensor | None = None,
        student_bias: torch.Tensor | None = None,
    ):
        if torch.compiler.is_compiling():
            return _compile.run(
                "fused_linear_topk_kd",
                [student_hidden, student_weight, student_bias, ids, logprobs, labels],
                self._compile_key,
            )
        return topk_kd(student_hidden, student_weight, ids, logprobs, labels, student_bias, self.options)

    def extra_repr(self) -> str:
        return self.options.describe()
