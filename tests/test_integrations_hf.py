"""KDTrainer (fusedkd.integrations.hf): a transformers.Trainer whose fused KD loss equals the naive
recipe on the models' logits, gradients included, on tiny Qwen3 models built here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers", reason="the train extra is not installed")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (pip install accelerate)")

from _helpers import tiny_gemma2, tiny_granite  # noqa: E402
from transformers import Qwen3Config, Qwen3ForCausalLM, TrainingArguments  # noqa: E402

from fusedkd.integrations.hf import KDTrainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 389  # odd, not a multiple of any tile size
# float32: the fused loss and the naive one differ in summation order only (a few ulps of the loss,
# relative to each gradient's largest entry).
LOSS_RTOL, GRAD_RTOL = 2e-5, 1e-4


def tiny_qwen3(hidden: int, seed: int, head_scale: float, **config) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        **config,
    )
    model = Qwen3ForCausalLM(config).float()
    with torch.no_grad():  # a larger head makes peaked distributions; the default init is near uniform
        model.lm_head.weight.mul_(head_scale)
    return model


def batch(seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (3, 13), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0  # right padding
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :4] = -100  # prompt
    labels[2, 6] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def naive_loss(student, teacher, inputs, divergence, beta, temperature, alpha, num_items_in_batch=None):
    """The textbook recipe on full logits, float32: shift, softmax at T, divergence, CE, mask."""
    kwargs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    s = student(**kwargs).logits[:, :-1]
    with torch.no_grad():
        t = teacher(**kwargs).logits[:, :-1]
    labels = inputs["labels"][:, 1:]
    valid = labels != -100
    log_q, log_p = (s / temperature).log_softmax(-1), (t / temperature).log_softmax(-1)
    if divergence == "forward_kl":
        d = (log_p.exp() * (log_p - log_q)).sum(-1)
    elif divergence == "reverse_kl":
        d = (log_q.exp() * (log_q - log_p)).sum(-1)
    else:
        log_m = torch.logsumexp(torch.stack([log_p + math_log(beta), log_q + math_log(1 - beta)]), 0)
        d = beta * (log_p.exp() * (log_p - log_m)).sum(-1) + (1 - beta) * (log_q.exp() * (log_q - log_m)).sum(
            -1
        )
    ce = F.cross_entropy(s.flatten(0, 1), labels.flatten(), reduction="none").view_as(d)
    total = ((alpha * temperature**2 * d + (1 - alpha) * ce) * valid).sum()
    return total / (valid.sum() if num_items_in_batch is None else num_items_in_batch)


def math_log(x: float) -> float:
    import math

    return math.log(x) if x > 0 else float("-inf")


@pytest.fixture(scope="module")
def models():
    return tiny_qwen3(32, 0, head_scale=30.0), tiny_qwen3(48, 1, head_scale=8.0)


def make_trainer(student, teacher, tmp_path, **options):
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, save_strategy="no")
    return KDTrainer(model=student, teacher_model=teacher, args=args, **options)


def grads(model) -> dict[str, torch.Tensor]:
    out = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize(
    ("divergence", "beta", "temperature", "alpha"),
    [
        ("forward_kl", 0.5, 1.0, 0.5),
        ("forward_kl", 0.5, 2.0, 1.0),
        ("reverse_kl", 0.5, 0.7, 0.3),
        ("jsd", 0.5, 2.0, 0.8),
        ("jsd", 0.1, 1.0, 0.0),
    ],
)
def test_loss_and_gradients_equal_the_naive_recipe(models, tmp_path, divergence, beta, temperature, alpha):
    student, teacher = models
    options = {"divergence": divergence, "beta": beta, "temperature": temperature, "alpha": alpha}
    trainer = make_trainer(student, teacher, tmp_path, **options)
    inputs = batch(seed=int(100 * beta + 10 * temperature))
    student.train()
    student.zero_grad(set_to_none=True)
    for num_items_in_batch in (None, torch.tensor(41)):  # mean over valid tokens; sum / global count
        loss = trainer.compute_loss(student, dict(inputs), num_items_in_batch=num_items_in_batch)
        loss.backward()
        fused_grads = grads(student)
        reference = naive_loss(student, teacher, inputs, num_items_in_batch=num_items_in_batch, **options)
        reference.backward()
        reference_grads = grads(student)
        assert reference > 0
        torch.testing.assert_close(loss.detach(), reference.detach(), rtol=LOSS_RTOL, atol=0)
        assert fused_grads.keys() == reference_grads.keys() and len(fused_grads) > 0
        for name, ref in reference_grads.items():
            err, scale = (fused_grads[name] - ref).abs().max().item(), ref.abs().max().item()
            assert scale > 0 and err <= GRAD_RTOL * scale, (name, err, scale)
    # The teacher is frozen.
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_training_and_evaluation_run(models, tmp_path):
    student, teacher = models
    from torch.utils.data import Dataset

    class Batches(Dataset):
        def __len__(self):
            return 12

        def __getitem__(self, i):
            return {k: v[i % 3] for k, v in batch(seed=i // 3).items()}

    args = TrainingArguments(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        max_steps=3,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        logging_steps=1,
    )
    trainer = KDTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=Batches(), temperature=2.0, alpha=0.5
    )
    before = student.lm_head.weight.detach().clone()
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 3 and all(0 < loss < float("inf") for loss in losses)
    assert not torch.equal(before, student.lm_head.weight.detach())
    assert 0 < trainer.evaluate(Batches())["eval_loss"] < float("inf")


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"temperature": 0.0}, ValueError, "temperature must be > 0"),
        ({"temperature": "2"}, TypeError, "temperature must be a float"),
        ({"alpha": 1.5}, ValueError, r"alpha must be in \[0, 1\]"),
        ({"beta": -0.1}, ValueError, r"beta must be in \[0, 1\]"),
        ({"divergence": "kl"}, ValueError, "divergence must be one of"),
        ({"compute_loss_func": lambda *a, **k: 0}, ValueError, "compute_loss_func is not accepted"),
    ],
)
def test_bad_options_are_refused(models, tmp_path, options, error, match):
    student, teacher = models
    with pytest.raises(error, match=match):
        make_trainer(student, teacher, tmp_path, **options)


@pytest.mark.parametrize(("divergence", "alpha"), [("forward_kl", 0.5), ("jsd", 0.8)])
def test_scaled_and_softcapped_heads_equal_the_naive_recipe_on_their_logits(tmp_path, divergence, alpha):
    """A Granite student (logits / 4) and a soft-capped Gemma 2 teacher (cap 3, which its largest logits
    reach): the loss is that of the models' own logits, each head's transform read from its config."""
    student = tiny_granite(VOCAB, 32, 0, logits_scaling=4.0, head_scale=30.0)
    teacher = tiny_gemma2(VOCAB, 48, 1, final_logit_softcapping=3.0, head_scale=8.0)
    options = {"divergence": divergence, "beta": 0.5, "temperature": 2.0, "alpha": alpha}
    trainer = make_trainer(student, teacher, tmp_path, **options)
    inputs = batch(seed=7)
    student.train()
    student.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(student, dict(inputs))
    loss.backward()
    fused_grads = grads(student)
    reference = naive_loss(student, teacher, inputs, **options)
    reference.backward()
    reference_grads = grads(student)
    torch.testing.assert_close(loss.detach(), reference.detach(), rtol=LOSS_RTOL, atol=0)
    assert fused_grads.keys() == reference_grads.keys() and len(fused_grads) > 0
    for name, ref in reference_grads.items():
        err, scale = (fused_grads[name] - ref).abs().max().item(), ref.abs().max().item()
        assert scale > 0 and err <= GRAD_RTOL * scale, (name, err, scale)


def test_other_head_multipliers_are_refused(models, tmp_path):
    _, teacher = models
    multiplied = tiny_qwen3(32, 0, head_scale=1.0)
    multiplied.config.lm_head_multiplier = 0.5
    with pytest.raises(ValueError, match="model: the model's logits use lm_head_multiplier=0.5"):
        make_trainer(multiplied, teacher, tmp_path)


@pytest.mark.slow
def test_the_example_runs():
    """examples/hf_trainer_kd.py end to end, shortened: it checks the fused loss against the naive one."""
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "hf_trainer_kd.py"),
            "--teacher-steps",
            "10",
            "--student-steps",
            "4",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "student, KDTrainer" in proc.stdout and "relative difference" in proc.stdout
