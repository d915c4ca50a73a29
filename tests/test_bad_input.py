"""Bad input gets a clear error naming the argument and the expectation, before any work."""

from __future__ import annotations

import pytest
import torch

import fusedkd
from fusedkd import reference


def good(n=6, vocab=50, hs=8, ht=12):
    return dict(
        student_hidden=torch.randn(n, hs),
        student_weight=torch.randn(vocab, hs),
        teacher_hidden=torch.randn(n, ht),
        teacher_weight=torch.randn(vocab, ht),
        labels=torch.randint(0, vocab, (n,)),
    )


def call(fn=fusedkd.fused_linear_kd_loss, **overrides):
    args = good()
    options = {}
    for key, value in overrides.items():
        (args if key in args else options)[key] = value
    return fn(
        args["student_hidden"],
        args["student_weight"],
        args["teacher_hidden"],
        args["teacher_weight"],
        args["labels"],
        **options,
    )


CASES = [
    # (overrides, exception, message fragment)
    (dict(teacher_hidden=torch.randn(5, 12)), ValueError, "same leading"),
    (dict(student_hidden=torch.randn(6, 9)), ValueError, "student_weight must be"),
    (dict(teacher_weight=torch.randn(50, 11)), ValueError, "teacher_weight must be"),
    (dict(teacher_weight=torch.randn(60, 12)), ValueError, "vocab_size="),
    (dict(vocab_size=51), ValueError, "larger than student_weight"),
    (dict(vocab_size=0), ValueError, "vocab_size must be >= 1"),
    (dict(labels=torch.rand(6)), TypeError, "labels must be an integer"),
    (dict(labels=torch.full((6,), 50)), ValueError, r"labels must be in \[0, 50\)"),
    (dict(labels=torch.full((6,), -3)), ValueError, "found -3"),
    (dict(labels=torch.zeros(5, dtype=torch.long)), ValueError, "labels must have the leading shape"),
    (dict(temperature=0.0), ValueError, "temperature must be finite and > 0"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(temperature=float("inf")), ValueError, "temperature"),
    (dict(alpha=1.5), ValueError, r"alpha must be in \[0, 1\]"),
    (dict(alpha=-0.1), ValueError, "alpha"),
    (dict(beta=2.0, divergence="jsd"), ValueError, r"beta must be in \[0, 1\]"),
    (dict(divergence="kl"), ValueError, "divergence must be one of"),
    (dict(reduction="batchmean"), ValueError, "reduction must be one of"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
    (dict(labels=None, alpha=0.5), ValueError, "labels=None"),
    (dict(student_hidden=torch.randn(6, 8, dtype=torch.float64)), TypeError, "student_hidden has dtype"),
    (dict(student_hidden=torch.randint(0, 3, (6, 8))), TypeError, "student_hidden must be float32"),
    (dict(student_weight=torch.randn(50, 8, 1)), ValueError, "student_weight must have 2 dimension"),
    (dict(teacher_hidden=[1.0]), TypeError, "teacher_hidden must be a torch.Tensor"),
    (dict(student_bias=torch.randn(49)), ValueError, "student_bias must have one entry per row"),
    (dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
    (dict(temperature=1e20), ValueError, r"temperature must be in \[0.001, 1000\]"),
    (dict(temperature=1e-6), ValueError, r"temperature must be in \[0.001, 1000\]"),
    (dict(student_hidden=torch.randn(6, 0), student_weight=torch.randn(50, 0)), ValueError, "hidden size 0"),
    (dict(teacher_hidden=torch.randn(6, 0), teacher_weight=torch.randn(50, 0)), ValueError, "hidden size 0"),
]


@pytest.mark.parametrize(
    "fn", [fusedkd.fused_linear_kd_loss, reference.fused_linear_kd_loss], ids=["fused", "ref"]
)
@pytest.mark.parametrize("overrides,exception,message", CASES, ids=[str(i) for i in range(len(CASES))])
def test_bad_input_raises_clearly(fn, overrides, exception, message):
    if fn is reference.fused_linear_kd_loss and "backend" in overrides:
        message = "backend='reference' only"
    with pytest.raises(exception, match=message):
        call(fn, **overrides)


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


def test_module_checks_options_at_construction():
    with pytest.raises(ValueError, match="temperature"):
        fusedkd.FusedLinearKDLoss(temperature=0)
    with pytest.raises(ValueError, match="divergence"):
        fusedkd.FusedLinearKDLoss(divergence="js")


def test_ignored_label_may_be_any_int():
    # ignore_index need not be negative; tokens carrying it are simply skipped.
    args = good()
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
    args = good()
    student_hidden = args.pop("student_hidden")

    def loss(h):
        return fusedkd.fused_linear_kd_loss(h, *args.values())

    with pytest.raises(RuntimeError, match="torch.func transforms .*call the loss on the whole batch"):
        if transform == "vmap":
            torch.func.vmap(loss)(student_hidden[None].expand(2, -1, -1))
        else:
            torch.func.grad(loss)(student_hidden)
