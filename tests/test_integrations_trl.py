"""fusedkd as the loss of TRL's DistillationTrainer and GKDTrainer: same loss and student gradients as
TRL's own, on tiny Qwen3 models built here (no Hub), and a working training run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl", reason="the trl extra is not installed (pip install -e '.[trl]')")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from _helpers import tiny_gemma2, tiny_granite  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM  # noqa: E402
from trl import DistillationConfig, DistillationTrainer  # noqa: E402
from trl.experimental.gkd import GKDConfig, GKDTrainer  # noqa: E402

from fusedkd.integrations.trl import FusedDistillationTrainer, FusedGKDTrainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 301  # odd, not a multiple of any tile size
PAD, EOS, BOS = 0, 1, 2
# float32 losses and gradients of the same computation in a different order (vocabulary chunks,
# online log-sum-exp): a few float32 ulps on the loss, relative to each gradient's largest entry.
LOSS_RTOL, GRAD_RTOL = 2e-5, 1e-4


def tiny_qwen3(hidden: int, seed: int, head_scale: float) -> Qwen3ForCausalLM:
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
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=BOS,
    )
    model = Qwen3ForCausalLM(config).float()
    with torch.no_grad():  # a larger head makes peaked distributions; the default init is near uniform
        model.lm_head.weight.mul_(head_scale)
    return model


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": PAD, "<eos>": EOS, "<bos>": BOS, "<unk>": 3, **{f"w{i}": i for i in range(4, VOCAB)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        padding_side="left",
    )


def prompts_dataset(n: int) -> Dataset:
    return Dataset.from_dict(
        {
            "prompt": [
                " ".join(f"w{(7 * i + 3 * j) % (VOCAB - 4) + 4}" for j in range(3 + i % 4)) for i in range(n)
            ]
        }
    )


@pytest.fixture(scope="module")
def models_and_tokenizer():
    # Peaked student, flatter teacher: both regimes in every batch's tokens.
    return tiny_qwen3(32, 0, head_scale=30.0), tiny_qwen3(48, 1, head_scale=8.0), tiny_tokenizer()


def student_grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def loss_and_grads(trainer, inputs, num_items_in_batch=None):
    model = trainer.model
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
    loss.backward()
    grads = student_grads(model)
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def assert_same(loss, grads, loss_ref, grads_ref):
    assert loss.dtype == loss_ref.dtype == torch.float32
    torch.testing.assert_close(loss, loss_ref, rtol=LOSS_RTOL, atol=0)
    assert grads.keys() == grads_ref.keys() and len(grads) > 0
    for name, ref in grads_ref.items():
        scale = ref.abs().max().item()
        assert scale > 0, name
        err = (grads[name] - ref).abs().max().item()
        assert err <= GRAD_RTOL * scale, (name, err, scale)


def distillation_batch(generator: torch.Generator) -> dict:
    """What DistillationTrainer's generation hands the loss: left-padded prompts, right-padded
    completions, a completion mask that ends after the EOS, and a tool mask."""
    batch, prompt_len, completion_len = 3, 5, 7
    prompt_ids = torch.randint(4, VOCAB, (batch, prompt_len), generator=generator)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_ids[0, :2], prompt_mask[0, :2] = PAD, 0
    completion_ids = torch.randint(4, VOCAB, (batch, completion_len), generator=generator)
    completion_mask = torch.ones_like(completion_ids)
    completion_ids[1, 3] = EOS
    completion_ids[1, 4:], completion_mask[1, 4:] = PAD, 0
    tool_mask = torch.ones_like(completion_ids)
    tool_mask[2, 2:4] = 0
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "tool_mask": tool_mask,
    }


def distillation_trainers(models_and_tokenizer, tmp_path, beta, temperature):
    student, teacher, tokenizer = models_and_tokenizer
    trainers = []
    for cls in (DistillationTrainer, FusedDistillationTrainer):
        args = DistillationConfig(
            output_dir=str(tmp_path / cls.__name__),
            report_to="none",
            use_cpu=True,
            bf16=False,  # TRL turns on bf16 autocast by default, on CPUs too
            beta=beta,
            temperature=temperature,
            per_device_train_batch_size=3,
            max_completion_length=7,
            save_strategy="no",
        )
        trainers.append(
            cls(
                model=student,
                teacher_model=teacher,
                args=args,
                train_dataset=prompts_dataset(6),
                processing_class=tokenizer,
            )
        )
    return trainers


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_distillation_trainer_loss_and_gradients_equal_trls(
    models_and_tokenizer, tmp_path, beta, temperature
):
    trl_trainer, fused_trainer = distillation_trainers(models_and_tokenizer, tmp_path, beta, temperature)
    generator = torch.Generator().manual_seed(int(10 * beta + temperature))
    batch = distillation_batch(generator)
    # Without num_items_in_batch: mean over the loss tokens; with it (on-policy count): sum / count.
    for extra in ({}, {"num_items_in_batch": torch.tensor(23.0)}):
        inputs = {**batch, **extra}
        loss_ref, grads_ref = loss_and_grads(trl_trainer, dict(inputs))
        loss, grads = loss_and_grads(fused_trainer, dict(inputs))
        assert loss_ref > 0
        assert_same(loss, grads, loss_ref, grads_ref)


def gkd_batch(generator: torch.Generator) -> dict:
    """What GKD's collator (or its on-policy generation) hands the loss: padded sequences whose
    labels are -100 on prompt and padding tokens."""
    batch, length = 3, 11
    input_ids = torch.randint(4, VOCAB, (batch, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    input_ids[0, 8:], attention_mask[0, 8:] = PAD, 0
    labels = input_ids.clone()
    labels[attention_mask == 0] = -100
    labels[0, :3], labels[1, :5], labels[2, :4] = -100, -100, -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def gkd_trainers(models_and_tokenizer, tmp_path, beta, lmbda=0.0, **config):
    student, teacher, tokenizer = models_and_tokenizer
    trainers = []
    for cls in (GKDTrainer, FusedGKDTrainer):
        args = GKDConfig(
            output_dir=str(tmp_path / cls.__name__),
            report_to="none",
            use_cpu=True,
            bf16=False,  # TRL turns on bf16 autocast by default, on CPUs too
            beta=beta,
            lmbda=lmbda,
            temperature=0.9,
            save_strategy="no",
            **config,
        )
        trainers.append(
            cls(
                model=student,
                teacher_model=teacher,
                args=args,
                data_collator=prompt_completion_collator(tokenizer),
                train_dataset=prompts_dataset(6),
                processing_class=tokenizer,
            )
        )
    return trainers


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gkd_trainer_loss_and_gradients_equal_trls(models_and_tokenizer, tmp_path, beta):
    trl_trainer, fused_trainer = gkd_trainers(models_and_tokenizer, tmp_path, beta)
    batch = gkd_batch(torch.Generator().manual_seed(int(10 * beta)))
    for num_items_in_batch in (None, torch.tensor(19)):
        loss_ref, grads_ref = loss_and_grads(trl_trainer, dict(batch), num_items_in_batch)
        loss, grads = loss_and_grads(fused_trainer, dict(batch), num_items_in_batch)
        assert loss_ref > 0
        assert_same(loss, grads, loss_ref, grads_ref)


def test_gkd_trainer_no_loss_token_gives_zero(models_and_tokenizer, tmp_path):
    _, fused_trainer = gkd_trainers(models_and_tokenizer, tmp_path, 0.5)
    batch = gkd_batch(torch.Generator().manual_seed(3))
    batch["labels"].fill_(-100)
    loss, grads = loss_and_grads(fused_trainer, batch)
    assert loss.item() == 0.0 and all(torch.all(g == 0) for g in grads.values())


def prompt_completion_collator(tokenizer):
    """Pads token id lists: prompts left-padded (for generation), full sequences right-padded, labels
    -100 on prompt and padding. Stands in for GKD's chat-template collator."""

    def collate(examples):
        prompts = [tokenizer(e["prompt"])["input_ids"] for e in examples]
        completions = [[(p * 5 + i) % (VOCAB - 4) + 4 for i in range(4)] + [EOS] for p in range(len(prompts))]
        prompt_len = max(map(len, prompts))
        length = max(len(p) + len(c) for p, c in zip(prompts, completions))
        out = {
            k: torch.full((len(prompts), n), v)
            for k, n, v in [
                ("prompts", prompt_len, PAD),
                ("prompt_attention_mask", prompt_len, 0),
                ("input_ids", length, PAD),
                ("attention_mask", length, 0),
                ("labels", length, -100),
            ]
        }
        for row, (p, c) in enumerate(zip(prompts, completions)):
            out["prompts"][row, prompt_len - len(p) :] = torch.tensor(p)
            out["prompt_attention_mask"][row, prompt_len - len(p) :] = 1
            seq = torch.tensor(p + c)
            out["input_ids"][row, : len(seq)] = seq
            out["attention_mask"][row, : len(seq)] = 1
            out["labels"][row, len(p) : len(seq)] = torch.tensor(c)
        return out

    return collate


def test_fused_trainers_train_on_policy(models_and_tokenizer, tmp_path):
    """A short run of each trainer with on-policy generation: finite losses, the student moves."""
    student, teacher, tokenizer = models_and_tokenizer
    before = student.lm_head.weight.detach().clone()
    args = DistillationConfig(
        output_dir=str(tmp_path / "distill"),
        report_to="none",
        use_cpu=True,
        bf16=False,
        max_steps=2,
        per_device_train_batch_size=2,
        max_completion_length=5,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
    )
    trainer = FusedDistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=prompts_dataset(8),
        processing_class=tokenizer,
    )
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 2 and all(0 < loss < float("inf") for loss in losses)
    assert not any("entropy" in log for log in trainer.state.log_history)
    _, gkd = gkd_trainers(
        models_and_tokenizer,
        tmp_path,
        0.5,
        lmbda=1.0,  # every step generates from the student
        max_steps=2,
        per_device_train_batch_size=2,
        max_new_tokens=4,
        learning_rate=1e-2,
        logging_steps=1,
    )
    gkd.train()
    losses = [log["loss"] for log in gkd.state.log_history if "loss" in log]
    assert len(losses) == 2 and all(0 < loss < float("inf") for loss in losses)
    assert not torch.equal(before, student.lm_head.weight.detach())
    metrics = gkd.evaluate(prompts_dataset(2))
    assert 0 < metrics["eval_loss"] < float("inf")


@pytest.fixture(scope="module")
def transformed_heads_and_tokenizer():
    """A Granite student (logits = W h / 4) and a soft-capped Gemma 2 teacher (cap 3, reached by its
    largest logits): heads whose logits are not W h."""
    tokens = dict(pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS)
    student = tiny_granite(VOCAB, 32, 0, logits_scaling=4.0, head_scale=30.0, **tokens)
    teacher = tiny_gemma2(VOCAB, 48, 1, final_logit_softcapping=3.0, head_scale=8.0, **tokens)
    return student, teacher, tiny_tokenizer()


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_scaled_and_softcapped_heads_equal_trls_loss(transformed_heads_and_tokenizer, tmp_path, beta):
    """TRL's losses use the models' own (scaled, capped) logits; the fused ones read each head's
    transform from its config and match them."""
    batch = distillation_batch(torch.Generator().manual_seed(3))
    trl_trainer, fused_trainer = distillation_trainers(transformed_heads_and_tokenizer, tmp_path, beta, 2.0)
    assert_same(*loss_and_grads(fused_trainer, dict(batch)), *loss_and_grads(trl_trainer, dict(batch)))
    trl_trainer, fused_trainer = gkd_trainers(transformed_heads_and_tokenizer, tmp_path / "gkd", beta)
    batch = gkd_batch(torch.Generator().manual_seed(4))
    assert_same(*loss_and_grads(fused_trainer, dict(batch)), *loss_and_grads(trl_trainer, dict(batch)))


@pytest.mark.parametrize(("attribute", "value"), [("output_multiplier", 2.0), ("lm_head_multiplier", 0.5)])
def test_other_head_multipliers_are_refused(models_and_tokenizer, tmp_path, attribute, value):
    student, teacher, tokenizer = models_and_tokenizer
    multiplied = tiny_qwen3(48, 1, head_scale=1.0)
    setattr(multiplied.config, attribute, value)
    args = DistillationConfig(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, save_strategy="no"
    )
    with pytest.raises(ValueError, match=f"the teacher model: the model's logits use {attribute}={value}"):
        FusedDistillationTrainer(
            model=student,
            teacher_model=multiplied,
            args=args,
            train_dataset=prompts_dataset(2),
            processing_class=tokenizer,
        )


@pytest.mark.slow
def test_one_gkd_step_takes_less_memory_than_trls(tmp_path):
    """examples/trl_step_memory.py at V = 32,768: each trainer's training step in its own process."""
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "trl_step_memory.py"),
            "--vocab",
            "32768",
            "--batch",
            "2",
            "--length",
            "64",
            "--json",
            str(tmp_path / "memory.json"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    result = json.loads((tmp_path / "memory.json").read_text())
    trl_mib, fused_mib = result["trl"]["peak_mib"], result["fusedkd"]["peak_mib"]
    # TRL's GKD loss holds several [tokens x V] float32 tensors; 2 x 64 tokens x 32,768 x 4 B = 32 MiB each.
    assert fused_mib < trl_mib, result
    assert result["loss_rel_diff"] < LOSS_RTOL, result
