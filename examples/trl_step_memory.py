"""Peak memory of one training step: TRL's trainers against fusedkd's (`fusedkd.integrations.trl`).

    pip install -e ".[trl]"
    python examples/trl_step_memory.py                       # GKD, V = 151,936 (Qwen3), 2 x 256 tokens
    python examples/trl_step_memory.py --vocab 32768 --batch 4 --length 128
    python examples/trl_step_memory.py --trainer distillation

Offline: tiny Qwen3-config student (hidden 64) and teacher (hidden 128) with the given vocabulary
are built here. Each trainer runs in its own process: one warm-up step, then a second step is
measured: the peak growth of the process's resident set over the resident set just before the step
(Linux: VmHWM reset through /proc/self/clear_refs, glibc told to return freed large buffers to the
OS, so the resident set follows live memory). On a CUDA machine, `--device cuda` measures
`torch.cuda.max_memory_allocated()` instead. Both trainers see the same batch, so their losses are
also compared.

- `--trainer gkd` (default): `GKDTrainer` vs `FusedGKDTrainer`, one `training_step` (forward and
  backward, no optimizer step; lmbda = 0, so the batch is the collated one; the first quarter of
  each sequence is a prompt, -100 in the labels).
- `--trainer distillation`: `DistillationTrainer` vs `FusedDistillationTrainer`, the loss's forward
  and backward (`compute_loss`, then `backward`) on a prompt / completion batch (the completion is
  three quarters of the length), generation excluded: a step without its on-policy generation.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_growth_mib(fn, device: str) -> float:
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) / 1024


def worker(args) -> dict:
    import torch

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM
    from trl import DistillationConfig, DistillationTrainer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from fusedkd.integrations.trl import FusedDistillationTrainer, FusedGKDTrainer

    def model(hidden: int, seed: int):
        torch.manual_seed(seed)
        config = Qwen3Config(
            vocab_size=args.vocab,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=hidden // 4,
            max_position_embeddings=args.length,
            tie_word_embeddings=False,
            pad_token_id=0,
            eos_token_id=1,
        )
        return Qwen3ForCausalLM(config).float().to(args.device)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, "<unk>": 2}, unk_token="<unk>")),
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
    )
    student, teacher = model(64, 0), model(128, 1)
    common = dict(
        output_dir=os.path.join(args.scratch, args.worker),
        report_to="none",
        use_cpu=args.device == "cpu",
        bf16=False,  # float32 on both sides (TRL defaults to bf16 autocast)
        beta=args.beta,
        save_strategy="no",
    )
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, args.vocab, (args.batch, args.length), generator=generator).to(args.device)
    prompt_length = args.length // 4
    losses = []
    if args.trainer == "gkd":
        cls = GKDTrainer if args.worker == "trl" else FusedGKDTrainer
        trainer = cls(
            model=student,
            teacher_model=teacher,
            args=GKDConfig(lmbda=0.0, **common),
            data_collator=lambda examples: examples,
            train_dataset=Dataset.from_dict({"prompt": ["unused"]}),
            processing_class=tokenizer,
        )
        labels = input_ids.clone()
        labels[:, :prompt_length] = -100
        batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
        num_items = (labels[:, 1:] != -100).sum()

        def step():
            losses.append(trainer.training_step(trainer.model, dict(batch), num_items).float().item())

    else:
        cls = DistillationTrainer if args.worker == "trl" else FusedDistillationTrainer
        trainer = cls(
            model=student,
            teacher_model=teacher,
            args=DistillationConfig(temperature=1.0, **common),
            train_dataset=Dataset.from_dict({"prompt": ["unused"]}),
            processing_class=tokenizer,
        )
        prompt, completion = input_ids[:, :prompt_length], input_ids[:, prompt_length:]
        batch = {
            "prompt_ids": prompt,
            "prompt_mask": torch.ones_like(prompt),
            "completion_ids": completion,
            "completion_mask": torch.ones_like(completion),
        }

        def step():
            trainer.model.zero_grad(set_to_none=True)
            loss = trainer.compute_loss(trainer.model, dict(batch))
            loss.backward()
            losses.append(loss.float().item())

    trainer.model.train()

    step()  # warm-up: first-call allocations (thread pools, autograd graph caches)
    trainer.model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    peak = _peak_growth_mib(step, args.device)
    seconds = time.perf_counter() - start
    return {
        "method": args.worker,
        "peak_mib": round(peak, 1),
        "seconds": round(seconds, 3),
        "loss": losses[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainer", default="gkd", choices=["gkd", "distillation"])
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--worker", choices=["trl", "fusedkd"], help=argparse.SUPPRESS)
    parser.add_argument(
        "--scratch", default=os.path.join("/tmp", "fusedkd_trl_step_memory"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return
    results = {}
    for method in ("trl", "fusedkd"):
        proc = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--worker", method],
            capture_output=True,
            text=True,
            env={**os.environ, **MALLOC_ENV},
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            sys.exit(f"{method} worker failed (exit code {proc.returncode}):\n{proc.stderr[-3000:]}")
        results[method] = json.loads(lines[-1])
    tokens = args.batch * args.length
    what = (
        "one GKD training step"
        if args.trainer == "gkd"
        else "one DistillationTrainer loss forward + backward"
    )
    logits_mib = tokens * args.vocab * 4 / 2**20
    trl_loss, fused_loss = results["trl"]["loss"], results["fusedkd"]["loss"]
    results["loss_rel_diff"] = abs(fused_loss - trl_loss) / abs(trl_loss)
    results["config"] = {
        k: getattr(args, k) for k in ("trainer", "vocab", "batch", "length", "beta", "device")
    }
    print(
        f"{what}, V = {args.vocab:,}, {args.batch} x {args.length} tokens, "
        f"beta = {args.beta}, {args.device} (one [tokens x V] float32 tensor: {logits_mib:,.0f} MiB)"
    )
    print("| trainer | peak MiB | seconds | loss |\n|---|--:|--:|--:|")
    names = (
        ("GKDTrainer", "FusedGKDTrainer")
        if args.trainer == "gkd"
        else ("DistillationTrainer", "FusedDistillationTrainer")
    )
    for method, name in zip(("trl", "fusedkd"), (f"trl {names[0]}", f"fusedkd {names[1]}")):
        r = results[method]
        print(f"| {name} | {r['peak_mib']:,.1f} | {r['seconds']:.3f} | {r['loss']:.7g} |")
    print(f"loss relative difference: {results['loss_rel_diff']:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
