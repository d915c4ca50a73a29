"""The options object of every loss (`fusedkd._options`): one place per option, validated once; the
Hugging Face label convention (`shift_labels`) and the up-front finiteness check (`check_finite`)."""

from __future__ import annotations

import dataclasses
import inspect
import math

import pytest
import torch

import fusedkd
from fusedkd._options import KDOptions, LogitsKDOptions, TopKOptions

LOSSES = [
    (fusedkd.fused_linear_kd_loss, fusedkd.FusedLinearKDLoss, KDOptions),
    (fusedkd.kd_loss, fusedkd.KDLoss, LogitsKDOptions),
    (fusedkd.fused_linear_topk_kd_loss, fusedkd.FusedLinearTopKKDLoss, TopKOptions),
]


@pytest.mark.parametrize("function,module,options_class", LOSSES, ids=lambda x: getattr(x, "__name__", ""))
def test_every_keyword_option_is_a_field_of_the_options_class(function, module, options_class):
    """A keyword-only parameter of the public function is an option: the options class takes it (the
    heads' scale and cap through `<role>_head`), so the function, its Module and the backends share one
    object. A new option that is not added there fails here."""
    keyword_only = {
        name
        for name, parameter in inspect.signature(function).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY and not name.endswith("_bias")
    }
    fields = {f.name for f in dataclasses.fields(options_class)} - {"has_labels", *options_class.NOT_OPTIONS}
    heads = {f"{role}_{part}" for role in options_class.ROLES for part in ("logit_scale", "softcap")}
    expected = (fields - {f"{role}_head" for role in ("student", "teacher")}) | heads
    assert keyword_only == expected
    # The defaults agree too.
    defaults = options_class()
    for name in keyword_only - heads:
        assert inspect.signature(function).parameters[name].default == getattr(defaults, name), name
    # The Module stores the validated object and rejects what is not an option.
    criterion = module(temperature=2.0)
    assert isinstance(criterion.options, options_class) and criterion.options.temperature == 2.0
    with pytest.raises(TypeError, match="unexpected option"):
        module(temprature=2.0)
    with pytest.raises(ValueError, match="temperature"):
        module(temperature=0.0)


def test_head_options_become_one_head_per_model():
    options = KDOptions.of(dict(student_logit_scale=0.5, teacher_softcap=30.0))
    assert options.student_head == fusedkd.HeadTransform(0.5, None)
    assert options.teacher_head == fusedkd.HeadTransform(1.0, 30.0)
    with pytest.raises(ValueError, match="teacher_softcap"):
        KDOptions.of(dict(teacher_softcap=-1.0))
    with pytest.raises(TypeError, match="teacher_logit_scale"):
        TopKOptions.of(dict(teacher_logit_scale=2.0), strict=True)


# --- shift_labels: the Hugging Face convention -------------------------------------------------------


def test_shift_labels_equals_shifting_by_hand():
    """Unshifted labels with full-length inputs = shifted labels with the last position ignored, on every
    loss (values and gradients)."""
    batch, seq, hidden, vocab = 2, 7, 8, 40
    input_ids = torch.randint(0, vocab, (batch, seq))
    input_ids[0, :2] = -100  # a masked prompt
    shifted = torch.cat([input_ids[:, 1:], torch.full((batch, 1), -100)], dim=1)
    hs = torch.randn(batch, seq, hidden, requires_grad=True)
    ws = torch.randn(vocab, hidden, requires_grad=True)
    ht, wt = torch.randn(batch, seq, 5), torch.randn(vocab, 5)
    ids, logprobs = fusedkd.teacher_topk(ht, wt, k=6)
    calls = {
        "linear": lambda labels, **kw: fusedkd.fused_linear_kd_loss(hs, ws, ht, wt, labels, alpha=0.6, **kw),
        "logits": lambda labels, **kw: fusedkd.kd_loss(hs @ ws.T, ht @ wt.T, labels, alpha=0.6, **kw),
        "topk": lambda labels, **kw: fusedkd.fused_linear_topk_kd_loss(hs, ws, ids, logprobs, labels, **kw),
    }
    for name, call in calls.items():
        for reduction in ("mean", "none"):
            by_hand = call(shifted, reduction=reduction)
            grads_by_hand = torch.autograd.grad(by_hand.sum(), [hs, ws])
            hf = call(input_ids, reduction=reduction, shift_labels=True)
            grads_hf = torch.autograd.grad(hf.sum(), [hs, ws])
            torch.testing.assert_close(hf, by_hand, rtol=0, atol=0, msg=name)
            for a, b in zip(grads_hf, grads_by_hand):
                torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    with pytest.raises(ValueError, match="shift_labels=True shifts the labels"):
        fusedkd.fused_linear_kd_loss(hs, ws, ht, wt, None, alpha=1.0, shift_labels=True)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_shift_labels_in_narrow_integer_dtypes(dtype):
    """Labels of any integer dtype, shifted: the same loss as int64 labels. The last position's
    ignore_index is not written in the labels' own dtype (uint8: -100 would wrap to 156, a token id
    of this vocabulary, and that position would silently count; int8: 1000 would overflow)."""
    vocab = 200
    labels = torch.randint(0, 100, (2, 5))
    s, t = torch.randn(2, 5, vocab), torch.randn(2, 5, vocab)
    for ignore_index in (-100, 1000) if dtype != torch.uint8 else (-100,):
        expected = fusedkd.kd_loss(
            s, t, labels, shift_labels=True, ignore_index=ignore_index, reduction="none"
        )
        actual = fusedkd.kd_loss(
            s, t, labels.to(dtype), shift_labels=True, ignore_index=ignore_index, reduction="none"
        )
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)
        assert (actual[:, -1] == 0).all()


def test_shift_labels_on_a_hugging_face_model_matches_its_own_loss():
    """README's first example: `model.model(...)` hidden states, `lm_head.weight`, the model's own labels.
    With alpha=0 the loss is the plain cross-entropy, which the model computes itself from its logits."""
    transformers = pytest.importorskip("transformers", reason="the train extra is not installed")
    torch.manual_seed(0)
    config = transformers.Qwen3Config(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=32, tie_word_embeddings=False,
    )  # fmt: skip
    student = transformers.Qwen3ForCausalLM(config)
    teacher = transformers.Qwen3ForCausalLM(config)
    input_ids = torch.randint(0, 97, (2, 11))
    labels = input_ids.clone()
    labels[:, :3] = -100
    hidden = student.model(input_ids=input_ids).last_hidden_state
    with torch.no_grad():
        teacher_hidden = teacher.model(input_ids=input_ids).last_hidden_state
    loss = fusedkd.fused_linear_kd_loss(
        hidden, student.lm_head.weight, teacher_hidden, teacher.lm_head.weight, labels,
        alpha=0.0, shift_labels=True,
    )  # fmt: skip
    expected = student(input_ids=input_ids, labels=labels).loss
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    unshifted = fusedkd.fused_linear_kd_loss(
        hidden, student.lm_head.weight, teacher_hidden, teacher.lm_head.weight, labels, alpha=0.0
    )
    assert not torch.allclose(unshifted, expected, rtol=1e-3)  # the trap shift_labels avoids


# --- check_finite -------------------------------------------------------------------------------------


def _linear_inputs(n=6, vocab=30, hs=5, ht=7):
    return dict(
        student_hidden=torch.randn(n, hs),
        student_weight=torch.randn(vocab, hs),
        teacher_hidden=torch.randn(n, ht),
        teacher_weight=torch.randn(vocab, ht),
        labels=torch.randint(0, vocab, (n,)),
    )


@pytest.mark.parametrize(
    "name,index,value,message",
    [
        ("teacher_hidden", (3, 1), math.nan, "teacher_hidden has NaN at token 3"),
        ("student_hidden", (4, 0), math.inf, "student_hidden has \\+inf at token 4"),
        ("student_weight", (7, 2), -math.inf, "student_weight has -inf at vocabulary row 7"),
        ("teacher_bias", (11,), math.nan, "teacher_bias has NaN at vocabulary entry 11"),
    ],
)
def test_check_finite_names_the_tensor_and_the_first_bad_token(name, index, value, message):
    inputs = _linear_inputs()
    inputs["teacher_bias"] = torch.zeros(30)
    inputs[name][index] = value
    with pytest.raises(ValueError, match=f"check_finite: {message}"):
        fusedkd.fused_linear_kd_loss(**inputs, check_finite=True)
    loss = fusedkd.fused_linear_kd_loss(**inputs, reduction="none")  # without it: NaN, not an error
    assert loss.isnan().any()


def test_check_finite_accepts_masked_entries_and_ignored_tokens():
    inputs = _linear_inputs()
    inputs["student_bias"] = torch.zeros(30)
    inputs["student_bias"][[2, 5]] = -math.inf  # masked vocabulary entries (never a label)
    inputs["teacher_bias"] = inputs["student_bias"].clone()
    inputs["labels"] = torch.randint(6, 30, (6,))
    inputs["labels"][1] = -100
    inputs["teacher_hidden"][1] = math.nan  # a token that does not count is never read
    loss = fusedkd.fused_linear_kd_loss(**inputs, check_finite=True)
    assert torch.isfinite(loss)
    student, teacher = torch.randn(2, 5, 30), torch.randn(2, 5, 30)
    teacher[1, 2] = -math.inf
    with pytest.raises(ValueError, match="teacher_logits has -inf only at token 7"):
        fusedkd.kd_loss(student, teacher, torch.randint(0, 30, (2, 5)), check_finite=True)
    student[0, 3, 4] = math.nan
    labels = torch.randint(0, 30, (2, 5))
    labels[1, 2] = -100
    with pytest.raises(ValueError, match="student_logits has NaN at token 3"):
        fusedkd.kd_loss(student, teacher, labels, check_finite=True)
    hidden = torch.randn(4, 5)
    hidden[2, 0] = math.nan
    ids, logprobs = fusedkd.teacher_topk(torch.randn(4, 3), torch.randn(30, 3), k=4)
    with pytest.raises(ValueError, match="student_hidden has NaN at token 2"):
        fusedkd.fused_linear_topk_kd_loss(
            hidden, torch.randn(30, 5), ids, logprobs, check_finite=True, alpha=1.0
        )
