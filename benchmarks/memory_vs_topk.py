"""Memory, time and exactness of every distillation-loss approach, side by side.

    python benchmarks/memory_vs_topk.py            # full sweeps (CPU: N = 256 .. 4096; CUDA: up to 32k)
    python benchmarks/memory_vs_topk.py --quick    # small sweeps: about 2 minutes on a 2-core CPU
    python benchmarks/memory_vs_topk.py --smoke    # tiny shapes, about 10 s: keeps the script from rotting

Every method computes the same loss (docs/design.md §2, forward KL, no ignored tokens, so the usual
`batchmean` is the mean over tokens) from the same inputs, the final hidden states and lm_head weights
of a student and a teacher, and the student's gradients (hidden states and lm_head weight) are included
in what is timed and measured:

- naive:       both models' logits, `nn.KLDivLoss(batchmean)(log_softmax(s / T), softmax(t / T)) * T^2`
               plus `F.cross_entropy(s, labels)`, as commonly written, in the input dtype;
- vocab_chunk: the same, with the softmax taken within each vocab chunk and the chunk KLs weighted by
               the chunk widths (the common wrong recipe of docs/design.md §1), in one autograd graph;
- masked_topk: the same, with the teacher logits outside its top-k set to -inf through a full-size
               tensor (`full_like(-inf).scatter_`), the student over the full vocabulary;
- liger:       `LigerFusedLinearJSDLoss(beta=0)` (forward KL; its soft weight is alpha*T^2 so that it
               computes the same loss), torch.compile'd, when liger-kernel is installed;
- trl:         TRL's `trl.kernels.chunked_divergence.ChunkedDivergenceFunction(beta=0)` (forward KL;
               the loss of TRL's `DistillationTrainer`), times T^2, mean over tokens, when trl is
               installed. It computes the divergence only, no cross-entropy term: it runs at
               `--alpha 1` only (KD-only comparison) and is skipped, saying so, at any other alpha.
               It projects 4,096 x 32,768 float32 tiles with torch matmuls; its per-tile statistics
               run as Triton kernels on CUDA / XPU and as torch operations elsewhere (so on a CPU
               this measures its torch fallback);
- fusedkd:     `fusedkd.fused_linear_kd_loss` (backend "auto": PyTorch on a CPU, Triton on CUDA);
- sparse_topk: `fusedkd.fused_linear_topk_kd_loss` from the teacher's top-k.
               Offline setting: `fusedkd.teacher_topk` runs once per point, outside the timed region,
               and its outputs count as inputs; the timed step is the student's loss and gradients.

Measured for each method and point (tokens N, and k for the top-k methods):

- peak memory: on CUDA, `max_memory_allocated()` after a reset, minus the memory allocated before the
  call; on a CPU, the peak resident-set growth over the inputs (benchmarks/_measure.py), each method in
  its own subprocess;
- time: the median of `--repeats` warm calls (forward + backward) after `--warmup` calls;
- exactness, at N = `--exact-tokens`: relative error of the loss and norm-wise relative error of the
  student gradients against a float64 dense computation of the exact loss (`fusedkd.reference`). For
  the chunk, masked and sparse methods that is their approximation error against the exact loss.

The teacher is peaked, as a trained LLM's is: each token's teacher hidden state is pushed along one
teacher weight row, so that the teacher puts most of its mass on one token over a Gaussian tail (its
mean top-1 probability and entropy are printed). The labels are those tokens.

Theory column (`b` bytes per logit in the input dtype, `floor` = V * H_s * 4, the float32 student weight
gradient every method must hold):

- naive: 7 N V b. At the forward's peak, inside `kl_div`, the live `[N, V]` tensors are both models'
  logits, log q, p, `xlogy(p, p)`, `p * log q` and their difference. The weight gradient is allocated
  later, when most of them are freed, so the peak is not floor + 7 N V b.
- vocab_chunk: 5 N V b: logits of both models, log q and p of every chunk (kept for the backward of
  the one graph) and the cross-entropy's log-softmax; one chunk's `kl_div` temporaries are freed by
  then. Chunking the softmax leaves the peak linear in N V; bounding it would take a backward per chunk.
- masked_topk: 8 N V b + N k (b + 8): the naive recipe's seven plus the full-size masked teacher
  tensor, and `topk`'s values and int64 indices.
- liger: >= 2 min(N, 1024) V b + floor: both models' logits of a 1024-token chunk (a lower bound).
- trl: >= 2 min(N, 4096) min(V, 32768) 4 + floor: its two float32 tile buffers (a lower bound; on a
  CPU its torch fallback also makes several tile-sized temporaries per tile).
- fusedkd: torch backend floor + 2 c V 4 + 4 r V 4 (its two float32 `c x V` logit tiles, c its
  default token chunk, and up to four scratch blocks of r rows, its element-wise row group on the
  device); Triton backend >= floor (a lower bound: the backward also holds O(N) statistics, a float32
  hidden-state gradient, per-program weight-gradient rows and staging, modelled in
  benchmarks/gpu_model.py).
- sparse_topk: >= floor (its working tiles are not modelled here).

Output: markdown tables on stdout, and under `--out` (default results/memory_vs_topk, git-ignored):
memory_vs_topk.csv (one row per method, k and N), memory_vs_topk.json (configuration, machine,
versions, teacher statistics, raw timing samples), tables.md, and the plots memory_vs_tokens.png,
error_vs_k.png and memory_vs_k.png (when matplotlib is installed).

On a CPU, points whose theoretical peak exceeds `--max-memory-gib` (default half the memory available
at start) are skipped, and say so, rather than run the machine out of memory. On CUDA they run, and an
out-of-memory error is recorded as such.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _measure import (  # noqa: E402
    available_memory_gib,
    git_revision,
    machine_description,
    stream_subprocess,
    time_and_peak,
)

METHODS = ("naive", "vocab_chunk", "masked_topk", "liger", "trl", "fusedkd", "sparse_topk")
TOPK_METHODS = ("masked_topk", "sparse_topk")
COLORS = {
    "naive": "tab:gray",
    "vocab_chunk": "tab:red",
    "masked_topk": "tab:blue",
    "liger": "tab:purple",
    "trl": "tab:brown",
    "fusedkd": "tab:green",
    "sparse_topk": "tab:orange",
}
LIGER_CHUNK_TOKENS = 1024  # LigerFusedLinearJSDLoss's default chunk_size
TRL_TILE = (4096, 32768)  # trl.kernels.chunked_divergence TOKEN_CHUNK_SIZE, VOCAB_CHUNK_SIZE
CSV_COLUMNS = (
    "method",
    "detail",
    "k",
    "tokens",
    "seconds",
    "seconds_min",
    "seconds_max",
    "peak_mib",
    "theory_mib",
    "theory",
    "floor_mib",
    "loss",
    "loss_rel_err",
    "grad_hidden_rel_err",
    "grad_weight_rel_err",
    "teacher_topk_mass",
    "load_1min",
    "error",
)


@dataclass
class Config:
    """Everything a worker needs to rebuild the inputs and the methods of a point."""

    device: str
    dtype: str
    vocab: int
    student_hidden: int
    teacher_hidden: int
    tokens: list[int]  # N sweep
    ks: list[int]  # k sweep
    k_sweep_tokens: int  # N of the k sweep
    tokens_sweep_k: int  # k of the top-k methods in the N sweep
    exact_tokens: int  # N of the exactness check against the float64 reference
    temperature: float
    alpha: float
    vocab_chunk: int
    liger_compiled: bool
    topk_tail: str
    repeats: int
    warmup: int
    teacher_peak: float  # teacher's favourite logit is log(V) + teacher_peak above the tail's center
    seed: int
    threads: int  # torch threads in the workers; 0: torch's default


@dataclass(frozen=True)
class Job:
    method: str  # one of METHODS, or "reference"
    tokens: int
    k: int | None = None


# ----------------------------------------------------------------------------------------------------
# Inputs and methods (run inside the workers)


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def make_weights(cfg: Config):
    """Seeded lm_head weights (student_weight [V, H_s], teacher_weight [V, H_t]), float32, standard normal."""
    import torch

    device = torch.device(cfg.device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    student_weight = torch.randn(cfg.vocab, cfg.student_hidden, generator=gen, device=device)
    teacher_weight = torch.randn(cfg.vocab, cfg.teacher_hidden, generator=gen, device=device)
    return student_weight, teacher_weight


def make_inputs(cfg: Config, tokens: int, weights=None):
    """Seeded inputs (student_hidden, student_weight, teacher_hidden, teacher_weight, labels).

    Logits have standard deviation about 1 (student) and 2 (teacher tail); each token's teacher hidden
    state adds `log(V) + teacher_peak` to the logit of one favourite token, which is also its label.
    The same (cfg, tokens) gives the same tensors in every process; `weights` (from `make_weights`)
    saves drawing the weights again.
    """
    import torch

    device, dtype = torch.device(cfg.device), torch_dtype(cfg.dtype)
    student_weight, teacher_weight = weights if weights is not None else make_weights(cfg)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    v, hs, ht = cfg.vocab, cfg.student_hidden, cfg.teacher_hidden
    student_hidden = torch.randn(tokens, hs, generator=gen, device=device) / hs**0.5
    favourite = torch.randint(0, v, (tokens,), generator=gen, device=device)
    direction = teacher_weight[favourite]
    direction /= direction.square().sum(-1, keepdim=True)  # <w_fav, direction> = 1
    teacher_hidden = 2.0 * torch.randn(tokens, ht, generator=gen, device=device) / ht**0.5
    teacher_hidden += (math.log(v) + cfg.teacher_peak) * direction
    return (
        student_hidden.to(dtype).requires_grad_(),
        student_weight.to(dtype).requires_grad_(),
        teacher_hidden.to(dtype),
        teacher_weight.to(dtype),
        favourite,
    )


def sparse_topk_api() -> tuple[Callable, Callable]:
    """(teacher_topk, fused_linear_topk_kd_loss) of fusedkd."""
    import fusedkd

    return fusedkd.teacher_topk, fusedkd.fused_linear_topk_kd_loss


def trl_unavailable_reason(cfg: Config) -> str | None:
    """Why TRL's ChunkedDivergenceFunction cannot be a row of this run, or None."""
    if importlib.util.find_spec("trl") is None:
        return 'trl is not installed (pip install -e ".[trl]")'
    if cfg.alpha != 1:
        return (
            f"TRL's ChunkedDivergenceFunction has no cross-entropy term, so it is compared at --alpha 1 "
            f"only (this run: alpha={cfg.alpha})"
        )
    return None


def fusedkd_backend(device: str) -> str:
    import torch

    from fusedkd._dispatch import resolve_backend

    return resolve_backend("auto", torch.device(device))


def kd_recipe(student_logits, teacher_logits, labels, cfg: Config):
    """The usual recipe on materialized logits: alpha T^2 KLDivLoss(batchmean) + (1 - alpha) CE."""
    import torch
    import torch.nn.functional as F

    T = cfg.temperature
    kl = torch.nn.KLDivLoss(reduction="batchmean")
    distill = kl(F.log_softmax(student_logits / T, dim=-1), F.softmax(teacher_logits / T, dim=-1))
    ce = F.cross_entropy(student_logits, labels)
    return cfg.alpha * T * T * distill + (1 - cfg.alpha) * ce


def vocab_chunk_recipe(student_logits, teacher_logits, labels, cfg: Config):
    """The usual recipe with the softmax within vocab chunks, chunk KLs weighted by width (biased)."""
    import torch
    import torch.nn.functional as F

    T = cfg.temperature
    kl = torch.nn.KLDivLoss(reduction="batchmean")
    vocab = student_logits.shape[-1]
    distill = 0.0
    for student_chunk, teacher_chunk in zip(
        student_logits.split(cfg.vocab_chunk, dim=-1), teacher_logits.split(cfg.vocab_chunk, dim=-1)
    ):
        width = student_chunk.shape[-1]
        distill = distill + width / vocab * kl(
            F.log_softmax(student_chunk / T, dim=-1), F.softmax(teacher_chunk / T, dim=-1)
        )
    ce = F.cross_entropy(student_logits, labels)
    return cfg.alpha * T * T * distill + (1 - cfg.alpha) * ce


def build_loss(method: str, k: int | None, inputs, cfg: Config) -> Callable[[], object]:
    """A closure computing the method's loss (with autograd) on `inputs`."""
    import torch

    student_hidden, student_weight, teacher_hidden, teacher_weight, labels = inputs
    T, alpha = cfg.temperature, cfg.alpha

    if method in ("naive", "vocab_chunk"):
        recipe = kd_recipe if method == "naive" else vocab_chunk_recipe

        def loss_fn():
            student_logits = student_hidden @ student_weight.T
            with torch.no_grad():
                teacher_logits = teacher_hidden @ teacher_weight.T
            return recipe(student_logits, teacher_logits, labels, cfg)

    elif method == "masked_topk":

        def loss_fn():
            student_logits = student_hidden @ student_weight.T
            with torch.no_grad():
                teacher_logits = teacher_hidden @ teacher_weight.T
                top = teacher_logits.topk(k, dim=-1)
                masked = torch.full_like(teacher_logits, float("-inf")).scatter_(-1, top.indices, top.values)
            return kd_recipe(student_logits, masked, labels, cfg)

    elif method == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        # Liger's soft loss is the KL at temperature T without the T^2 factor: weight it in.
        criterion = LigerFusedLinearJSDLoss(
            weight_hard_loss=1 - alpha,
            weight_soft_loss=alpha * T * T,
            beta=0.0,
            temperature=T,
            compiled=cfg.liger_compiled,
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
            return T * T * divergence.mean()  # alpha = 1: the loss of the other methods

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
            )

    elif method == "sparse_topk":
        teacher_topk, topk_loss = sparse_topk_api()
        with torch.no_grad():  # offline: once per point, outside the timed region
            ids, logprobs = teacher_topk(teacher_hidden, teacher_weight, k, temperature=T)

        def loss_fn():
            return topk_loss(
                student_hidden,
                student_weight,
                ids,
                logprobs,
                labels,
                temperature=T,
                alpha=alpha,
                tail=cfg.topk_tail,
            )

    else:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    return loss_fn


def rel_err(actual, expected) -> float:
    """Norm-wise relative error, in float64."""
    actual, expected = actual.double(), expected.double().to(actual.device)
    scale = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff / scale if scale > 0 else diff


def run_reference(cfg: Config, path: str) -> dict:
    """Float64 exact loss and gradients at N = exact_tokens, saved to `path`; teacher statistics."""
    import torch

    import fusedkd

    student_hidden, student_weight, teacher_hidden, teacher_weight, labels = make_inputs(
        cfg, cfg.exact_tokens
    )
    hidden64 = student_hidden.detach().double().requires_grad_()
    weight64 = student_weight.detach().double().requires_grad_()
    teacher_hidden64, teacher_weight64 = teacher_hidden.double(), teacher_weight.double()
    start = time.perf_counter()
    loss = fusedkd.reference.fused_linear_kd_loss(
        hidden64,
        weight64,
        teacher_hidden64,
        teacher_weight64,
        labels,
        temperature=cfg.temperature,
        alpha=cfg.alpha,
    )
    loss.backward()
    seconds = time.perf_counter() - start
    reference_loss = loss.item()
    torch.save(
        {"loss": loss.detach().cpu(), "grad_hidden": hidden64.grad.cpu(), "grad_weight": weight64.grad.cpu()},
        path,
    )
    del hidden64, weight64, loss
    with torch.no_grad():
        log_p = torch.log_softmax(teacher_hidden64 @ teacher_weight64.T / cfg.temperature, dim=-1)
        p = log_p.exp()
        entropy = -(p * log_p).sum(-1).mean().item()
        top_mass = {}
        for k in sorted({*cfg.ks, cfg.tokens_sweep_k}):
            top_mass[str(k)] = 1.0 if k >= cfg.vocab else p.topk(k, dim=-1).values.sum(-1).mean().item()
    return {
        "method": "reference",
        "tokens": cfg.exact_tokens,
        "loss": reference_loss,
        "seconds": seconds,
        "teacher_top1": top_mass.get("1", p.max(-1).values.mean().item()),
        "teacher_entropy": entropy,
        "teacher_topk_mass": top_mass,
    }


def run_job(job: Job, cfg: Config, reference_path: str, cache: dict) -> dict:
    """Time, peak memory and (at N = exact_tokens) exactness of one method at one point."""
    import gc

    import torch

    record: dict = {"method": job.method, "tokens": job.tokens, "k": job.k}
    device_type = torch.device(cfg.device).type
    try:
        if job.method == "reference":
            return {**record, **run_reference(cfg, reference_path)}
        if "weights" not in cache:
            cache["weights"] = make_weights(cfg)
        inputs = make_inputs(cfg, job.tokens, cache["weights"])
        student_hidden, student_weight = inputs[0], inputs[1]
        loss_fn = build_loss(job.method, job.k, inputs, cfg)
        last: dict = {}

        def drop_gradients() -> None:
            student_hidden.grad = None
            student_weight.grad = None

        def step() -> None:
            loss = loss_fn()
            loss.backward()
            last["loss"] = loss.detach()

        record.update(time_and_peak(step, cfg.repeats, cfg.warmup, device_type, before_each=drop_gradients))
        record["seconds_min"], record["seconds_max"] = min(record["samples"]), max(record["samples"])
        record["load_1min"] = os.getloadavg()[0]  # the machine's 1-minute load average after the point
        record["loss"] = last["loss"].item()
        if job.tokens == cfg.exact_tokens:
            if "reference" not in cache:
                cache["reference"] = torch.load(reference_path)
            reference = cache["reference"]
            record["loss_rel_err"] = rel_err(last["loss"], reference["loss"])
            record["grad_hidden_rel_err"] = rel_err(student_hidden.grad, reference["grad_hidden"])
            record["grad_weight_rel_err"] = rel_err(student_weight.grad, reference["grad_weight"])
    except torch.OutOfMemoryError:
        record["error"] = "out of memory"
    except Exception as exc:
        record["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    finally:
        gc.collect()
        if device_type == "cuda":
            torch.cuda.empty_cache()
    return record


def worker(plan_path: str) -> None:
    with open(plan_path) as f:
        plan = json.load(f)
    cfg = Config(**plan["config"])
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    cache: dict = {}
    for job in plan["jobs"]:
        record = run_job(Job(**job), cfg, plan["reference_path"], cache)
        print(json.dumps(record), flush=True)


# ----------------------------------------------------------------------------------------------------
# Planning (in the parent)


def floor_bytes(cfg: Config) -> int:
    return cfg.vocab * cfg.student_hidden * 4


def theory(method: str, tokens: int, k: int | None, cfg: Config, backend: str) -> tuple[float, str]:
    """(expected peak bytes, formula) of one method at one point; see the module docstring."""
    import torch

    from fusedkd.torch_backend.tiles import LINEAR_TILE_BYTES, Scratch, default_chunk_size

    b = torch.finfo(torch_dtype(cfg.dtype)).bits // 8
    nv = tokens * cfg.vocab
    floor = floor_bytes(cfg)
    if method == "naive":
        return 7 * nv * b, "7NVb"
    if method == "vocab_chunk":
        return 5 * nv * b, "5NVb"
    if method == "masked_topk":
        return 8 * nv * b + tokens * k * (b + 8), "8NVb+Nk(b+8)"
    if method == "liger":
        return 2 * min(tokens, LIGER_CHUNK_TOKENS) * cfg.vocab * b + floor, ">=2min(N,1024)Vb+floor"
    if method == "trl":
        tile = min(tokens, TRL_TILE[0]) * min(cfg.vocab, TRL_TILE[1]) * 4
        return 2 * tile + floor, ">=2min(N,4096)min(V,32768)4+floor"
    if method == "fusedkd" and backend == "torch":
        chunk = min(tokens, default_chunk_size(cfg.vocab, 4, LINEAR_TILE_BYTES))
        rows = Scratch(chunk, cfg.vocab, torch.float32, torch.device(cfg.device)).rows
        return (2 * chunk + Scratch.BLOCKS * rows) * cfg.vocab * 4 + floor, "2cV4+4rV4+floor"
    if method == "fusedkd":  # plus the backward's O(N) buffers (benchmarks/gpu_model.py)
        return floor, ">=floor"
    if method == "sparse_topk":
        return floor, ">=floor"
    raise ValueError(method)


def plan_jobs(methods: Iterable[str], cfg: Config) -> dict[str, list[Job]]:
    """The points of every method: the N sweep, the exactness N, the k sweep (top-k methods)."""
    dense_tokens = sorted({*cfg.tokens, cfg.exact_tokens, cfg.k_sweep_tokens})
    jobs: dict[str, list[Job]] = {}
    for method in methods:
        if method in TOPK_METHODS:
            points = {(n, cfg.tokens_sweep_k) for n in cfg.tokens}
            points |= {(n, k) for n in (cfg.k_sweep_tokens, cfg.exact_tokens) for k in cfg.ks}
            jobs[method] = [Job(method, n, k) for n, k in sorted(points)]
        else:
            jobs[method] = [Job(method, n) for n in dense_tokens]
    return jobs


def method_detail(method: str, cfg: Config, backend: str) -> str:
    return {
        "naive": "full softmax",
        "vocab_chunk": f"softmax per {cfg.vocab_chunk}-wide vocab chunk",
        "masked_topk": "teacher top-k by -inf masking",
        "liger": "LigerFusedLinearJSDLoss(beta=0), " + ("compiled" if cfg.liger_compiled else "eager"),
        "trl": "trl ChunkedDivergenceFunction(beta=0), KD only (alpha=1), "
        + (
            "Triton statistics"
            if cfg.device.startswith(("cuda", "xpu"))
            else "torch fallback (no Triton on CPU)"
        ),
        "fusedkd": f"{backend} backend",
        "sparse_topk": f"student loss from precomputed teacher top-k, tail={cfg.topk_tail}",
    }[method]


def k_label(k: int | None, vocab: int) -> str:
    if k is None:
        return "-"
    return "V" if k >= vocab else str(k)


def method_label(method: str, k: int | None, cfg: Config, backend: str) -> str:
    names = {
        "naive": "naive",
        "vocab_chunk": "vocab-chunk softmax",
        "masked_topk": "masked top-k",
        "liger": "Liger " + ("(compiled)" if cfg.liger_compiled else "(eager)"),
        "trl": "TRL chunked divergence",
        "fusedkd": f"fusedkd ({backend})",
        "sparse_topk": "fusedkd sparse top-k",
    }
    label = names[method]
    return label if k is None else f"{label}, k={k_label(k, cfg.vocab)}"


# ----------------------------------------------------------------------------------------------------
# Presets and the command line


def parse_ints(text: str, vocab: int | None = None) -> list[int]:
    values = []
    for item in text.split(","):
        item = item.strip()
        if item.upper() == "V":
            if vocab is None:
                raise SystemExit("'V' (the vocabulary size) is allowed in --ks only")
            values.append(vocab)
        else:
            values.append(int(item))
    return values


def presets(mode: str, cuda: bool) -> dict:
    """Defaults of each mode; explicit command-line options override them."""
    if mode == "smoke":
        return dict(
            vocab=3001,
            student_hidden=32,
            teacher_hidden=48,
            tokens="64,128",
            ks="1,8,64,V",
            k_sweep_tokens=64,
            tokens_sweep_k=8,
            exact_tokens=64,
            vocab_chunk=512,
            repeats=1,
            warmup=1,
            dtype="float32",
            liger_compiled=False,
            isolate=False,
            threads=1,  # tiny ops: one thread avoids waiting on a busy second core
        )
    common = dict(
        vocab=151_936, ks="1,8,64,512,V", tokens_sweep_k=64, vocab_chunk=16_384, isolate=True, threads=0
    )
    if cuda:
        sizes = dict(student_hidden=1024, teacher_hidden=2560, dtype="bfloat16", repeats=5, warmup=2)
        if mode == "quick":
            return {
                **common,
                **sizes,
                "tokens": "1024,4096,16384",
                "k_sweep_tokens": 4096,
                "exact_tokens": 1024,
            }
        return {
            **common,
            **sizes,
            "tokens": "1024,2048,4096,8192,16384,32768",
            "k_sweep_tokens": 8192,
            "exact_tokens": 1024,
        }
    sizes = dict(student_hidden=256, teacher_hidden=512, dtype="float32")
    if mode == "quick":
        return {
            **common,
            **sizes,
            "tokens": "128,256",
            "k_sweep_tokens": 128,
            "exact_tokens": 128,
            "repeats": 1,
            "warmup": 1,
        }
    return {
        **common,
        **sizes,
        "tokens": "256,512,1024,2048,4096",
        "k_sweep_tokens": 1024,
        "exact_tokens": 256,
        "repeats": 3,
        "warmup": 1,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small sweeps (about 2 minutes on a 2-core CPU)")
    mode.add_argument(
        "--smoke", action="store_true", help="tiny shapes, one worker, Liger eager: about 10 s (CI)"
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS)
    )
    parser.add_argument("--out", default="results/memory_vs_topk", help="results folder")
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--student-hidden", type=int)
    parser.add_argument("--teacher-hidden", type=int)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--tokens", help="N sweep, comma-separated")
    parser.add_argument("--ks", help="k sweep, comma-separated; 'V' is the vocabulary size")
    parser.add_argument("--k-sweep-tokens", type=int, help="N of the k sweep")
    parser.add_argument("--tokens-sweep-k", type=int, help="k of the top-k methods in the N sweep")
    parser.add_argument("--exact-tokens", type=int, help="N of the exactness check (float64 reference)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--vocab-chunk", type=int, help="vocab chunk width of the vocab_chunk method")
    parser.add_argument("--topk-tail", default="bucket", choices=("bucket", "renormalize"))
    parser.add_argument("--teacher-peak", type=float, default=3.0, help="teacher peak logit minus log(V)")
    parser.add_argument("--repeats", type=int, help="timed calls per point")
    parser.add_argument("--warmup", type=int, help="untimed calls per point first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads in the workers (default: torch's choice)")
    parser.add_argument("--max-memory-gib", type=float, help="CPU: skip points whose theory exceeds this")
    parser.add_argument("--timeout", type=float, default=7200.0, help="seconds per worker process")
    parser.add_argument(
        "--no-isolate",
        dest="isolate",
        action="store_false",
        default=None,
        help="run every method in one worker process (smoke mode's default)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser


def make_config(args: argparse.Namespace) -> tuple[Config, bool]:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    defaults = presets(mode, torch.device(device).type == "cuda")

    def pick(name: str):
        value = getattr(args, name, None)
        return defaults[name] if value is None else value

    vocab = pick("vocab")
    cfg = Config(
        device=device,
        dtype=pick("dtype"),
        vocab=vocab,
        student_hidden=pick("student_hidden"),
        teacher_hidden=pick("teacher_hidden"),
        tokens=sorted(set(parse_ints(pick("tokens")))),
        ks=sorted({min(k, vocab) for k in parse_ints(pick("ks"), vocab)}),
        k_sweep_tokens=pick("k_sweep_tokens"),
        tokens_sweep_k=min(pick("tokens_sweep_k"), vocab),
        exact_tokens=pick("exact_tokens"),
        temperature=args.temperature,
        alpha=args.alpha,
        vocab_chunk=pick("vocab_chunk"),
        liger_compiled=defaults.get("liger_compiled", True),
        topk_tail=args.topk_tail,
        repeats=pick("repeats"),
        warmup=pick("warmup"),
        teacher_peak=args.teacher_peak,
        seed=args.seed,
        threads=pick("threads"),
    )
    isolate = defaults["isolate"] if args.isolate is None else args.isolate
    return cfg, isolate


# ----------------------------------------------------------------------------------------------------
# Reporting


def fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def mib(value: float | None) -> str:
    """MiB with three significant digits for small values, whole MiB from 100 up."""
    if value is None:
        return ""
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:,.0f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table, aligned in plain text too: first column to the left, numbers to the right."""
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]

    def line(cells: list[str]) -> str:
        aligned = [
            str(x).ljust(w) if i == 0 else str(x).rjust(w) for i, (x, w) in enumerate(zip(cells, widths))
        ]
        return "| " + " | ".join(aligned) + " |"

    separator = "|" + "|".join(("-" * (w + 1) + (":" if i else "-")) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), separator] + [line(row) for row in rows])


def report(rows: list[dict], cfg: Config, meta: dict) -> str:
    """The markdown tables: memory and time vs N, the k sweep, exactness, skipped or failed points."""
    by_key = {(r["method"], r["k"], r["tokens"]): r for r in rows}
    series = []  # (label, method, k) of the N sweep, in METHODS order
    for method in METHODS:
        if any(r["method"] == method for r in rows):
            k = cfg.tokens_sweep_k if method in TOPK_METHODS else None
            series.append((rows_label(rows, method, k), method, k))
    out = []
    machine = meta["machine"]
    teacher = meta.get("teacher") or {}
    out.append(f"Run of {meta['date']}, {meta['wall_seconds']:.0f} s in all.")
    out.append(
        f"V={cfg.vocab:,} H_s={cfg.student_hidden} H_t={cfg.teacher_hidden} {cfg.dtype} on {cfg.device} "
        f"({machine.get('gpu') or machine.get('cpu')}, {cfg.threads or machine.get('threads')} threads); "
        f"forward KL, T={cfg.temperature}, alpha={cfg.alpha}, no ignored tokens; "
        f"time: median of {cfg.repeats} warm calls after {cfg.warmup}, forward + backward."
    )
    versions = ", ".join(
        f"{n} {machine.get(n)}" for n in ("torch", "triton", "liger_kernel", "fusedkd", "python")
    )
    loads = [r["load_1min"] for r in rows if r.get("load_1min") is not None]
    during = f", {min(loads):.1f} to {max(loads):.1f} after the points" if loads else ""
    out.append(
        f"Versions: {versions} (fusedkd/ at {meta.get('fusedkd_revision') or 'an unknown revision'}). "
        f"1-minute load average: {meta['load_start']} at start{during}, "
        f"{meta['load_end']} at the end."
    )
    floor = floor_bytes(cfg) / 2**20
    out.append(f"Floor (float32 student weight gradient, V x H_s x 4): {mib(floor)} MiB.")
    if teacher:
        out.append(
            f"Teacher (peaked), at N={cfg.exact_tokens}: mean top-1 probability "
            f"{teacher['teacher_top1']:.3f}, mean entropy {teacher['teacher_entropy']:.2f} nats."
        )
    for note in meta.get("notes", []):
        out.append(note)

    tokens = cfg.tokens
    header = ["method"] + [f"N={n:,}" for n in tokens]

    def pivot(cell: Callable[[dict], str]) -> list[list[str]]:
        table = []
        for label, method, k in series:
            row = [label]
            for n in tokens:
                r = by_key.get((method, k, n))
                row.append("" if r is None else short_error(r) if r.get("error") else cell(r))
            table.append(row)
        return table

    out.append("\n### Peak memory growth (MiB) over the inputs, forward + backward\n")
    memory_rows = pivot(lambda r: mib(r.get("peak_mib")))
    memory_rows.append(["floor (V x H_s x 4)"] + [mib(floor)] * len(tokens))
    out.append(markdown_table(header, memory_rows))

    out.append("\n### Theory (MiB): the formula of each method (module docstring)\n")
    theory_rows = []
    for label, method, k in series:
        row = [label]
        for n in tokens:
            r = by_key.get((method, k, n))
            row.append("" if r is None else mib(r["theory_mib"]))
        theory_rows.append(row + [by_key_any(rows, method, "theory")])
    out.append(markdown_table(header + ["formula"], theory_rows))

    fused_seconds = {n: by_key.get(("fusedkd", None, n), {}).get("seconds") for n in tokens}

    def time_cell(r: dict) -> str:
        base = fused_seconds.get(r["tokens"])
        ratio = f" ({r['seconds'] / base:.2f}x)" if base and r.get("seconds") else ""
        return fmt(r.get("seconds"), ".2f") + ratio

    out.append("\n### Time (s), and in parentheses the ratio to fusedkd in the same run\n")
    out.append(markdown_table(header, pivot(time_cell)))

    topk_methods = [m for m in TOPK_METHODS if any(r["method"] == m for r in rows)]
    if topk_methods:
        n = cfg.k_sweep_tokens
        out.append(f"\n### k sweep at N={n:,}: peak memory (MiB) and time (s)\n")
        k_header = ["k"]
        for method in topk_methods:
            name = rows_label(rows, method, None)
            k_header += [f"{name} MiB", f"{name} s"]
        k_rows = []
        for k in cfg.ks:
            row = [k_label(k, cfg.vocab)]
            for method in topk_methods:
                r = by_key.get((method, k, n), {})
                if r.get("error"):
                    row += [short_error(r), ""]
                else:
                    row += [mib(r.get("peak_mib")), fmt(r.get("seconds"), ".2f")]
            k_rows.append(row)
        out.append(markdown_table(k_header, k_rows))
        for method in ("naive", "fusedkd"):
            r = by_key.get((method, None, n))
            if r and not r.get("error"):
                peak, seconds = mib(r["peak_mib"]), r["seconds"]
                out.append(f"\nFor comparison at N={n:,}: {r['label']} {peak} MiB, {seconds:.2f} s.")

    n = cfg.exact_tokens
    out.append(
        f"\n### Exactness at N={n:,} against the float64 exact dense loss (peaked teacher): relative error "
        "of the loss, norm-wise relative error of the student gradients\n"
    )
    exact_rows = []
    for r in sorted(
        (r for r in rows if r["tokens"] == n), key=lambda r: (METHODS.index(r["method"]), r["k"] or 0)
    ):
        if r.get("error"):
            exact_rows.append([r["label"], short_error(r), "", "", "", ""])
            continue
        exact_rows.append(
            [
                r["label"],
                fmt(r.get("loss"), ".6g"),
                fmt(r.get("loss_rel_err"), ".2e"),
                fmt(r.get("grad_hidden_rel_err"), ".2e"),
                fmt(r.get("grad_weight_rel_err"), ".2e"),
                fmt(r.get("teacher_topk_mass"), ".4f"),
            ]
        )
    if meta.get("reference_loss") is not None:
        exact_rows.append(["float64 reference", f"{meta['reference_loss']:.6g}", "0", "0", "0", ""])
    out.append(
        markdown_table(
            ["method", "loss", "loss rel err", "grad_h rel err", "grad_W rel err", "teacher top-k mass"],
            exact_rows,
        )
    )

    problems = [r for r in rows if r.get("error")]
    if problems:
        out.append("\n### Points not measured\n")
        out.append(
            markdown_table(
                ["method", "N", "reason"], [[r["label"], f"{r['tokens']:,}", r["error"]] for r in problems]
            )
        )
    return "\n".join(out)


def rows_label(rows: list[dict], method: str, k: int | None) -> str:
    for r in rows:
        if r["method"] == method and (k is None or r["k"] == k):
            return r["label"] if k is not None else r["label"].split(", k=")[0]
    return method


def by_key_any(rows: list[dict], method: str, field: str) -> str:
    return next((str(r[field]) for r in rows if r["method"] == method and r.get(field)), "")


def short_error(record: dict) -> str:
    error = record["error"]
    if error.startswith("skipped"):
        return "skipped"
    if "out of memory" in error or "SIGKILL" in error:
        return "OOM"
    return "failed"


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({c: "" if r.get(c) is None else r[c] for c in CSV_COLUMNS})


def plot(rows: list[dict], cfg: Config, out: Path) -> list[str]:
    """memory_vs_tokens.png, error_vs_k.png, memory_vs_k.png; the names of the files written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots", file=sys.stderr)
        return []
    ok = [r for r in rows if not r.get("error")]
    floor = floor_bytes(cfg) / 2**20
    title = f"V={cfg.vocab:,}, H_s={cfg.student_hidden}, H_t={cfg.teacher_hidden}, {cfg.dtype}, {cfg.device}"
    written = []

    def finish(fig, ax, name: str) -> None:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        written.append(name)

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method in METHODS:
        k = cfg.tokens_sweep_k if method in TOPK_METHODS else None
        points = sorted((r["tokens"], r["peak_mib"]) for r in ok if r["method"] == method and r["k"] == k)
        points = [(n, m) for n, m in points if n in cfg.tokens]
        if points:
            ax.plot(*zip(*points), marker="o", color=COLORS[method], label=rows_label(rows, method, k))
    naive_theory = [(n, 7 * n * cfg.vocab * torch_dtype_bytes(cfg) / 2**20) for n in cfg.tokens]
    ax.plot(*zip(*naive_theory), "k:", label="theory: naive 7NVb")
    ax.axhline(floor, color="black", ls="--", label="floor: V x H_s x 4")
    ax.set(yscale="log", xlabel="tokens N", ylabel="peak memory growth (MiB)")
    log_axis_ticks(ax, cfg.tokens, [f"{n:,}" for n in cfg.tokens])
    ax.set_title("Peak memory vs tokens\n" + title, fontsize=9)
    finish(fig, ax, "memory_vs_tokens.png")

    topk = [m for m in TOPK_METHODS if any(r["method"] == m for r in ok)]
    if topk:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for method in topk:
            for field, style in (("loss_rel_err", "-o"), ("grad_weight_rel_err", "--s")):
                points = sorted(
                    (r["k"], max(r[field], 1e-17))
                    for r in ok
                    if r["method"] == method and r["tokens"] == cfg.exact_tokens and r.get(field) is not None
                )
                if points:
                    what = "loss" if field == "loss_rel_err" else "grad W"
                    label = f"{rows_label(rows, method, None)}: {what}"
                    ax.plot(*zip(*points), style, color=COLORS[method], label=label)
        for method in ("vocab_chunk", "naive", "fusedkd"):
            r = next((r for r in ok if r["method"] == method and r["tokens"] == cfg.exact_tokens), None)
            if r and r.get("loss_rel_err") is not None:
                error = max(r["loss_rel_err"], 1e-17)
                ax.axhline(error, color=COLORS[method], ls=":", label=f"{r['label']}: loss")
        ax.set(yscale="log", xlabel="k (teacher top-k)", ylabel="relative error vs float64 exact")
        log_axis_ticks(ax, cfg.ks, [k_label(k, cfg.vocab) for k in cfg.ks])
        ax.set_title(f"Error vs k at N={cfg.exact_tokens} (peaked teacher)\n" + title, fontsize=9)
        finish(fig, ax, "error_vs_k.png")

        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for method in topk:
            points = sorted(
                (r["k"], r["peak_mib"])
                for r in ok
                if r["method"] == method and r["tokens"] == cfg.k_sweep_tokens
            )
            if points:
                ax.plot(*zip(*points), marker="o", color=COLORS[method], label=rows_label(rows, method, None))
        for method in ("naive", "fusedkd"):
            r = next((r for r in ok if r["method"] == method and r["tokens"] == cfg.k_sweep_tokens), None)
            if r:
                ax.axhline(r["peak_mib"], color=COLORS[method], ls=":", label=r["label"])
        ax.axhline(floor, color="black", ls="--", label="floor: V x H_s x 4")
        ax.set(yscale="log", xlabel="k (teacher top-k)", ylabel="peak memory growth (MiB)")
        log_axis_ticks(ax, cfg.ks, [k_label(k, cfg.vocab) for k in cfg.ks])
        ax.set_title(f"Peak memory vs k at N={cfg.k_sweep_tokens:,}\n" + title, fontsize=9)
        finish(fig, ax, "memory_vs_k.png")
    return written


def log_axis_ticks(ax, values: list[int], labels: list[str]) -> None:
    """A log x axis with ticks at exactly the swept values."""
    from matplotlib.ticker import NullLocator

    ax.set_xscale("log")
    ax.set_xticks(values, labels=labels)
    ax.xaxis.set_minor_locator(NullLocator())


def torch_dtype_bytes(cfg: Config) -> int:
    import torch

    return torch.finfo(torch_dtype(cfg.dtype)).bits // 8


# ----------------------------------------------------------------------------------------------------


def main() -> None:
    args = build_parser().parse_args()
    if args.worker:
        worker(args.worker)
        return
    import torch

    cfg, isolate = make_config(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    backend = fusedkd_backend(cfg.device)
    load_start = os.getloadavg()[0]
    started = time.time()

    notes: list[str] = []
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; expected a subset of {METHODS}")
    if "liger" in methods and importlib.util.find_spec("liger_kernel") is None:
        methods.remove("liger")
        notes.append("Liger-Kernel is not installed: no Liger row.")
    if "trl" in methods:
        reason = trl_unavailable_reason(cfg)
        if reason:
            methods.remove("trl")
            notes.append(f"No TRL row: {reason}.")
            print(f"skipping trl: {reason}", file=sys.stderr)
        else:
            notes.append(
                "TRL row: ChunkedDivergenceFunction(beta=0) times T^2, no cross-entropy term (alpha = 1); "
                + method_detail("trl", cfg, backend).split(", ")[-1]
                + "."
            )
    if "sparse_topk" in methods:
        notes.append(
            "Sparse top-k: the teacher's top-k (fusedkd.teacher_topk) is computed once per point, "
            "outside the timed region (offline setting); its outputs count as inputs."
        )

    device_type = torch.device(cfg.device).type
    budget_gib = args.max_memory_gib
    if budget_gib is None and device_type == "cpu":
        available = available_memory_gib()
        budget_gib = None if available is None else 0.5 * available
    if budget_gib is not None:
        notes.append(f"Points whose theoretical peak exceeds {budget_gib:.1f} GiB are skipped.")

    jobs = plan_jobs(methods, cfg)
    rows: list[dict] = []
    runnable: dict[str, list[Job]] = {}
    for method, method_jobs in jobs.items():
        runnable[method] = []
        for job in sorted(
            method_jobs, key=lambda j: (theory(method, j.tokens, j.k, cfg, backend)[0], j.tokens)
        ):
            expected = theory(method, job.tokens, job.k, cfg, backend)[0] / 2**30
            if budget_gib is not None and expected > budget_gib:
                rows.append(
                    {
                        "method": method,
                        "tokens": job.tokens,
                        "k": job.k,
                        "error": f"skipped: theory {expected:.1f} GiB > budget {budget_gib:.1f} GiB",
                    }
                )
            else:
                runnable[method].append(job)

    meta: dict = {
        "notes": notes,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "load_start": f"{load_start:.2f}",
    }
    with tempfile.TemporaryDirectory() as tmp:
        reference_path = os.path.join(tmp, "reference.pt")
        reference_job = Job("reference", cfg.exact_tokens)
        if isolate:
            groups = [[reference_job]] + [runnable[m] for m in methods if runnable[m]]
        else:
            groups = [[reference_job] + [job for m in methods for job in runnable[m]]]
        for index, group in enumerate(groups):
            plan_path = os.path.join(tmp, f"plan{index}.json")
            with open(plan_path, "w") as f:
                json.dump(
                    {
                        "config": dataclasses.asdict(cfg),
                        "reference_path": reference_path,
                        "jobs": [dataclasses.asdict(j) for j in group],
                    },
                    f,
                )
            names = sorted({j.method for j in group}, key=lambda m: (m != "reference", m))
            print(f"running {', '.join(names)} ({len(group)} points) ...", file=sys.stderr, flush=True)
            records, error = stream_subprocess(
                __file__, ["--worker", plan_path], args.timeout, on_record=progress
            )
            done = {(r["method"], r["tokens"], r["k"]) for r in records}
            for job in group:
                if (job.method, job.tokens, job.k) not in done:
                    records.append(
                        {
                            "method": job.method,
                            "tokens": job.tokens,
                            "k": job.k,
                            "error": error or "no result",
                        }
                    )
            for r in records:
                if r["method"] == "reference":
                    if r.get("error"):
                        notes.append(f"The float64 reference failed ({r['error']}): no exactness numbers.")
                    else:
                        meta["teacher"] = r
                        meta["reference_seconds"] = r["seconds"]
                else:
                    rows.append(r)
    mass = meta["teacher"]["teacher_topk_mass"] if meta.get("teacher") else {}
    meta["reference_loss"] = meta["teacher"]["loss"] if meta.get("teacher") else None

    floor_mib = floor_bytes(cfg) / 2**20
    for r in rows:
        expected, formula = theory(r["method"], r["tokens"], r["k"], cfg, backend)
        r["label"] = method_label(r["method"], r["k"], cfg, backend)
        r["detail"] = method_detail(r["method"], cfg, backend)
        r["theory_mib"] = expected / 2**20
        r["theory"] = formula
        r["floor_mib"] = floor_mib
        if r["k"] is not None and r["tokens"] == cfg.exact_tokens:
            r["teacher_topk_mass"] = mass.get(str(r["k"]))
    rows.sort(key=lambda r: (METHODS.index(r["method"]), r["k"] or 0, r["tokens"]))

    meta["load_end"] = f"{os.getloadavg()[0]:.2f}"
    meta["machine"] = machine_description()
    import fusedkd

    meta["fusedkd_revision"] = git_revision(os.path.dirname(os.path.abspath(fusedkd.__file__)))
    meta["wall_seconds"] = time.time() - started
    text = report(rows, cfg, meta)
    print("\n" + text)
    (out / "tables.md").write_text(text + "\n")
    write_csv(rows, out / "memory_vs_topk.csv")
    with open(out / "memory_vs_topk.json", "w") as f:
        json.dump(
            {
                "config": dataclasses.asdict(cfg),
                "isolate": isolate,
                "budget_gib": budget_gib,
                **meta,
                "rows": rows,
            },
            f,
            indent=1,
        )
    written = plot(rows, cfg, out)
    print(
        f"wrote {out}/: memory_vs_topk.csv, memory_vs_topk.json, tables.md, {', '.join(written)}",
        file=sys.stderr,
    )


def progress(record: dict) -> None:
    what = f"{record['method']} N={record['tokens']}" + (
        "" if record.get("k") is None else f" k={record['k']}"
    )
    if record.get("error"):
        print(f"  {what}: {record['error']}", file=sys.stderr, flush=True)
    elif record["method"] == "reference":
        print(f"  {what}: float64 reference in {record['seconds']:.1f} s", file=sys.stderr, flush=True)
    else:
        print(
            f"  {what}: {record['seconds']:.2f} s, {mib(record['peak_mib'])} MiB",
            file=sys.stderr,
            flush=True,
        )


if __name__ == "__main__":
    main()
