"""GPU check of the Triton backend, in one shot: correctness on the GPU, then speed and memory.

    python benchmarks/gpu_check.py                    # on a GPU: at most ~8 minutes on one H200
    python benchmarks/gpu_check.py --dry-run          # anywhere: tiny shapes (CPU: Triton's interpreter)
    python benchmarks/gpu_check.py --output $OUT/gpu_check.json

1. Correctness: fusedkd's Triton kernels (fp32 and bf16; forward KL, reverse KL, JSD) against a float64
   reference (fusedkd's torch backend in float64: exact, and chunked, so it fits at V = 151,936); the
   error must be within 3x that of the same computation by the torch backend in the same dtype.
2. Speed and memory at Qwen3-4B -> Qwen3-0.6B shapes (V = 151,936, H_t = 2560, H_s = 1024, bf16,
   N in {4096, 8192, 16384}), forward + backward with the student gradients, forward KL at T = 2 plus
   cross-entropy (alpha = 0.5), for
     - fusedkd  `fused_linear_kd_loss(..., backend="triton")`;
     - naive    the usual recipe: both models' logits, log_softmax / softmax, KL and cross-entropy;
     - liger    `liger_kernel.chunked_loss.LigerFusedLinearJSDLoss(beta=0)` (forward KL), compiled;
     - trl      TRL's `trl.kernels.chunked_divergence.ChunkedDivergenceFunction` (beta = 0: forward KL;
                TRL computes the divergence only, no cross-entropy), when TRL >= 1.16 is importable
                (the GPU machine has no network: without TRL the row says "not installed").
   Each row also shows the time `benchmarks/gpu_model.py` PREDICTS for it (the roofline model), so a
   GPU run tests the model's predictions too.
   Peak memory is `torch.cuda.max_memory_allocated()` after a reset, minus the memory held before the
   step (the inputs) and minus the student gradients: the loss's own extra memory. Achieved TFLOP/s
   uses the fused FLOP count 2 N V (2 H_t + 4 H_s) (docs/design.md §5), against a bf16 matmul measured on
   the same machine at the teacher's logits shape.
3. The table comes last; every number (and the machine) goes to --output as JSON.

Targets (printed with the table): the loss's extra memory <= 64 MB at N = 16384; fusedkd's forward +
backward <= 0.8x Liger's time at N = 8192; >= 50% of the measured bf16 matmul rate on the fused FLOPs.

Liger-Kernel on a machine without it (and without network), e.g. the lent H200 machine, whose python3
has torch and triton but no liger-kernel: download its (pure Python) wheel here, at the repo root,

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform any -d .whl liger-kernel==0.8.5

carry `.whl` along, and there run

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \\
        && export PYTHONPATH=/tmp/site
    python3 benchmarks/gpu_check.py --output $OUT/gpu_check.json

(benchmarks/gpu_check.sh does exactly that). Without Liger the check still runs and says so. fusedkd
itself needs no install: the script puts the repository on sys.path.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import shutil
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TARGET_EXTRA_MIB = 64.0
TARGET_VS_LIGER = 0.8
TARGET_MATMUL_FRACTION = 0.5


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny shapes; on a CPU through TRITON_INTERPRET=1"
    )
    parser.add_argument("--tokens", default=None, help="comma-separated N (default 4096,8192,16384)")
    parser.add_argument("--vocab", type=int, default=None, help="V (default 151936)")
    parser.add_argument("--student-hidden", type=int, default=None, help="H_s (default 1024)")
    parser.add_argument("--teacher-hidden", type=int, default=None, help="H_t (default 2560)")
    parser.add_argument("--check-tokens", type=int, default=None, help="N of the correctness check (1024)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per method (default 5)")
    parser.add_argument(
        "--methods", default="fusedkd,naive,liger,trl", help="subset of fusedkd,naive,liger,trl"
    )
    parser.add_argument("--no-liger-compile", action="store_true", help="run Liger eagerly (compiled=False)")
    parser.add_argument("--output", default="gpu_check.json", help="where to write the details (JSON)")
    args = parser.parse_args(argv)
    if args.dry_run:
        defaults = dict(
            tokens="48,96", vocab=1003, student_hidden=24, teacher_hidden=40, check_tokens=37, repeats=1
        )
    else:
        defaults = dict(
            tokens="4096,8192,16384",
            vocab=151_936,
            student_hidden=1024,
            teacher_hidden=2560,
            check_tokens=1024,
            repeats=5,
        )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.tokens = [int(n) for n in str(args.tokens).split(",")]
    args.methods = args.methods.split(",")
    return args


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- setup ----------------------------------------------------------------------------------------------


def import_torch(dry_run: bool):
    """torch (and fusedkd) with Triton's interpreter on when a dry run has no GPU (before triton loads)."""
    if dry_run and shutil.which("nvidia-smi") is None:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, ROOT)
    import torch

    import fusedkd  # noqa: F401

    return torch


def machine(torch) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
    }
    for name in ("triton", "liger_kernel", "trl"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", None) or _dist_version(name)
        except Exception as exc:  # not installed, or broken
            info[name] = f"unavailable ({type(exc).__name__})"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name, multiprocessors=props.multi_processor_count, memory_gib=props.total_memory / 2**30
        )
    else:
        info["gpu"] = None
        info["interpreter"] = os.environ.get("TRITON_INTERPRET") == "1"
    return info


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name.replace("_", "-"))


def synchronize(torch):
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# --- correctness ------------------------------------------------------------------------------------------


def rel_err(torch, actual, expected) -> float:
    actual, expected = actual.double(), expected.double()
    scale = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff / scale if scale > 0 else diff


def loss_and_grads(torch, fusedkd, tensors, backend, **options):
    student_hidden, student_weight, teacher_hidden, teacher_weight, labels = tensors
    student_hidden.grad = student_weight.grad = None
    loss = fusedkd.fused_linear_kd_loss(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels, backend=backend, **options
    )
    loss.backward()
    return [loss.detach(), student_hidden.grad, student_weight.grad]


def check_correctness(torch, args, device) -> list[dict]:
    """Triton vs float64 (the torch backend in float64); allowed: 3x the torch backend's own error."""
    import fusedkd

    n, v, hs, ht = args.check_tokens, args.vocab, args.student_hidden, args.teacher_hidden
    generator = torch.Generator().manual_seed(0)
    base = [
        torch.randn(n, hs, generator=generator) / hs**0.5,
        torch.randn(v, hs, generator=generator) * 2.0,
        torch.randn(n, ht, generator=generator) / ht**0.5,
        torch.randn(v, ht, generator=generator) * 2.0,
    ]
    labels = torch.randint(0, v, (n,), generator=generator)
    labels[torch.rand(n, generator=generator) < 0.25] = -100
    labels = labels.to(device)
    rows = []
    for dtype, floor in ((torch.float32, 2e-5), (torch.bfloat16, 4 * torch.finfo(torch.bfloat16).eps)):
        rounded = [x.to(dtype) for x in base]  # the same rounded inputs for every computation

        def tensors(compute_dtype, rounded=rounded):
            return [
                rounded[0].detach().to(device=device, dtype=compute_dtype).requires_grad_(True),
                rounded[1].detach().to(device=device, dtype=compute_dtype).requires_grad_(True),
                rounded[2].to(device=device, dtype=compute_dtype),
                rounded[3].to(device=device, dtype=compute_dtype),
                labels,
            ]

        for divergence, beta in (("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5)):
            options = dict(divergence=divergence, beta=beta, temperature=2.0, alpha=0.7)
            exact = loss_and_grads(torch, fusedkd, tensors(torch.float64), "torch", **options)
            same_dtype = loss_and_grads(torch, fusedkd, tensors(dtype), "torch", **options)
            started = time.perf_counter()
            ours = loss_and_grads(torch, fusedkd, tensors(dtype), "triton", **options)
            synchronize(torch)
            seconds = time.perf_counter() - started
            for what, a, b, e in zip(("loss", "grad_hidden", "grad_weight"), ours, same_dtype, exact):
                err, torch_err = rel_err(torch, a, e), rel_err(torch, b, e)
                allowed = max(3 * torch_err, floor)
                rows.append(
                    dict(
                        dtype=str(dtype).replace("torch.", ""),
                        divergence=divergence,
                        what=what,
                        error=err,
                        torch_backend_error=torch_err,
                        allowed=allowed,
                        finite=bool(torch.isfinite(a).all()),
                        ok=bool(torch.isfinite(a).all()) and err <= allowed,
                        first_call_seconds=seconds,
                    )
                )
            del exact, same_dtype, ours
            gc.collect()
    return rows


# --- speed and memory -------------------------------------------------------------------------------------


def make_inputs(torch, n, args, device, dtype):
    generator = torch.Generator().manual_seed(n)
    v, hs, ht = args.vocab, args.student_hidden, args.teacher_hidden

    def rand(*shape, scale):
        return (torch.randn(*shape, generator=generator) * scale).to(device=device, dtype=dtype)

    student_hidden = rand(n, hs, scale=hs**-0.5).requires_grad_(True)
    student_weight = rand(v, hs, scale=2.0).requires_grad_(True)
    teacher_hidden = rand(n, ht, scale=ht**-0.5)
    teacher_weight = rand(v, ht, scale=2.0)
    labels = torch.randint(0, v, (n,), generator=generator).to(device)
    return student_hidden, student_weight, teacher_hidden, teacher_weight, labels


TEMPERATURE, ALPHA = 2.0, 0.5


class NotInstalled(RuntimeError):
    """A compared method whose package is not installed here."""


def build_loss(torch, method, inputs, compile_liger: bool):
    import torch.nn.functional as F

    student_hidden, student_weight, teacher_hidden, teacher_weight, labels = inputs
    if method == "fusedkd":
        import fusedkd

        return lambda: fusedkd.fused_linear_kd_loss(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            labels,
            temperature=TEMPERATURE,
            alpha=ALPHA,
            backend="triton",
        )
    if method == "naive":

        def naive():
            student_logits = (student_hidden @ student_weight.T).float()
            with torch.no_grad():
                teacher_logits = (teacher_hidden @ teacher_weight.T).float()
            log_q = F.log_softmax(student_logits / TEMPERATURE, dim=-1)
            log_p = F.log_softmax(teacher_logits / TEMPERATURE, dim=-1)
            distill = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
            ce = F.cross_entropy(student_logits, labels)
            return ALPHA * TEMPERATURE**2 * distill + (1 - ALPHA) * ce

        return naive
    if method == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        criterion = LigerFusedLinearJSDLoss(
            weight_hard_loss=1 - ALPHA,
            weight_soft_loss=ALPHA,
            beta=0.0,
            temperature=TEMPERATURE,
            compiled=compile_liger,
        )
        return lambda: criterion(student_hidden, student_weight, teacher_hidden, teacher_weight, labels)
    if method == "trl":
        try:
            from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
        except ImportError as exc:
            raise NotInstalled(f"TRL's chunked divergence is not importable ({exc})") from None

        def trl_loss():
            divergence, _ = ChunkedDivergenceFunction.apply(
                student_hidden, student_weight, None, teacher_hidden, teacher_weight, None, 0.0, TEMPERATURE
            )
            return ALPHA * TEMPERATURE**2 * divergence.mean()

        return trl_loss
    raise ValueError(f"unknown method {method!r}")


def time_calls(torch, fn, repeats: int, warmup: int):
    for _ in range(warmup):
        fn()
    synchronize(torch)
    samples = []
    for _ in range(repeats):
        synchronize(torch)
        started = time.perf_counter()
        fn()
        synchronize(torch)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples), samples


def measure(torch, method, n, args, device) -> dict:
    """Median forward + backward time and the loss's peak extra memory for one method at N = n."""
    dtype = torch.bfloat16
    inputs = make_inputs(torch, n, args, device, dtype)
    student_hidden, student_weight = inputs[0], inputs[1]

    def step():
        student_hidden.grad = student_weight.grad = None
        loss = loss_fn()
        loss.backward()
        return loss

    result = {"method": method, "tokens": n}
    try:
        loss_fn = build_loss(torch, method, inputs, compile_liger=not (args.no_liger_compile or args.dry_run))
    except (NotInstalled, ImportError) as exc:
        result["error"] = f"not installed ({type(exc).__name__})"
        return result
    try:
        # One warm-up call compiles (Triton, torch.compile); a dry run only exercises the code.
        seconds, samples = time_calls(torch, step, repeats=args.repeats, warmup=0 if args.dry_run else 1)
        result.update(seconds=seconds, samples=samples)
        if device.type == "cuda":
            student_hidden.grad = student_weight.grad = None
            gc.collect()
            torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            loss = step()
            synchronize(torch)
            peak = torch.cuda.max_memory_allocated()
            gradients = student_hidden.grad.nbytes + student_weight.grad.nbytes
            result.update(
                peak_extra_mib=(peak - before - gradients) / 2**20,
                inputs_mib=before / 2**20,
                gradients_mib=gradients / 2**20,
                loss=loss.item(),
            )
        else:
            result.update(peak_extra_mib=None, loss=step().item())
    except Exception as exc:  # OOM, or a method that cannot run here: recorded, the check goes on
        result["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    return result


def matmul_tflops(torch, args, device) -> dict:
    """bf16 matmul rate at the teacher's logits shape [N, H_t] x [H_t, V] (N = the middle token count)."""
    n = args.tokens[len(args.tokens) // 2]
    a = torch.randn(n, args.teacher_hidden, device=device).to(torch.bfloat16)
    b = torch.randn(args.teacher_hidden, args.vocab, device=device).to(torch.bfloat16)
    seconds, _ = time_calls(torch, lambda: a @ b, repeats=max(3, args.repeats), warmup=2)
    flops = 2.0 * n * args.teacher_hidden * args.vocab
    return {
        "shape": [n, args.teacher_hidden, args.vocab],
        "seconds": seconds,
        "tflops": flops / seconds / 1e12,
    }


def predicted_seconds(args, method: str, n: int) -> float | None:
    """The time benchmarks/gpu_model.py predicts for `method` at N = n on an H200 (None: not modelled)."""
    if method not in ("fusedkd", "liger", "trl"):
        return None
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import gpu_model

    shapes = gpu_model.Shapes(n, args.vocab, args.student_hidden, args.teacher_hidden)
    return gpu_model.evaluate(shapes, gpu_model.Hardware())["methods"][method]["time_s"]


def fused_flops(n: int, args) -> float:
    """2 N V (2 H_t + 4 H_s): both models' logits twice (statistics, gradient) and two gradient GEMMs."""
    return 2.0 * n * args.vocab * (2 * args.teacher_hidden + 4 * args.student_hidden)


# --- report -----------------------------------------------------------------------------------------------


def summarize(args, matmul, results) -> tuple[list[str], dict]:
    by_key = {(r["method"], r["tokens"]): r for r in results}
    lines = []
    header = (
        f"{'N':>6} {'method':<8} {'fwd+bwd ms':>10} {'vs liger':>8} {'extra MiB':>9} {'TFLOP/s':>8} "
        f"{'% matmul':>8} {'predicted ms':>12}"
    )
    lines.append(header)
    lines.append("-" * len(header))
    for r in results:
        liger = by_key.get(("liger", r["tokens"]), {})
        if "error" in r:
            status = r["error"] if r["error"].startswith("not installed") else "failed: " + r["error"]
            lines.append(f"{r['tokens']:>6} {r['method']:<8} {status}")
            continue
        tflops = fused_flops(r["tokens"], args) / r["seconds"] / 1e12
        r["fused_tflops"] = tflops
        vs_liger = f"{r['seconds'] / liger['seconds']:.2f}x" if "seconds" in liger else "n/a"
        extra = "n/a" if r.get("peak_extra_mib") is None else f"{r['peak_extra_mib']:.0f}"
        share = f"{100 * tflops / matmul['tflops']:.0f}%"
        predicted = r.get("predicted_seconds")
        predicted = "n/a" if predicted is None else f"{1e3 * predicted:.1f}"
        lines.append(
            f"{r['tokens']:>6} {r['method']:<8} {1e3 * r['seconds']:>10.1f} {vs_liger:>8} {extra:>9} "
            f"{tflops:>8.3g} {share:>8} {predicted:>12}"
        )

    targets = {}
    largest = max(args.tokens)
    ours = by_key.get(("fusedkd", largest), {})
    if ours.get("peak_extra_mib") is not None:
        targets[f"extra memory <= {TARGET_EXTRA_MIB:.0f} MB at N={largest}"] = (
            ours["peak_extra_mib"] * 2**20 <= TARGET_EXTRA_MIB * 1e6,
            f"{ours['peak_extra_mib']:.0f} MiB",
        )
    middle = 8192 if 8192 in args.tokens else args.tokens[len(args.tokens) // 2]
    ours, liger = by_key.get(("fusedkd", middle), {}), by_key.get(("liger", middle), {})
    if "seconds" in ours and "seconds" in liger:
        ratio = ours["seconds"] / liger["seconds"]
        targets[f"time <= {TARGET_VS_LIGER}x Liger at N={middle}"] = (
            ratio <= TARGET_VS_LIGER,
            f"{ratio:.2f}x",
        )
    if "seconds" in ours:
        share = fused_flops(middle, args) / ours["seconds"] / 1e12 / matmul["tflops"]
        targets[f">= {TARGET_MATMUL_FRACTION:.0%} of bf16 matmul at N={middle}"] = (
            share >= TARGET_MATMUL_FRACTION,
            f"{share:.0%}",
        )
    return lines, targets


def main(argv=None) -> int:
    args = parse_args(argv)
    torch = import_torch(args.dry_run)
    if not args.dry_run and not torch.cuda.is_available():
        log("no CUDA device: run with --dry-run to exercise the check on this machine")
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = machine(torch)
    started = time.perf_counter()
    log(f"machine: {json.dumps(info)}")

    log("correctness against float64 ...")
    correctness = check_correctness(torch, args, device)
    failures = [r for r in correctness if not r["ok"]]

    log("bf16 matmul rate ...")
    matmul = matmul_tflops(torch, args, device)

    results = []
    for n in args.tokens:
        for method in args.methods:
            log(f"N={n} {method} ...")
            result = measure(torch, method, n, args, device)
            result["predicted_seconds"] = predicted_seconds(args, method, n)
            results.append(result)
            gc.collect()  # the method's inputs and buffers go before the next one is measured
            if device.type == "cuda":
                torch.cuda.empty_cache()
    lines, targets = summarize(args, matmul, results)

    details = dict(
        args={k: v for k, v in vars(args).items()},
        machine=info,
        correctness=correctness,
        matmul=matmul,
        fused_flops_per_token_formula="2 V (2 H_t + 4 H_s)",
        results=results,
        targets={name: {"met": met, "value": value} for name, (met, value) in targets.items()},
        seconds=time.perf_counter() - started,
    )
    with open(args.output, "w") as f:
        json.dump(details, f, indent=2)

    worst = {}
    for r in correctness:
        key = (r["dtype"], r["divergence"])
        worst[key] = max(worst.get(key, 0.0), r["error"] / r["allowed"])
    shapes = f"V={args.vocab} H_s={args.student_hidden} H_t={args.teacher_hidden}"
    print(
        f"fusedkd GPU check, {info['date']}, {info.get('gpu') or 'CPU (dry run)'}, torch {info['torch']}, "
        f"triton {info['triton']}, liger-kernel {info['liger_kernel']}"
    )
    print(f"correctness vs float64 (N={args.check_tokens}, {shapes}; error / allowed, <= 1 passes):")
    print("  " + ", ".join(f"{d} {div}: {ratio:.2f}" for (d, div), ratio in worst.items()))
    print(f"bf16 matmul {matmul['shape']}: {matmul['tflops']:.3g} TFLOP/s")
    if args.dry_run:
        print("targets: not judged in a dry run (tiny shapes; on a CPU, Triton's interpreter)")
    for name, (met, value) in ({} if args.dry_run else targets).items():
        print(f"target {name}: {value} ({'met' if met else 'NOT met'})")
    print(f"details: {args.output} ({details['seconds']:.0f} s)")
    print(
        f"\nforward + backward, bf16, {shapes}, forward KL T={TEMPERATURE} + CE alpha={ALPHA}, "
        f"median of {args.repeats}; extra = peak - inputs - student gradients; TFLOP/s on 2NV(2H_t+4H_s); "
        "predicted = benchmarks/gpu_model.py's H200 prediction (trl: divergence only, no CE)"
    )
    print("\n".join(lines))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
