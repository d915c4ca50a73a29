"""The embedded default: ``python -m fusedkd.distill`` with no models named, offline, on a CPU, in minutes.

A 4,096-token byte-level BPE and a scaled-down Qwen3-4B teacher (`TeacherRecipe`: 200 cross-entropy
steps of 16 x 128 tokens; no trained teacher can be downloaded offline) are trained on the standard
library's source (`TRAIN_MODULES`) and cached; a scaled-down Qwen3-0.6B student is distilled from it by
`trainer.DistillTrainer` for 100 steps and, as the baseline, trained on hard labels by a plain
``transformers.Trainer`` with the same steps, batches, data order and schedule; the table compares them
on 5 held-out modules. On a CPU the thread count follows machine load (`trainer.ThreadTuner`), which
changes float summation order: the numbers differ by a few percent between runs on a shared machine."""

from __future__ import annotations

import collections
import copy
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from fusedkd.distill.data import Collator, TokenizedSamples
from fusedkd.distill.errors import EXIT_OK, UsageError
from fusedkd.distill.models import TINY_STUDENT_SHAPE, TINY_TEACHER_SHAPE, build_model, qwen3_config

HELDOUT_MODULES = ("argparse", "difflib", "fractions", "statistics", "textwrap")
TRAIN_MODULES = (
    "_collections_abc", "_compat_pickle", "_markupbase", "_pydecimal", "_pyio", "_strptime",
    "_threading_local", "_weakrefset", "abc", "ast", "base64", "bdb", "bisect", "calendar", "cmd",
    "code", "codecs", "codeop", "colorsys", "compileall", "configparser", "contextlib", "copy", "copyreg",
    "csv", "dataclasses", "dis", "doctest", "enum", "filecmp", "fileinput", "fnmatch", "ftplib",
    "functools", "genericpath", "getopt", "getpass", "gettext", "glob", "graphlib", "gzip", "hashlib",
    "heapq", "hmac", "imaplib", "inspect", "ipaddress", "keyword", "linecache", "locale", "lzma",
    "mailbox", "mimetypes", "modulefinder", "netrc", "ntpath", "numbers", "opcode", "operator",
    "optparse", "os", "pathlib", "pdb", "pickle", "pickletools", "pkgutil", "platform", "plistlib",
    "poplib", "posixpath", "pprint", "profile", "pstats", "py_compile", "pyclbr", "pydoc", "queue",
    "quopri", "random", "reprlib", "rlcompleter", "runpy", "sched", "secrets", "selectors", "shelve",
    "shlex", "shutil", "signal", "site", "smtplib", "socket", "socketserver", "ssl", "stat", "string",
    "stringprep", "struct", "subprocess", "symtable", "tabnanny", "tarfile", "tempfile", "threading",
    "timeit", "token", "tokenize", "trace", "traceback", "tracemalloc", "tty", "turtle", "types", "typing",
    "uuid", "warnings", "wave", "weakref", "webbrowser", "zipapp", "zipfile", "zipimport",
)  # fmt: skip
EOS_TOKEN = "<|endoftext|>"
EVAL_SEQUENCES = 128  # held-out blocks, evenly spaced over the 5 files (~16k target tokens)


# Training and held-out documents ``(name, text)``, and a fingerprint of their exact contents.
Corpus = collections.namedtuple("Corpus", "train heldout fingerprint")


@dataclasses.dataclass(frozen=True)
class TeacherRecipe:
    """How the default's teacher is trained (all of it is part of the teacher's cache key)."""

    vocab_size: int = 4096
    seq_len: int = 128
    steps: int = 200
    batch_size: int = 16
    lr: float = 3e-3
    warmup_ratio: float = 0.05
    seed: int = 0


def stdlib_corpus() -> Corpus:
    """The default corpus from the running Python's standard library (``name.py`` or ``name/__init__.py``);
    `UsageError` if more than 10% of its modules are missing."""
    root, digest, parts = Path(sysconfig.get_paths()["stdlib"]), hashlib.sha256(), []
    for role, names in (("train", TRAIN_MODULES), ("heldout", HELDOUT_MODULES)):
        found = [(n, p) for n in names for p in (root / f"{n}.py", root / n / "__init__.py") if p.is_file()]
        if len(found) < 0.9 * len(names):
            raise UsageError(
                f"the standard library at {root} lacks {len(names) - len(found)} of the {len(names)} "
                f"{role} modules of the default corpus; run with a full CPython 3.10+ install"
            )
        documents = tuple((n, p.read_text(encoding="utf-8", errors="replace")) for n, p in found)
        for name, text in documents:
            digest.update(f"{role}:{name}:{len(text)}\n".encode() + text.encode("utf-8", errors="replace"))
        parts.append(documents)
    version = f"py{sys.version_info.major}.{sys.version_info.minor}"
    return Corpus(parts[0], parts[1], f"{version}-{digest.hexdigest()[:12]}")


def default_cache_dir() -> Path:
    """``$FUSEDKD_CACHE_DIR``, else ``$XDG_CACHE_HOME/fusedkd``, else ``~/.cache/fusedkd``."""
    xdg = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "fusedkd"
    return Path(os.environ["FUSEDKD_CACHE_DIR"]).expanduser() if os.environ.get("FUSEDKD_CACHE_DIR") else xdg


def cache_key(*parts: object) -> str:
    """A short stable hash of JSON-serializable `parts`."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


@contextmanager
def building(entry: Path):
    """A fresh temporary directory next to `entry`, renamed to `entry` if the block succeeds (an
    interrupted build leaves nothing half-written; a finished concurrent build of the same entry wins)."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        yield scratch
        try:
            os.rename(scratch, entry)
        except OSError:
            if not entry.is_dir():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def train_bpe_tokenizer(texts, vocab_size: int):
    """A byte-level BPE trained on `texts`, as Qwen3's (``PreTrainedTokenizerFast``; EOS is padding)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    options = dict(special_tokens=[EOS_TOKEN], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False, **options)
    bpe.train_from_iterator(texts, trainer, length=len(texts))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)


def blocks(documents, tokenizer, seq_len: int) -> TokenizedSamples:
    """The documents, each followed by EOS, concatenated and cut into `seq_len`-token blocks."""
    ids = [t for _, text in documents for t in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]]
    cuts = [ids[start : start + seq_len] for start in range(0, len(ids) - 1, seq_len)]
    return TokenizedSamples.from_lists([(cut, [False] + [True] * (len(cut) - 1)) for cut in cuts])


def _shape(model) -> str:
    c, params = model.config, sum(p.numel() for p in model.parameters()) / 1e6
    return f"Qwen3 {c.num_hidden_layers} layers x {c.hidden_size} wide, {params:.2f}M params"


def run_default(distill, training) -> int:
    """The embedded default (see the module docstring); returns the exit code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer

    from fusedkd.distill import models
    from fusedkd.distill.report import format_table
    from fusedkd.distill.trainer import DistillTrainer, ThreadTuner

    recipe, start, output_dir = TeacherRecipe(), time.perf_counter(), Path(training.output_dir).expanduser()
    cache_dir = Path(distill.cache_dir).expanduser() if distill.cache_dir else default_cache_dir()
    for wrong, message in (
        (training.world_size > 1, "the embedded default runs in one process; use torchrun for real runs"),
        (distill.seq_len > recipe.seq_len, f"--seq_len is at most {recipe.seq_len} for the embedded default"),
        ((output_dir / "report.md").exists(), f"--output_dir {str(output_dir)!r} already holds a report"),
    ):
        if wrong:
            raise UsageError(message)

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {message}", flush=True)

    models.quiet_transformers()
    log(f"fusedkd.distill embedded default; outputs in {output_dir}, cache in {cache_dir}")
    corpus = stdlib_corpus()
    names = ", ".join(name for name, _ in corpus.heldout)
    log(f"corpus: the standard library's source, {len(corpus.train)} training files, held out: {names}")
    entry = cache_dir / f"tokenizer-{cache_key('bpe-v1', recipe.vocab_size, corpus.fingerprint)}"
    built = not (entry / "tokenizer.json").is_file()
    if built:
        with building(entry) as scratch:
            bpe = train_bpe_tokenizer([text for _, text in corpus.train], recipe.vocab_size)
            bpe.save_pretrained(scratch)
    tokenizer = AutoTokenizer.from_pretrained(entry)
    log(f"tokenizer: byte-level BPE, {len(tokenizer)} tokens, {'trained' if built else 'loaded'} ({entry})")
    teacher_samples = blocks(corpus.train, tokenizer, recipe.seq_len)
    train_samples = blocks(corpus.train, tokenizer, distill.seq_len)
    heldout = blocks(corpus.heldout, tokenizer, distill.seq_len)
    picks = torch.linspace(0, len(heldout) - 1, min(EVAL_SEQUENCES, len(heldout))).round().long().tolist()
    eval_samples = TokenizedSamples.from_lists(
        [[heldout[i][k].tolist() for k in ("input_ids", "targets")] for i in picks]
    )
    held_out = f"{len(eval_samples)} held out"
    log(f"data: {len(train_samples)} blocks of {distill.seq_len} tokens for training, {held_out}")

    collate = Collator(tokenizer.pad_token_id)

    def without_index(rows):  # a plain Trainer's model takes no sample index
        return {k: v for k, v in collate(rows).items() if k != "index"}

    def arguments(directory: Path, **changes):
        cpu = training.device.type == "cpu"
        return dataclasses.replace(training, output_dir=str(directory), save_strategy="no", logging_steps=25,
                                   dataloader_pin_memory=not cpu, **changes)  # fmt: skip

    batch = collate([teacher_samples[i] for i in range(8)])
    probe = {key: batch[key] for key in ("input_ids", "attention_mask")}
    forward = torch.no_grad()(lambda: teacher.base_model(**probe, use_cache=False))
    tuner = ThreadTuner(forward) if training.device.type == "cpu" else None
    callbacks = [tuner] if tuner and torch.get_num_threads() > 1 else []
    recipe_key = cache_key("teacher-v2", dataclasses.asdict(recipe), TINY_TEACHER_SHAPE, entry.name)
    teacher_entry = cache_dir / f"teacher-{cache_key(recipe_key, corpus.fingerprint)}"
    shape = dict(vocab_size=len(tokenizer), max_positions=recipe.seq_len, eos_token_id=tokenizer.eos_token_id)
    if (teacher_entry / "config.json").is_file():
        teacher = AutoModelForCausalLM.from_pretrained(teacher_entry)
        log(f"teacher: {_shape(teacher)}, loaded from the cache ({teacher_entry})")
    else:
        teacher = build_model(qwen3_config(TINY_TEACHER_SHAPE, **shape), seed=recipe.seed)
        log(f"teacher: {_shape(teacher)}; training it from scratch, {recipe.steps} steps (cached)")
        with building(teacher_entry) as scratch:
            schedule = dict(learning_rate=recipe.lr, max_steps=recipe.steps, warmup_steps=recipe.warmup_ratio)
            schedule |= dict(per_device_train_batch_size=recipe.batch_size, seed=recipe.seed)
            args = arguments(scratch, **schedule)
            Trainer(model=teacher, args=args, train_dataset=teacher_samples, data_collator=without_index,
                    callbacks=callbacks).train()  # fmt: skip
            teacher.save_pretrained(scratch)
            tokenizer.save_pretrained(scratch)
        log("teacher: trained")
    teacher.requires_grad_(False).eval()
    initial = build_model(qwen3_config(TINY_STUDENT_SHAPE, **shape), seed=training.seed + 1)
    loss = dict(divergence=distill.divergence, alpha=distill.alpha, temperature=distill.temperature,
                beta=distill.beta, backend=distill.backend)  # fmt: skip
    loss |= dict(data_collator=collate, eval_vocab=len(tokenizer))

    def evaluate(student) -> dict:
        args = arguments(output_dir / "eval")
        return DistillTrainer(model=student, teacher_model=teacher, args=args, **loss).evaluate(eval_samples)

    before, results, seconds = evaluate(initial), {}, {}
    log(f"student: {_shape(initial)}; teacher held-out perplexity {before['eval_teacher_ppl']:.2f}")
    for name, description in (("kd", "distill (KD)"), ("ce", "baseline (CE only)")):
        student, began = copy.deepcopy(initial), time.perf_counter()
        common = dict(model=student, args=arguments(output_dir / name), callbacks=callbacks)
        common["train_dataset"] = train_samples
        if name == "kd":
            DistillTrainer(teacher_model=teacher, **loss, **common).train()
        else:
            Trainer(data_collator=without_index, **common).train()
        seconds[name] = time.perf_counter() - began
        student.save_pretrained(output_dir / name / "final")
        tokenizer.save_pretrained(output_dir / name / "final")
        results[name] = evaluate(student)
        log(
            f"{description}: {training.max_steps} steps in {seconds[name]:.1f}s, saved in {output_dir / name}"
        )

    rows = [("teacher (Qwen3-4B-shaped)", before["eval_teacher_ppl"], None, None)]
    for label, result in (("student (Qwen3-0.6B-shaped), before training", before),
                          ("student, distilled with fusedkd (KD)", results["kd"]),
                          ("student, hard labels only (CE baseline)", results["ce"])):  # fmt: skip
        rows.append((label, result["eval_student_ppl"], result["eval_agreement"], result["eval_kl"]))
    total = time.perf_counter() - start
    table = format_table(rows, tokens=before["eval_tokens"])
    budget = (
        f"students: {training.max_steps} steps x {training.per_device_train_batch_size} x {distill.seq_len} "
        f"tokens each, same data order and schedule; KD {seconds['kd']:.0f}s, CE {seconds['ce']:.0f}s; loss "
        f"{distill.divergence}, alpha {distill.alpha}, T {distill.temperature}. Total wall time {total:.0f}s"
        + (f" (CPU threads: {tuner.summary()})." if callbacks else ".")
    )
    print("\n" + table + "\n" + budget, flush=True)
    shutil.rmtree(output_dir / "eval", ignore_errors=True)
    (output_dir / "report.md").write_text(table + "\n\n" + budget + "\n", encoding="utf-8")
    settings = {**dataclasses.asdict(distill), "learning_rate": training.learning_rate, "seed": training.seed}
    settings |= {"batch_size": training.per_device_train_batch_size, "max_steps": training.max_steps}
    report = {"teacher": {"perplexity": before["eval_teacher_ppl"]}, "student_before": before}
    report |= {"student_kd": results["kd"], "student_ce": results["ce"], "eval_tokens": before["eval_tokens"]}
    report |= {"settings": settings, "corpus": corpus.fingerprint, "seconds": {"total": total, **seconds}}
    report["threads"] = tuner.steps_at if callbacks else None
    (output_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return EXIT_OK
