"""Bad input gets a clear error naming the argument and the expectation, before any work: every loss,
`teacher_topk` and the Modules, in this one file (the options every loss shares, then each entry
point's own arguments, the heads' options, the Modules' construction, the asynchronous value checks
of an accelerator)."""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import _triton_skip_reason

import fusedkd
from fusedkd import reference

N, VOCAB, K = 6, 50, 4


def _inputs(key: str) -> dict:
    """Good positional arguments of each loss, in order: N = 6 tokens, V = 50, k = 4."""
    labels = torch.randint(0, VOCAB, (N,))
    if key == "linear":
        return dict(
            student_hidden=torch.randn(N, 8),
            student_weight=torch.randn(VOCAB, 8),
            teacher_hidden=torch.randn(N, 12),
            teacher_weight=torch.randn(VOCAB, 12),
            labels=labels,
        )
    if key == "logits":
        return dict(student_logits=torch.randn(N, VOCAB), teacher_logits=torch.randn(N, VOCAB), labels=labels)
    return dict(
        student_hidden=torch.randn(N, 8),
        student_weight=torch.randn(VOCAB, 8),
        ids=torch.stack([torch.randperm(VOCAB)[:K] for _ in range(N)]),
        logprobs=torch.log_softmax(torch.randn(N, VOCAB), -1)[:, :K],
        labels=labels,
    )


FUNCTIONS = {
    "linear": fusedkd.fused_linear_kd_loss,
    "logits": fusedkd.kd_loss,
    "topk": fusedkd.fused_linear_topk_kd_loss,
    "linear-reference": reference.fused_linear_kd_loss,
}
MODULES = {
    "linear": fusedkd.FusedLinearKDLoss,
    "logits": fusedkd.KDLoss,
    "topk": fusedkd.FusedLinearTopKKDLoss,
}


def call(key: str = "linear", **overrides):
    """The loss `key` on good inputs with `overrides`: argument names replace arguments, others are
    options."""
    args = _inputs(key.removesuffix("-reference"))
    options = {}
    for name, value in overrides.items():
        (args if name in args else options)[name] = value
    return FUNCTIONS[key](*args.values(), **options)


# ----------------------------------------------------------------------------------------------------
# The arguments and options every loss shares
# ----------------------------------------------------------------------------------------------------

SHARED = [
    # (overrides, exception, message fragment)
    (dict(labels=torch.rand(6)), TypeError, "labels must be an integer"),
    (dict(labels=torch.full((6,), 50)), ValueError, r"labels must be in \[0, 50\) or equal ignore_index"),
    (dict(labels=torch.full((6,), -3)), ValueError, "found -3"),
    (dict(labels=torch.zeros(5, dtype=torch.long)), ValueError, "labels must have the leading shape"),
    (dict(labels=[1, 2]), TypeError, "labels must be a torch.Tensor"),
    (dict(labels=None, alpha=0.5), ValueError, "labels=None"),
    (dict(temperature=0.0), ValueError, "temperature must be finite and > 0"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(temperature=float("inf")), ValueError, "temperature"),
    (dict(temperature="2"), TypeError, "temperature must be a positive float"),
    (dict(temperature=1e20), ValueError, r"temperature must be in \[0.001, 1000\]"),
    (dict(temperature=1e-6), ValueError, r"temperature must be in \[0.001, 1000\]"),
    (dict(alpha=1.5), ValueError, r"alpha must be in \[0, 1\]"),
    (dict(alpha=-0.1), ValueError, "alpha"),
    (dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
    (dict(ignore_index=2**70), ValueError, "ignore_index must fit in int64"),
    (dict(divergence="kl"), ValueError, "divergence must be one of"),
    (dict(reduction="batchmean"), ValueError, "reduction must be one of"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
    (dict(backend="torch", chunk_size=0), ValueError, "chunk_size must be a positive int"),
    (dict(backend="torch", chunk_size=2.5), ValueError, "chunk_size must be a positive int"),
    (dict(vocab_size=0), ValueError, "vocab_size must be >= 1"),
    (dict(vocab_size=51), ValueError, "vocab_size=51 is larger than"),
    (dict(vocab_size="50"), TypeError, "vocab_size must be an int or None"),
]


@pytest.mark.parametrize(
    "key,overrides,exception,message",
    [
        pytest.param(key, *case, id=f"{key}-{i}")
        for key in FUNCTIONS
        for i, case in enumerate(SHARED)
        if not (key == "linear-reference" and "chunk_size" in case[0])  # the reference takes no chunks
    ],
)
def test_shared_bad_input_raises_clearly(key, overrides, exception, message):
    if key == "linear-reference" and "backend" in overrides:
        message = "backend='reference' only"
    with pytest.raises(exception, match=message):
        call(key, **overrides)


# ----------------------------------------------------------------------------------------------------
# Each entry point's own arguments
# ----------------------------------------------------------------------------------------------------

LINEAR = [
    (dict(teacher_hidden=torch.randn(5, 12)), ValueError, "same leading"),
    (dict(student_hidden=torch.randn(6, 9)), ValueError, "student_weight must be"),
    (dict(teacher_weight=torch.randn(50, 11)), ValueError, "teacher_weight must be"),
    (dict(teacher_weight=torch.randn(60, 12)), ValueError, "vocab_size="),
    (dict(beta=2.0, divergence="jsd"), ValueError, r"beta must be in \[0, 1\]"),
    (dict(student_hidden=torch.randn(6, 8, dtype=torch.float64)), TypeError, "student_hidden has dtype"),
    (dict(student_hidden=torch.randint(0, 3, (6, 8))), TypeError, "student_hidden must be float32"),
    (dict(student_weight=torch.randn(50, 8, 1)), ValueError, "student_weight must have 2 dimension"),
    (dict(teacher_hidden=[1.0]), TypeError, "teacher_hidden must be a torch.Tensor"),
    (dict(student_bias=torch.randn(49)), ValueError, "student_bias must have one entry per row"),
    (dict(student_hidden=torch.randn(6, 0), student_weight=torch.randn(50, 0)), ValueError, "hidden size 0"),
    (dict(teacher_hidden=torch.randn(6, 0), teacher_weight=torch.randn(50, 0)), ValueError, "hidden size 0"),
]
LOGITS = [
    (dict(teacher_logits=torch.randn(5, 50)), ValueError, "same leading"),
    (dict(teacher_logits=torch.randn(6, 60)), ValueError, "vocab_size="),
    (dict(vocab_size=51), ValueError, "larger than the last dimension of student_logits"),
    (dict(student_logits=torch.randint(0, 3, (6, 50))), TypeError, "student_logits must be float32"),
    (dict(teacher_logits=[1.0]), TypeError, "teacher_logits must be a torch.Tensor"),
    (dict(student_logits=torch.randn(())), ValueError, "at least 1 dimension"),
]
TOPK = [
    (dict(ids=torch.arange(51).repeat(6, 1), logprobs=torch.full((6, 51), -5.0)), ValueError, "k=51"),
    (dict(ids=torch.full((6, 4), 50)), ValueError, r"ids must be token ids in \[0, 50\); found 50"),
    (dict(ids=torch.full((6, 4), -1)), ValueError, "found -1"),
    (
        dict(ids=torch.tensor([[0, 1, 2, 2]] * 6)),
        ValueError,
        "distinct tokens per position; position 0 lists id 2",
    ),
    (dict(logprobs=torch.full((6, 4), 0.5)), ValueError, "logprobs must be log-probabilities"),
    (dict(logprobs=torch.full((6, 4), math.nan)), ValueError, "not NaN"),
    (dict(logprobs=torch.full((6, 4), -0.1)), ValueError, "normalized over the full vocabulary"),
    (dict(logprobs=torch.full((6, 3), -5.0)), ValueError, "logprobs must have the shape of ids"),
    (dict(ids=torch.zeros(5, 4, dtype=torch.long)), ValueError, "leading shape of student_hidden"),
    (dict(ids=torch.zeros(6, 4)), TypeError, "ids must be an integer tensor"),
    (dict(logprobs=torch.zeros(6, 4, dtype=torch.long)), TypeError, "logprobs must be float32"),
    (dict(student_hidden=torch.randn(6, 9)), ValueError, "student_weight must be"),
    (dict(divergence="jsd"), ValueError, "divergence must be one of 'forward_kl', 'reverse_kl'"),
    (dict(tail="drop"), ValueError, "tail must be one of 'bucket', 'renormalize'"),
    (dict(backend="triton"), ValueError, "has no fused Triton kernels"),
    (dict(vocab_size=40, labels=None, alpha=1.0), ValueError, r"ids must be token ids in \[0, 40\)"),
]
OWN = [
    *[
        pytest.param(key, *case, id=f"linear-{i}")
        for key in ("linear", "linear-reference")
        for i, case in enumerate(LINEAR)
    ],
    *[pytest.param("logits", *case, id=f"logits-{i}") for i, case in enumerate(LOGITS)],
    *[pytest.param("topk", *case, id=f"topk-{i}") for i, case in enumerate(TOPK)],
]


@pytest.mark.parametrize("key,overrides,exception,message", OWN)
def test_own_bad_input_raises_clearly(key, overrides, exception, message):
    with pytest.raises(exception, match=message):
        call(key, **overrides)


@pytest.mark.parametrize("key", ["linear", "topk"])
def test_mismatched_dtypes_outside_autocast_are_an_error(key):
    with pytest.raises(
        TypeError, match="student_hidden has dtype torch.bfloat16 but student_weight has dtype"
    ):
        call(key, student_hidden=torch.randn(N, 8, dtype=torch.bfloat16))


@pytest.mark.parametrize(
    "key,overrides,named",
    [
        ("linear", dict(student_weight=torch.randn(0, 8)), "student_weight, which has 0 rows: an empty"),
        ("linear", dict(teacher_weight=torch.randn(0, 12)), "teacher_weight, which has 0 rows: an empty"),
        ("logits", dict(student_logits=torch.randn(N, 0)), r"student_logits has vocabulary size 0"),
        ("topk", dict(student_weight=torch.randn(0, 8)), "student_weight, which has 0 rows: an empty"),
    ],
)
def test_an_empty_vocabulary_is_named(key, overrides, named):
    """A head with no rows (logits with no entries): the tensor is named, not a vocab_size never passed."""
    with pytest.raises(ValueError, match=named):
        call(key, **overrides)


def test_teacher_topk_bad_input():
    from fusedkd import teacher_topk

    hidden, weight = torch.randn(6, 8), torch.randn(50, 8)
    for kwargs, exception, message in [
        (dict(k=51), ValueError, r"k must be in \[1, vocabulary size = 50\]"),
        (dict(k=0), ValueError, r"k must be in \[1"),
        (dict(k=2.0), TypeError, "k must be an int"),
        (dict(k=45, vocab_size=40), ValueError, "vocabulary size = 40"),
        (dict(k=5, temperature=0.0), ValueError, "temperature"),
        (dict(k=5, block_size=0), ValueError, "block_size must be a positive int"),
        (dict(k=5, chunk_size=-1), ValueError, "chunk_size must be a positive int"),
        (dict(k=5, teacher_bias=torch.zeros(49)), ValueError, "teacher_bias"),
    ]:
        with pytest.raises(exception, match=message):
            teacher_topk(hidden, weight, **kwargs)
    with pytest.raises(ValueError, match="teacher_weight must be"):
        teacher_topk(hidden[:, :7], weight, 5)
    with pytest.raises(ValueError, match="teacher_weight, which has 0 rows: an empty vocabulary"):
        teacher_topk(hidden, weight[:0], 5)
    with pytest.raises(TypeError, match="teacher_hidden has dtype"):
        teacher_topk(hidden.double(), weight, 5)
    ids, _ = teacher_topk(hidden, weight, 5, vocab_size=40)  # a smaller vocab_size is fine
    assert ids.max() < 40


# ----------------------------------------------------------------------------------------------------
# The heads' options (logit scale, soft cap) and the Modules' construction
# ----------------------------------------------------------------------------------------------------


def _bad_head_options(side: str):
    return [
        (f"{side}_logit_scale", 0.0, ValueError, f"{side}_logit_scale must be finite and > 0"),
        (f"{side}_logit_scale", -2.0, ValueError, f"{side}_logit_scale must be finite and > 0"),
        (f"{side}_logit_scale", float("inf"), ValueError, f"{side}_logit_scale"),
        (f"{side}_logit_scale", None, TypeError, f"{side}_logit_scale must be a positive float"),
        (f"{side}_logit_scale", True, TypeError, f"{side}_logit_scale must be a positive float"),
        (f"{side}_softcap", 0.0, ValueError, f"{side}_softcap must be None or finite and > 0"),
        (f"{side}_softcap", float("nan"), ValueError, f"{side}_softcap"),
        (f"{side}_softcap", "30", TypeError, f"{side}_softcap must be None or a positive float"),
        # Finite, but past what float32 logits represent (NaN losses, or an overflow inside the GEMM).
        (f"{side}_logit_scale", 1e300, ValueError, rf"{side}_logit_scale must be in \[1e-06, 1e\+06\]"),
        (f"{side}_logit_scale", 1e-300, ValueError, rf"{side}_logit_scale must be in \[1e-06, 1e\+06\]"),
        (f"{side}_softcap", 1e39, ValueError, rf"{side}_softcap must be None or in \[0.001, 1e\+06\]"),
        (f"{side}_softcap", 1e-300, ValueError, rf"{side}_softcap must be None or in \[0.001, 1e\+06\]"),
    ]


@pytest.mark.parametrize(
    "key,side",
    [
        ("linear", "student"),
        ("linear", "teacher"),
        ("logits", "student"),
        ("logits", "teacher"),
        ("topk", "student"),
    ],
)
def test_bad_head_options_raise_clearly(key, side):
    for option, value, exception, message in _bad_head_options(side):
        with pytest.raises(exception, match=message):
            call(key, **{option: value})
        with pytest.raises(exception, match=message):
            MODULES[key](**{option: value})


def test_bad_teacher_head_options_of_teacher_topk_raise_clearly():
    hidden, weight = torch.randn(6, 8), torch.randn(50, 8)
    for option, value, exception, message in _bad_head_options("teacher"):
        with pytest.raises(exception, match=message):
            fusedkd.teacher_topk(hidden, weight, 7, **{option: value})


@pytest.mark.parametrize("key", list(MODULES))
def test_bad_module_options_fail_at_construction(key):
    for options, message in (
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=0), "temperature"),
        (dict(alpha=2.0), "alpha"),
        (dict(reduction="avg"), "reduction must be one of"),
        (dict(divergence="kl"), "divergence must be one of"),
        (dict(divergence="js"), "divergence must be one of"),
        (dict(backend="gpu"), "backend must be one of"),
        (dict(vocab_size=0), "vocab_size must be >= 1"),
        (dict(chunk_size=-4), "chunk_size must be a positive int"),
    ):
        with pytest.raises(ValueError, match=message):
            MODULES[key](**options)
    if key == "logits":  # KDLoss also takes (alpha, temperature) positionally
        with pytest.raises(ValueError, match="temperature"):
            MODULES[key](0.5, -1.0)


@pytest.mark.skipif(_triton_skip_reason() is not None, reason="needs the Triton backend")
@pytest.mark.parametrize("key", ["linear", "logits"])
def test_chunk_size_is_a_torch_backend_option(key):
    with pytest.raises(ValueError, match="chunk_size applies to backends 'torch' and 'tiles'"):
        call(key, backend="triton", chunk_size=8)


# ----------------------------------------------------------------------------------------------------
# Value checks on an accelerator: asynchronous (no host sync), with the same message
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["linear", "logits", "topk"])
def test_value_checks_on_an_accelerator_are_asynchronous_and_name_the_argument(key, monkeypatch):
    """On an accelerator a bad label is a device-side assertion (no host sync) with the same message."""
    from fusedkd import _values

    calls = []
    monkeypatch.setattr(_values, "eager_value_checks", lambda device: calls.append(device) or False)
    # On a CPU the asynchronous assertion fails at once, as a RuntimeError carrying the message.
    with pytest.raises(RuntimeError, match=r"labels must be in \[0, 50\) or equal ignore_index=-100"):
        call(key, labels=torch.full((6,), 50), backend="torch")
    assert calls


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(ids=torch.full((6, 4), 50)), r"ids must be token ids in \[0, 50\)"),
        (dict(logprobs=torch.full((6, 4), 0.5)), "logprobs must be log-probabilities"),
        (dict(logprobs=torch.full((6, 4), -0.01)), "normalized over the full vocabulary"),
        (dict(ids=torch.tensor([[0, 1, 2, 2]] * 6)), "ids must list k distinct tokens per position"),
    ],
)
def test_topk_value_checks_on_an_accelerator_are_asynchronous(overrides, message, monkeypatch):
    from fusedkd import _values

    monkeypatch.setattr(_values, "eager_value_checks", lambda device: False)
    with pytest.raises(RuntimeError, match=message):
        call("topk", **overrides)


# ----------------------------------------------------------------------------------------------------
# Devices, backends, degenerate shapes, configs, torch.func
# ----------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_tensors_on_different_devices():
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        call(teacher_weight=torch.randn(50, 12, device="cuda"))


def test_tensors_on_different_devices_meta():
    # The "meta" device stands in for a second device on a CPU-only machine.
    with pytest.raises(ValueError, match="teacher_weight is on meta"):
        call(teacher_weight=torch.randn(50, 12, device="meta"))


def test_triton_backend_unavailable_says_why(monkeypatch):
    from fusedkd import kernels

    monkeypatch.setattr(kernels, "INTERPRETER", False)
    if kernels.TRITON_IMPORT_ERROR is None:
        with pytest.raises(RuntimeError, match="backend='triton' cannot run here: .*TRITON_INTERPRET=1"):
            call(backend="triton")
    else:
        with pytest.raises(RuntimeError, match="Triton is not importable"):
            call(backend="triton")


def test_ignored_label_may_be_any_int():
    # ignore_index need not be negative; tokens carrying it are simply skipped.
    args = _inputs("linear")
    args["labels"][:3] = 50
    loss = fusedkd.fused_linear_kd_loss(*args.values(), ignore_index=50)
    assert torch.isfinite(loss)


def test_degenerate_inputs_of_the_other_entry_points():
    with pytest.raises(ValueError, match="student_logits has vocabulary size 0"):
        fusedkd.kd_loss(torch.randn(4, 0), torch.randn(4, 0), alpha=1.0)
    with pytest.raises(ValueError, match="teacher_hidden has hidden size 0"):
        fusedkd.teacher_topk(torch.randn(4, 0), torch.randn(9, 0), k=2)
    with pytest.raises(ValueError, match="teacher_hidden is on the meta device"):
        fusedkd.teacher_topk(torch.randn(4, 3, device="meta"), torch.randn(9, 3, device="meta"), k=2)
    # A counted position whose listed teacher log-probabilities are all -inf has no teacher distribution.
    ids = torch.tensor([[0, 1], [2, 3], [4, 5]])
    logprobs = torch.log(torch.tensor([[0.5, 0.2], [0.3, 0.3], [0.1, 0.1]]))
    logprobs[1] = -float("inf")
    hidden, weight = torch.randn(3, 4), torch.randn(9, 4)
    with pytest.raises(ValueError, match="position 1 has all its log-probabilities -inf"):
        fusedkd.fused_linear_topk_kd_loss(hidden, weight, ids, logprobs, torch.tensor([1, 2, 3]))
    # ... and is fine when it does not count.
    loss = fusedkd.fused_linear_topk_kd_loss(hidden, weight, ids, logprobs, torch.tensor([1, -100, 3]))
    assert torch.isfinite(loss)


def test_head_transform_refuses_what_is_not_a_config():
    transformers = pytest.importorskip("transformers", reason="the train extra is not installed")
    config = transformers.Gemma2Config(final_logit_softcapping=30.0)
    with pytest.raises(TypeError, match="not a dict"):
        fusedkd.head_transform(config.to_dict())
    with pytest.raises(TypeError, match="got NoneType"):
        fusedkd.head_transform(None)


@pytest.mark.parametrize("transform", ["vmap", "grad"])
def test_torch_func_transforms_are_refused_with_the_alternative(transform):
    args = _inputs("linear")
    student_hidden = args.pop("student_hidden")

    def loss(h):
        return fusedkd.fused_linear_kd_loss(h, *args.values())

    with pytest.raises(RuntimeError, match="torch.func transforms .*call the loss on the whole batch"):
        if transform == "vmap":
            torch.func.vmap(loss)(student_hidden[None].expand(2, -1, -1))
        else:
            torch.func.grad(loss)(student_hidden)


def test_vocab_parallel_entry_points_on_plain_tensors_say_so():
    """`fusedkd.vocab_parallel`'s losses called on plain tensors only: the message says that no input
    is a DTensor (not that "another input is"), and what they take."""
    from fusedkd import vocab_parallel
    from fusedkd._options import KDOptions

    options = KDOptions.of(dict(alpha=1.0))
    with pytest.raises(ValueError, match="student_logits is a plain tensor and so is every other input"):
        vocab_parallel.logits_kd(torch.randn(2, 5), torch.randn(2, 5), None, options)
    with pytest.raises(ValueError, match="student_weight is a plain tensor and so is every other input"):
        vocab_parallel.linear_kd(
            torch.randn(2, 3),
            torch.randn(5, 3),
            torch.randn(2, 4),
            torch.randn(5, 4),
            None,
            None,
            None,
            options,
        )
