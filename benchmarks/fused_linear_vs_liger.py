"""fusedkd (torch backend) vs Liger-Kernel, TRL and the naive recipe: forward + backward time, peak memory.

    python benchmarks/fused_linear_vs_liger.py            # N=1024, V=151,936, H_s=256, H_t=512, fp32
    python benchmarks/fused_linear_vs_liger.py --tokens 256 --repeats 2
    python benchmarks/fused_linear_vs_liger.py --alpha 1  # KD only: adds TRL's chunked divergence

Every method runs on the same inputs (seeded), each in its own subprocess (benchmarks/_measure.py says
how the CPU peak is measured), with the student gradients (hidden states, lm_head weight) included:

- naive:   logits of both models, `nn.KLDivLoss(batchmean)` on log_softmax / softmax at T, times T^2,
           plus cross-entropy, as commonly written;
- liger:   `liger_kernel.chunked_loss.LigerFusedLinearJSDLoss(beta=0)` (forward KL), torch.compile'd,
           timed warm (after its compilation). Its soft term has no T^2 factor
           (alpha KL + (1 - alpha) CE), so its printed loss is lower; the work is the same;
- trl:     `trl.kernels.chunked_divergence.ChunkedDivergenceFunction(beta=0)` (forward KL at T, the
           loss of TRL's `DistillationTrainer`), mean over tokens, times T^2 so that its loss is
           fusedkd's. It has no cross-entropy term: it runs at `--alpha 1` only, and is skipped,
           saying why, otherwise. Its statistics are Triton kernels on CUDA / XPU; on a CPU its torch
           fallback runs (4,096 x 32,768 float32 tiles);
- fusedkd: `fusedkd.fused_linear_kd_loss(..., backend="torch")`.

The table reports the median time of `--repeats` warm calls, the ratio to Liger, the peak resident
memory growth of one warm call over the inputs, and the machine's 1-minute load average after each
method (times are only comparable on a quiet machine; memory does not depend on the load). The floor
is the float32 student weight gradient (V x H_s x 4 bytes), which every method must hold.
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

METHODS = ("naive", "liger", "trl", "fusedkd")


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

    elif method == "trl":
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

        if alpha != 1:
            raise ValueError(
                f"TRL's ChunkedDivergenceFunction has no cross-entropy term: needs alpha=1, got {alpha}"
            )

        def loss_fn():
            # Per-token KL(p_teacher || p_student) at T (beta=0), and the student entropy (unused).
            divergence, _ = ChunkedDivergenceFunction.apply(
                student_hidden, student_weight, None, teacher_hidden, teacher_weight, None, 0.0, T
            )
            return T * T * divergence.mean()

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


def trl_unavailable_reason(alpha: float) -> str | None:
    """Why TRL's ChunkedDivergenceFunction cannot run in this comparison, or None."""
    import importlib.util

    if importlib.util.find_spec("trl") is None:
        return 'trl is not installed (pip install -e ".[trl]")'
    if alpha != 1:
        return (
            "TRL's ChunkedDivergenceFunction has no cross-entropy term: "
            f"compared at --alpha 1 only (alpha={alpha})"
        )
    return None


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads or torch.get_num_threads())
    inputs = make_inputs(args)
    step = build_step(args.worker, args, inputs)
    seconds, samples = median_seconds(step, repeats=args.repeats, warmup=1)
    inputs[0].grad = inputs[1].grad = None
    peak = cpu_peak_growth_mib(step)
    loss = step().item()
    record = {"method": args.worker, "seconds": seconds, "samples": samples, "peak_mib": peak, "loss": loss}
    record["load_1min"] = os.getloadavg()[0]  # after the method's calls
    print(json.dumps(record))


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
    skipped = {}
    load_start = os.getloadavg()[0]
    for method in args.methods.split(","):
        if method == "trl":
            reason = trl_unavailable_reason(args.alpha)
            if reason:
                skipped[method] = reason
                print(f"skipping trl: {reason}", file=sys.stderr, flush=True)
                continue
        print(f"running {method} ...", file=sys.stderr, flush=True)
        results[method] = run_in_subprocess(__file__, [*forwarded, f"--worker={method}"], args.timeout)

    floor_mib = args.vocab * args.student_hidden * 4 / 2**20
    machine = machine_description()
    print(
        f"\nN={args.tokens} V={args.vocab} H_s={args.student_hidden} H_t={args.teacher_hidden} fp32 "
        f"T={args.temperature} alpha={args.alpha}; forward + backward, median of {args.repeats} warm calls"
    )
    print(f"machine: {machine}")
    print(f"1-minute load average: {load_start:.2f} at the start")
    print(f"floor (float32 student weight gradient): {floor_mib:.0f} MiB\n")
    liger_time = results.get("liger", {}).get("seconds")
    print(f"{'method':<10} {'time (s)':>9} {'vs liger':>9} {'peak (MiB)':>11} {'loss':>12} {'load':>6}")
    for method, r in results.items():
        if "error" in r:
            print(f"{method:<10} failed: {r['error']}")
            continue
        ratio = f"{r['seconds'] / liger_time:.2f}x" if liger_time else "n/a"
        print(
            f"{method:<10} {r['seconds']:>9.2f} {ratio:>9} {r['peak_mib']:>11.0f} {r['loss']:>12.5f} "
            f"{r['load_1min']:>6.2f}"
        )
    for method, reason in skipped.items():
        print(f"{method:<10} skipped: {reason}")
    if "liger" in results:
        print("(liger's loss omits the T^2 factor of the distillation term: alpha KL + (1 - alpha) CE)")
    if "trl" in results:
        print("(trl: ChunkedDivergenceFunction's mean KL times T^2, no cross-entropy term; alpha = 1)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "args": vars(args),
                    "machine": machine,
                    "floor_mib": floor_mib,
                    "load_start": load_start,
                    "results": results,
                    "skipped": skipped,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
