"""``python -m fusedkd.distill``: the command line of the distillation recipe.

Without ``--teacher`` / ``--student`` it runs the embedded default (`recipe`); with them, a real run
(`run`). Exit codes: 0 done, 2 bad input (one ``error:`` line on stderr, nothing saved is touched),
130 stopped by Ctrl-C / SIGTERM after saving a checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from fusedkd.distill.errors import EXIT_INTERRUPTED, EXIT_USAGE, UsageError

# Options whose default depends on the mode: (real runs, embedded default). None in argparse = "not given".
MODE_DEFAULTS: dict[str, tuple[object, object]] = {
    "lr": (2e-5, 3e-3),
    "batch_size": (8, 16),
    "seq_len": (1024, 128),
    "max_steps": (None, 100),
    "warmup_ratio": (0.03, 0.05),
}

# Options that only real runs take (the embedded default brings its own models and corpus).
REAL_RUN_ONLY = (
    "dataset",
    "dataset_config",
    "split",
    "text_field",
    "eval_dataset",
    "eval_split",
    "eval_samples",
    "eval_every",
    "topk_tail",
    "max_samples",
    "loss_only_on_response",
    "pack",
    "vocab_size",
    "resume",
    "fsdp",
    "shard_teacher",
    "teacher_topk",
    "topk_cache",
    "topk_part_tokens",
    "gradient_checkpointing",
    "epochs",
    "grad_accum",
    "save_every",
    "dist_timeout",
)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default: the value, "off" for a flag, or the help's own words.

    An option whose default is None (it depends on the mode, or means "not given") says in its help text
    what applies, as ``(default: ...)``; the others get ``(default: <value>)`` appended.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is argparse.SUPPRESS or "(default:" in text:
            return text
        if action.default is False and action.nargs == 0:
            return text + " (default: off)"
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, as for every other bad input
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m fusedkd.distill",
        description=(
            "Distill a causal LM teacher into a smaller student with fusedkd's fused loss (no "
            "[tokens x vocab] logits). Without --teacher/--student: the embedded default, a real "
            "distillation of a scaled-down Qwen3-4B -> Qwen3-0.6B pair on the Python standard library's "
            "source, on the CPU in minutes. Options marked 'real runs' need --teacher and --student."
        ),
        formatter_class=_HelpFormatter,
    )
    models = parser.add_argument_group("models")
    models.add_argument(
        "--teacher",
        help="teacher: Hugging Face model name or local directory (default: none, the embedded default)",
    )
    models.add_argument(
        "--student",
        help="student to train, same tokenizer as the teacher (default: none, the embedded default)",
    )
    models.add_argument(
        "--vocab-size",
        type=int,
        help="real runs: distill over the first N vocabulary rows, for heads of different sizes "
        "(default: the heads' common size)",
    )

    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset",
        help="real runs: Hugging Face dataset name, or local .json / .jsonl / .txt file or directory; "
        "records hold plain text (--text-field), chat 'messages', or 'prompt' + 'completion' (default: none)",
    )
    data.add_argument(
        "--dataset-config", help="real runs: configuration name of a Hub dataset (default: none)"
    )
    data.add_argument("--split", default="train", help="real runs: split of a Hub --dataset")
    data.add_argument(
        "--text-field", default="text", help="real runs: field of a plain-text record that holds the text"
    )
    data.add_argument(
        "--eval-dataset",
        help="real runs: evaluation data, as --dataset (default: --eval-samples held out from --dataset)",
    )
    data.add_argument("--eval-split", default="test", help="real runs: split of a Hub --eval-dataset")
    data.add_argument(
        "--eval-samples", type=int, default=64, help="real runs: evaluation samples (0: no evaluation)"
    )
    data.add_argument(
        "--max-samples", type=int, help="real runs: use at most N training samples (default: all)"
    )
    data.add_argument(
        "--seq-len", type=int, help="tokens per sequence (default: 1024 for real runs, 128 for the default)"
    )
    data.add_argument(
        "--loss-only-on-response",
        action="store_true",
        help="real runs, plain-text records: only '### Assistant:' turns are targets (chat records always "
        "train on the assistant turns only)",
    )
    data.add_argument(
        "--pack", action="store_true", help="real runs: pack samples into full --seq-len blocks"
    )

    loss = parser.add_argument_group("distillation loss")
    loss.add_argument(
        "--divergence",
        default="forward_kl",
        choices=("forward_kl", "reverse_kl", "jsd"),
        help="distillation divergence: KL(teacher||student), KL(student||teacher) or JSD(--beta)",
    )
    loss.add_argument(
        "--alpha", type=float, default=0.5, help="weight of the distillation term (1 - alpha: CE)"
    )
    loss.add_argument(
        "--temperature", type=float, default=1.0, help="softmax temperature of the distillation term"
    )
    loss.add_argument("--beta", type=float, default=0.5, help="JSD mixture weight (--divergence jsd)")
    loss.add_argument(
        "--backend", default="auto", choices=("auto", "torch", "tiles", "triton"), help="fusedkd loss backend"
    )
    loss.add_argument(
        "--teacher-topk",
        type=int,
        help="real runs, offline teacher: distill from the teacher's cached top-K, 1 <= K <= vocabulary "
        "(default: none, the teacher runs online)",
    )
    loss.add_argument(
        "--topk-cache",
        help="real runs: directory of the top-k cache, built on first use (default: none; needed with "
        "--teacher-topk)",
    )
    loss.add_argument(
        "--topk-part-tokens",
        type=int,
        default=1 << 20,
        help="real runs: tokens per part of the top-k cache (the unit of work of one process, and what "
        "a resumed build keeps)",
    )
    loss.add_argument(
        "--topk-tail",
        default="bucket",
        choices=("bucket", "renormalize"),
        help="real runs: how the teacher's mass outside its top-k is treated",
    )

    optim = parser.add_argument_group("optimization")
    optim.add_argument(
        "--lr", type=float, help="peak learning rate (default: 2e-5 for real runs, 3e-3 for the default)"
    )
    optim.add_argument(
        "--weight-decay", type=float, default=0.0, help="AdamW weight decay (not on norms, biases)"
    )
    optim.add_argument(
        "--warmup-ratio",
        type=float,
        help="fraction of steps of linear warmup (default: 0.03 for real runs, 0.05 for the default)",
    )
    optim.add_argument(
        "--min-lr-ratio", type=float, default=0.1, help="cosine decays to this fraction of --lr"
    )
    optim.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient-norm clipping threshold")
    optim.add_argument(
        "--batch-size",
        type=int,
        help="sequences per micro-batch per process (default: 8 for real runs, 16 for the default)",
    )
    optim.add_argument(
        "--grad-accum", type=int, default=1, help="real runs: micro-batches per optimizer step"
    )
    optim.add_argument(
        "--max-steps",
        type=int,
        help="optimizer steps, overrides --epochs (default: from --epochs for real runs, 100 for the "
        "default)",
    )
    optim.add_argument(
        "--epochs", type=float, default=1.0, help="real runs: passes over the data (without --max-steps)"
    )
    optim.add_argument("--seed", type=int, default=0, help="seed of the data order, held-out draw and init")

    system = parser.add_argument_group("system")
    system.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: CUDA if available"
    )
    system.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "bf16"),
        help="bf16: bf16 autocast (fp32 master weights; the logit projections in bf16); auto: bf16 on CUDA",
    )
    system.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="real runs: recompute each student layer in backward",
    )
    system.add_argument(
        "--fsdp", action="store_true", help="real runs: shard the student with FSDP2 (under torchrun)"
    )
    system.add_argument(
        "--shard-teacher",
        action="store_true",
        help="real runs: shard the teacher's layers too (FSDP2, under torchrun; lm_head replicated)",
    )
    system.add_argument(
        "--dist-timeout",
        type=float,
        default=120.0,
        help="real runs under torchrun: minutes a collective may wait (building a top-k cache, saving)",
    )

    output = parser.add_argument_group("output")
    output.add_argument("--output-dir", help="run directory (default: runs/<mode>-<time>)")
    output.add_argument(
        "--resume",
        action="store_true",
        help="real runs: continue the run in --output-dir from its checkpoint",
    )
    output.add_argument(
        "--save-every",
        type=int,
        default=500,
        help="real runs: checkpoint every N steps (0: only on Ctrl-C)",
    )
    output.add_argument(
        "--eval-every", type=int, default=0, help="real runs: evaluate every N steps (0: only at the end)"
    )
    output.add_argument("--log-every", type=int, default=1, help="log metrics every N steps")
    output.add_argument("--no-progress", action="store_true", help="no progress bar")
    output.add_argument(
        "--cache-dir",
        help="cache of the embedded default (default: $FUSEDKD_CACHE_DIR, else $XDG_CACHE_HOME/fusedkd, "
        "else ~/.cache/fusedkd)",
    )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and complete the arguments: mode-dependent defaults filled in, `args.mode` set."""
    parser = build_parser()
    args = parser.parse_args(argv)
    given = [name for name in ("teacher", "student") if getattr(args, name)]
    if len(given) == 1:
        missing = "student" if given == ["teacher"] else "teacher"
        raise UsageError(f"--{given[0]} needs --{missing} too (or neither, for the embedded default)")
    args.mode = "real" if given else "default"
    if args.mode == "real" and not args.dataset:
        raise UsageError(
            "a real run needs --dataset (a Hugging Face dataset name, or local json / jsonl / txt)"
        )
    if args.mode == "default":
        misplaced = [name for name in REAL_RUN_ONLY if getattr(args, name) != parser.get_default(name)]
        if misplaced:
            flags = ", ".join("--" + name.replace("_", "-") for name in misplaced)
            raise UsageError(
                f"{flags}: only for real runs (with --teacher and --student), not the embedded default"
            )
    index = 0 if args.mode == "real" else 1
    for name, pair in MODE_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, pair[index])
    if (args.teacher_topk is None) != (args.topk_cache is None):
        raise UsageError("--teacher-topk K and --topk-cache DIR go together (the offline teacher mode)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (0, 2 for bad input, 130 when interrupted)."""
    try:
        args = parse_args(argv)
        if args.mode == "default":
            from fusedkd.distill.recipe import run_default

            return run_default(args)
        from fusedkd.distill.run import run_distillation

        return run_distillation(args)
    except UsageError as exc:
        if os.environ.get("RANK", "0") == "0":  # under torchrun, one line from rank 0, not one per process
            print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
