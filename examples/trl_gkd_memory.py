"""Peak memory of one GKD training step: TRL's GKDTrainer against fusedkd's FusedGKDTrainer.

    pip install -e ".[trl]"
    python examples/trl_gkd_memory.py                       # V = 151,936 (Qwen3), 2 x 256 tokens
    python examples/trl_gkd_memory.py --vocab 32768 --batch 4 --length 128

Offline: tiny Qwen3-config student (hidden 64) and teacher (hidden 128) with the given vocabulary
are built here. Each trainer runs in its own process: one warm-up `training_step` (forward and
backward of the loss, no optimizer step; lmbda = 0, so the batch is the collated one), then a
second step is measured: the peak growth of the process's resident set over the resident set just
before the step (Linux: VmHWM reset through /proc/self/clear_refs, glibc told to return freed large
buffers to the OS, so the resident set follows live memory). Both steps see the same batch, so the
two losses are also compared. On a CUDA machine, `--device cuda` measures
`torch.cuda.max_memory_allocated()` instead.
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
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from fusedkd.integrations.trl import FusedGKDTrainer

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
    cls = GKDTrainer if args.worker == "trl" else FusedGKDTrainer
    config = GKDConfig(
        output_dir=os.path.join(args.scratch, args.worker),
        report_to="none",
        use_cpu=args.device == "cpu",
        bf16=False,  # float32 on both sides (TRL defaults to bf16 autocast)
        beta=args.beta,
        lmbda=0.0,
        save_strategy="no",
    )
    trainer = cls(
        model=student,
        teacher_model=teacher,
        args=config,
        data_collator=lambda examples: examples,
        train_dataset=Dataset.from_dict({"prompt": ["unused"]}),
        processing_class=tokenizer,
    )
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, args.vocab, (args.batch, args.length), generator=generator)
    labels = input_ids.clone()
    labels[:, : args.length // 4] = -100  # the prompt
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    batch = {k: v.to(args.device) for k, v in batch.items()}
    num_items = (labels[:, 1:] != -100).sum().to(args.device)
    trainer.model.train()
    losses = []

    def step():
        losses.append(trainer.training_step(trainer.model, dict(batch), num_items).float().item())

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
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--worker", choices=["trl", "fusedkd"], help=argparse.SUPPRESS)
    parser.add_argument(
        "--scratch", default=os.path.join("/tmp", "fusedkd_trl_gkd_memory"), help=argparse.SUPPRESS
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
    logits_mib = tokens * args.vocab * 4 / 2**20
    trl_loss, fused_loss = results["trl"]["loss"], results["fusedkd"]["loss"]
    results["loss_rel_diff"] = abs(fused_loss - trl_loss) / abs(trl_loss)
    results["config"] = {k: getattr(args, k) for k in ("vocab", "batch", "length", "beta", "device")}
    print(
        f"one GKD training step, V = {args.vocab:,}, {args.batch} x {args.length} tokens, "
        f"beta = {args.beta}, {args.device} (one [tokens x V] float32 tensor: {logits_mib:,.0f} MiB)"
    )
    print("| trainer | peak MiB | seconds | loss |\n|---|--:|--:|--:|")
    for method, name in (("trl", "trl GKDTrainer"), ("fusedkd", "fusedkd FusedGKDTrainer")):
        r = results[method]
        print(f"| {name} | {r['peak_mib']:,.1f} | {r['seconds']:.3f} | {r['loss']:.7g} |")
    print(f"loss relative difference: {results['loss_rel_diff']:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
