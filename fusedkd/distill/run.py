"""A real distillation run: ``--teacher`` and ``--student`` by name or path, a dataset, the fused loss.

Loads the two tokenizers and checks that they match (before any model's weights are loaded), the data
(evaluation samples held out first), the student, and trains it with `trainer.Trainer` on
`objectives.KDObjective` (online teacher, under ``no_grad``, replicated or with ``--shard-teacher``
sharded) or, with ``--teacher-topk``, on `objectives.TopKObjective` from the teacher's cached top-k
(`offline`; the teacher is loaded only to build the cache). Writes ``metrics.jsonl``, ``checkpoint.pt``
(every ``--save-every`` steps and on Ctrl-C) and, at the end, the student with ``save_pretrained`` in
``<output-dir>/final``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from functools import partial
from pathlib import Path

import torch

import fusedkd
from fusedkd.distill.checkpoint import CHECKPOINT_NAME
from fusedkd.distill.data import Sample, TokenizedSamples, TokenizeReport, load_texts, tokenize
from fusedkd.distill.distributed import (
    DistContext,
    barrier,
    gather_objects,
    init_distributed,
    is_fsdp,
    require_backend,
    shutdown,
    wrap_objective,
)
from fusedkd.distill.errors import EXIT_INTERRUPTED, EXIT_OK, UsageError
from fusedkd.distill.evaluate import EvalResult, evaluate
from fusedkd.distill.models import (
    PROBE_TOKENS,
    check_linear_head,
    check_tokenizers,
    check_vocabularies,
    config_head_rows,
    enable_activation_checkpointing,
    head_rows,
    hidden_states,
    lm_head,
    load_model,
    load_teacher,
    load_tokenizer,
    model_fingerprint,
    quiet_transformers,
)
from fusedkd.distill.objectives import KDObjective, TopKObjective
from fusedkd.distill.offline import CachedTopK, build_cache, cache_identity, open_cache
from fusedkd.distill.report import format_table
from fusedkd.distill.runtime import FINAL_NAME, prepare_output_dir, resolve_precision, say, writable_dir
from fusedkd.distill.trainer import TrainConfig, Trainer


def split_texts(args: argparse.Namespace) -> tuple[list[Sample], list[Sample]]:
    """(training samples, evaluation samples): evaluation from --eval-dataset, or held out from --dataset.

    A sample is a text or a chat record (`data.chat_record`)."""
    texts = load_texts(
        args.dataset, text_field=args.text_field, split=args.split, config_name=args.dataset_config
    )
    if args.eval_samples == 0:
        eval_texts: list[str] = []
    elif args.eval_dataset:
        eval_texts = load_texts(
            args.eval_dataset,
            text_field=args.text_field,
            split=args.eval_split,
            config_name=args.dataset_config,
        )[: args.eval_samples]
    else:
        if args.eval_samples >= len(texts):
            raise UsageError(
                f"the dataset has {len(texts)} samples, too few to hold out --eval-samples "
                f"{args.eval_samples} for evaluation; lower --eval-samples, or pass --eval-dataset"
            )
        held = set(random.Random(args.seed).sample(range(len(texts)), args.eval_samples))
        eval_texts = [texts[i] for i in sorted(held)]
        texts = [text for i, text in enumerate(texts) if i not in held]
    if args.max_samples is not None:
        texts = texts[: args.max_samples]
    return texts, eval_texts


def fingerprint(samples: TokenizedSamples, *, targets: bool = True) -> str:
    """A hash of the exact training tokens (and targets): a resume must match it, a top-k cache its tokens."""
    digest = hashlib.sha256()
    tensors = (
        [samples.tokens, samples.targets, samples.offsets] if targets else [samples.tokens, samples.offsets]
    )
    for tensor in tensors:
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]


def probe_ids(samples: TokenizedSamples) -> torch.Tensor:
    """The startup head check's batch: the first `PROBE_TOKENS` tokens of the first training sample."""
    return samples[0][0][:PROBE_TOKENS].unsqueeze(0)


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of a tokenizer's whole definition (vocabulary, merges, normalizer, ...) and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = (
        backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    )
    extra = json.dumps([getattr(tokenizer, "chat_template", None), tokenizer.eos_token_id], default=str)
    return hashlib.sha256((definition + extra).encode()).hexdigest()[:16]


def samples_fingerprint(samples: list) -> str:
    """A hash of the training samples before tokenization (texts or chat records)."""
    return hashlib.sha256(json.dumps(samples, sort_keys=True).encode()).hexdigest()[:16]


MAX_NAMED = 5  # dropped chat records named in a warning; the rest are counted


def _named(unmaskable: list[tuple[str, str]]) -> str:
    """The first `MAX_NAMED` dropped chat records as ``where (why)``, and how many more there are."""
    named = "; ".join(f"{where} ({why})" for where, why in unmaskable[:MAX_NAMED])
    more = len(unmaskable) - MAX_NAMED
    return named + (f"; and {more} more" if more > 0 else "")


def nothing_to_train_on(report: TokenizeReport, what: str, seq_len: int) -> str:
    """The error when tokenization kept no sequence: why each dropped sample went, in one line."""
    # (count, as the one reason: "every sample ...", as one of several: "N ...")
    reasons = [
        (
            report.truncated_away,
            f"lost all its target tokens to truncation: the part before its first target (the prompt) "
            f"is longer than --seq-len {seq_len}; raise --seq-len",
            f"lost all their target tokens to truncation at --seq-len {seq_len} (prompts longer than it)",
        ),
        (
            report.no_target,
            "has no target token (no assistant turn, or no '### Assistant:' marker?)",
            "have no target token (no assistant turn, or no '### Assistant:' marker?)",
        ),
        (report.too_short, "is shorter than 2 tokens", "are shorter than 2 tokens"),
        (
            len(report.unmaskable),
            f"is a chat record the chat template cannot mask: {_named(report.unmaskable)}",
            f"are chat records the chat template cannot mask: {_named(report.unmaskable)}",
        ),
    ]
    reasons = [(count, one, several) for count, one, several in reasons if count]
    if len(reasons) == 1:
        return f"every {what} sample {reasons[0][1]}: nothing to train on"
    listed = "; ".join(f"{count} {several}" for count, _, several in reasons)
    return f"no {what} sample is left: {listed}: nothing to train on"


def tokenize_or_fail(texts: list[Sample], tokenizer, args: argparse.Namespace, what: str, ctx: DistContext):
    samples, report = tokenize(
        texts,
        tokenizer,
        seq_len=args.seq_len,
        loss_only_on_response=args.loss_only_on_response,
        pack=args.pack,
    )
    if report.kept == 0:
        raise UsageError(nothing_to_train_on(report, what, args.seq_len))
    message = f"{what}: {report.kept} sequences, {samples.num_targets:,} target tokens"
    if report.too_short or report.no_target:
        message += (
            f" ({report.too_short} dropped as shorter than 2 tokens, {report.no_target} as without targets)"
        )
    if report.truncated_away:
        message += (
            f" ({report.truncated_away} dropped as without targets once truncated to --seq-len "
            f"{args.seq_len}: prompts longer than it)"
        )
    if report.unmaskable:
        message += f" ({len(report.unmaskable)} chat records dropped: see the warning)"
    if report.truncated:
        message += f", {report.truncated} truncated to {args.seq_len} tokens"
    say(ctx, message)
    if report.unmaskable:
        say(
            ctx,
            f"warning: dropped {len(report.unmaskable)} {what} chat records whose assistant turns the "
            f"chat template cannot render or locate: {_named(report.unmaskable)}",
        )
    return samples


def online_teacher_inputs(teacher, batch) -> dict:
    """The teacher's hidden states and lm_head for a micro-batch (called under no_grad)."""
    head = lm_head(teacher)
    return {
        "teacher_hidden": hidden_states(teacher, batch.input_ids, batch.attention_mask),
        "teacher_weight": head.weight,
        "teacher_bias": head.bias,
    }


def check_options(args: argparse.Namespace) -> None:
    """`UsageError` for option values no run can use (before anything is loaded)."""
    for name in ("alpha", "beta"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise UsageError(f"--{name} must be in [0, 1], got {getattr(args, name)}")
    if not args.temperature > 0:
        raise UsageError(f"--temperature must be > 0, got {args.temperature}")
    if args.seq_len < 2:
        raise UsageError(f"--seq-len must be at least 2 (one input and one target token), got {args.seq_len}")
    if args.eval_samples < 0:
        raise UsageError(f"--eval-samples must be >= 0, got {args.eval_samples}")
    if not args.dist_timeout > 0:
        raise UsageError(f"--dist-timeout must be > 0 minutes, got {args.dist_timeout}")
    if args.max_samples is not None and args.max_samples < 1:
        raise UsageError(f"--max-samples must be >= 1, got {args.max_samples}")
    if args.teacher_topk is not None:
        if args.topk_part_tokens < 1:
            raise UsageError(f"--topk-part-tokens must be >= 1, got {args.topk_part_tokens}")
        if args.teacher_topk < 1:
            raise UsageError(f"--teacher-topk must be >= 1, got {args.teacher_topk}")
        if args.divergence == "jsd":
            raise UsageError("--teacher-topk supports --divergence forward_kl or reverse_kl, not jsd")
        if args.shard_teacher:
            raise UsageError(
                "--shard-teacher has no effect with --teacher-topk: training never loads the teacher"
            )


def train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        lr=args.lr,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_steps=args.max_steps,
        epochs=args.epochs,
        warmup_ratio=args.warmup_ratio,
        min_lr_ratio=args.min_lr_ratio,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        seed=args.seed,
        eval_every=args.eval_every,
        save_every=args.save_every,
        log_every=args.log_every,
    )


def run_settings(args: argparse.Namespace, vocab_size: int, train_samples: TokenizedSamples) -> dict:
    """What a resumed run must share with the run that wrote the checkpoint."""
    keys = ("teacher", "student", "divergence", "alpha", "temperature", "beta", "teacher_topk", "topk_tail")
    return {key: getattr(args, key) for key in keys} | {
        "vocab_size": vocab_size,
        "data": fingerprint(train_samples),
    }


def save_student(student, tokenizer, directory: Path, ctx: DistContext, *, sharded: bool) -> None:
    """``save_pretrained`` the student (gathered from its FSDP2 shards first, if sharded) on rank 0."""
    state = None
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(
            student, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    if ctx.is_main:
        student.save_pretrained(directory, state_dict=state)
        tokenizer.save_pretrained(directory)
    barrier(ctx)


def run_distillation(args: argparse.Namespace) -> int:
    """The real-run mode of the CLI (see the module docstring); returns the exit code."""
    check_options(args)
    config = train_config(args)
    config.check()
    ctx = init_distributed(args.device, args.dist_timeout)
    code = None
    try:
        require_backend(args.backend, ctx.device)
        code = _run(args, config, ctx)
        return code
    finally:
        shutdown(ctx, synchronize=code == 0)


def _evaluate(
    student, samples, vocab_size, pad_id, batch_size, ctx, teacher, autocast_dtype, objective
) -> EvalResult:
    def autocast():
        return torch.autocast(ctx.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)

    return evaluate(
        student,
        samples,
        vocab_size=vocab_size,
        pad_id=pad_id,
        batch_size=batch_size,
        ctx=ctx,
        teacher=teacher,
        autocast=autocast,
        student_hidden=partial(objective, hidden_only=True) if is_fsdp(objective) else None,
    )


def _run(args: argparse.Namespace, config: TrainConfig, ctx: DistContext) -> int:
    output_dir = prepare_output_dir(args.output_dir, mode="distill", resume=args.resume, ctx=ctx)
    offline = args.teacher_topk is not None
    topk_dir = writable_dir(args.topk_cache, "--topk-cache", ctx) if offline else None
    quiet_transformers()
    torch.manual_seed(args.seed)
    teacher_tokenizer = load_tokenizer(args.teacher, role="teacher")
    student_tokenizer = load_tokenizer(args.student, role="student")
    check_tokenizers(teacher_tokenizer, student_tokenizer)  # before any model's weights are loaded
    train_texts, eval_texts = split_texts(args)
    train_samples = tokenize_or_fail(train_texts, student_tokenizer, args, "training", ctx)
    eval_samples = (
        tokenize_or_fail(eval_texts, student_tokenizer, args, "evaluation", ctx) if eval_texts else None
    )
    pad_id = student_tokenizer.pad_token_id if student_tokenizer.pad_token_id is not None else 0

    autocast_dtype = resolve_precision(args.precision, ctx.device)
    teacher_dtype = torch.bfloat16 if autocast_dtype is not None else torch.float32
    probe = probe_ids(train_samples)
    student = load_model(args.student, role="student", dtype=torch.float32)
    check_linear_head(student, "student", probe)
    teacher = None
    if not offline:
        teacher = load_teacher(
            args.teacher, dtype=teacher_dtype, ctx=ctx, probe=probe, shard=args.shard_teacher
        )
    teacher_rows = config_head_rows(args.teacher, role="teacher") if offline else head_rows(teacher)
    vocab_size = check_vocabularies(
        teacher_tokenizer, student_tokenizer, teacher_rows, head_rows(student), args.vocab_size
    )
    if offline and args.teacher_topk > vocab_size:
        raise UsageError(
            f"--teacher-topk {args.teacher_topk} is larger than the vocabulary ({vocab_size} rows); "
            f"use at most {vocab_size}"
        )
    student.config.use_cache = False
    student.train()  # from_pretrained returns eval mode, in which transformers skips gradient checkpointing
    if args.gradient_checkpointing:
        enable_activation_checkpointing(student)

    if offline:
        identity = cache_identity(
            model_fingerprint(args.teacher, role="teacher"),  # its weights and config, not its path
            tokenizer=tokenizer_fingerprint(teacher_tokenizer),
            data=samples_fingerprint(train_texts),
            seq_len=args.seq_len,
            pack=args.pack,
            k=args.teacher_topk,
            temperature=args.temperature,
            vocab_size=vocab_size,
            tokens=fingerprint(train_samples, targets=False),
        )
        teacher_inputs = _offline_teacher(
            args, ctx, topk_dir, identity, train_samples, pad_id, teacher_dtype, autocast_dtype
        )
        objective = TopKObjective(
            student,
            divergence=args.divergence,
            temperature=args.temperature,
            alpha=args.alpha,
            tail=args.topk_tail,
            vocab_size=vocab_size,
            backend=args.backend,
            **lm_head(student).transform.options("student"),
        )
    else:
        teacher.requires_grad_(False).eval()  # on ctx.device already (`load_teacher`)
        teacher_inputs = partial(online_teacher_inputs, teacher)
        criterion = fusedkd.FusedLinearKDLoss(
            divergence=args.divergence,
            beta=args.beta,
            temperature=args.temperature,
            alpha=args.alpha,
            reduction="sum",
            vocab_size=vocab_size,
            backend=args.backend,
            return_components=True,
            # Each model's logit scale and soft cap, from its config (checked against its logits).
            **lm_head(student).transform.options("student"),
            **lm_head(teacher).transform.options("teacher"),
        )
        objective = KDObjective(student, criterion)
    if not args.fsdp:
        student.to(ctx.device)
    objective = wrap_objective(objective, ctx, fsdp=args.fsdp)

    evaluator = None
    if eval_samples is not None:
        evaluator = partial(
            _evaluate,
            student,
            eval_samples,
            vocab_size,
            pad_id,
            args.batch_size,
            ctx,
            teacher,
            autocast_dtype,
            objective,
        )
    trainer = Trainer(
        objective,
        train_samples,
        config,
        ctx,
        pad_id=pad_id,
        teacher_inputs=teacher_inputs,
        output_dir=output_dir,
        settings=run_settings(args, vocab_size, train_samples),
        evaluate=None if evaluator is None else lambda: evaluator().as_dict(),
        autocast_dtype=autocast_dtype,
        progress=not args.no_progress,
        description="distill",
    )
    return _train_and_save(args, trainer, ctx, output_dir, student, student_tokenizer, evaluator is not None)


def _offline_teacher(
    args, ctx, topk_dir: Path, identity: dict, train_samples, pad_id, teacher_dtype, autocast_dtype
) -> CachedTopK:
    """The cached top-k of the training data, built first if missing (every process builds its parts)."""
    cache = open_cache(topk_dir, identity)
    if cache is None:
        say(
            ctx,
            f"building the teacher's top-{args.teacher_topk} cache in {topk_dir} "
            f"({ctx.world_size} processes)",
        )
        teacher = load_model(args.teacher, role="teacher", dtype=teacher_dtype).to(ctx.device).eval()
        check_linear_head(teacher, "teacher", probe_ids(train_samples))
        built = build_cache(
            topk_dir,
            identity,
            teacher,
            train_samples,
            batch_size=args.batch_size,
            pad_id=pad_id,
            ctx=ctx,
            autocast_dtype=autocast_dtype,
            progress=not args.no_progress,
            part_tokens=args.topk_part_tokens,
        )
        del teacher
        total = sum(gather_objects(len(built), ctx))
        cache = open_cache(topk_dir, identity)
        if cache is None:
            raise UsageError(f"--topk-cache {str(topk_dir)!r}: the build finished without a manifest")
        parts = len(cache.parts)
        say(ctx, f"built {total} of the cache's {parts} parts ({parts - total} kept from an earlier build)")
    else:
        say(ctx, f"using the teacher's top-{cache.k} cache in {topk_dir} ({len(cache):,} positions)")
    return CachedTopK(cache, train_samples)


def _train_and_save(args, trainer: Trainer, ctx, output_dir: Path, student, tokenizer, evaluate: bool) -> int:
    before = None
    if args.resume:
        step = trainer.resume()
        say(ctx, f"resumed from {output_dir / CHECKPOINT_NAME} at step {step} of {trainer.total_steps}")
    elif evaluate:
        before = trainer.evaluate()
        trainer.metrics.write({"event": "eval", "step": 0, **before})
    say(ctx, f"training {trainer.total_steps} steps; metrics in {output_dir / 'metrics.jsonl'}")
    result = trainer.train()
    if result.interrupted:
        say(
            ctx,
            f"stopped at step {result.steps_done} of {result.total_steps}: checkpoint saved to "
            f"{output_dir / CHECKPOINT_NAME}; continue with the same command and --resume",
        )
        return EXIT_INTERRUPTED
    save_student(student, tokenizer, output_dir / FINAL_NAME, ctx, sharded=is_fsdp(trainer.objective))
    say(ctx, f"student saved to {output_dir / FINAL_NAME}")
    evals = [r for r in result.history if r["event"] == "eval"]
    if evals and ctx.is_main:
        final = evals[-1]
        rows = []
        if "eval_teacher_ppl" in final:
            rows.append(("teacher", final["eval_teacher_ppl"], None, None))
        if before is not None:
            rows.append(
                (
                    "student before",
                    before["eval_student_ppl"],
                    before.get("eval_agreement"),
                    before.get("eval_kl"),
                )
            )
        rows.append(
            ("student after", final["eval_student_ppl"], final.get("eval_agreement"), final.get("eval_kl"))
        )
        print(format_table(rows, tokens=final["eval_tokens"]), flush=True)
    return EXIT_OK
