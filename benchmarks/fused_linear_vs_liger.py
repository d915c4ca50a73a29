"""fusedkd (torch backend) vs Liger-Kernel vs the naive recipe: forward + backward time and peak memory.

    python benchmarks/fused_linear_vs_liger.py            # N=1024, V=151,936, H_s=256, H_t=512, fp32
    python benchmarks/fused_linear_vs_liger.py --tokens 256 --repeats 2

Every method runs on the same inputs (seeded), each in its own subprocess (benchmarks/_measure.py says
how the CPU peak is measured), with the student gradients (hidden states, lm_head weight) included:

- naive:   logits of both models, `nn.KLDivLoss(batchmean)` on log_softmax / softmax at T, times T^2,
           plus cross-entropy, as commonly written;
- liger:   `liger_kernel.chunked_loss.LigerFusedLinearJSDLoss(beta=0)` (forward KL), torch.compile'd,
           timed warm (after its compilation). Its soft term has no T^2 factor
           (alpha KL + (1 - alpha) CE), so its printed loss is lower; the work is the same;
- fusedkd: `fusedkd.fused_linear_kd_loss(..., backend="torch")`.

The table reports the median time of `--repeats` warm calls, the ratio to Liger, and the peak resident
memory growth of one warm call over the inputs. The floor is the float32 student weight gradient
(V x H_s x 4 bytes), which every method must hold.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _measure import (  # noqa: E402
    cpu_peak_growth_mib,
    machine_description,
    median_seconds,
    run_in_subprocess,
)

METHODS = ("naive", "liger", "fusedkd")


def make_inputs(args):
    import torch

    torch.manual_seed(0)
    n, v, hs, ht = args.tokens, args.vocab, args.student_hidden, args.teacher_hidden
    student_hidden = (torch.randn(n, hs) / hs**0.5).requires_grad_()
    student_weight = torch.randn(v, hs).requires_grad_()
    teacher_hidden = torch.randn(n, ht) / ht**0.5
    teacher_weight = torch.randn(v, ht)
    labels = torch.randint(0, v, (n,))
    return student_hidden, student_weight, teacher_hidden, teacher_weight, labels


def build_step(method, args, inputs):
    import torch
    import torch.nn.functional as F

    student_hidden, student_weight, teacher_hidden, teacher_weight, labels = inputs
    T, alpha = args.temperature, args.alpha

    if method == "naive":
        kl = torch.nn.KLDivLoss(reduction="batchmean")

        def loss_fn():
            student_logits = student_hidden @ student_weight.T
            with torch.no_grad():
                teacher_logits = teacher_hidden @ teacher_weight.T
            distill = kl(F.log_softmax(student_logits / T, dim=-1), F.softmax(teacher_logits / T, dim=-1))
            ce = F.cross_entropy(student_logits, labels)
            return alpha * T * T * distill + (1 - alpha) * ce

    elif method == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        criterion = LigerFusedLinearJSDLoss(
            weight_hard_loss=1 - alpha, weight_soft_loss=alpha, beta=0.0, temperature=T, compiled=True
        )

        def loss_fn():
            return criterion(student_hidden, student_weight, teacher_hidden, teacher_weight, labels)

    elif method == "fusedkd":
        import fusedkd

        def loss_fn():
            return fusedkd.fused_linear_kd_loss(
                student_hidden,
                student_weight,
                teacher_hidden,
                teacher_weight,
                labels,
                temperature=T,
                alpha=alpha,
                backend="torch",
            )

    else:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")

    def step():
        student_hidden.grad = None
        student_weight.grad = None
        loss = loss_fn()
        loss.backward()
        return loss

    return step


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads or torch.get_num_threads())
    inputs = make_inputs(args)
    step = build_step(args.worker, args, inputs)
    seconds, samples = median_seconds(step, repeats=args.repeats, warmup=1)
    inputs[0].grad = inputs[1].grad = None
    peak = cpu_peak_growth_mib(step)
    loss = step().item()
    print(
        json.dumps(
            {"method": args.worker, "seconds": seconds, "samples": samples, "peak_mib": peak, "loss": loss}
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--student-hidden", type=int, default=256)
    parser.add_argument("--teacher-hidden", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=5.0)
    parser.add_argument("--alpha", type=float, default=0.7)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS)
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per method")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    forwarded = [
        f"--tokens={args.tokens}",
        f"--vocab={args.vocab}",
        f"--student-hidden={args.student_hidden}",
        f"--teacher-hidden={args.teacher_hidden}",
        f"--temperature={args.temperature}",
        f"--alpha={args.alpha}",
        f"--repeats={args.repeats}",
        f"--threads={args.threads}",
    ]
    results = {}
    for method in args.methods.split(","):
        print(f"running {method} ...", file=sys.stderr, flush=True)
        results[method] = run_in_subprocess(__file__, [*forwarded, f"--worker={method}"], args.timeout)

    floor_mib = args.vocab * args.student_hidden * 4 / 2**20
    machine = machine_description()
    print(
        f"\nN={args.tokens} V={args.vocab} H_s={args.student_hidden} H_t={args.teacher_hidden} fp32 "
        f"T={args.temperature} alpha={args.alpha}; forward + backward, median of {args.repeats} warm calls"
    )
    print(f"machine: {machine}")
    print(f"floor (float32 student weight gradient): {floor_mib:.0f} MiB\n")
    liger_time = results.get("liger", {}).get("seconds")
    print(f"{'method':<10} {'time (s)':>9} {'vs liger':>9} {'peak (MiB)':>11} {'loss':>12}")
    for method, r in results.items():
        if "error" in r:
            print(f"{method:<10} failed: {r['error']}")
            continue
        ratio = f"{r['seconds'] / liger_time:.2f}x" if liger_time else "n/a"
        print(f"{method:<10} {r['seconds']:>9.2f} {ratio:>9} {r['peak_mib']:>11.0f} {r['loss']:>12.5f}")
    if "liger" in results:
        print("(liger's loss omits the T^2 factor of the distillation term: alpha KL + (1 - alpha) CE)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"args": vars(args), "machine": machine, "floor_mib": floor_mib, "results": results},
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
