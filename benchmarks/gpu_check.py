"""GPU check in one shot, made for a first (10-minute) GPU session: at most ~8 minutes on one H100.

    bash benchmarks/gpu_check.sh                      # on the GPU machine: $OUT/gpu_check.jsonl (+ .log)
    python benchmarks/gpu_check.py --output gpu_check.jsonl [--max-minutes 8]
    python benchmarks/gpu_check.py --dry-run          # anywhere: tiny shapes (CPU: Triton's interpreter)

Every step writes ONE JSON line as soon as it ends, flushed (and fsync'ed) to --output (JSON Lines) and
then printed to stdout, so a run cut off at any point keeps every line before. Each line holds "step",
"status" ("ok"; "skipped" with a "reason"; "failed" with an "error"), "machine" (the GPU's name), "t_s"
(seconds since the start), the step's "estimate_s" and "elapsed_s", and its numbers. stderr gets a
readable line per step and, at the end, the table. Exit status 1 when a correctness check fails, else 0
(a target that FAILs is a result, not an error).

Shapes: Qwen3-4B -> Qwen3-0.6B at their real sizes (V = 151,936, H_t = 2560, H_s = 1024; nothing scaled
down), bf16 for the timed rows, forward KL at T = 2 plus cross-entropy (alpha = 0.5). Inputs are made
on the GPU: the two heads once, the hidden states and labels once per N (shared by every method at N).

Steps, and the time each is budgeted on a fresh H100 (empty Triton / inductor caches; the estimates
in `BUDGET_S` and `FIRST_CALL_S`, padded; a timing row's is 3x the model's predicted time per call
plus 1 s). The plan comes to ~430 s (7.2 min), written in the first line. They run in the order of
`PHASES`, what a cut-off run must keep first: machine, gemm, compile, the float32 correctness of both
backends, the comparison at N = 16,384 (timing rows, peers, targets, profile), the bf16 correctness,
topk, then the other token counts' timing rows:

  machine      versions, GPU, float32 matmul precision, the plan                                     10 s
  gemm         cuBLAS bf16 GEMMs as the tile path runs them, at N = 1,024 (its chunk) and 16,384:
               the teacher's and the student's logits [N, H] x [H, V], dh = G W_s [N, V] x [V, H_s],
               dW += G^T h_s [V, N] x [N, H_s] (into float32 dW); measured TFLOP/s next to
               the model's assumed cuBLAS rate (peak x efficiency)                             8 x 2 s
  compile      the first call of backend="tiles" and of "triton" (bf16, N = 1,024) against a second
               call: compile time, reported apart from the timed rows                         20 + 75 s
  correctness  "tiles" and "triton" against the torch backend computing in float32, at N = 4,096 with
               25% of the labels ignored (3,072 counted tokens), real shapes: in float32 (the
               kernels' float32 variants compile here) and in bf16 (reference: the torch backend in
               float32 on the same bf16-rounded inputs). Judged against float64 (the torch backend
               in float64): loss, dh, dW each within 3x the torch backend's own error in that dtype
               (floors 2e-5 / 2^-6). The fused gradient pass updates its float32 dW rows once per
               gradient_sub_blocks x block_n tokens (`fusedkd.kernels.config`: 1,024 in bf16, 128 in
               float32); >= 2 updates is checked. A second call on the same inputs must give a
               bitwise-identical dW (dh and the loss reported too; the fused pass adds dh atomically).
                                                                                  30 + 50 + 15 + 10 s
  topk         fused_linear_topk_kd_loss (tail "bucket", forward KL + CE, k = 64) at the same N in bf16:
               backend "tiles" (the student's tile on cuBLAS, two Triton passes) against float64 within
               3x the torch backend's bf16 error (floor 2^-6), dW bitwise on a second call; "tiles" and
               "torch" timed (median of 3 calls, forward + backward) and their ratio                 40 s
  timing       per (N, method): forward and backward timed apart with CUDA events (median of
               --repeats 5), the first call apart (first_call_ms, first_call_extra_s), extra memory
               (peak allocated minus what was held before, minus the student's gradients), the
               prediction of benchmarks/gpu_model.py for this GPU (H200 figures when its name says
               H200, else H100's) and measured / predicted, for time and memory. fusedkd "auto",
               "tiles", "triton" at N = 4,096, 16,384, 32,768 (1-6 s a row); at 16,384 also
                 liger  `LigerFusedLinearJSDLoss(beta=0)` (forward KL + CE), torch.compile'd        92 s
                        (eager, with the compile error in its line, when torch.compile fails)
                 trl    TRL >= 1.16's `ChunkedDivergenceFunction` (beta 0: forward KL; divergence
                        only, no CE), when importable (else "skipped: not installed")              33 s
  targets      from the N = 16,384 lines, never written in: auto's time <= 0.9x Liger's, below
               TRL's; auto's extra memory <= Liger's; the fused path ("triton") <= 300 MiB extra
               (constants from gpu_model). PASS / FAIL each, or unjudged with why (a row missing);
               the model's own verdicts beside them. Never refused by the budget                   0 s
  profile      one torch.profiler step of backend="tiles" at N = 16,384: the top 15 CUDA kernels by
               time, their calls and shares                                                       15 s
  timing       the N = 4,096 and 32,768 rows, last: the first to go when time runs short
  summary      counts, the correctness verdict, the targets, what was skipped or failed; the table
               goes to stderr

Guards. --max-minutes (default 8) skips a step, with a line saying so, when the time so far plus its
estimate would pass the limit; gpu_check.sh also stops the run with SIGINT after 9 minutes (a step
that overran its estimate), and an interrupted run still writes its summary line and table. A step
that fails (a kernel fault included) is one "failed" line and the steps after it still run. Before
each timing row the free GPU memory (`torch.cuda.mem_get_info` after emptying the cache) is compared
with the row's need: the model's extra memory (gpu_model; naive: 8 N V float32 bytes) plus the
student's gradients, x 1.25, plus --memory-margin-mib (1024); a row that would not fit is skipped with
a line saying so, and a `torch.cuda.OutOfMemoryError` is caught and reported as skipped too. The lines
of the steps that may run the tile path's GEMMs carry "float32_out_gemms": false for a float32-output
cuBLAS GEMM this torch refused (`fusedkd.torch_backend.gemm` then falls back, slower); a gemm line
with such a fallback fails.

Notes. backend="tiles" (like the torch backend and Liger) forms the gradients in the forward (for an
output gradient of 1): its forward holds nearly all its time, its backward only hands the gradients
over; "triton" and TRL recompute in the backward. "naive" (both models' full logits, log_softmax, KL,
CE) is opt-in (--methods auto,tiles,triton,naive).

--dry-run: tiny shapes (V = 257, H_s = 24, H_t = 40; timing at N = 16 and 32, peers and targets at 32;
correctness at N = 96, 71 counted tokens: two dW updates of the interpreter's 64, the tiles backend in
32-token chunks), on a CPU through Triton's interpreter: every step runs and writes its line as on a
GPU. There auto runs the torch backend (auto takes the Triton paths on CUDA only), memory figures are
absent (the memory targets: unjudged), the profile lists CPU operators instead of CUDA kernels, and
"naive" is in the method list to exercise both skip paths: --pretend-full naive@32 (the memory check
sees 0 bytes free) and --pretend-oom naive@16 (the row raises torch.cuda.OutOfMemoryError). Its numbers
mean nothing. tests/test_gpu_check.py runs it (~40 s on two cores).

Liger-Kernel on a machine without it (and without network), e.g. the lent GPU machine, whose python3
has torch and triton but no liger-kernel: download its (pure Python) wheel here, at the repo root,

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform any -d .whl liger-kernel==0.8.5

carry `.whl` along, and there run `bash benchmarks/gpu_check.sh`: it installs the wheel into /tmp/site
and runs this script with --output $OUT/gpu_check.jsonl. Without Liger its line says "skipped: not
installed" and the rest runs. fusedkd itself needs no install: the script puts the repository on
sys.path.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time
import traceback

START = time.perf_counter()
BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCHMARKS)

TEMPERATURE, ALPHA, DIVERGENCE = 2.0, 0.5, "forward_kl"
IGNORED_FRACTION = 0.25  # labels set to -100 in the correctness check
MIB = 2**20
TOP_KERNELS = 15

# Seconds each step is budgeted on a fresh H100 (empty Triton / inductor caches): estimates, padded.
# A timing row's estimate is computed from the model's prediction (see `row_estimate`).
BUDGET_S = {
    "machine": 10.0,  # imports and the CUDA context, before the first line
    "gemm": 2.0,  # per shape: 3 warm-up and 10 timed GEMMs of <= 20 ms, plus the operands
    "compile tiles": 20.0,  # the kd_tile kernel (one Triton pass) and cuBLAS's first calls
    "compile triton": 75.0,  # the fused statistics and gradient kernels (large Hopper tiles)
    # Correctness: the dtype's first step makes the references (float64, float32, the dtype: ~10 s);
    # float32 compiles the kd_tile kernel's and the fused kernels' float32 variants (FMA dots).
    "correctness float32 tiles": 30.0,
    "correctness float32 triton": 50.0,
    "correctness bfloat16 tiles": 15.0,
    "correctness bfloat16 triton": 10.0,
    "topk": 40.0,  # the top-k tile kernels' first calls, the references, 2 x 3 timed calls
    "profile": 15.0,
}
TOPK_K = 64  # teacher tokens per position in the top-k step (8 in the dry run)
# Added to a timing row's estimate: the first call of a method not compiled by the compile step.
FIRST_CALL_S = {
    "liger": 90.0,  # torch.compile of Liger's chunk function (inductor)
    "trl": 30.0,  # TRL's Triton kernels
    "naive": 5.0,
}
ROW_SLACK = 3.0  # a timing row's calls take at most this many times the model's prediction
ROW_FIXED_S = 1.0  # its inputs' check, memory clean-up, synchronizations

# Which benchmarks/gpu_model.py method predicts each measured method.
MODEL_METHOD = {
    "auto": "fusedkd",
    "tiles": "fusedkd_tile",
    "triton": "fusedkd_fused",
    "liger": "liger",
    "trl": "trl",
}
FUSEDKD_METHODS = ("auto", "tiles", "triton")
NAIVE_BYTES_PER_ENTRY = 8 * 4  # ~8 float32 [N, V] tensors: logits, log-softmaxes, KL terms, gradients


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny shapes; on a CPU through TRITON_INTERPRET=1"
    )
    parser.add_argument("--output", default="gpu_check.jsonl", help="JSON Lines, one per step")
    parser.add_argument("--max-minutes", type=float, default=8.0, help="skip steps that would pass it")
    parser.add_argument("--tokens", default=None, help="N of the timing rows (4096,16384,32768)")
    parser.add_argument("--compare-tokens", type=int, default=None, help="N of the peers and targets (16384)")
    parser.add_argument("--check-tokens", type=int, default=None, help="N of the correctness check (4096)")
    parser.add_argument("--vocab", type=int, default=None, help="V (151936)")
    parser.add_argument("--student-hidden", type=int, default=None, help="H_s (1024)")
    parser.add_argument("--teacher-hidden", type=int, default=None, help="H_t (2560)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per row (5)")
    parser.add_argument(
        "--methods", default=None, help="fusedkd methods at every N (auto,tiles,triton[,naive])"
    )
    parser.add_argument("--peers", default=None, help="methods at --compare-tokens only (liger,trl)")
    parser.add_argument("--gemm-tokens", default=None, help="N of the GEMM baselines (1024,16384)")
    parser.add_argument("--tiles-chunk", type=int, default=None, help="tiles chunk in the correctness check")
    parser.add_argument("--no-liger-compile", action="store_true", help="run Liger eagerly (compiled=False)")
    parser.add_argument("--gpu-model", choices=("H100", "H200"), default=None, help="model figures to use")
    parser.add_argument("--memory-margin-mib", type=float, default=None, help="kept free (1024)")
    parser.add_argument("--pretend-full", default=None, help="METHOD@N: the memory check sees 0 bytes free")
    parser.add_argument("--pretend-oom", default=None, help="METHOD@N: the row raises OutOfMemoryError")
    args = parser.parse_args(argv)
    if args.dry_run:
        defaults = dict(
            tokens="16,32",
            compare_tokens=32,
            check_tokens=96,
            vocab=257,
            student_hidden=24,
            teacher_hidden=40,
            repeats=1,
            methods="auto,tiles,triton,naive",
            peers="liger,trl",
            gemm_tokens="16,32",
            tiles_chunk=32,
            memory_margin_mib=0.0,
            pretend_full="naive@32",
            pretend_oom="naive@16",
        )
    else:
        defaults = dict(
            tokens="4096,16384,32768",
            compare_tokens=16384,
            check_tokens=4096,
            vocab=151_936,
            student_hidden=1024,
            teacher_hidden=2560,
            repeats=5,
            methods="auto,tiles,triton",
            peers="liger,trl",
            gemm_tokens="1024,16384",
            memory_margin_mib=1024.0,
        )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.tokens = [int(n) for n in str(args.tokens).split(",")]
    args.gemm_tokens = [int(n) for n in str(args.gemm_tokens).split(",")]
    args.methods = [m for m in args.methods.split(",") if m]
    args.peers = [m for m in args.peers.split(",") if m]
    return args


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- the report: one JSON line per step ----------------------------------------------------------------


def _plain(value):
    """JSON-safe: non-finite floats as strings (strict JSON has no NaN), tuples as lists."""
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class Report:
    """Writes each step's line at once: to `path` (flushed and fsync'ed) and to stdout (flushed)."""

    def __init__(self, path: str):
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        self.file = open(path, "w", encoding="utf-8")
        self.machine = "unknown"
        self.records: list[dict] = []

    def emit(self, step: str, status: str = "ok", **fields) -> dict:
        record = {
            "step": step,
            "status": status,
            "machine": self.machine,
            "t_s": round(time.perf_counter() - START, 3),
            **fields,
        }
        text = json.dumps(_plain(record), allow_nan=False, default=str)
        self.file.write(text + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())
        print(text, flush=True)
        self.records.append(record)
        try:
            log(describe(record))
        except Exception as exc:  # the JSON line is what counts
            log(f"{step} {status} (unreadable: {_first_line(exc)})")
        return record

    def close(self) -> None:
        self.file.close()


class Budget:
    """--max-minutes: a step runs only if the time so far plus its estimate stays within the limit."""

    def __init__(self, max_minutes: float):
        self.max_minutes = max_minutes
        self.limit_s = 60.0 * max_minutes

    def refusal(self, estimate_s: float) -> str | None:
        elapsed = time.perf_counter() - START
        if elapsed + estimate_s <= self.limit_s:
            return None
        return (
            f"--max-minutes {self.max_minutes:g}: {elapsed:.0f} s elapsed + this step's estimated "
            f"{estimate_s:.0f} s > {self.limit_s:.0f} s; skipped"
        )


class Skip(Exception):
    """A step that cannot run here (not installed, would not fit): reported as skipped, with why."""


# --- setup --------------------------------------------------------------------------------------------


def import_torch(dry_run: bool):
    """torch (and fusedkd) with Triton's interpreter on when a dry run has no GPU (before triton loads)."""
    if dry_run and shutil.which("nvidia-smi") is None:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    for path in (ROOT, BENCHMARKS):
        if path not in sys.path:
            sys.path.insert(0, path)
    import torch

    import fusedkd  # noqa: F401

    return torch


def _version(name: str) -> str:
    try:
        module = __import__(name)
    except Exception as exc:  # not installed, or broken
        return f"unavailable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"[:200]
    version = getattr(module, "__version__", None)
    if version is None:
        from importlib.metadata import version as dist_version

        try:
            version = dist_version(name.replace("_", "-"))
        except Exception:
            version = "unknown"
    return str(version)


def model_gpu(torch, override: str | None) -> tuple[str, str]:
    """The gpu_model figures for this GPU ("H100" / "H200") and why."""
    if override:
        return override, "--gpu-model"
    if not torch.cuda.is_available():
        return "H100", "no GPU: H100 figures"
    name = torch.cuda.get_device_name()
    if "H200" in name:
        return "H200", f"{name!r} names an H200"
    if "H100" in name:
        return "H100", f"{name!r} names an H100"
    return "H100", f"{name!r} is neither an H100 nor an H200: H100 figures (default)"


def machine_info(torch, args) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "liger_kernel": _version("liger_kernel"),
        "trl": _version("trl"),
        "dry_run": args.dry_run,
        "interpreter": os.environ.get("TRITON_INTERPRET") == "1",
        # Triton builds its launcher with a C compiler against Python.h on its first use.
        "c_compiler": shutil.which("gcc") or shutil.which("clang") or shutil.which("cc"),
        "python_h": os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")),
        # The float32 correctness check wants IEEE float32 GEMMs and dots (no TF32): "highest".
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }
    try:
        info["commit"] = (
            subprocess.run(
                ["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except Exception:
        info["commit"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info()
        info.update(
            gpu=props.name,
            multiprocessors=props.multi_processor_count,
            memory_gib=total / 2**30,
            free_gib=free / 2**30,
            capability=f"{props.major}.{props.minor}",
        )
    else:
        info["gpu"] = None
    return info


def synchronize(torch) -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free_memory(torch):
    """Free device memory in bytes after releasing the allocator's cache; None on a CPU, or when the
    device cannot answer (a kernel fault is sticky: its step's line has the error, and the steps after
    it must still get to write theirs)."""
    gc.collect()
    if not torch.cuda.is_available():
        return None
    try:
        torch.cuda.empty_cache()
        return torch.cuda.mem_get_info()[0]
    except Exception:
        return None


def _pretend(spec: str | None, method: str, n: int) -> bool:
    return spec is not None and spec == f"{method}@{n}"


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:300]


class Check:
    """State shared by the steps: the device, the shared bf16 heads, the current N's inputs."""

    def __init__(self, torch, args, report: Report, budget: Budget):
        import gpu_model

        import fusedkd

        self.torch, self.args, self.report, self.budget = torch, args, report, budget
        self.fusedkd, self.gpu_model = fusedkd, gpu_model
        self.cuda = torch.cuda.is_available()
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.gpu_name, self.gpu_reason = model_gpu(torch, args.gpu_model)
        self.hardware = gpu_model.GPUS[self.gpu_name]
        self.dtype = torch.bfloat16
        self._weights = None
        self._predictions: dict[int, dict] = {}
        self.rows: list[dict] = []  # timing lines

    # -- running a step --

    def step(self, step: str, estimate_s: float, fn, guard: bool = True, **ident) -> dict:
        """Run `fn` (returning its line's fields) unless the budget refuses (`guard`); one line either
        way."""
        torch = self.torch
        reason = self.budget.refusal(estimate_s) if guard else None
        if reason is not None:
            return self.report.emit(step, "skipped", reason=reason, estimate_s=estimate_s, **ident)
        started = time.perf_counter()
        status = "ok"
        try:
            fields = fn() or {}
        except Skip as exc:
            status, fields = "skipped", {"reason": str(exc)}
        except torch.cuda.OutOfMemoryError as exc:
            status, fields = "skipped", {"reason": f"out of memory ({_first_line(exc)})"}
        except Exception as exc:  # recorded; the check goes on
            status = "failed"
            fields = {"error": _first_line(exc), "traceback": traceback.format_exc().splitlines()[-8:]}
        if self.cuda:
            try:
                synchronize(torch)
            except Exception:  # a failed kernel: its error is in the line already
                pass
        fields = {**ident, **fields}
        if step in ("gemm", "compile", "correctness", "topk", "timing", "profile"):
            fields["float32_out_gemms"] = float32_out()
        fields.setdefault("estimate_s", estimate_s)
        fields["elapsed_s"] = round(time.perf_counter() - started, 3)
        return self.report.emit(step, fields.pop("status", status), **fields)

    # -- inputs (on the device) --

    def generator(self, seed: int):
        return self.torch.Generator(device=self.device).manual_seed(seed)

    def randn(self, shape, scale: float, generator, dtype=None):
        x = self.torch.randn(shape, generator=generator, device=self.device, dtype=self.torch.float32)
        return (x * scale).to(dtype or self.dtype)

    def weights(self):
        """The two heads in bf16, made once: W_s [V, H_s], W_t [V, H_t]."""
        if self._weights is None:
            a, g = self.args, self.generator(1)
            self._weights = (
                self.randn((a.vocab, a.student_hidden), 2.0, g),
                self.randn((a.vocab, a.teacher_hidden), 2.0, g),
            )
        return self._weights

    def inputs(self, n: int) -> dict:
        """N's hidden states and labels (all counted), with the shared heads: made once per N."""
        a, g = self.args, self.generator(n)
        student_weight, teacher_weight = self.weights()
        return dict(
            student_hidden=self.randn((n, a.student_hidden), a.student_hidden**-0.5, g),
            student_weight=student_weight,
            teacher_hidden=self.randn((n, a.teacher_hidden), a.teacher_hidden**-0.5, g),
            teacher_weight=teacher_weight,
            labels=self.torch.randint(0, a.vocab, (n,), generator=g, device=self.device),
        )

    # -- the model's predictions --

    def prediction(self, method: str, n: int) -> dict | None:
        key = MODEL_METHOD.get(method)
        if key is None:
            return None
        if n not in self._predictions:
            a, gm = self.args, self.gpu_model
            shapes = gm.Shapes(n, a.vocab, a.student_hidden, a.teacher_hidden, divergence=DIVERGENCE)
            self._predictions[n] = gm.evaluate(shapes, self.hardware)
        row = self._predictions[n]["methods"].get(key)
        if row is None:
            return None
        return {"time_ms": 1e3 * row["time_s"], "extra_mib": row["extra_memory_bytes"] / MIB}

    def model_targets(self, n: int) -> dict:
        self.prediction("auto", n)
        return self._predictions[n]["targets"]

    def auto_backend(self) -> str:
        from fusedkd._dispatch import MIN_TILES_CHUNK, resolve_backend, tiles_chunk_size

        fits = tiles_chunk_size(self.args.vocab, None) >= MIN_TILES_CHUNK
        return resolve_backend("auto", self.device, self.dtype, has_tiles=True, tiles_fit=fits)


# --- step: cuBLAS GEMM baselines -------------------------------------------------------------------------


def time_op(torch, fn, repeats: int, warmup: int) -> list[float]:
    """Milliseconds per call of `fn`: CUDA events on a GPU, the wall clock elsewhere."""
    for _ in range(warmup):
        fn()
    synchronize(torch)
    samples = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            fn()
            samples.append(1e3 * (time.perf_counter() - started))
    return samples


def gemm_shapes(check: Check, n: int) -> list[tuple[str, tuple[int, int, int]]]:
    a = check.args
    return [
        ("teacher logits h_t W_t^T", (n, a.teacher_hidden, a.vocab)),
        ("student logits h_s W_s^T", (n, a.student_hidden, a.vocab)),
        ("dh = G W_s", (n, a.vocab, a.student_hidden)),
        ("dW += G^T h_s (float32 dW)", (a.vocab, n, a.student_hidden)),
    ]


def gemm_step(check: Check, name: str, n: int) -> dict:
    """One bf16 GEMM as the tile path runs it: the projections into a float32 tile (`gemm.project`),
    dh = G W_s and dW += G^T h_s (`gemm.accumulate_float32`) with G in the student tile's bytes (a
    bf16 view of a float32 [n, V] tile: row stride 2V)."""
    from fusedkd.torch_backend.gemm import accumulate_float32, project

    torch, a = check.torch, check.args
    student_weight, teacher_weight = check.weights()
    g = check.generator(7)
    f32 = dict(dtype=torch.float32, device=check.device)
    if name.startswith(("teacher", "student")):
        weight = teacher_weight if name.startswith("teacher") else student_weight
        hidden = check.randn((n, weight.shape[1]), weight.shape[1] ** -0.5, g)
        tile = torch.empty((n, a.vocab), **f32)
        fn = lambda: project(tile, hidden, weight, None)  # noqa: E731
    else:
        grad = torch.empty((n, a.vocab), **f32).view(check.dtype)[:, : a.vocab]
        grad.copy_(check.randn((n, a.vocab), 1e-4, g))
        if name.startswith("dh"):
            fn = lambda: torch.mm(grad, student_weight)  # noqa: E731
        else:
            hidden = check.randn((n, a.student_hidden), a.student_hidden**-0.5, g)
            dw = torch.zeros((a.vocab, a.student_hidden), **f32)
            fn = lambda: accumulate_float32(dw, grad.T, hidden, first=False)  # noqa: E731
    (m, k, cols) = dict(gemm_shapes(check, n))[name]
    samples = time_op(torch, fn, repeats=10 if check.cuda else 2, warmup=3 if check.cuda else 1)
    fallbacks = [what for what, available in float32_out().items() if not available]
    if check.cuda and fallbacks:  # the tile path's numbers would time the slower fallback GEMMs
        raise RuntimeError(f"cuBLAS float32-output GEMM unavailable, fallback taken for: {fallbacks}")
    ms = statistics.median(samples)
    flops = 2.0 * m * k * cols
    assumed = check.hardware.bf16_flops * check.hardware.cublas_mma_efficiency / 1e12
    measured = flops / (ms / 1e3) / 1e12
    return dict(
        gemm=name,
        shape=[m, k, cols],
        ms=ms,
        samples_ms=samples,
        tflops=measured,
        model_assumed_tflops=assumed,
        measured_over_assumed=measured / assumed,
        model_gpu=check.gpu_name,
    )


# --- the losses ----------------------------------------------------------------------------------------


def float32_out() -> dict:
    """Which float32-output cuBLAS GEMMs the tile path found (`fusedkd.torch_backend.gemm`: False = it
    fell back to a 16-bit product and a copy, slower, and with the logits rounded to 16 bits)."""
    from fusedkd.torch_backend import gemm

    return dict(gemm._FLOAT32_OUT)


def liger_compiled(check: Check) -> bool:
    return not (check.args.no_liger_compile or check.args.dry_run)


def build_loss(check: Check, method: str, x: dict, liger_compile: bool = True):
    """A zero-argument callable returning the loss of `method` on the inputs `x`."""
    torch, fusedkd = check.torch, check.fusedkd
    sh, sw, th, tw, labels = (
        x["student_hidden"],
        x["student_weight"],
        x["teacher_hidden"],
        x["teacher_weight"],
        x["labels"],
    )
    if method in FUSEDKD_METHODS:
        return lambda: fusedkd.fused_linear_kd_loss(
            sh,
            sw,
            th,
            tw,
            labels,
            divergence=DIVERGENCE,
            temperature=TEMPERATURE,
            alpha=ALPHA,
            backend=method,
        )
    if method == "naive":
        import torch.nn.functional as F

        def naive():
            student_logits = (sh @ sw.T).float()
            with torch.no_grad():
                teacher_logits = (th @ tw.T).float()
            log_q = F.log_softmax(student_logits / TEMPERATURE, dim=-1)
            log_p = F.log_softmax(teacher_logits / TEMPERATURE, dim=-1)
            distill = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
            ce = F.cross_entropy(student_logits, labels)
            return ALPHA * TEMPERATURE**2 * distill + (1 - ALPHA) * ce

        return naive
    if method == "liger":
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
        except ImportError as exc:
            raise Skip(f"not installed ({_first_line(exc)})") from None
        except Exception as exc:  # installed, but its import fails (a version skew of its dependencies)
            raise Skip(f"does not import ({_first_line(exc)})") from None
        criterion = LigerFusedLinearJSDLoss(
            weight_hard_loss=1 - ALPHA,
            weight_soft_loss=ALPHA,
            beta=0.0,
            temperature=TEMPERATURE,
            compiled=liger_compile and liger_compiled(check),
        )
        return lambda: criterion(sh, sw, th, tw, labels)
    if method == "trl":
        try:
            from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
        except ImportError as exc:
            raise Skip(f"not installed ({_first_line(exc)})") from None
        except Exception as exc:  # installed, but its import fails (a version skew of its dependencies)
            raise Skip(f"does not import ({_first_line(exc)})") from None

        def trl_loss():
            divergence, _ = ChunkedDivergenceFunction.apply(sh, sw, None, th, tw, None, 0.0, TEMPERATURE)
            return ALPHA * TEMPERATURE**2 * divergence.mean()

        return trl_loss
    raise ValueError(f"unknown method {method!r}")


def run_once(check: Check, loss_fn, x: dict):
    """One forward + backward from fresh gradients; the loss."""
    x["student_hidden"].grad = x["student_weight"].grad = None
    loss = loss_fn()
    loss.backward()
    return loss


def _trainable(x: dict) -> dict:
    """The inputs with the student's hidden states and head as fresh leaves that take gradients."""
    return {
        **x,
        "student_hidden": x["student_hidden"].detach().requires_grad_(True),
        "student_weight": x["student_weight"].detach().requires_grad_(True),
    }


# --- step: compile -------------------------------------------------------------------------------------


def compile_step(check: Check, method: str, x: dict) -> dict:
    """First call (compiles) and second call of `method`, wall clock with synchronizations."""
    torch = check.torch
    x = _trainable(x)
    loss_fn = build_loss(check, method, x)
    times = []
    for _ in range(2):
        synchronize(torch)
        started = time.perf_counter()
        run_once(check, loss_fn, x)
        synchronize(torch)
        times.append(time.perf_counter() - started)
    return dict(
        first_call_s=times[0],
        second_call_s=times[1],
        compile_s=max(0.0, times[0] - times[1]),
        runs=check.auto_backend() if method == "auto" else method,
    )


# --- step: correctness ---------------------------------------------------------------------------------


def rel_err(actual, expected) -> float:
    actual, expected = actual.double(), expected.double()
    scale = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff / scale if scale > 0 else diff


def correctness_inputs(check: Check, dtype) -> dict:
    """float32 inputs on the device rounded to `dtype`, and the labels (IGNORED_FRACTION ignored)."""
    torch, a = check.torch, check.args
    n, g = a.check_tokens, check.generator(0)
    f32 = torch.float32
    x = dict(
        student_hidden=check.randn((n, a.student_hidden), a.student_hidden**-0.5, g, f32),
        student_weight=check.randn((a.vocab, a.student_hidden), 2.0, g, f32),
        teacher_hidden=check.randn((n, a.teacher_hidden), a.teacher_hidden**-0.5, g, f32),
        teacher_weight=check.randn((a.vocab, a.teacher_hidden), 2.0, g, f32),
    )
    x = {k: v.to(dtype) for k, v in x.items()}
    labels = torch.randint(0, a.vocab, (n,), generator=g, device=check.device)
    ignored = torch.rand(n, generator=g, device=check.device) < IGNORED_FRACTION
    x["labels"] = labels.masked_fill(ignored, -100)
    return x


def loss_and_grads(check: Check, x: dict, backend: str, dtype, **options):
    """loss, dh, dW of `backend` on `x` cast to `dtype`."""
    x = _trainable({k: (v.to(dtype) if v.is_floating_point() else v) for k, v in x.items()})
    loss = check.fusedkd.fused_linear_kd_loss(
        x["student_hidden"],
        x["student_weight"],
        x["teacher_hidden"],
        x["teacher_weight"],
        x["labels"],
        divergence=DIVERGENCE,
        temperature=TEMPERATURE,
        alpha=ALPHA,
        backend=backend,
        **options,
    )
    loss.backward()
    return loss.detach(), x["student_hidden"].grad, x["student_weight"].grad


class References:
    """Per dtype, made at the first backend's step: the inputs, the float32 reference (the torch
    backend computing in float32), the exact one (float64) and the torch backend in that dtype."""

    def __init__(self):
        self.by_dtype: dict = {}

    def get(self, check: Check, dtype):
        if dtype not in self.by_dtype:
            self.by_dtype.clear()
            free_memory(check.torch)
            torch = check.torch
            x = correctness_inputs(check, dtype)
            exact = loss_and_grads(check, x, "torch", torch.float64)
            reference = loss_and_grads(check, x, "torch", torch.float32)
            same = reference if dtype == torch.float32 else loss_and_grads(check, x, "torch", dtype)
            self.by_dtype[dtype] = (x, reference, exact, same)
        return self.by_dtype[dtype]


def dw_update_tokens(dtype, divergence: str = DIVERGENCE) -> int:
    """Tokens per float32 dW update of the fused gradient pass (kernels/config.py, gradient.py)."""
    from fusedkd.kernels.config import default_config

    config = default_config(dtype)
    return config.gradient_sub_blocks * config.gradient.block_n


def correctness_step(check: Check, refs: References, dtype, backend: str) -> dict:
    torch = check.torch
    x, reference, exact, same = refs.get(check, dtype)
    options = {}
    if backend == "tiles" and check.args.tiles_chunk:
        options["chunk_size"] = check.args.tiles_chunk
    synchronize(torch)
    started = time.perf_counter()
    first = loss_and_grads(check, x, backend, dtype, **options)
    synchronize(torch)
    first_call_s = time.perf_counter() - started
    second = loss_and_grads(check, x, backend, dtype, **options)
    floor = 2e-5 if dtype == torch.float32 else 2.0**-6
    counted = int((x["labels"] != -100).sum().item())
    terms, ok = {}, True
    for what, ours, ref, ex, sm in zip(("loss", "dh", "dW"), first, reference, exact, same):
        err = rel_err(ours, ex)
        torch_err = rel_err(sm, ex)
        allowed = max(3.0 * torch_err, floor)
        finite = bool(torch.isfinite(ours).all())
        terms[what] = dict(
            error_vs_float64=err,
            error_vs_torch_float32=rel_err(ours, ref),
            torch_backend_error=torch_err,
            allowed=allowed,
            finite=finite,
            ok=finite and err <= allowed,
        )
        ok = ok and terms[what]["ok"]
    fields = dict(
        backend=backend,
        dtype=str(dtype).replace("torch.", ""),
        n=check.args.check_tokens,
        counted_tokens=counted,
        shapes=dict(
            vocab=check.args.vocab,
            student_hidden=check.args.student_hidden,
            teacher_hidden=check.args.teacher_hidden,
        ),
        reference="torch backend in float32 (errors judged against float64)",
        first_call_s=first_call_s,
        terms=terms,
        dw_bitwise_repeat=bool(torch.equal(first[2], second[2])),
        dh_bitwise_repeat=bool(torch.equal(first[1], second[1])),
        loss_bitwise_repeat=bool(torch.equal(first[0], second[0])),
    )
    ok = ok and fields["dw_bitwise_repeat"]
    if backend == "triton":
        update = dw_update_tokens(dtype)
        fields.update(dw_update_tokens=update, dw_updates=math.ceil(counted / update))
        ok = ok and fields["dw_updates"] >= 2
    else:
        from fusedkd._dispatch import tiles_chunk_size

        chunk = options.get("chunk_size") or tiles_chunk_size(check.args.vocab, None)
        fields.update(tiles_chunk=chunk, tiles_chunks=math.ceil(counted / chunk))
    fields["ok"] = ok
    return fields


# --- step: the top-k loss's tile path -----------------------------------------------------------------


def topk_step(check: Check) -> dict:
    """`fused_linear_topk_kd_loss` (tail "bucket", forward KL + CE) at the correctness check's N, bf16:
    backend "tiles" (the student's float32 tile on cuBLAS, two Triton passes) against float64 (the
    torch backend on the same bf16-rounded inputs), within 3x the torch backend's own bf16 error (floor
    2^-6); a second call's dW bitwise equal; then both backends timed (3 calls each, forward + backward)."""
    torch, fusedkd = check.torch, check.fusedkd
    x = correctness_inputs(check, torch.bfloat16)
    k = 8 if check.args.dry_run else TOPK_K
    ids, logprobs = fusedkd.teacher_topk(x["teacher_hidden"], x["teacher_weight"], k, temperature=TEMPERATURE)
    x = dict(student_hidden=x["student_hidden"], student_weight=x["student_weight"], labels=x["labels"])

    def run(backend, dtype):
        y = _trainable({k_: (v.to(dtype) if v.is_floating_point() else v) for k_, v in x.items()})
        loss = fusedkd.fused_linear_topk_kd_loss(
            y["student_hidden"], y["student_weight"], ids, logprobs, y["labels"],
            temperature=TEMPERATURE, alpha=ALPHA, backend=backend,
        )  # fmt: skip
        loss.backward()
        return loss.detach(), y["student_hidden"].grad, y["student_weight"].grad

    synchronize(torch)
    started = time.perf_counter()
    first = run("tiles", torch.bfloat16)
    synchronize(torch)
    first_call_s = time.perf_counter() - started
    second = run("tiles", torch.bfloat16)
    exact = run("torch", torch.float64)
    same = run("torch", torch.bfloat16)
    terms, ok = {}, True
    for what, ours, ex, sm in zip(("loss", "dh", "dW"), first, exact, same):
        err, torch_err = rel_err(ours, ex), rel_err(sm, ex)
        allowed = max(3.0 * torch_err, 2.0**-6)
        finite = bool(torch.isfinite(ours).all())
        terms[what] = dict(
            error_vs_float64=err, torch_backend_error=torch_err, allowed=allowed, finite=finite,
            ok=finite and err <= allowed,
        )  # fmt: skip
        ok = ok and terms[what]["ok"]
    exact = same = None
    times = {}
    for backend in ("tiles", "torch"):
        calls = []
        for _ in range(3):
            synchronize(torch)
            started = time.perf_counter()
            run(backend, torch.bfloat16)
            synchronize(torch)
            calls.append(time.perf_counter() - started)
        times[backend] = 1e3 * statistics.median(calls)
    dw_repeat = bool(torch.equal(first[2], second[2]))
    return dict(
        n=check.args.check_tokens,
        k=k,
        counted_tokens=int((x["labels"] != -100).sum().item()),
        tail="bucket",
        reference="torch backend in float64 on the bf16 inputs",
        first_call_s=first_call_s,
        terms=terms,
        dw_bitwise_repeat=dw_repeat,
        tiles_ms=times["tiles"],
        torch_ms=times["torch"],
        tiles_over_torch=times["tiles"] / times["torch"],
        ok=ok and dw_repeat,
    )


# --- step: timing --------------------------------------------------------------------------------------


def memory_need(check: Check, method: str, n: int) -> tuple[float, str]:
    """Bytes a row needs beyond the inputs already held (x 1.25, plus the margin), and the model."""
    a = check.args
    grads = (n + a.vocab) * a.student_hidden * 2
    if method == "naive":
        extra, model = n * a.vocab * NAIVE_BYTES_PER_ENTRY, "8 N V float32"
    else:
        predicted = check.prediction(method, n)
        extra = 0.0 if predicted is None else predicted["extra_mib"] * MIB
        model = f"gpu_model {MODEL_METHOD.get(method)} extra memory"
    return 1.25 * (extra + grads) + a.memory_margin_mib * MIB, model


def row_estimate(check: Check, method: str, n: int) -> float:
    predicted = check.prediction(method, n)
    per_call_s = 1.0 if predicted is None else predicted["time_ms"] / 1e3
    compile_s = FIRST_CALL_S.get(method, 0.0)
    return ROW_FIXED_S + compile_s + ROW_SLACK * (check.args.repeats + 1) * per_call_s


def timing_step(check: Check, method: str, n: int, x: dict) -> dict:
    torch, a = check.torch, check.args
    fields = dict(method=method, n=n)
    if method == "auto":
        fields["runs"] = check.auto_backend()
    predicted = check.prediction(method, n)
    need, model = memory_need(check, method, n)
    free = 0 if _pretend(a.pretend_full, method, n) else free_memory(torch)
    fields.update(
        memory_need_mib=need / MIB, memory_model=model, free_mib=None if free is None else free / MIB
    )
    if free is not None and need > free:
        note = " (--pretend-full)" if _pretend(a.pretend_full, method, n) else ""
        raise Skip(f"would not fit: needs ~{need / MIB:.4g} MiB ({model}), {free / MIB:.4g} MiB free{note}")
    x = _trainable(x)
    sh, sw = x["student_hidden"], x["student_weight"]
    try:
        loss_fn = build_loss(check, method, x)
        if _pretend(a.pretend_oom, method, n):
            raise torch.cuda.OutOfMemoryError(f"--pretend-oom {a.pretend_oom}: raised before the first call")
        synchronize(torch)
        started = time.perf_counter()
        try:
            run_once(check, loss_fn, x)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:  # torch.compile failing on this machine: Liger eagerly, said so
            if method != "liger" or not liger_compiled(check):
                raise
            fields.update(liger_compiled=False, compile_error=_first_line(exc))
            loss_fn = build_loss(check, method, x, liger_compile=False)
            started = time.perf_counter()
            run_once(check, loss_fn, x)
        synchronize(torch)
        first_call_ms = 1e3 * (time.perf_counter() - started)
        if method == "liger":
            fields.setdefault("liger_compiled", liger_compiled(check))

        sh.grad = sw.grad = None
        free_memory(torch)
        if check.cuda:
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        forward, backward, losses = [], [], []
        for _ in range(a.repeats):
            sh.grad = sw.grad = None
            if check.cuda:
                events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
                events[0].record()
                loss = loss_fn()
                events[1].record()
                loss.backward()
                events[2].record()
                events[2].synchronize()
                forward.append(events[0].elapsed_time(events[1]))
                backward.append(events[1].elapsed_time(events[2]))
            else:
                t0 = time.perf_counter()
                loss = loss_fn()
                t1 = time.perf_counter()
                loss.backward()
                t2 = time.perf_counter()
                forward.append(1e3 * (t1 - t0))
                backward.append(1e3 * (t2 - t1))
            losses.append(loss.detach())
            loss = None  # the call's graph goes before the next call
        totals = [f + b for f, b in zip(forward, backward)]
        fields.update(
            first_call_ms=first_call_ms,
            forward_ms=statistics.median(forward),
            backward_ms=statistics.median(backward),
            total_ms=statistics.median(totals),
            samples_ms=[[f, b] for f, b in zip(forward, backward)],
            # The first call over the steady state: compiling (torch.compile, Triton) and warming up.
            first_call_extra_s=max(0.0, first_call_ms - statistics.median(totals)) / 1e3,
            loss=losses[-1].item(),
        )
        if check.cuda:
            peak = torch.cuda.max_memory_allocated()
            gradients = sh.grad.nbytes + sw.grad.nbytes
            fields.update(
                extra_mib=(peak - before - gradients) / MIB,
                held_before_mib=before / MIB,
                gradients_mib=gradients / MIB,
            )
        else:
            fields["extra_mib"] = None
    finally:
        sh.grad = sw.grad = None
        del x, sh, sw
        free_memory(torch)
    useful = 2.0 * n * a.vocab * (a.teacher_hidden + 3 * a.student_hidden)
    fields["useful_tflops"] = useful / (fields["total_ms"] / 1e3) / 1e12
    if predicted is not None:
        fields.update(
            predicted_ms=predicted["time_ms"],
            measured_over_predicted=fields["total_ms"] / predicted["time_ms"],
            predicted_extra_mib=predicted["extra_mib"],
            model_gpu=check.gpu_name,
        )
        if fields["extra_mib"] is not None:
            fields["extra_over_predicted"] = fields["extra_mib"] / predicted["extra_mib"]
    return fields


# --- step: targets -------------------------------------------------------------------------------------


def targets_step(check: Check, n: int) -> dict:
    """The issue's targets from the measured rows at N = n: PASS / FAIL, or unjudged with why."""
    gm = check.gpu_model
    rows = {r["method"]: r for r in check.rows if r.get("n") == n}

    def measured(method: str, key: str):
        row = rows.get(method)
        if row is None:
            return None, f"{method} not run at N={n}"
        if row["status"] != "ok":
            return None, f"{method} {row['status']}: {row.get('reason') or row.get('error')}"
        if row.get(key) is None:
            return None, f"{method} has no {key} here (no CUDA memory statistics)"
        return row[key], None

    def check_ratio(name, method, other, key, limit, strict=False):
        a, why_a = measured(method, key)
        b, why_b = measured(other, key)
        entry = dict(target=name, limit=limit)
        if why_a or why_b:
            entry.update({"pass": None, "why": why_a or why_b})
        else:
            value = a / b
            entry.update(value=value, **{"pass": value < limit if strict else value <= limit})
        return entry

    checks = {
        "time_vs_liger": check_ratio(
            f"auto's time <= {gm.TARGET_VS_LIGER}x Liger's", "auto", "liger", "total_ms", gm.TARGET_VS_LIGER
        ),
        "time_vs_trl": check_ratio("auto's time below TRL's", "auto", "trl", "total_ms", 1.0, strict=True),
        "memory_vs_liger": check_ratio("auto's extra memory <= Liger's", "auto", "liger", "extra_mib", 1.0),
    }
    fused, why = measured("triton", "extra_mib")
    entry = dict(
        target=f"fused path (triton) extra memory <= {gm.FUSED_MEMORY_LIMIT_MIB} MiB at N=16384",
        limit=gm.FUSED_MEMORY_LIMIT_MIB,
    )
    if why:
        entry.update({"pass": None, "why": why})
    else:
        entry.update(value=fused, **{"pass": fused <= gm.FUSED_MEMORY_LIMIT_MIB})
    if n != gm.FUSED_MEMORY_TOKENS:
        entry["note"] = f"measured at N={n}, not {gm.FUSED_MEMORY_TOKENS}"
    checks["fused_memory_mib"] = entry
    verdicts = [c["pass"] for c in checks.values()]
    judged = [v for v in verdicts if v is not None]
    return dict(
        n=n,
        checks=checks,
        passed=sum(judged),
        failed=len(judged) - sum(judged),
        unjudged=len(verdicts) - len(judged),
        all_pass=None if len(judged) < len(verdicts) else all(judged),
        model_prediction={k: v for k, v in check.model_targets(n).items() if isinstance(v, dict)},
        model_gpu=check.gpu_name,
    )


# --- step: profile -------------------------------------------------------------------------------------


def profile_step(check: Check, n: int, x: dict) -> dict:
    """One step of backend="tiles" under torch.profiler: the top CUDA kernels by time (CPU: operators)."""
    torch = check.torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    x = _trainable(x)
    loss_fn = build_loss(check, "tiles", x)
    if check.cuda:  # warm: compiled by now (the timing rows), but a first call after a skipped row
        run_once(check, loss_fn, x)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if check.cuda else [])
    synchronize(torch)
    with profile(activities=activities) as prof:
        run_once(check, loss_fn, x)
        synchronize(torch)
    x["student_hidden"].grad = x["student_weight"].grad = None

    def device_us(event) -> float:
        for attribute in ("self_device_time_total", "self_cuda_time_total"):
            value = getattr(event, attribute, None)
            if value:
                return float(value)
        return 0.0

    events = list(prof.key_averages())
    if check.cuda:
        kernels = [e for e in events if e.device_type == DeviceType.CUDA]
        if not kernels:  # an older profiler: CPU entries that carry device time
            kernels = [e for e in events if device_us(e) > 0]
        timed = [(device_us(e), e) for e in kernels]
        what = "CUDA kernels (self device time)"
    else:
        timed = [(float(e.self_cpu_time_total), e) for e in events]
        what = "CPU operators (self CPU time): no CUDA device, so no kernel times"
    timed.sort(key=lambda item: -item[0])
    total_us = sum(us for us, _ in timed)
    if check.cuda and total_us == 0:  # the profiler's CUDA activity did not start (it only warns)
        raise Skip("the profiler recorded no CUDA kernel time (CUPTI unavailable?)")
    top = [
        dict(kernel=e.key[:160], calls=e.count, total_ms=us / 1e3, share=us / total_us if total_us else None)
        for us, e in timed[:TOP_KERNELS]
    ]
    return dict(method="tiles", n=n, what=what, entries=len(timed), total_ms=total_us / 1e3, top=top)


# --- the readable side ---------------------------------------------------------------------------------


def _ms(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def _ident(r: dict) -> str:
    """A line's step and what it is about: "timing method=liger n=16384"."""
    keys = ("gemm", "method", "backend", "dtype", "n")
    return " ".join([r["step"]] + [f"{k}={r[k]}" for k in keys if k in r])


def describe(r: dict) -> str:
    """One readable line for a JSON line."""
    head = f"[{r['t_s']:6.1f} s] {r['step']}"
    if r["status"] != "ok":
        return f"[{r['t_s']:6.1f} s] {_ident(r)} {r['status'].upper()}: {r.get('reason') or r.get('error')}"
    step = r["step"]
    if step == "machine":
        return f"{head}: {r['info'].get('gpu') or 'CPU'}; plan {r['plan_total_s']:.0f} s"
    if step == "gemm":
        return (
            f"{head} {r['gemm']} {r['shape']}: {r['ms']:.3f} ms, {r['tflops']:.3g} TFLOP/s "
            f"(model assumes {r['model_assumed_tflops']:.0f}: {r['measured_over_assumed']:.2f}x)"
        )
    if step == "compile":
        return (
            f"{head} {r['method']}: first call {r['first_call_s']:.2f} s, second {r['second_call_s']:.3f} s, "
            f"compile ~{r['compile_s']:.2f} s"
        )
    if step == "correctness":
        worst = max(t["error_vs_float64"] / t["allowed"] for t in r["terms"].values())
        extra = f", {r['dw_updates']} dW updates" if "dw_updates" in r else f", {r['tiles_chunks']} chunks"
        return (
            f"{head} {r['backend']} {r['dtype']} N={r['n']}: {'ok' if r['ok'] else 'FAILED'} "
            f"(worst error / allowed {worst:.2f}, dW bitwise repeat {r['dw_bitwise_repeat']}{extra}, "
            f"first call {r['first_call_s']:.1f} s)"
        )
    if step == "topk":
        worst = max(t["error_vs_float64"] / t["allowed"] for t in r["terms"].values())
        return (
            f"{head} tiles bf16 N={r['n']} k={r['k']}: {'ok' if r['ok'] else 'FAILED'} (worst error / "
            f"allowed {worst:.2f}, dW bitwise repeat {r['dw_bitwise_repeat']}); {r['tiles_ms']:.1f} ms "
            f"against the torch backend's {r['torch_ms']:.1f} ms ({r['tiles_over_torch']:.2f}x)"
        )
    if step == "timing":
        ratio = r.get("measured_over_predicted")
        return (
            f"{head} N={r['n']} {r['method']}: fwd {_ms(r['forward_ms'])} + bwd {_ms(r['backward_ms'])} = "
            f"{_ms(r['total_ms'])} ms (predicted {_ms(r.get('predicted_ms'))}"
            f"{'' if ratio is None else f', {ratio:.2f}x'}), extra {_ms(r['extra_mib'])} MiB, "
            f"first call {r['first_call_ms']:.0f} ms"
        )
    if step == "targets":
        marks = {True: "PASS", False: "FAIL", None: "unjudged"}
        return f"{head} N={r['n']}: " + "; ".join(
            f"{c['target']}: {marks[c['pass']]}"
            + (f" ({c['value']:.2f})" if "value" in c else f" ({c.get('why')})")
            for c in r["checks"].values()
        )
    if step == "profile":
        first = r["top"][0] if r["top"] else {}
        return (
            f"{head} tiles N={r['n']}: {r['entries']} entries, {r['total_ms']:.1f} ms; "
            f"top {first.get('kernel')}"
        )
    if step == "summary":
        return f"{head}: {r['counts']} in {r['t_s']:.0f} s"
    return head


def table(check: Check) -> list[str]:
    lines = [
        f"{'N':>6} {'method':<7} {'runs':<6} {'fwd ms':>8} {'bwd ms':>8} {'total':>8} {'pred ms':>8} "
        f"{'meas/pred':>9} {'extra MiB':>9} {'pred MiB':>8} {'first ms':>8}"
    ]
    lines.append("-" * len(lines[0]))
    for r in sorted(check.rows, key=lambda r: r["n"]):  # by N (they ran the compared N first); stable
        if r["status"] != "ok":
            lines.append(f"{r['n']:>6} {r['method']:<7} {r['status']}: {r.get('reason') or r.get('error')}")
            continue
        ratio = r.get("measured_over_predicted")
        lines.append(
            f"{r['n']:>6} {r['method']:<7} {r.get('runs', r['method']):<6} {_ms(r['forward_ms']):>8} "
            f"{_ms(r['backward_ms']):>8} {_ms(r['total_ms']):>8} {_ms(r.get('predicted_ms')):>8} "
            f"{'-' if ratio is None else f'{ratio:.2f}x':>9} {_ms(r['extra_mib']):>9} "
            f"{_ms(r.get('predicted_extra_mib')):>8} {r['first_call_ms']:>8.0f}"
        )
    return lines


# --- main ----------------------------------------------------------------------------------------------


# The order the steps run in: what a cut-off run must not lose first. The float32 correctness of both
# backends, then the comparison (N = --compare-tokens: the fusedkd rows, the peers, the targets,
# the profile), then bf16 correctness, the top-k tiles, and the other token counts.
PHASES = (
    "gemm",
    "compile",
    "correctness float32",
    "timing compared",
    "correctness bfloat16",
    "topk",
    "timing",
)


def phase_tokens(args, phase: str) -> list[int]:
    """The token counts of a timing phase."""
    compared = phase == "timing compared"
    return [n for n in args.tokens if (n == args.compare_tokens) == compared]


def timing_methods(args, n: int) -> list[str]:
    return args.methods + (args.peers if n == args.compare_tokens else [])


def plan(check: Check) -> list[tuple[str, float]]:
    """Every step and its estimate, in the order `run_phase` runs them (the timing rows' estimates
    from the model's predictions)."""
    a = check.args
    steps = [("machine", BUDGET_S["machine"])]
    for phase in PHASES:
        if phase == "gemm":
            steps += [(f"gemm N={n}", 4 * BUDGET_S["gemm"]) for n in a.gemm_tokens]
        elif phase == "compile":
            steps += [(f"compile {m}", BUDGET_S[f"compile {m}"]) for m in ("tiles", "triton")]
        elif phase.startswith("correctness"):
            steps += [(f"{phase} {b}", BUDGET_S[f"{phase} {b}"]) for b in ("tiles", "triton")]
        elif phase == "topk":
            steps += [("topk", BUDGET_S["topk"])]
        else:
            for n in phase_tokens(a, phase):
                steps += [(f"timing N={n} {m}", row_estimate(check, m, n)) for m in timing_methods(a, n)]
                if n == a.compare_tokens:
                    steps += [("targets", 0.0), ("profile", BUDGET_S["profile"])]
    return steps


class LazyInputs:
    """One N's inputs, made on the device by the first step that needs them (so that a failure to
    make them, out of memory included, is that step's line, not the end of the check)."""

    def __init__(self, check: Check, n: int):
        self.check, self.n, self.x = check, n, None

    def __call__(self) -> dict:
        if self.x is None:
            self.x = self.check.inputs(self.n)
        return self.x


def run_phase(check: Check, phase: str) -> None:
    """Run one of PHASES' steps, each writing its line; device memory released after."""
    torch, args = check.torch, check.args
    if phase == "gemm":
        for n in args.gemm_tokens:
            for name, _ in gemm_shapes(check, n):
                check.step(
                    "gemm", BUDGET_S["gemm"], lambda name=name, n=n: gemm_step(check, name, n), gemm=name, n=n
                )
    elif phase == "compile":
        compile_n = args.tokens[0] if args.dry_run else 1024
        inputs = LazyInputs(check, compile_n)
        for method in ("tiles", "triton"):
            check.step(
                "compile",
                BUDGET_S[f"compile {method}"],
                lambda method=method: compile_step(check, method, inputs()),
                method=method,
                n=compile_n,
                dtype="bfloat16",
            )
    elif phase.startswith("correctness"):
        name = phase.split()[1]
        dtype = getattr(torch, name)
        refs = References()
        for backend in ("tiles", "triton"):
            estimate = BUDGET_S[f"{phase} {backend}"]
            if backend != "tiles" and dtype not in refs.by_dtype:  # its references too
                estimate += BUDGET_S[f"{phase} tiles"]
            check.step(
                "correctness",
                estimate,
                lambda backend=backend: correctness_step(check, refs, dtype, backend),
                backend=backend,
                dtype=name,
                n=args.check_tokens,
            )
        refs.by_dtype.clear()
    elif phase == "topk":
        check.step("topk", BUDGET_S["topk"], lambda: topk_step(check), n=args.check_tokens)
    else:
        for n in phase_tokens(args, phase):
            inputs = LazyInputs(check, n)  # once per N, shared by every method
            for method in timing_methods(args, n):
                line = check.step(
                    "timing",
                    row_estimate(check, method, n),
                    lambda method=method, n=n, inputs=inputs: timing_step(check, method, n, inputs()),
                    method=method,
                    n=n,
                )
                check.rows.append(line)
            if n == args.compare_tokens:
                # Computed from the lines above (no device work): never refused by the budget.
                check.step("targets", 0.0, lambda n=n: targets_step(check, n), guard=False, n=n)
                check.step(
                    "profile", BUDGET_S["profile"], lambda n=n, x=inputs: profile_step(check, n, x()), n=n
                )
            inputs = None  # this N's inputs go before the next N's are made
            free_memory(torch)
    free_memory(torch)


def print_readable(check: Check, records: list[dict], targets: dict | None) -> None:
    """The end of stderr: the GEMM, compile and correctness lines again, the table, the targets."""
    args = check.args
    log("")
    log(
        f"fusedkd GPU check: {check.report.machine}; bf16, V={args.vocab} H_s={args.student_hidden} "
        f"H_t={args.teacher_hidden}, forward KL T={TEMPERATURE} + CE alpha={ALPHA}; "
        f"median of {args.repeats}; "
        f"predicted: benchmarks/gpu_model.py, {check.gpu_name} figures; extra = peak - held before - "
        "student gradients (trl: divergence only, no CE)"
    )
    for record in records:  # again, next to the table: the lines a reader wants first
        if record["step"] in ("gemm", "compile", "correctness", "topk") or record["status"] == "failed":
            log(describe(record))
    for line in table(check):
        log(line)
    if targets is not None:
        log(describe(targets))
    if args.dry_run:
        log("dry run: tiny shapes on Triton's interpreter; the numbers mean nothing")
    log(f"details: {args.output} ({time.perf_counter() - START:.0f} s)")


def main(argv=None) -> int:
    args = parse_args(argv)
    report = Report(args.output)
    torch = import_torch(args.dry_run)
    if not args.dry_run and not torch.cuda.is_available():
        report.emit("machine", "failed", error="no CUDA device: run with --dry-run to exercise the check")
        report.close()
        return 2
    budget = Budget(args.max_minutes)
    check = Check(torch, args, report, budget)
    report.machine = torch.cuda.get_device_name() if check.cuda else "cpu (dry run, Triton interpreter)"
    steps = plan(check)
    report.emit(
        "machine",
        info=machine_info(torch, args),
        model_gpu=check.gpu_name,
        model_gpu_reason=check.gpu_reason,
        args=vars(args),
        shapes=dict(vocab=args.vocab, student_hidden=args.student_hidden, teacher_hidden=args.teacher_hidden),
        loss=dict(divergence=DIVERGENCE, temperature=TEMPERATURE, alpha=ALPHA, dtype="bfloat16"),
        plan=[dict(step=name, estimate_s=round(s, 1)) for name, s in steps],
        plan_total_s=sum(s for _, s in steps),
        max_minutes=args.max_minutes,
        estimate_s=BUDGET_S["machine"],
        elapsed_s=round(time.perf_counter() - START, 3),
    )

    interrupted = None
    try:
        for phase in PHASES:
            run_phase(check, phase)
    except KeyboardInterrupt:  # `timeout -s INT` in gpu_check.sh: the summary and the table still come
        interrupted = f"interrupted after {time.perf_counter() - START:.0f} s"
        log(interrupted)

    records = report.records
    counts = {}
    for r in records:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    correctness = [r for r in records if r["step"] in ("correctness", "topk")]
    correctness_failed = [
        f"{r.get('backend', 'topk tiles')} {r.get('dtype', 'bfloat16')}"
        for r in correctness
        if r["status"] == "failed" or not r.get("ok", True)
    ]
    targets = next((r for r in records if r["step"] == "targets" and r["status"] == "ok"), None)
    report.emit(
        "summary",
        counts=counts,
        correctness_ok=None if not correctness else not correctness_failed,
        correctness_failed=correctness_failed,
        targets_all_pass=None if targets is None else targets["all_pass"],
        targets={} if targets is None else {k: c["pass"] for k, c in targets["checks"].items()},
        skipped=[f"{_ident(r)}: {r['reason']}" for r in records if r["status"] == "skipped"],
        failed=[f"{_ident(r)}: {r.get('error')}" for r in records if r["status"] == "failed"],
        plan_total_s=sum(s for _, s in steps),
        interrupted=interrupted,
        elapsed_s=round(time.perf_counter() - START, 3),
    )
    report.close()

    try:
        print_readable(check, records, targets)
    except Exception as exc:  # the JSON lines are written already
        log(f"(no readable summary: {_first_line(exc)})")
    return 1 if correctness_failed else 0


if __name__ == "__main__":
    sys.exit(main())
