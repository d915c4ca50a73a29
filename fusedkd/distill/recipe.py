"""The embedded default: ``python -m fusedkd.distill`` with no models named, offline, on a CPU, in minutes.

1. Corpus: a fixed selection of the Python standard library's source files (`corpus`), 122 modules for
   training and 5 held out (argparse, difflib, fractions, statistics, textwrap) for evaluation.
2. Tokenizer: a 4,096-token byte-level BPE trained on the training files (cached).
3. Teacher: a scaled-down Qwen3-4B (`models.TINY_TEACHER_SHAPE`, 4.8M parameters) trained from scratch
   on the corpus with cross-entropy (`TeacherRecipe`: 200 steps of 16 x 128 tokens), because no trained
   teacher can be downloaded offline (cached; the next run reuses it).
4. Student: a scaled-down Qwen3-0.6B (`models.TINY_STUDENT_SHAPE`, 1.1M parameters), distilled for 100
   steps of 16 x 128 tokens with `fusedkd.FusedLinearKDLoss` (forward KL, alpha 0.5, T 1 unless told
   otherwise); and, as the baseline, the same initial student trained on hard labels only with the same
   steps, batches, data order and learning-rate schedule. The teacher sees twice the students' tokens:
   distillation pays when the teacher knows more than the student can learn from the same data (with
   a teacher trained no longer than the students, KD and CE ended within noise of each other).
5. Report: perplexity on the held-out files of the teacher and of the student before training, after
   distillation and after cross-entropy-only training, with each student's top-1 next-token agreement
   with the teacher and its KL to the teacher.

Both students go through the same `trainer.Trainer` as real runs. All sequences are 128-token blocks of
the concatenated files (EOS between files). On a CPU, the intra-op thread count follows machine load
(`threads.ThreadTuner`): its choice changes floating-point summation order, and training amplifies
that, so the students' numbers differ by a few percent between runs on a shared machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

import fusedkd
from fusedkd.distill.cache import building, cache_key, default_cache_dir
from fusedkd.distill.corpus import Corpus, stdlib_corpus
from fusedkd.distill.data import Batch, TokenizedSamples, collate, tokenize
from fusedkd.distill.distributed import DistContext, init_distributed, require_backend
from fusedkd.distill.errors import EXIT_INTERRUPTED, EXIT_OK, UsageError
from fusedkd.distill.evaluate import EvalResult, evaluate
from fusedkd.distill.models import (
    TINY_STUDENT_SHAPE,
    TINY_TEACHER_SHAPE,
    build_model,
    hidden_states,
    lm_head,
    quiet_transformers,
    qwen3_config,
)
from fusedkd.distill.objectives import CrossEntropyObjective, KDObjective
from fusedkd.distill.report import format_table
from fusedkd.distill.runtime import discard_stale_metrics, prepare_output_dir, resolve_precision
from fusedkd.distill.threads import ThreadTuner
from fusedkd.distill.tokenizer import cached_bpe_tokenizer
from fusedkd.distill.trainer import TrainConfig, Trainer, TrainResult


@dataclass(frozen=True)
class TeacherRecipe:
    """How the default's teacher is trained (all of it is part of the teacher's cache key)."""

    vocab_size: int = 4096
    seq_len: int = 128
    steps: int = 200
    batch_size: int = 16
    lr: float = 3e-3
    warmup_ratio: float = 0.05
    seed: int = 0


EVAL_SEQUENCES = 128  # held-out 128-token blocks, evenly spaced over the 5 files (~16k target tokens)


class Interrupted(Exception):
    """Ctrl-C during the default: nothing half-built is kept (the teacher is cached only when complete)."""


class Clock:
    """Prints phase messages with the time since the start."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.start:6.1f}s] {message}", flush=True)


def _params(model) -> str:
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M"


def _shape(model) -> str:
    c = model.config
    return f"Qwen3 {c.num_hidden_layers} layers x {c.hidden_size} wide, {_params(model)} params"


def _evenly_spaced(samples: TokenizedSamples, count: int) -> TokenizedSamples:
    if len(samples) <= count:
        return samples
    picks = torch.linspace(0, len(samples) - 1, count).round().long().tolist()
    return TokenizedSamples.from_lists([(samples[i][0].tolist(), samples[i][1].tolist()) for i in picks])


def _blocks(documents, tokenizer, seq_len: int) -> TokenizedSamples:
    samples, _ = tokenize([d.text for d in documents], tokenizer, seq_len=seq_len, pack=True)
    return samples


@torch.no_grad()
def _forward(model, batch: Batch) -> torch.Tensor:
    return hidden_states(model, batch.input_ids, batch.attention_mask)


def _train(trainer: Trainer) -> TrainResult:
    result = trainer.train()
    if result.interrupted:
        raise Interrupted
    return result


def cached_teacher(
    corpus: Corpus,
    tokenizer,
    tokenizer_key: str,
    samples: TokenizedSamples,
    cache_dir: Path,
    ctx,
    log: Clock,
    *,
    progress: bool,
    tuner: ThreadTuner | None,
    probe_batch: Batch,
):
    """The default's teacher: loaded from the cache, or trained (`TeacherRecipe`) and cached."""
    from transformers import AutoModelForCausalLM

    recipe = TeacherRecipe()
    key = cache_key("teacher-v1", asdict(recipe), TINY_TEACHER_SHAPE, tokenizer_key, corpus.fingerprint)
    entry = cache_dir / f"teacher-{key}"
    if (entry / "config.json").is_file():
        teacher = AutoModelForCausalLM.from_pretrained(entry)
        log(f"teacher: {_shape(teacher)}, loaded from the cache ({entry})")
        return teacher
    config = qwen3_config(
        TINY_TEACHER_SHAPE,
        vocab_size=len(tokenizer),
        max_positions=recipe.seq_len,
        eos_token_id=tokenizer.eos_token_id,
    )
    teacher = build_model(config, seed=recipe.seed)
    log(
        f"teacher: {_shape(teacher)}; training it from scratch, {recipe.steps} steps "
        "(cached for the next run)"
    )
    train_config = TrainConfig(
        lr=recipe.lr,
        batch_size=recipe.batch_size,
        max_steps=recipe.steps,
        warmup_ratio=recipe.warmup_ratio,
        seed=recipe.seed,
    )
    if tuner is not None:
        tuner.probe = partial(_forward, teacher, probe_batch)
    with building(entry) as scratch:
        trainer = Trainer(
            CrossEntropyObjective(teacher),
            samples,
            train_config,
            ctx,
            pad_id=tokenizer.pad_token_id,
            output_dir=scratch,
            checkpoints=False,
            progress=progress,
            description="teacher",
            before_step=tuner,
        )
        result = _train(trainer)
        teacher.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
    log(f"teacher: trained in {result.seconds:.1f}s, final training CE {result.history[-1]['ce']:.3f}")
    return teacher


def run_default(args: argparse.Namespace) -> int:
    """The embedded default (see the module docstring); returns the exit code."""
    ctx = init_distributed(args.device)
    if ctx.distributed:
        raise UsageError(
            "the embedded default runs in one process; use torchrun with --teacher and --student"
        )
    require_backend(args.backend, ctx.device)
    output_dir = prepare_output_dir(args.output_dir, mode="default", resume=False, ctx=ctx)
    if (output_dir / "report.md").exists():
        raise UsageError(
            f"--output-dir {str(output_dir)!r} already holds a report; choose another --output-dir"
        )
    cache_dir = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
    threads = torch.get_num_threads()
    try:
        return _run_default(args, ctx, output_dir, cache_dir)
    except Interrupted:
        print("interrupted: nothing was cached from the unfinished phase", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        torch.set_num_threads(threads)  # the thread tuner's choice must not outlive the run


def _run_default(args: argparse.Namespace, ctx: DistContext, output_dir: Path, cache_dir: Path) -> int:
    log = Clock()
    quiet_transformers()
    progress = not args.no_progress
    recipe = TeacherRecipe()
    if args.seq_len > recipe.seq_len:
        raise UsageError(
            f"--seq-len for the embedded default is at most {recipe.seq_len}, got {args.seq_len}"
        )
    log(f"fusedkd.distill embedded default; outputs in {output_dir}, cache in {cache_dir}")

    corpus = stdlib_corpus()
    train_chars, heldout_chars = corpus.num_chars
    log(
        f"corpus: Python {sys.version_info.major}.{sys.version_info.minor} standard library, "
        f"{len(corpus.train)} training files ({train_chars / 1e6:.2f}M chars), "
        f"{len(corpus.heldout)} held out ({', '.join(d.name for d in corpus.heldout)}; "
        f"{heldout_chars / 1e6:.2f}M chars)"
    )
    tokenizer, tokenizer_path, built = cached_bpe_tokenizer(
        [d.text for d in corpus.train], recipe.vocab_size, corpus.fingerprint, cache_dir
    )
    log(
        f"tokenizer: byte-level BPE, {len(tokenizer)} tokens, "
        f"{'trained' if built else 'loaded'} ({tokenizer_path})"
    )
    teacher_samples = _blocks(corpus.train, tokenizer, recipe.seq_len)
    train_samples = teacher_samples
    if args.seq_len != recipe.seq_len:
        train_samples = _blocks(corpus.train, tokenizer, args.seq_len)
    eval_samples = _evenly_spaced(_blocks(corpus.heldout, tokenizer, args.seq_len), EVAL_SEQUENCES)
    log(
        f"data: {teacher_samples.num_tokens / 1e6:.2f}M training tokens in {len(train_samples)} blocks of "
        f"{args.seq_len}; evaluation: {len(eval_samples)} held-out blocks, "
        f"{eval_samples.num_targets:,} target tokens"
    )

    # On a CPU, use all cores only while that is faster (a shared machine: see `threads`).
    tuner = ThreadTuner() if ctx.device.type == "cpu" and torch.get_num_threads() > 1 else None
    probe_batch = collate(teacher_samples, range(min(8, len(teacher_samples))), pad_id=tokenizer.pad_token_id)
    teacher = cached_teacher(
        corpus,
        tokenizer,
        tokenizer_path.name,
        teacher_samples,
        cache_dir,
        ctx,
        log,
        progress=progress,
        tuner=tuner,
        probe_batch=probe_batch,
    )
    teacher.requires_grad_(False).eval()
    if tuner is not None:
        tuner.probe = partial(_forward, teacher, probe_batch.to(ctx.device))
    student_config = qwen3_config(
        TINY_STUDENT_SHAPE,
        vocab_size=len(tokenizer),
        max_positions=recipe.seq_len,
        eos_token_id=tokenizer.eos_token_id,
    )
    initial_student = build_model(student_config, seed=args.seed + 1)
    autocast_dtype = resolve_precision(args.precision, ctx.device)
    teacher.to(ctx.device)
    initial_student.to(ctx.device)

    teacher_cache: dict = {}  # the teacher's held-out hidden states, computed once for the three evaluations

    def evaluate_student(student) -> EvalResult:
        def autocast():
            return torch.autocast(ctx.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)

        return evaluate(
            student,
            eval_samples,
            vocab_size=len(tokenizer),
            pad_id=tokenizer.pad_token_id,
            batch_size=32,
            ctx=ctx,
            teacher=teacher,
            autocast=autocast,
            teacher_cache=teacher_cache,
        )

    before = evaluate_student(initial_student)
    log(f"student: {_shape(initial_student)}; teacher held-out perplexity {before.teacher_ppl:.2f}")

    config = TrainConfig(
        lr=args.lr,
        batch_size=args.batch_size,
        max_steps=args.max_steps,
        warmup_ratio=args.warmup_ratio,
        min_lr_ratio=args.min_lr_ratio,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        seed=args.seed,
        log_every=args.log_every,
    )
    head = lm_head(teacher)

    def teacher_inputs(batch) -> dict:
        hidden = hidden_states(teacher, batch.input_ids, batch.attention_mask)
        return {"teacher_hidden": hidden, "teacher_weight": head.weight, "teacher_bias": head.bias}

    criterion = fusedkd.FusedLinearKDLoss(
        divergence=args.divergence,
        beta=args.beta,
        temperature=args.temperature,
        alpha=args.alpha,
        reduction="sum",
        backend=args.backend,
        return_components=True,
        **lm_head(initial_student).transform.options("student"),
        **lm_head(teacher).transform.options("teacher"),
    )
    runs = {}
    for name, objective_of, inputs, description in (
        ("kd", lambda s: KDObjective(s, criterion), teacher_inputs, "distill (KD)"),
        ("ce", CrossEntropyObjective, None, "baseline (CE only)"),
    ):
        student = copy.deepcopy(initial_student)
        trainer = Trainer(
            objective_of(student),
            train_samples,
            config,
            ctx,
            pad_id=tokenizer.pad_token_id,
            teacher_inputs=inputs,
            output_dir=_fresh_dir(output_dir / name, ctx),
            checkpoints=False,
            autocast_dtype=autocast_dtype,
            progress=progress,
            description=description,
            before_step=tuner,
        )
        result = _train(trainer)
        student.save_pretrained(output_dir / name / "final")
        tokenizer.save_pretrained(output_dir / name / "final")
        runs[name] = (evaluate_student(student), result)
        log(
            f"{description}: {result.steps_done} steps in {result.seconds:.1f}s; "
            f"saved to {output_dir / name / 'final'}"
        )

    (kd, kd_run), (ce, ce_run) = runs["kd"], runs["ce"]
    rows = [
        ("teacher (Qwen3-4B-shaped)", before.teacher_ppl, None, None),
        ("student (Qwen3-0.6B-shaped), before training", before.student_ppl, before.agreement, before.kl),
        ("student, distilled with fusedkd (KD)", kd.student_ppl, kd.agreement, kd.kl),
        ("student, hard labels only (CE baseline)", ce.student_ppl, ce.agreement, ce.kl),
    ]
    seconds = time.perf_counter() - log.start
    table = format_table(rows, tokens=kd.tokens)
    budget = (
        f"students: {config.max_steps} steps x {config.batch_size} x {args.seq_len} tokens each, "
        f"same data order and schedule; KD {kd_run.seconds:.0f}s, CE {ce_run.seconds:.0f}s; "
        f"loss {args.divergence}, alpha {args.alpha}, T {args.temperature}. "
        f"Total wall time {seconds:.0f}s"
        + (f" (CPU threads: {tuner.summary()})." if tuner is not None else ".")
    )
    print("\n" + table + "\n" + budget, flush=True)
    (output_dir / "report.md").write_text(table + "\n\n" + budget + "\n", encoding="utf-8")
    report = {
        "teacher": {"perplexity": before.teacher_ppl},
        "student_before": asdict(before),
        "student_kd": asdict(kd),
        "student_ce": asdict(ce),
        "eval_tokens": kd.tokens,
        "seconds": {"total": seconds, "kd": kd_run.seconds, "ce": ce_run.seconds},
        "settings": {
            k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))
        },
        "corpus": corpus.fingerprint,
        "threads": None if tuner is None else dict(tuner.steps_at),
    }
    (output_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return EXIT_OK


def _fresh_dir(path: Path, ctx: DistContext) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    discard_stale_metrics(path, ctx)
    return path
