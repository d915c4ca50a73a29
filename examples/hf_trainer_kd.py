"""Distill a teacher into a smaller student with a plain Hugging Face Trainer and fusedkd's loss.

    pip install -e ".[train]" accelerate
    python examples/hf_trainer_kd.py

Offline, on a CPU, in well under two minutes: everything is built here. The data are sequences of
a random Markov chain over a 512-token vocabulary (each token has a few likely successors), so the
best possible cross-entropy is known: the chain's entropy rate. A Qwen3-config teacher learns the
chain from hard labels with `transformers.Trainer`; then two students of a quarter of its width get
the same budget, one trained on hard labels (`transformers.Trainer`), one distilled from the frozen
teacher with `fusedkd.integrations.hf.KDTrainer`, whose loss reads both models' hidden states and
lm_head weights and never builds their logits. The script prints held-out cross-entropies and the
students' KL to the teacher, and checks on one batch that the fused loss equals the naive recipe on
the models' logits.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from transformers import Qwen3Config, Qwen3ForCausalLM, Trainer, TrainingArguments

from fusedkd.integrations.hf import KDTrainer

VOCAB, LENGTH = 512, 32


class MarkovChain:
    """A random first-order chain: each token moves to one of `fanout` successors, Zipf-weighted."""

    def __init__(self, seed: int, fanout: int = 6):
        generator = torch.Generator().manual_seed(seed)
        self.successors = torch.stack(
            [torch.randperm(VOCAB, generator=generator)[:fanout] for _ in range(VOCAB)]
        )
        weights = 1.0 / torch.arange(1, fanout + 1, dtype=torch.float64)
        self.probs = weights / weights.sum()
        # Every row has the same successor weights, so the entropy rate is their entropy.
        self.entropy = float(-(self.probs * self.probs.log()).sum())

    def sample(self, n: int, seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        tokens = torch.empty(n, LENGTH, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, VOCAB, (n,), generator=generator)
        for i in range(1, LENGTH):
            choice = torch.multinomial(self.probs.float().expand(n, -1), 1, generator=generator).squeeze(1)
            tokens[:, i] = self.successors[tokens[:, i - 1], choice]
        return tokens


class Sequences(Dataset):
    def __init__(self, tokens: torch.Tensor):
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict:
        ids = self.tokens[i]
        labels = ids.clone()
        labels[: LENGTH // 4] = -100  # a "prompt" that does not count, as in instruction data
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def qwen3(hidden: int, layers: int, seed: int) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=LENGTH,
        tie_word_embeddings=False,
    )
    return Qwen3ForCausalLM(config)


def arguments(out: str, steps: int, lr: float) -> TrainingArguments:
    return TrainingArguments(
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,  # KDTrainer normalizes by the accumulated batch's token count
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 10),
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=max(1, steps // 4),
        disable_tqdm=True,
    )


@torch.no_grad()
def evaluate(model, teacher, tokens: torch.Tensor) -> tuple[float, float]:
    """Held-out cross-entropy (nats per token) and KL(teacher || model), over the counted tokens."""
    model.eval()
    ids = tokens[:, :-1]
    logits = model(input_ids=ids).logits[:, LENGTH // 4 - 1 :]
    targets = tokens[:, LENGTH // 4 :]
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten()).item()
    if teacher is None:
        return ce, float("nan")
    teacher_logp = teacher(input_ids=ids).logits[:, LENGTH // 4 - 1 :].log_softmax(-1)
    kl = (teacher_logp.exp() * (teacher_logp - logits.log_softmax(-1))).sum(-1).mean().item()
    return ce, kl


def naive_kd_loss(student, teacher, batch, temperature: float, alpha: float) -> torch.Tensor:
    """The usual recipe on the logits: alpha T^2 KL(p_t || p_s) + (1 - alpha) CE, mean over valid tokens."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"][:, 1:]
    s = student(input_ids=ids, attention_mask=mask).logits[:, :-1]
    with torch.no_grad():
        t = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1]
    valid = labels != -100
    log_q, log_p = (s / temperature).log_softmax(-1), (t / temperature).log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    ce = F.cross_entropy(s.flatten(0, 1), labels.flatten(), reduction="none").view_as(kl)
    return ((alpha * temperature**2 * kl + (1 - alpha) * ce) * valid).sum() / valid.sum()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-steps", type=int, default=80)
    parser.add_argument("--student-steps", type=int, default=40)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--alpha", type=float, default=0.7)
    args = parser.parse_args()
    start = time.perf_counter()
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    chain = MarkovChain(seed=0)
    train, held_out = Sequences(chain.sample(1024, seed=1)), chain.sample(256, seed=2)

    with tempfile.TemporaryDirectory() as out:
        teacher = qwen3(hidden=64, layers=2, seed=0)
        Trainer(model=teacher, args=arguments(out, args.teacher_steps, 1e-2), train_dataset=train).train()
        teacher.eval()

        baseline = qwen3(hidden=32, layers=1, seed=1)
        Trainer(model=baseline, args=arguments(out, args.student_steps, 1e-2), train_dataset=train).train()

        student = qwen3(hidden=32, layers=1, seed=1)  # the baseline's initialization
        kd = KDTrainer(
            model=student,
            teacher_model=teacher,
            args=arguments(out, args.student_steps, 1e-2),
            train_dataset=train,
            temperature=args.temperature,
            alpha=args.alpha,
            divergence="forward_kl",
        )
        # The fused loss on one batch equals the naive recipe on the logits, gradients included.
        batch = {
            k: torch.stack([train[i][k] for i in range(8)]) for k in ("input_ids", "attention_mask", "labels")
        }
        student.train()
        fused = kd.compute_loss(student, dict(batch))
        grad_fused = torch.autograd.grad(fused, student.lm_head.weight)[0]
        naive = naive_kd_loss(student, teacher, batch, args.temperature, args.alpha)
        grad_naive = torch.autograd.grad(naive, student.lm_head.weight)[0]
        loss_diff = abs(fused.item() - naive.item()) / naive.item()
        grad_diff = ((grad_fused - grad_naive).abs().max() / grad_naive.abs().max()).item()
        kd.train()

    rows = [
        ("teacher (64 wide, 2 layers)", *evaluate(teacher, None, held_out)),
        ("student, hard labels (32 wide, 1 layer)", *evaluate(baseline, teacher, held_out)),
        (
            f"student, KDTrainer (T={args.temperature}, alpha={args.alpha})",
            *evaluate(student, teacher, held_out),
        ),
    ]
    print(
        f"\nheld-out, {held_out.numel() * 3 // 4:,} tokens; "
        f"the chain's entropy rate is {chain.entropy:.4f} nats"
    )
    print("| model | cross-entropy | perplexity | KL(teacher || model) |\n|---|--:|--:|--:|")
    for name, ce, kl in rows:
        kl_text = "" if math.isnan(kl) else f"{kl:.4f}"
        print(f"| {name} | {ce:.4f} | {math.exp(ce):.3f} | {kl_text} |")
    print(
        f"\none batch: fused loss {fused.item():.6f}, naive loss on the logits {naive.item():.6f} "
        f"(relative difference {loss_diff:.1e}); "
        f"lm_head gradient max difference {grad_diff:.1e} of its largest entry"
    )
    print(f"total time {time.perf_counter() - start:.0f} s")
    if not (loss_diff < 1e-5 and grad_diff < 1e-4):
        raise SystemExit("the fused loss differs from the naive recipe")


if __name__ == "__main__":
    main()
