"""``python -m fusedkd.distill``: distill a teacher into a student with `KDTrainer` (see docs/distill.md).

`DistillArguments` and the Trainer's own (`trainer.DistillTrainingArguments`), by ``HfArgumentParser``
from flags or a YAML file; without ``--teacher`` / ``--student``, the embedded default (`default`). Exit
codes: 0 done, 2 bad input (one ``error:`` line), 130 stopped by SIGTERM / Ctrl-C (after a checkpoint).
To the loss: `run` trains a `trainer.DistillTrainer`, whose ``compute_loss`` (`KDTrainer`'s) calls
``_kd_loss``, which calls ``fusedkd.fused_linear_kd_loss``."""

from __future__ import annotations

import dataclasses
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from fusedkd.distill.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, UsageError, first_line

# Options whose default depends on the mode: {name: (real runs, embedded default)}.
MODE_DEFAULTS = {
    "learning_rate": (2e-5, 3e-3), "per_device_train_batch_size": (8, 16), "seq_len": (1024, 128),
    "max_steps": (-1, 100), "warmup_steps": (0.03, 0.05),
}  # fmt: skip
# What the embedded default takes (it brings its own models, data and schedule otherwise).
DEFAULT_MODE_OPTIONS = {
    *MODE_DEFAULTS,
    *"output_dir seed weight_decay max_grad_norm logging_steps disable_tqdm use_cpu bf16 log_level".split(),
    *"divergence alpha temperature beta backend cache_dir".split(),
}
# What a resumed run must share with the run that wrote the checkpoint (with the training data's hash).
RESUME_SETTINGS = (
    "teacher student vocab_size seq_len pack loss_only_on_response chat_template divergence alpha"
    " temperature beta teacher_topk topk_tail learning_rate per_device_train_batch_size seed max_steps"
    " gradient_accumulation_steps num_train_epochs weight_decay warmup_steps lr_scheduler_type"
    " max_grad_norm world_size bf16"
).split()


def _option(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class DistillArguments:
    """The recipe's own options (``TrainingArguments`` holds the Trainer's)."""

    teacher: str | None = _option(None, "teacher: Hub name or local directory (none: the embedded default)")
    student: str | None = _option(None, "student to train, with the teacher's tokenizer")
    vocab_size: int | None = _option(None, "distill over the first N head rows (heads of different sizes)")
    dataset: str | None = _option(None, "Hub dataset, or local .json/.jsonl/.txt (file or directory)")
    dataset_config: str | None = _option(None, "configuration of a Hub dataset")
    split: str = _option("train", "split of a Hub --dataset")
    text_field: str = _option("text", "text field of a record (else: chat 'messages' / prompt-completion)")
    eval_dataset: str | None = _option(None, "evaluation data, as --dataset (none: held out from --dataset)")
    eval_split: str = _option("test", "split of a Hub --eval_dataset")
    eval_samples: int = _option(64, "evaluation samples (0: no evaluation)")
    max_samples: int | None = _option(None, "use at most N training samples")
    seq_len: int | None = _option(None, "tokens per sequence (default: 1024; 128 for the embedded default)")
    pack: bool = _option(False, "pack samples into full --seq_len blocks")
    loss_only_on_response: bool = _option(False, "plain text: only '### Assistant:' turns are targets")
    chat_template: str = _option("auto", "chat masks from: auto, tokenizer, qwen3, llama3, gemma, a .jinja")
    num_proc: int = _option(1, "processes that tokenize (datasets.map)")
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = _option("forward_kl", "the divergence")
    alpha: float = _option(0.5, "weight of the distillation term (1 - alpha: cross-entropy)")
    temperature: float = _option(1.0, "softmax temperature of the distillation term")
    beta: float = _option(0.5, "JSD mixture weight (--divergence jsd)")
    backend: Literal["auto", "torch", "tiles", "triton"] = _option("auto", "the loss backend")
    teacher_topk: int | None = _option(None, "offline teacher: distill from its cached top-K")
    topk_cache: str | None = _option(None, "directory of the top-k cache (with --teacher_topk)")
    topk_part_tokens: int = _option(1 << 20, "tokens per part of the top-k cache (a process's unit of work)")
    topk_tail: Literal["bucket", "renormalize"] = _option("bucket", "the teacher's mass outside its top-k")
    shard_teacher: bool = _option(False, "shard the teacher's layers with FSDP2 (torchrun; lm_head whole)")
    resume: bool = _option(False, "continue the run in --output_dir from its last checkpoint")
    cache_dir: str | None = _option(None, "cache (default: $FUSEDKD_CACHE_DIR, else ~/.cache/fusedkd)")


def parse(argv: list[str] | None = None):
    """``(DistillArguments, DistillTrainingArguments, mode)`` from flags or one YAML file, the options left
    at their defaults set for the mode (`MODE_DEFAULTS`); `UsageError` on bad input."""
    from transformers import HfArgumentParser

    from fusedkd.distill.trainer import DistillTrainingArguments

    class Parser(HfArgumentParser):
        def error(self, message: str):  # one line and exit 2, as for every other bad input
            raise UsageError(message)

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = Parser((DistillArguments, DistillTrainingArguments), prog="python -m fusedkd.distill")
    try:
        if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
            argv = yaml_flags(argv[0])
        distill, training, rest = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    except (ValueError, TypeError, OSError) as exc:  # TrainingArguments' own checks
        raise UsageError(first_line(exc)) from None
    if rest:
        raise UsageError(f"unrecognized arguments: {' '.join(rest)}")
    given = [name for name in ("teacher", "student") if getattr(distill, name)]
    if len(given) == 1:
        missing = "student" if given == ["teacher"] else "teacher"
        raise UsageError(f"--{given[0]} needs --{missing} too (or neither, for the embedded default)")
    mode = "distill" if given else "default"
    # every option as it is when not given (the output directory aside: under torchrun it must be given)
    baseline = parser.parse_args_into_dataclasses(["--output_dir", training.output_dir])
    changed = [
        option.name
        for options, default in zip((distill, training), baseline)
        for option in dataclasses.fields(options)
        if option.init and getattr(options, option.name) != getattr(default, option.name)
    ]
    misplaced = [f"--{name}" for name in changed if name not in DEFAULT_MODE_OPTIONS]
    if mode == "default" and misplaced:
        raise UsageError(f"{', '.join(misplaced)}: only for real runs (with --teacher and --student)")
    if mode == "distill" and not distill.dataset:
        raise UsageError("a real run needs --dataset (a Hugging Face dataset name, or local json/jsonl/txt)")
    for name, values in MODE_DEFAULTS.items():
        if name not in changed:
            setattr(distill if hasattr(distill, name) else training, name, values[mode == "default"])
    _ = training.device  # under torchrun this joins the processes: from here world_size is right
    return distill, training, mode


def yaml_flags(path: str) -> list[str]:
    """A YAML config (``option: value``) as the flags it stands for: its values are converted and checked
    as the command line's are (``3e-3`` is a float, not YAML 1.1's string)."""
    import json

    import yaml

    try:
        config = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise UsageError(f"cannot read the config {path!r}: {str(exc).splitlines()[0]}") from None
    if not isinstance(config, dict):
        raise UsageError(f"the config {path!r} must map option names to values")
    flags = []
    for key, value in config.items():
        values = value if isinstance(value, list) else [value]
        as_text = [json.dumps(v) if isinstance(v, dict) else str(v) for v in values]
        flags += [f"--{key}", *(text.lower() if text in ("True", "False") else text for text in as_text)]
    return flags


def check_options(distill: DistillArguments) -> None:
    """`UsageError` for option values no run can use, before anything is loaded."""
    for name in ("alpha", "beta"):
        if not 0.0 <= getattr(distill, name) <= 1.0:
            raise UsageError(f"--{name} must be in [0, 1], got {getattr(distill, name)}")
    if not distill.temperature > 0:
        raise UsageError(f"--temperature must be > 0, got {distill.temperature}")
    for name, least in (("seq_len", 2), ("eval_samples", 0), ("max_samples", 1), ("num_proc", 1),
                        ("topk_part_tokens", 1), ("teacher_topk", 1)):  # fmt: skip
        if getattr(distill, name) is not None and getattr(distill, name) < least:
            why = " (one input and one target token)" if name == "seq_len" else ""
            raise UsageError(f"--{name} must be at least {least}{why}, got {getattr(distill, name)}")
    if (distill.teacher_topk is None) != (distill.topk_cache is None):
        raise UsageError("--teacher_topk K and --topk_cache DIR go together (the offline teacher mode)")
    if distill.teacher_topk is not None and distill.divergence == "jsd":
        raise UsageError("--teacher_topk supports --divergence forward_kl or reverse_kl, not jsd")
    if distill.teacher_topk is not None and distill.shard_teacher:
        raise UsageError(
            "--shard_teacher has no effect with --teacher_topk: training never loads the teacher"
        )


def say(training, message: str) -> None:  # on the main process only
    if training.process_index == 0:
        print(message, flush=True)


def tokenized(records: list, tokenizer, distill, training, what: str):
    """`data.tokenize` (the main process first, the others from its cache), its report printed;
    `UsageError` if nothing is left."""
    from fusedkd.distill.data import tokenize
    from fusedkd.distill.default import default_cache_dir

    cache = Path(distill.cache_dir).expanduser() if distill.cache_dir else default_cache_dir()
    names = ("seq_len", "pack", "loss_only_on_response", "chat_template", "num_proc")
    options = {name: getattr(distill, name) for name in names} | {"cache_dir": cache / "tokenized"}
    with training.main_process_first(local=False, desc=f"tokenizing the {what} data"):
        samples, report = tokenize(records, tokenizer, **options)
    if report.kept == 0:
        raise UsageError(report.nothing_left(what, distill.seq_len))
    say(training, f"{what}: {report.summary(distill.seq_len)}")
    if report.unmaskable:
        say(training, f"warning: dropped {len(report.unmaskable)} {what} chat records: {report.named()}")
    return samples


def split_records(distill: DistillArguments, seed: int) -> tuple[list, list]:
    """(training records, evaluation records): from --eval_dataset, or --eval_samples held out at random."""
    from fusedkd.distill.data import load_records

    load = dict(text_field=distill.text_field, config_name=distill.dataset_config)
    records = load_records(distill.dataset, split=distill.split, **load)
    if distill.eval_samples and distill.eval_dataset:
        held_out = load_records(distill.eval_dataset, split=distill.eval_split, **load)
        return records[: distill.max_samples], held_out[: distill.eval_samples]
    if distill.eval_samples >= len(records):
        raise UsageError(
            f"the dataset has {len(records)} samples, too few to hold out --eval_samples "
            f"{distill.eval_samples}; lower it, or pass --eval_dataset"
        )
    held = set(random.Random(seed).sample(range(len(records)), distill.eval_samples))
    training = [r for i, r in enumerate(records) if i not in held]
    return training[: distill.max_samples], [records[i] for i in sorted(held)]


def run(distill: DistillArguments, training) -> int:
    """A real run (see docs/distill.md); returns the exit code."""
    from fusedkd.distill import models, offline
    from fusedkd.distill.data import Collator, training_template
    from fusedkd.distill.report import format_table
    from fusedkd.distill.trainer import DistillTrainer, MetricsLog, StopOnSignal, TopKTrainer, check_settings

    check_options(distill)
    models.quiet_transformers()
    output_dir, main = Path(training.output_dir).expanduser(), training.process_index == 0
    teacher_tokenizer = models.load_tokenizer(distill.teacher, role="teacher")
    tokenizer = models.load_tokenizer(distill.student, role="student")
    models.check_tokenizers(teacher_tokenizer, tokenizer)  # before any weights load
    records, eval_records = split_records(distill, training.seed)
    if any("messages" in r for r in records + eval_records):
        say(training, f"chat template: {training_template(tokenizer, distill.chat_template)[1]}")
    train_samples = tokenized(records, tokenizer, distill, training, "training")
    eval_samples = (
        tokenized(eval_records, tokenizer, distill, training, "evaluation") if eval_records else None
    )
    settings = {k: getattr(distill if hasattr(distill, k) else training, k) for k in RESUME_SETTINGS}
    settings["data"] = train_samples.fingerprint()
    checkpoint = check_settings(output_dir, settings, distill.resume, main)

    probe = train_samples[0]["input_ids"][: models.PROBE_TOKENS].unsqueeze(0)
    student = models.load_model(distill.student, role="student")
    models.check_linear_head(student.to(training.device), "student", probe)
    student.config.use_cache = False
    rows_student, teacher = student.get_output_embeddings().weight.shape[0], None
    if distill.teacher_topk is None:
        options = dict(dtype=torch.bfloat16 if training.bf16 else None, device=training.device, probe=probe)
        teacher = models.load_teacher(distill.teacher, shard=distill.shard_teacher, **options)
        rows_teacher = teacher.get_output_embeddings().weight.shape[0]
    else:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(os.path.expanduser(distill.teacher))
        rows_teacher = config.get_text_config().vocab_size
    vocab = models.check_vocabularies(tokenizer, rows_teacher, rows_student, distill.vocab_size)
    metrics = MetricsLog(output_dir / "metrics.jsonl", fresh=checkpoint is None, is_main=main)
    common = dict(model=student, args=training, train_dataset=train_samples, eval_dataset=eval_samples)
    common |= dict(data_collator=Collator(tokenizer.pad_token_id or 0), eval_vocab=vocab)
    common |= dict(callbacks=[stop := StopOnSignal(), metrics])
    loss = dict(divergence=distill.divergence, alpha=distill.alpha, temperature=distill.temperature)
    if teacher is not None:
        options = dict(beta=distill.beta, vocab_size=vocab, backend=distill.backend)
        trainer = DistillTrainer(teacher_model=teacher, **options, **loss, **common)
    else:
        if distill.teacher_topk > vocab:
            raise UsageError(
                f"--teacher_topk {distill.teacher_topk} is larger than the vocabulary ({vocab} rows); "
                f"use at most {vocab}"
            )
        cache = offline.teacher_topk_cache(distill, training, train_samples, tokenizer, records, vocab, probe)
        loss |= dict(tail=distill.topk_tail, vocab_size=vocab, backend=distill.backend)
        trainer = TopKTrainer(topk=cache, loss_options=loss, **common)
    before = trainer.evaluate() if eval_samples is not None and checkpoint is None else None
    say(training, f"training; metrics in {metrics.path}" + (f", resuming {checkpoint}" if checkpoint else ""))
    trainer.train(resume_from_checkpoint=checkpoint)
    if stop.received:
        where = f"at step {trainer.state.global_step}: checkpoint saved in {output_dir}"
        say(training, f"stopped by {stop.received} {where}; continue with the same command and --resume")
        return EXIT_INTERRUPTED
    trainer.save_model(str(output_dir / "final"))
    if main:
        tokenizer.save_pretrained(output_dir / "final")
    say(training, f"student saved to {output_dir / 'final'}")
    if eval_samples is not None:
        after = trainer.evaluate()
        rows = [("teacher", after["eval_teacher_ppl"], None, None)] if "eval_teacher_ppl" in after else []
        for name, result in (("student before", before), ("student after", after)):
            if result is not None:
                scores = [result.get(f"eval_{key}") for key in ("student_ppl", "agreement", "kl")]
                rows.append((name, *scores))
        say(training, format_table(rows, tokens=after["eval_tokens"]))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code (0, 2 for bad input, 130 when interrupted)."""
    try:
        distill, training, mode = parse(argv)
        if mode == "default":
            from fusedkd.distill.default import run_default

            return run_default(distill, training)
        return run(distill, training)
    except UsageError as exc:
        if os.environ.get("RANK", "0") == "0":  # under torchrun, one line from rank 0, not one per process
            print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
