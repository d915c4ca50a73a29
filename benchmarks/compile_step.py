"""Eager against `torch.compile`: the time of a training step with a fusedkd loss inside.

    python benchmarks/compile_step.py                         # torch backend, CPU
    python benchmarks/compile_step.py --backend triton        # Triton kernels (CPU: the interpreter)
    python benchmarks/compile_step.py --json                  # one JSON object per line

The step: a student layer (Linear + tanh) on [tokens, H_s] inputs, `fused_linear_kd_loss` against a
fixed teacher, backward. It runs eagerly and compiled (`torch.compile(step, fullgraph=True)`, inductor
by default), alternating (and which of the two goes first alternates too), after warm-ups; each
reports the median of `--repeats` steps and the first compiled call (the compile time) apart. Inside
the compiled step the loss is one opaque op (`fusedkd._compile`), so the two should take the same
time: the ratio compiled / eager is the number this prints. On a CPU the Triton backend runs in
Triton's interpreter (TRITON_INTERPRET=1, set here when no GPU is present): its absolute times mean
nothing, the ratio still does.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import time

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import fusedkd  # noqa: E402


def make_step(args, device):
    torch.manual_seed(0)
    layer = torch.nn.Linear(args.student_hidden, args.student_hidden).to(device)
    head = torch.nn.Parameter(torch.randn(args.vocab, args.student_hidden, device=device) * 0.05)
    x = torch.randn(args.tokens, args.student_hidden, device=device)
    teacher_hidden = torch.randn(args.tokens, args.teacher_hidden, device=device)
    teacher_weight = torch.randn(args.vocab, args.teacher_hidden, device=device) * 0.05
    labels = torch.randint(0, args.vocab, (args.tokens,), device=device)
    labels[: args.tokens // 8] = -100
    params = [*layer.parameters(), head]

    if args.no_layer:
        x.requires_grad_(True)
        params = [head, x]

    def forward(x):
        hidden = x if args.no_layer else torch.tanh(layer(x))
        return fusedkd.fused_linear_kd_loss(
            hidden,
            head,
            teacher_hidden,
            teacher_weight,
            labels,
            temperature=2.0,
            alpha=0.5,
            backend=args.backend,
        )

    return forward, x, params


def timed(fn, x, params, device) -> float:
    for p in params:
        p.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn(x).backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", default="torch", choices=["torch", "triton", "tiles"])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--student-hidden", type=int, default=256)
    parser.add_argument("--teacher-hidden", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--compiler", default="inductor", help="torch.compile backend")
    parser.add_argument(
        "--no-layer",
        action="store_true",
        help="the loss alone, on leaf hidden states (no student layer): the loss's part of the ratio",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    forward, x, params = make_step(args, device)
    compiled = torch.compile(forward, fullgraph=True, backend=args.compiler)

    first = timed(compiled, x, params, device)  # compiles
    timed(forward, x, params, device)  # warm-up
    eager_times, compiled_times = [], []
    for i in range(args.repeats):  # in turn first: neither pays for always following the other
        if i % 2 == 0:
            eager_times.append(timed(forward, x, params, device))
            compiled_times.append(timed(compiled, x, params, device))
        else:
            compiled_times.append(timed(compiled, x, params, device))
            eager_times.append(timed(forward, x, params, device))
    row = dict(
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        backend=args.backend,
        compiler=args.compiler,
        tokens=args.tokens,
        vocab=args.vocab,
        student_hidden=args.student_hidden,
        teacher_hidden=args.teacher_hidden,
        threads=torch.get_num_threads(),
        layer=not args.no_layer,
        eager_ms=1e3 * statistics.median(eager_times),
        compiled_ms=1e3 * statistics.median(compiled_times),
        first_compiled_call_s=first,
        repeats=args.repeats,
    )
    row["compiled_over_eager"] = row["compiled_ms"] / row["eager_ms"]
    # The spread of the step-by-step ratios (each compiled step over the eager step beside it):
    # what a ratio near 1 has to be read against on a shared or noisy machine.
    pairs = sorted(c / e for c, e in zip(compiled_times, eager_times))
    quartiles = statistics.quantiles(pairs, n=4) if len(pairs) > 1 else pairs * 3
    row["pair_ratio_quartiles"] = [round(q, 4) for q in quartiles]
    # Their geometric mean and its 95% confidence interval (normal approximation on the log ratios):
    # "no slower" needs the interval's upper end at or below 1, a slowdown its lower end above 1.
    logs = [math.log(p) for p in pairs]
    half = 1.96 * statistics.stdev(logs) / math.sqrt(len(logs)) if len(logs) > 1 else math.inf
    mean = statistics.fmean(logs)
    row["pair_ratio_geomean"] = round(math.exp(mean), 4)
    row["pair_ratio_ci95"] = [round(math.exp(mean - half), 4), round(math.exp(mean + half), 4)]
    if args.json:
        print(json.dumps(row))
    else:
        print(
            f"{row['device']}, backend={row['backend']}, N={row['tokens']}, V={row['vocab']}: eager "
            f"{row['eager_ms']:.1f} ms, compiled ({row['compiler']}) {row['compiled_ms']:.1f} ms, "
            f"ratio {row['compiled_over_eager']:.3f} (step by step: quartiles "
            f"{', '.join(f'{q:.3f}' for q in row['pair_ratio_quartiles'])}; geometric mean "
            f"{row['pair_ratio_geomean']:.4f}, 95% CI {row['pair_ratio_ci95'][0]:.4f}-"
            f"{row['pair_ratio_ci95'][1]:.4f}); first compiled call "
            f"{row['first_compiled_call_s']:.1f} s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
