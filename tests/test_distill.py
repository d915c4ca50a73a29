"""End-to-end tests of ``python -m fusedkd.distill`` on tiny Qwen3 models (CPU, seconds each).

The models are saved with ``save_pretrained`` and loaded by path, the data is a local jsonl file in the
``### Human: ... ### Assistant: ...`` format, and the CLI is called in-process through
`fusedkd.distill.cli.main` (one test runs it as a subprocess, to check the real exit code and stderr).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from _helpers import reference_kd_loss

import fusedkd
from fusedkd.distill import recipe
from fusedkd.distill.checkpoint import CHECKPOINT_NAME
from fusedkd.distill.cli import main
from fusedkd.distill.corpus import Corpus, stdlib_corpus
from fusedkd.distill.data import load_texts, tokenize
from fusedkd.distill.distributed import DistContext
from fusedkd.distill.models import PROBE_TOKENS, build_model, quiet_transformers, qwen3_config
from fusedkd.distill.objectives import CrossEntropyObjective
from fusedkd.distill.tokenizer import train_bpe_tokenizer
from fusedkd.distill.trainer import METRICS_NAME, MetricsLog, TrainConfig, Trainer

TEXTS = [
    f"### Human: what is {a} plus {b}? ### Assistant: {a} plus {b} is {a + b}." + " Indeed." * (a % 3)
    for a in range(12)
    for b in range(12)
]
TEACHER_SHAPE = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
    head_dim=32,
)  # fmt: skip
STUDENT_SHAPE = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
    head_dim=16,
)  # fmt: skip


def save_model(
    directory: Path, shape: dict, tokenizer, *, seed: int, vocab_size: int | None = None, train_steps: int = 0
) -> str:
    """A tiny Qwen3 saved with its tokenizer; `train_steps` of cross-entropy on TEXTS first (a teacher)."""
    config = qwen3_config(
        shape, vocab_size=vocab_size or len(tokenizer), max_positions=64, eos_token_id=tokenizer.eos_token_id
    )
    model = build_model(config, seed=seed)
    if train_steps:
        samples, _ = tokenize(TEXTS, tokenizer, seq_len=40)
        config = TrainConfig(lr=1e-2, batch_size=16, max_steps=train_steps)
        ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
        trainer = Trainer(CrossEntropyObjective(model), samples, config, ctx, pad_id=0, progress=False)
        assert trainer.train().history[-1]["ce"] < 2.0
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def scaled_logits_model(vocab_size: int, eos: int, logits_scaling: float):
    """A tiny Granite causal LM: its logits are ``(W h) / logits_scaling``, not the head's plain ``W h``
    (`fusedkd.head_transform` reads the divisor from its config)."""
    from transformers import GraniteConfig, GraniteForCausalLM

    config = GraniteConfig(
        **STUDENT_SHAPE, vocab_size=vocab_size, max_position_embeddings=64, logits_scaling=logits_scaling,
        tie_word_embeddings=True, eos_token_id=eos, pad_token_id=eos, bos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(2)
    return GraniteForCausalLM(config)


def falsely_capped_model(vocab_size: int, eos: int):
    """A tiny Qwen3 whose config claims a final-logit soft cap its architecture does not apply: its logits
    are plain ``W h``, not what `fusedkd.head_transform` reads from the config."""
    config = qwen3_config(STUDENT_SHAPE, vocab_size=vocab_size, max_positions=64, eos_token_id=eos)
    config.final_logit_softcapping = 2.0
    return build_model(config, seed=3)


def save_falsely_capped_model(directory: Path, tokenizer) -> str:
    falsely_capped_model(len(tokenizer), tokenizer.eos_token_id).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def save_scaled_logits_model(directory: Path, tokenizer, *, logits_scaling: float) -> str:
    scaled_logits_model(len(tokenizer), tokenizer.eos_token_id, logits_scaling).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """Paths of a tiny teacher, student, odd students, and datasets (built once per module)."""
    root = tmp_path_factory.mktemp("tiny")
    quiet_transformers()
    tokenizer = train_bpe_tokenizer(TEXTS, vocab_size=300)
    other_tokenizer = train_bpe_tokenizer([t.upper() for t in TEXTS], vocab_size=280)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(TEXTS)))
    return {
        "teacher": save_model(root / "teacher", TEACHER_SHAPE, tokenizer, seed=0, train_steps=40),
        "student": save_model(root / "student", STUDENT_SHAPE, tokenizer, seed=1),
        "student_other_tokenizer": save_model(root / "other", STUDENT_SHAPE, other_tokenizer, seed=1),
        "student_padded_head": save_model(
            root / "padded", STUDENT_SHAPE, tokenizer, seed=1, vocab_size=len(tokenizer) + 64
        ),
        "student_scaled_logits": save_scaled_logits_model(root / "scaled", tokenizer, logits_scaling=4.0),
        "student_false_softcap": save_falsely_capped_model(root / "false-cap", tokenizer),
        "data": str(data),
        "root": root,
    }


def run_args(tiny: dict, output_dir: Path, *extra: str, steps: int = 6) -> list[str]:
    return [
        "--teacher", tiny["teacher"], "--student", tiny["student"], "--dataset", tiny["data"],
        "--seq-len", "40", "--batch-size", "4", "--max-steps", str(steps), "--lr", "3e-3",
        "--eval-samples", "8", "--save-every", "0", "--no-progress", "--output-dir", str(output_dir), *extra,
    ]  # fmt: skip


def set_option(args: list[str], flag: str, value: str) -> list[str]:
    """`args` with `flag` set to `value` (replaced if present, else appended)."""
    args = list(args)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    return args


def records(output_dir: Path, event: str) -> list[dict]:
    lines = (output_dir / METRICS_NAME).read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def losses(output_dir: Path) -> list[tuple]:
    return [
        (r["step"], r["loss"], r.get("kd"), r["ce"], r["lr"], r["grad_norm"])
        for r in records(output_dir, "train")
    ]


# --------------------------------------------------------------------------------------------------------
# Real runs


def test_end_to_end_never_builds_logits_and_saves_a_loadable_student(tiny, tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3ForCausalLM

    full_forward = Qwen3ForCausalLM.forward
    probes = []

    def no_logits(self, input_ids=None, **kwargs):
        # only the startup head check runs the full forward, once per model, on one short batch
        if input_ids is None or input_ids.numel() > PROBE_TOKENS:
            raise AssertionError(
                "the full causal-LM forward (which builds [tokens x vocab] logits) was called"
            )
        probes.append(tuple(input_ids.shape))
        return full_forward(self, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(Qwen3ForCausalLM, "forward", no_logits)
    out = tmp_path / "run"
    assert main(run_args(tiny, out, "--loss-only-on-response")) == 0
    monkeypatch.undo()
    assert probes == [(1, PROBE_TOKENS), (1, PROBE_TOKENS)]  # the student's and the teacher's head check

    train = records(out, "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert all(r.keys() >= {"loss", "kd", "ce", "lr", "tokens_per_s", "grad_norm"} for r in train)
    # loss = alpha T^2 kd + (1 - alpha) ce with alpha = 0.5, T = 1
    assert all(abs(r["loss"] - 0.5 * (r["kd"] + r["ce"])) < 1e-4 * r["loss"] for r in train)
    assert train[-1]["loss"] < 0.9 * train[0]["loss"]
    before, after = records(out, "eval")
    assert before["step"] == 0 and after["step"] == 6
    assert after["eval_student_ppl"] < before["eval_student_ppl"]
    assert after["eval_kl"] < before["eval_kl"]

    student = AutoModelForCausalLM.from_pretrained(out / "final")
    initial = AutoModelForCausalLM.from_pretrained(tiny["student"])
    assert (
        AutoTokenizer.from_pretrained(out / "final").get_vocab()
        == AutoTokenizer.from_pretrained(tiny["student"]).get_vocab()
    )
    changed = [
        not torch.equal(a, b) for a, b in zip(student.state_dict().values(), initial.state_dict().values())
    ]
    assert all(changed)
    table = capsys.readouterr().out
    assert "| student after" in table and "| teacher" in table


def test_interrupted_and_resumed_run_matches_uninterrupted(tiny, tmp_path, monkeypatch):
    reference_dir, resumed_dir = tmp_path / "straight", tmp_path / "interrupted"
    assert main(run_args(tiny, reference_dir)) == 0

    write = MetricsLog.write

    def write_then_ctrl_c(self, record):
        write(self, record)
        if record["event"] == "train" and record["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, in the middle of the run

    monkeypatch.setattr(MetricsLog, "write", write_then_ctrl_c)
    assert main(run_args(tiny, resumed_dir)) == 130
    monkeypatch.undo()
    checkpoint = resumed_dir / CHECKPOINT_NAME
    assert torch.load(checkpoint, weights_only=True)["step"] == 3
    assert not (resumed_dir / "final").exists()

    # Starting over in the same directory without --resume is refused, and the checkpoint is untouched.
    saved = checkpoint.read_bytes()
    assert main(run_args(tiny, resumed_dir)) == 2
    assert checkpoint.read_bytes() == saved

    assert main(run_args(tiny, resumed_dir, "--resume")) == 0
    assert losses(resumed_dir) == losses(reference_dir)  # bit for bit: same data position, RNG, optimizer
    assert records(resumed_dir, "eval")[-1] == records(reference_dir, "eval")[-1]

    # A resume with settings that change the losses is refused.
    assert main(run_args(tiny, resumed_dir, "--resume", "--alpha", "0.7")) == 2


def test_gradient_accumulation_takes_the_same_steps(tiny, tmp_path):
    whole, accumulated = tmp_path / "whole", tmp_path / "accumulated"
    assert main(run_args(tiny, whole, "--eval-samples", "0", steps=3)) == 0
    args = run_args(tiny, accumulated, "--eval-samples", "0", steps=3)
    args[args.index("--batch-size") + 1] = "2"
    assert main([*args, "--grad-accum", "2"]) == 0
    for a, b in zip(losses(whole), losses(accumulated), strict=True):
        torch.testing.assert_close(torch.tensor(a[1:]), torch.tensor(b[1:]), rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_gradient_checkpointing_recomputes_and_changes_nothing(tiny, tmp_path, monkeypatch):
    from transformers.models.qwen3 import modeling_qwen3

    calls = []
    forward = modeling_qwen3.Qwen3MLP.forward  # inside the decoder layer: runs again when it is recomputed

    def counting_forward(self, *args, **kwargs):
        calls.append(1)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(modeling_qwen3.Qwen3MLP, "forward", counting_forward)
    plain, checkpointed = tmp_path / "plain", tmp_path / "checkpointed"
    assert main(run_args(tiny, plain, "--eval-samples", "0", steps=3)) == 0
    plain_calls = len(calls)
    assert main(run_args(tiny, checkpointed, "--eval-samples", "0", "--gradient-checkpointing", steps=3)) == 0
    # the student's layer runs again in every backward (1 layer x 3 steps)
    assert len(calls) - plain_calls == plain_calls + 3
    assert losses(checkpointed) == losses(plain)


@pytest.mark.slow
def test_offline_topk_mode_matches_online_and_reuses_its_cache(tiny, tmp_path, monkeypatch, capsys):
    from transformers import AutoTokenizer

    from fusedkd.distill import run as run_module

    vocab = len(AutoTokenizer.from_pretrained(tiny["teacher"]))
    cache = tmp_path / "topk"
    online, offline, again = tmp_path / "online", tmp_path / "offline", tmp_path / "again"
    common = ("--eval-samples", "0", "--alpha", "0.8")
    assert main(run_args(tiny, online, *common, steps=3)) == 0
    # k = the whole vocabulary: the sparse loss is the full forward KL, up to the float16 storage
    topk = ("--teacher-topk", str(vocab), "--topk-cache", str(cache), "--topk-tail", "renormalize")
    assert main(run_args(tiny, offline, *common, *topk, steps=3)) == 0
    assert (cache / "manifest.json").is_file() and (cache / "part-00000" / "index.json").is_file()
    for a, b in zip(losses(online), losses(offline), strict=True):
        torch.testing.assert_close(torch.tensor(a[1:4]), torch.tensor(b[1:4]), rtol=2e-3, atol=1e-4)

    load_model = run_module.load_model

    def student_only(name, *, role, dtype=None):
        assert role == "student", "the teacher was loaded although its top-k is cached"
        return load_model(name, role=role, dtype=dtype)

    monkeypatch.setattr(run_module, "load_model", student_only)
    capsys.readouterr()
    assert main(run_args(tiny, again, *common, *topk, steps=3)) == 0
    assert "using the teacher's top-" in capsys.readouterr().out
    assert losses(again) == losses(offline)

    # a cache of other inputs is never overwritten, and the error says which input changed
    manifest = (cache / "manifest.json").read_bytes()
    changes = {
        "k": (("--teacher-topk", "8"), f"--teacher-topk {vocab} (this run: 8)"),
        "seq len": (("--seq-len", "32"), "--seq-len 40 (this run: 32)"),
        "temperature": (("--temperature", "2.0"), "--temperature 1.0 (this run: 2.0)"),
        "data": (("--max-samples", "100"), "different training data"),
    }
    for change, expected in changes.values():
        args = set_option(run_args(tiny, tmp_path / "other", *common, *topk, steps=3), *change)
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "holds the top-k of another run" in err and expected in err, err
    assert (cache / "manifest.json").read_bytes() == manifest
    # K above the vocabulary is refused before anything is built
    too_big = ("--teacher-topk", str(vocab + 1), "--topk-cache", str(tmp_path / "big"))
    assert main(run_args(tiny, tmp_path / "big-run", *common, *too_big, steps=3)) == 2
    assert (
        f"--teacher-topk {vocab + 1} is larger than the vocabulary ({vocab} rows)" in capsys.readouterr().err
    )


# --------------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit code 2


def bad_input_cases(tiny: dict, tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    blank = tmp_path / "blank.jsonl"
    blank.write_text("".join(json.dumps({"text": ""}) + "\n" for _ in range(20)))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    base = run_args(tiny, tmp_path / "out")

    def with_(**changes) -> list[str]:
        args = list(base)
        for flag, value in changes.items():
            flag = "--" + flag.replace("_", "-")
            if flag in args:
                args[args.index(flag) + 1] = value
            else:
                args += [flag, value]
        return args

    return {
        "missing model path": (with_(teacher=str(tmp_path / "no-such-model")), "no such directory"),
        "unknown dataset": (with_(dataset="no-such-user/no-such-dataset-fusedkd"), "no-such-dataset-fusedkd"),
        "empty dataset": (with_(dataset=str(empty)), "empty"),
        "missing text field": (with_(text_field="body"), "no text field 'body'"),
        "sequences shorter than 2 tokens": (with_(dataset=str(blank)), "shorter than 2 tokens"),
        "seq len below 2": (with_(seq_len="1"), "at least 2"),
        "tokenizer mismatch": (with_(student=tiny["student_other_tokenizer"]), "tokenizers differ"),
        "head size mismatch": (with_(student=tiny["student_padded_head"]), "--vocab-size"),
        "logits not the config's head transform": (
            with_(student=tiny["student_false_softcap"]),
            "not its lm_head's W h + b through the head transform of its config",
        ),
        "top-k without its cache": ([*base, "--teacher-topk", "8"], "go together"),
        "unwritable output dir": (with_(output_dir=str(blocker / "out")), "not writable"),
        "alpha out of range": (with_(alpha="1.5"), "--alpha"),
        "teacher without student": (["--teacher", tiny["teacher"]], "needs --student"),
        "real-run flag in the default": (["--dataset", tiny["data"]], "only for real runs"),
        "unknown option": ([*base, "--no-such-option"], "unrecognized arguments"),
    }


CASES = [
    "missing model path", "unknown dataset", "empty dataset", "missing text field",
    "sequences shorter than 2 tokens", "seq len below 2", "tokenizer mismatch", "head size mismatch",
    "logits not the config's head transform", "top-k without its cache", "unwritable output dir",
    "alpha out of range",
    "teacher without student", "real-run flag in the default", "unknown option",
]  # fmt: skip


@pytest.mark.parametrize(
    "case",
    # The unknown Hub dataset takes the datasets library ~20 s to give up on, offline.
    [pytest.param(c, marks=pytest.mark.slow) if c == "unknown dataset" else c for c in CASES],
)
def test_bad_input_is_one_line_and_exit_code_2(case, tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    args, expected = bad_input_cases(tiny, tmp_path)[case]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert expected in err[0]


@pytest.mark.slow
def test_command_line_exit_code_and_single_error_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    missing = str(tmp_path / "missing")
    command = [
        sys.executable,
        "-m",
        "fusedkd.distill",
        "--teacher",
        missing,
        "--student",
        missing,
        "--dataset",
        "x",
    ]
    completed = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines() == [f"error: --teacher {missing!r}: no such directory"]


# --------------------------------------------------------------------------------------------------------
# The embedded default, shrunk (the real one takes minutes; it is measured, not unit-tested)


@pytest.mark.slow
def test_embedded_default_runs_and_reuses_its_cache(tmp_path, monkeypatch, capsys):
    corpus = stdlib_corpus()
    small = Corpus(
        train=corpus.train[:6], heldout=corpus.heldout[-1:], fingerprint="test-" + corpus.fingerprint
    )
    monkeypatch.setattr(recipe, "stdlib_corpus", lambda: small)
    monkeypatch.setattr(recipe, "TINY_TEACHER_SHAPE", TEACHER_SHAPE)
    monkeypatch.setattr(recipe, "TINY_STUDENT_SHAPE", STUDENT_SHAPE)
    monkeypatch.setattr(recipe, "TeacherRecipe", partial(recipe.TeacherRecipe, vocab_size=512, steps=3))
    monkeypatch.setattr(recipe, "EVAL_SEQUENCES", 8)
    cache = tmp_path / "cache"
    args = ["--max-steps", "3", "--no-progress", "--cache-dir", str(cache)]
    threads = torch.get_num_threads()

    assert main([*args, "--output-dir", str(tmp_path / "first")]) == 0
    first = capsys.readouterr().out
    assert "training it from scratch" in first and "tokenizer: byte-level BPE, 512 tokens, trained" in first
    report = (tmp_path / "first" / "report.md").read_text()
    for row in ("teacher", "before training", "distilled with fusedkd", "hard labels only"):
        assert row in report
    assert json.loads((tmp_path / "first" / "report.json").read_text())["eval_tokens"] > 0
    for name in ("kd", "ce"):
        assert (tmp_path / "first" / name / "final" / "config.json").is_file()

    assert main([*args, "--output-dir", str(tmp_path / "second")]) == 0
    assert torch.get_num_threads() == threads  # the thread tuner's choice does not outlive the run
    second = capsys.readouterr().out
    assert "loaded from the cache" in second and "512 tokens, loaded" in second
    # same cached teacher and tokenizer, same seed: the same numbers
    assert (tmp_path / "second" / "report.md").read_text().split("Total wall time")[0].split("\n\n")[0] == (
        report.split("\n\n")[0]
    )


# --------------------------------------------------------------------------------------------------------
# Scale-out: torchrun, 2 processes on gloo, against 1 process with the same global batch


def torchrun(nproc: int, args: list[str], cwd: Path) -> str:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
        "-m", "fusedkd.distill", *args,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    completed = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
    return completed.stdout


@pytest.mark.slow
@pytest.mark.parametrize("sharding", [(), ("--fsdp", "--shard-teacher")], ids=["ddp", "fsdp2"])
def test_two_processes_take_the_same_steps_as_one(sharding, tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    one, two = tmp_path / "one", tmp_path / "two"
    assert main(run_args(tiny, one, steps=4)) == 0
    args = run_args(tiny, two, *sharding, steps=4)
    args[args.index("--batch-size") + 1] = "2"  # 2 processes x 2 = the global batch of 4
    torchrun(2, args, tmp_path)

    # Same global batches, loss normalized by the global number of target tokens: the same steps, up to
    # float32 summation order (per-process matmul shapes and the gradient all-reduce).
    for a, b in zip(losses(one), losses(two), strict=True):
        assert a[0] == b[0]
        torch.testing.assert_close(torch.tensor(a[1:]), torch.tensor(b[1:]), rtol=1e-4, atol=1e-6)
    eval_one, eval_two = records(one, "eval")[-1], records(two, "eval")[-1]
    assert eval_one["eval_tokens"] == eval_two["eval_tokens"]
    torch.testing.assert_close(eval_one["eval_student_ppl"], eval_two["eval_student_ppl"], rtol=1e-4, atol=0)
    final_one = AutoModelForCausalLM.from_pretrained(one / "final").state_dict()
    final_two = AutoModelForCausalLM.from_pretrained(two / "final").state_dict()
    for name, tensor in final_one.items():
        torch.testing.assert_close(final_two[name], tensor, rtol=1e-3, atol=1e-5)


# --------------------------------------------------------------------------------------------------------
# Startup checks, stale metrics, chat data, bf16 autocast


def test_head_check_accepts_plain_and_scaled_heads_and_refuses_other_logits():
    from fusedkd.distill.errors import UsageError
    from fusedkd.distill.models import check_linear_head, linear_head_error, lm_head

    ids = torch.randint(0, 300, (1, PROBE_TOKENS))
    config = qwen3_config(STUDENT_SHAPE, vocab_size=300, max_positions=64, eos_token_id=0)
    qwen3 = build_model(config, seed=0)
    assert linear_head_error(qwen3, ids) == 0.0
    check_linear_head(qwen3, "student", ids)
    check_linear_head(qwen3.to(torch.bfloat16), "student", ids)  # the same matmul in bf16
    # Granite divides its logits by logits_scaling: the head transform the loss applies.
    for scaling in (1.0, 4.0, 1.05):
        model = scaled_logits_model(300, 0, logits_scaling=scaling)
        assert lm_head(model).transform == fusedkd.HeadTransform(logit_scale=1.0 / scaling)
        assert linear_head_error(model, ids) < 1e-6
        check_linear_head(model, "student", ids)
    # Logits that are not what the config says: a cap the architecture ignores, a multiplier outside it.
    capped = falsely_capped_model(300, 0)
    assert lm_head(capped).transform.softcap == 2.0
    multiplied = scaled_logits_model(300, 0, logits_scaling=4.0)
    multiplied.lm_head.register_forward_hook(lambda module, args, out: out * 1.05)
    for model in (capped, multiplied):
        assert linear_head_error(model, ids) > 1e-3
        with pytest.raises(UsageError, match="--teacher: the model's logits are not its lm_head's W h"):
            check_linear_head(model, "teacher", ids)
    assert qwen3.training is True  # the check leaves the mode as it was


def test_scaled_student_is_distilled_with_its_own_logits():
    """The recipe's loss options for a Granite student (logits = W h / logits_scaling) and a soft-capped
    teacher: the fused loss equals the float64 reference loss on the models' own logits."""
    from fusedkd.distill.models import hidden_states, lm_head

    student = scaled_logits_model(300, 0, logits_scaling=4.0).double()
    teacher = scaled_logits_model(300, 0, logits_scaling=0.5).double()
    ids = torch.randint(0, 300, (2, 11))
    mask = torch.ones_like(ids)
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], 1)
    options = dict(temperature=2.0, alpha=0.6, divergence="jsd", beta=0.3)
    loss = fusedkd.fused_linear_kd_loss(
        hidden_states(student, ids, mask),
        lm_head(student).weight,
        hidden_states(teacher, ids, mask),
        lm_head(teacher).weight,
        labels,
        backend="torch",
        **options,
        **lm_head(student).transform.options("student"),
        **lm_head(teacher).transform.options("teacher"),
    )
    with torch.no_grad():
        expected = reference_kd_loss(
            student(input_ids=ids).logits, teacher(input_ids=ids).logits, labels, **options
        )
    assert abs(loss.item() - expected.item()) <= 1e-10 * abs(expected.item())


def test_run_distills_a_scaled_logits_student(tiny, tmp_path, monkeypatch):
    """A Granite student (logits = W h / 4) passes the startup head check and trains, its loss built with
    its own logit scale; eval logits use it too."""
    seen = []
    original = fusedkd.FusedLinearKDLoss.__init__

    def record(self, **options):
        seen.append(options)
        original(self, **options)

    monkeypatch.setattr(fusedkd.FusedLinearKDLoss, "__init__", record)
    out = tmp_path / "run"
    args = set_option(run_args(tiny, out, steps=2), "--student", tiny["student_scaled_logits"])
    assert main(args) == 0
    assert seen and seen[0]["student_logit_scale"] == 0.25 and seen[0]["teacher_logit_scale"] == 1.0
    assert seen[0]["student_softcap"] is None and seen[0]["teacher_softcap"] is None
    train = records(out, "train")
    assert [r["step"] for r in train] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in train)


def test_fresh_run_starts_clean_over_a_dead_attempts_metrics(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    stale = {"event": "train", "step": 1, "loss": 123.0}
    (out / METRICS_NAME).write_text(json.dumps(stale) + "\n" + json.dumps(dict(stale, step=2)) + "\n")
    assert main(run_args(tiny, out, "--eval-samples", "0", steps=2)) == 0
    assert "stopped before its first checkpoint; removed, this run starts clean" in capsys.readouterr().out
    assert [r["step"] for r in records(out, "train")] == [1, 2]
    assert all(r["loss"] != 123.0 for r in records(out, "train"))


def test_chat_dataset_trains_on_the_assistant_turns(tmp_path, capsys):
    from test_distill_data import CHAT, QWEN3_STYLE_TEMPLATE, chat_tokenizer

    tokenizer = chat_tokenizer(QWEN3_STYLE_TEMPLATE)
    teacher = save_model(tmp_path / "teacher", TEACHER_SHAPE, tokenizer, seed=0)
    student = save_model(tmp_path / "student", STUDENT_SHAPE, tokenizer, seed=1)
    data = tmp_path / "chat.jsonl"
    rows = [{"messages": CHAT}] * 12 + [
        {"prompt": f"what is {a} plus 1?", "completion": f"{a + 1}."} for a in range(12)
    ]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "run"
    args = [
        "--teacher", teacher, "--student", student, "--dataset", str(data), "--seq-len", "128",
        "--batch-size", "4", "--max-steps", "2", "--eval-samples", "4", "--no-progress",
        "--output-dir", str(out),
    ]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    samples, _ = tokenize(load_texts(str(data)), tokenizer, seq_len=128)
    train = printed.split("training: ")[1].split(" target tokens")[0]
    evaluation = printed.split("evaluation: ")[1].split(" target tokens")[0]
    counted = [int(text.split(" sequences, ")[1].replace(",", "")) for text in (train, evaluation)]
    # the run's targets are the assistant turns of every record (unit-tested in test_distill_data)
    assert sum(counted) == samples.num_targets < samples.num_tokens / 2
    assert sum(r["target_tokens"] for r in records(out, "train")) > 0


def torch_backend_entry_module():
    """The module of the torch backend's entry point ``fused_linear_kd(student_hidden, student_weight, ...)``,
    looked up by name at every call of the loss."""
    import importlib

    return importlib.import_module("fusedkd.torch_backend.fused_linear_kd")


def test_bf16_autocast_runs_the_loss_and_the_evaluation_logits_in_bf16(monkeypatch):
    """Under bf16 autocast with float32 master weights, the loss gets bf16 hidden states and heads (its logit
    projections run in bf16) and the master weight gets a float32 gradient."""
    import fusedkd
    from fusedkd.distill import evaluate as evaluate_module
    from fusedkd.distill.objectives import KDObjective

    config = qwen3_config(STUDENT_SHAPE, vocab_size=300, max_positions=64, eos_token_id=0)
    student, teacher = build_model(config, seed=0), build_model(config, seed=1)
    ids = torch.randint(0, 300, (4, 33))
    mask = torch.ones_like(ids)
    labels = torch.cat([ids[:, 1:], torch.full((4, 1), -100)], 1)
    seen = []
    entry_module = torch_backend_entry_module()
    backend = entry_module.fused_linear_kd

    def spy(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, *args, **kwargs):
        seen.append((student_hidden.dtype, student_weight.dtype, teacher_hidden.dtype, teacher_weight.dtype))
        return backend(
            student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, *args, **kwargs
        )

    monkeypatch.setattr(entry_module, "fused_linear_kd", spy)
    criterion = fusedkd.FusedLinearKDLoss(reduction="sum", return_components=True, backend="torch")
    objective = KDObjective(student, criterion)

    def step(autocast: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            with torch.no_grad():
                teacher_hidden = teacher.base_model(input_ids=ids).last_hidden_state
            loss, _, _ = objective(ids, mask, labels, teacher_hidden, teacher.lm_head.weight)
        loss.backward()

    step(autocast=False)
    assert seen.pop() == (torch.float32,) * 4
    assert student.lm_head.weight.dtype == torch.float32  # float32 master weights
    step(autocast=True)
    assert seen.pop() == (torch.bfloat16,) * 4
    assert student.lm_head.weight.grad.dtype == torch.float32

    # evaluation: the student's logits as training computes them (in the autocast dtype)
    hidden = torch.randn(5, STUDENT_SHAPE["hidden_size"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = evaluate_module._logits(hidden, student, 300)
    expected = torch.nn.functional.linear(hidden.bfloat16(), student.lm_head.weight.bfloat16()).float()
    assert torch.equal(logits, expected)
    assert torch.equal(evaluate_module._logits(hidden, student, 300), hidden @ student.lm_head.weight.T)


# --------------------------------------------------------------------------------------------------------
# The sharded teacher and the parallel top-k cache build, under torchrun (2 processes, gloo)

SHARDED_TEACHER_WORKER = """\
# run by torchrun, 2 processes on gloo; argv: teacher directory, output directory

import json
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from fusedkd.distill import models
from fusedkd.distill.distributed import init_distributed, is_fsdp, sharded_bytes, shutdown

teacher_dir, out_dir = sys.argv[1], Path(sys.argv[2])
ctx = init_distributed("cpu")
loads = []
load_model = models.load_model


def counting_load_model(*args, **kwargs):
    loads.append(ctx.rank)
    return load_model(*args, **kwargs)


models.load_model = counting_load_model
torch.manual_seed(0)
ids = torch.randint(0, 200, (3, 11))
mask = torch.ones_like(ids)
mask[1, 7:] = 0
probe = ids[:1, :8]
reference = load_model(teacher_dir, role="teacher", dtype=torch.float32).eval()
loads.clear()
with torch.no_grad():
    expected = models.hidden_states(reference, ids, mask)
    teacher = models.load_teacher(teacher_dir, dtype=torch.float32, ctx=ctx, probe=probe, shard=True)
    got = models.hidden_states(teacher, ids, mask)
    got_again = models.hidden_states(teacher, ids, mask)

layers = [p for layer in teacher.base_model.layers for p in layer.parameters()]
head = models.lm_head(teacher).weight
result = {
    "rank": ctx.rank,
    "loads": loads,
    "max_error": float((got - expected).abs().max()),
    "repeat_equal": bool(torch.equal(got, got_again)),
    "layers_resharded": all(isinstance(p, DTensor) for p in layers),
    "root_resharded": all(isinstance(p, DTensor) for p in teacher.base_model.norm.parameters()),
    "base_is_fsdp": is_fsdp(teacher.base_model),
    "layers_are_not_roots": all(not layer._get_fsdp_state()._is_root for layer in teacher.base_model.layers),
    "head_whole": not isinstance(head, DTensor) and head.shape == reference.lm_head.weight.shape,
    "head_equal": bool(torch.equal(head, reference.lm_head.weight)),
    "tied": teacher.lm_head.weight is teacher.base_model.embed_tokens.weight,
    "devices": sorted({str(t.device) for t in list(teacher.parameters()) + list(teacher.buffers())}),
    "bytes": sharded_bytes(teacher),
    "full_bytes": sum(p.numel() * p.element_size() for p in reference.parameters()),
    "layer_bytes": sum(p.numel() * p.element_size() for p in reference.model.layers.parameters()),
}
(out_dir / f"rank{ctx.rank}.json").write_text(json.dumps(result))
shutdown(ctx)
"""


@pytest.mark.slow
def test_sharded_teacher_equals_the_whole_one_and_stays_sharded(tiny, tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(SHARDED_TEACHER_WORKER)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(worker), tiny["teacher"], str(tmp_path),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    completed = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for result in results:
        # the sharded teacher's hidden states are the whole teacher's, and stay so run after run
        assert result["max_error"] == 0.0 and result["repeat_equal"]
        # the layers are FSDP2 units under a root (the base model), and after a forward under no_grad
        # every layer and the root are back to their shards: the teacher is never left gathered
        assert result["base_is_fsdp"] and result["layers_are_not_roots"]
        assert result["layers_resharded"] and result["root_resharded"]
        # the lm_head (tied to the embedding) is whole on every process and equals the checkpoint's
        assert result["head_whole"] and result["head_equal"] and result["tied"]
        assert result["devices"] == ["cpu"]  # nothing left on the meta device
        sharded, whole = result["bytes"]
        head_bytes = whole  # only the (tied) head is held whole
        assert sharded < 0.51 * (result["full_bytes"] - head_bytes) and sharded + whole < result["full_bytes"]
    # only rank 0 ever loaded the checkpoint; the other process built its shards on the meta device
    assert results[0]["loads"] == [0] and results[1]["loads"] == []


def read_cache(directory: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from fusedkd.distill.offline import MANIFEST_NAME, open_cache

    identity = json.loads((directory / MANIFEST_NAME).read_text())["identity"]
    cache = open_cache(directory, identity)
    return cache[0 : len(cache)]


@pytest.mark.slow
def test_topk_cache_built_by_two_processes_and_resumed_equals_one_process_build(tiny, tmp_path):
    one, two = tmp_path / "cache-one", tmp_path / "cache-two"
    common = ("--eval-samples", "0", "--teacher-topk", "16", "--topk-part-tokens", "700")

    def build(nproc: int, cache: Path, run: str) -> str:
        args = run_args(tiny, tmp_path / run, *common, "--topk-cache", str(cache), steps=1)
        return torchrun(nproc, args, tmp_path)

    build(1, one, "run-one")
    parts = sorted(p.name for p in one.iterdir() if p.name.startswith("part-"))
    assert len(parts) >= 4
    printed = build(2, two, "run-two")
    assert f"built {len(parts)} of the cache's {len(parts)} parts" in printed
    reference = read_cache(one)
    for got, expected in zip(read_cache(two), reference, strict=True):
        assert torch.equal(got, expected)
    # each process wrote its own parts (round robin): the two processes' parts interleave
    manifest = json.loads((two / "manifest.json").read_text())
    assert [p["name"] for p in manifest["parts"]] == parts

    # A crash: the manifest was never written, part 1 has shards but no index (it died writing it), and
    # part 2 has a truncated shard under its temporary name. The rerun keeps every finished part.
    (two / "manifest.json").unlink()
    (two / parts[1] / "index.json").unlink()
    shard = next((two / parts[2]).glob("shard-*"))
    (two / parts[2] / "index.json").unlink()
    shard.rename(shard.with_name(f".{shard.name}.tmp"))
    kept = {
        path: (path.stat().st_ino, path.stat().st_mtime_ns)
        for name in parts
        if name not in parts[1:3]
        for path in (two / name).iterdir()
    }
    printed = build(2, two, "run-resumed")
    assert (
        f"built 2 of the cache's {len(parts)} parts ({len(parts) - 2} kept from an earlier build)" in printed
    )
    assert {path: (path.stat().st_ino, path.stat().st_mtime_ns) for path in kept} == kept
    for got, expected in zip(read_cache(two), reference, strict=True):
        assert torch.equal(got, expected)
