"""Shared test helpers: input builders, backend parametrization, error metrics with dtype tolerances."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

import fusedkd
from fusedkd import kernels, reference
from fusedkd._inputs import prepare_logits_kd, prepare_topk_kd
from fusedkd._options import HeadTransform, LogitsKDOptions, TopKOptions, apply_head, tail_precision

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _triton_skip_reason() -> str | None:
    """Why the Triton backend cannot run here (None where it can: a GPU, or Triton's interpreter)."""
    return kernels.unavailable_reason(DEVICE)


BACKENDS = [
    pytest.param("torch", id="torch"),
    pytest.param(
        "triton",
        id="triton",
        marks=pytest.mark.skipif(_triton_skip_reason() is not None, reason=str(_triton_skip_reason())),
    ),
]
# The torch backend as on large shapes: many chunks of a few groups of rows, partial last ones. One
# test per loss reruns with it (test_contract.py's `test_matches_float64_reference`).
SMALL_TILES = pytest.param("torch", id="torch-small-tiles", marks=pytest.mark.small_tiles(3))

# Relative (norm-wise) error allowed for float32 inputs against a float64 reference: float32 rounding
# (2^-24) amplified by sums over a few thousand vocabulary entries and the hidden dimension.
FP32_RTOL = 2e-5


@dataclass
class Case:
    student_hidden: torch.Tensor
    student_weight: torch.Tensor
    teacher_hidden: torch.Tensor
    teacher_weight: torch.Tensor
    labels: torch.Tensor
    student_bias: torch.Tensor | None = None
    teacher_bias: torch.Tensor | None = None


def make_case(
    n: int = 37,
    vocab: int = 1003,
    student_dim: int = 24,
    teacher_dim: int = 40,
    *,
    dtype: torch.dtype = torch.float32,
    ignore_fraction: float = 0.2,
    teacher: str = "random",
    logit_scale: float = 1.0,
    bias: bool = False,
    leading: tuple[int, ...] | None = None,
    extra_student_rows: int = 0,
    extra_teacher_rows: int = 0,
    ignore_index: int = -100,
) -> Case:
    """Random inputs whose logits have standard deviation about `logit_scale`.

    teacher="peaked": each token's teacher hidden state is aligned with one teacher weight row, so the
    teacher puts most of its mass on one token; "flat": tiny teacher logits (near-uniform).
    """
    leading = leading or (n,)
    n = int(torch.tensor(leading).prod())
    hs = torch.randn(n, student_dim) / student_dim**0.5
    ws = torch.randn(vocab + extra_student_rows, student_dim) * logit_scale
    ht = torch.randn(n, teacher_dim) / teacher_dim**0.5
    wt = torch.randn(vocab + extra_teacher_rows, teacher_dim) * logit_scale
    if teacher == "peaked":
        favourite = torch.randint(0, vocab, (n,))
        ht = wt[favourite] / wt[favourite].norm(dim=-1, keepdim=True) * 8.0 / logit_scale
    elif teacher == "flat":
        wt = wt * 0.01
    labels = torch.randint(0, vocab, (n,))
    labels[torch.rand(n) < ignore_fraction] = ignore_index
    sb = torch.randn(vocab + extra_student_rows) if bias else None
    tb = torch.randn(vocab + extra_teacher_rows) if bias else None

    def prep(x, grad):
        if x is None:
            return None
        return x.to(dtype=dtype, device=DEVICE).requires_grad_(grad)

    return Case(
        student_hidden=prep(hs.reshape(*leading, student_dim), True),
        student_weight=prep(ws, True),
        teacher_hidden=prep(ht.reshape(*leading, teacher_dim), False),
        teacher_weight=prep(wt, False),
        labels=labels.reshape(leading).to(DEVICE),
        student_bias=prep(sb, True),
        teacher_bias=prep(tb, False),
    )


def as_float64(case: Case) -> Case:
    def up(x):
        if x is None:
            return None
        return x.detach().double().requires_grad_(x.requires_grad)

    return Case(
        up(case.student_hidden),
        up(case.student_weight),
        up(case.teacher_hidden),
        up(case.teacher_weight),
        case.labels,
        up(case.student_bias),
        up(case.teacher_bias),
    )


def run_loss(fn, case: Case, grad_outputs=None, **options):
    """Loss (or components) and the student gradients of `fn` on `case`, as float64 tensors."""
    student = [case.student_hidden, case.student_weight] + (
        [case.student_bias] if case.student_bias is not None else []
    )
    for x in student:
        x.grad = None
    out = fn(
        case.student_hidden,
        case.student_weight,
        case.teacher_hidden,
        case.teacher_weight,
        case.labels,
        student_bias=case.student_bias,
        teacher_bias=case.teacher_bias,
        **options,
    )
    outputs = out if isinstance(out, tuple) else (out,)
    if grad_outputs is None:
        grad_outputs = [torch.ones_like(o) for o in outputs]
    total = sum((o * g.to(o.dtype)).sum() for o, g in zip(outputs, grad_outputs))
    total.backward()
    values = [o.detach().double().cpu() for o in outputs]
    grads = [x.grad.detach().double().cpu() for x in student]
    return values, grads


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Norm-wise relative error; exact zeros must be matched to within 1e-30."""
    scale = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff / scale if scale > 0 else diff


def assert_close(actual: list[torch.Tensor], expected: list[torch.Tensor], rtol: float, what: str = ""):
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape, f"{what}[{i}]: shape {tuple(a.shape)} != {tuple(e.shape)}"
        assert torch.isfinite(a).all(), f"{what}[{i}]: non-finite values"
        err = rel_err(a, e)
        assert err <= rtol, f"{what}[{i}]: relative error {err:.3g} > {rtol:.3g}"


def assert_like_reference(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float) -> None:
    """`actual` has NaN and inf exactly where the float64 `expected` has them (the same infinities),
    and its finite entries match to a norm-wise relative error of `rtol` (docs/design.md §9)."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, what
    assert torch.equal(actual.isnan(), expected.isnan()), (
        f"{what}: NaN at {actual.isnan().nonzero().tolist()[:6]}, reference at "
        f"{expected.isnan().nonzero().tolist()[:6]}"
    )
    inf = expected.isinf()
    assert torch.equal(actual.isinf(), inf) and torch.equal(actual[inf], expected[inf]), f"{what}: inf differ"
    finite = expected.isfinite()
    diff = (actual[finite] - expected[finite]).norm().item()
    scale = expected[finite].norm().item()
    assert diff <= rtol * max(scale, 1e-6), f"{what}: relative error {diff / max(scale, 1e-30):.3g}"


def fused(backend: str):
    def fn(*args, **kwargs):
        return fusedkd.fused_linear_kd_loss(*args, backend=backend, **kwargs)

    return fn


# ----------------------------------------------------------------------------------------------------
# Float64 references of the logits-level and top-k losses: the definitions, literally, with autograd
# (the dense one is `fusedkd.reference`)
# ----------------------------------------------------------------------------------------------------


def reference_kd_loss(student_logits, teacher_logits, labels=None, *, return_components=False, **options):
    """docs/design.md §2 literally, with autograd, in the dtype of `student_logits` (float64: the truth)."""
    options = LogitsKDOptions.of(options, strict=True)
    checked = prepare_logits_kd(student_logits, teacher_logits, labels, options)
    vocab = checked.options.vocab_size
    compute = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    s = student_logits.reshape(-1, student_logits.shape[-1])[:, :vocab].to(compute)
    t = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])[:, :vocab].to(compute)
    out = reference.kd_terms_from_logits(s, t, checked.labels, checked.options)
    if checked.options.reduction == "none":
        out = tuple(x.reshape(checked.leading_shape) for x in out)
    return out if return_components else out[0]


def reference_teacher_topk(
    teacher_hidden,
    teacher_weight,
    k,
    temperature=1.0,
    teacher_bias=None,
    teacher_logit_scale=1.0,
    teacher_softcap=None,
):
    """ids by a stable descending sort of the full log-softmax row (ties: lowest id first)."""
    logits = teacher_hidden.double() @ teacher_weight.double().T
    if teacher_bias is not None:
        logits = logits + teacher_bias.double()
    logits = apply_head(logits, teacher_logit_scale, teacher_softcap)
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    order = torch.sort(logprobs, dim=-1, descending=True, stable=True).indices[..., :k]
    return order, logprobs.gather(-1, order), logprobs


def reference_topk_kd_loss(
    student_hidden,
    student_weight,
    ids,
    logprobs,
    labels=None,
    *,
    divergence="forward_kl",
    temperature=1.0,
    alpha=0.5,
    ignore_index=-100,
    reduction="mean",
    tail="bucket",
    student_bias=None,
    vocab_size=None,
    return_components=False,
    student_logit_scale=1.0,
    student_softcap=None,
):
    """The sparse loss of fusedkd.topk's docstring from full [N, V] logits (float64 for ground truth).

    Pass `logprobs` in their own dtype: it sets the precision eps of the teacher tail floor
    tau = eps (1 + sum_K p |log p|), as in the loss.
    """
    inputs = prepare_topk_kd(
        student_hidden,
        student_weight,
        ids,
        logprobs,
        labels,
        student_bias,
        TopKOptions(
            divergence=divergence,
            temperature=temperature,
            alpha=alpha,
            ignore_index=ignore_index,
            reduction=reduction,
            tail=tail,
            vocab_size=vocab_size,
            return_components=return_components,  # components want ce even at alpha = 1
            student_head=HeadTransform.of("student", student_logit_scale, student_softcap),
        ),
    )
    options = inputs.options
    compute = torch.float64 if student_hidden.dtype == torch.float64 else torch.float32
    hidden = inputs.student_hidden
    if inputs.labels is not None:  # ignored tokens are never read
        hidden = torch.where((inputs.labels != ignore_index)[:, None], hidden, torch.zeros_like(hidden))
    s = hidden @ inputs.student_weight.T
    if inputs.student_bias is not None:
        s = s + inputs.student_bias
    s = apply_head(s.to(compute), student_logit_scale, student_softcap)
    log_q_full = torch.log_softmax(s / temperature, dim=-1)
    ids, log_p = inputs.ids, inputs.logprobs.to(compute)
    k, vocab = ids.shape[-1], s.shape[-1]
    if inputs.labels is not None:  # positions that do not count may list anything (all -inf, say)
        counts = (inputs.labels != ignore_index)[:, None]
        log_p = torch.where(counts, log_p, -math.log(k))
    if tail == "renormalize" and not inputs.support.need_ce:
        # Only the k listed rows of the head are read (a NaN elsewhere in it is never seen): log q^ from
        # the k logits W[ids] h (+ b).
        s_support = torch.einsum("nkh,nh->nk", inputs.student_weight[ids], hidden)
        if inputs.student_bias is not None:
            s_support = s_support + inputs.student_bias[ids]
        if inputs.labels is not None:  # ignored tokens are never read (not even their k rows)
            s_support = torch.where(counts, s_support, torch.zeros_like(s_support))
        log_q = apply_head(s_support.to(compute), student_logit_scale, student_softcap) / temperature
    else:
        log_q = log_q_full.gather(-1, ids)

    def plogp_ratio(log_x, log_y):  # sum x (log x - log y), 0 log 0 = 0; a NaN stays NaN
        x = log_x.exp()
        zero = torch.zeros_like(x)
        return torch.where(x == 0, zero, x * torch.where(x == 0, zero, log_x - log_y))

    if tail == "renormalize":
        log_p = log_p - torch.logsumexp(log_p, -1, keepdim=True)
        log_q = log_q - torch.logsumexp(log_q, -1, keepdim=True)
    elif k < vocab:  # bucket: append the tail outcome
        in_support = torch.zeros_like(s, dtype=torch.bool).scatter(1, ids, True)
        log_q_tail = torch.logsumexp(log_q_full.masked_fill(in_support, -math.inf), -1, keepdim=True)
        # The loss under test computes in float32 unless its inputs are float64 (logprobs included).
        precision = tail_precision(
            logprobs.dtype, logprobs.dtype if logprobs.dtype == torch.float64 else torch.float32
        )
        p = log_p.exp()
        tau = precision * (1 - torch.where(p > 0, p * log_p, 0).sum(-1, keepdim=True))
        p_tail = torch.maximum(1 - p.sum(-1, keepdim=True), tau)
        log_p = torch.cat([log_p, p_tail.log()], -1)
        log_q = torch.cat([log_q, log_q_tail], -1)
    if divergence == "forward_kl":
        per_token = plogp_ratio(log_p, log_q).sum(-1)
    else:
        per_token = plogp_ratio(log_q, log_p).sum(-1)
    if inputs.labels is None:
        valid = torch.ones_like(per_token, dtype=torch.bool)
        ce = torch.zeros_like(per_token)
    else:
        valid = inputs.labels != ignore_index
        safe = torch.where(valid, inputs.labels, 0)
        ce = torch.logsumexp(s, -1) - s.gather(-1, safe[:, None])[:, 0]
        if not inputs.support.need_ce:  # not computed at all (the sparse path reads only k rows)
            ce = torch.zeros_like(per_token)
    zero = torch.zeros_like(per_token)
    per_token, ce = torch.where(valid, per_token, zero), torch.where(valid, ce, zero)
    loss = options.distill_weight * per_token + options.ce_weight * ce
    if reduction == "none":
        result = tuple(x.reshape(inputs.leading_shape) for x in (loss, per_token, ce))
    elif reduction == "sum":
        result = (loss.sum(), per_token.sum(), ce.sum())
    else:
        count = valid.sum().clamp(min=1)
        result = (loss.sum() / count, per_token.sum() / count, ce.sum() / count)
    return result if return_components else result[0]


# ----------------------------------------------------------------------------------------------------
# Tiny causal LMs whose logits are not the head's plain W h (transformers is imported when called)
# ----------------------------------------------------------------------------------------------------


def tiny_granite(
    vocab: int, hidden: int, seed: int, *, logits_scaling: float, head_scale: float = 1.0, **config
):
    """A tiny float32 Granite causal LM: its logits are ``W h / logits_scaling``."""
    from transformers import GraniteConfig, GraniteForCausalLM

    torch.manual_seed(seed)
    config = GraniteConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
        logits_scaling=logits_scaling, **config,
    )  # fmt: skip
    model = GraniteForCausalLM(config).float()
    with torch.no_grad():  # a larger head makes peaked distributions
        model.lm_head.weight.mul_(head_scale)
    return model


def tiny_gemma2(
    vocab: int, hidden: int, seed: int, *, final_logit_softcapping: float, head_scale: float = 1.0, **config
):
    """A tiny float32 Gemma 2 causal LM: its logits are ``c tanh(W h / c)``, c = final_logit_softcapping."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(seed)
    config = Gemma2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
        final_logit_softcapping=final_logit_softcapping, attn_implementation="eager", **config,
    )  # fmt: skip
    model = Gemma2ForCausalLM(config).float()
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    return model
