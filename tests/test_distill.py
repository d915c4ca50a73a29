"""End-to-end tests of ``python -m fusedkd.distill`` on tiny Qwen3 models (CPU, seconds each).

The models are saved with ``save_pretrained`` and loaded by path, the data is a local jsonl file in the
``### Human: ... ### Assistant: ...`` format, and the CLI is called in-process through
`fusedkd.distill.cli.main` (some tests run it as a subprocess: the real exit code and stderr, SIGKILL,
torchrun).
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
from fusedkd.distill import default
from fusedkd.distill.cli import main
from fusedkd.distill.data import Collator, load_records, tokenize
from fusedkd.distill.default import Corpus, stdlib_corpus, train_bpe_tokenizer
from fusedkd.distill.models import PROBE_TOKENS, build_model, quiet_transformers, qwen3_config
from fusedkd.distill.trainer import METRICS_NAME, MetricsLog

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
        from transformers import Trainer, TrainingArguments

        samples, _ = tokenize(TEXTS, tokenizer, seq_len=40)
        collate = Collator(pad_id=0)
        args = TrainingArguments(
            output_dir=str(directory),
            learning_rate=1e-2,
            per_device_train_batch_size=16,
            max_steps=train_steps,
            save_strategy="no",
            disable_tqdm=True,
            logging_steps=10,
            remove_unused_columns=False,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=samples,
            data_collator=lambda rows: {k: v for k, v in collate(rows).items() if k != "index"},
        )
        trainer.train()
        assert trainer.state.log_history[-2]["loss"] < 2.0
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
        "--seq_len", "40", "--per_device_train_batch_size", "4", "--max_steps", str(steps), "--learning_rate",
        "3e-3", "--eval_samples", "8", "--save_strategy", "no", "--disable_tqdm", "true", "--output_dir",
        str(output_dir), *extra,
    ]  # fmt: skip


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSEDKD_CACHE_DIR", str(tmp_path / "cache"))


def set_option(args: list[str], flag: str, value: str) -> list[str]:
    """`args` with `flag` set to `value` (replaced if present, else appended)."""
    args = list(args)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    return args


def records(output_dir: Path, event: str) -> list[dict]:
    """The ``metrics.jsonl`` records of training steps (``"train"``) or evaluations (``"eval"``)."""
    key = {"train": "loss", "eval": "eval_student_ppl"}[event]
    return [r for r in map(json.loads, (output_dir / METRICS_NAME).read_text().splitlines()) if key in r]


def losses(output_dir: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["learning_rate"], r["grad_norm"]) for r in records(output_dir, "train")]


def weights(directory: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory).state_dict()


# --------------------------------------------------------------------------------------------------------
# Real runs


def test_end_to_end_never_builds_logits_and_saves_a_loadable_student(tiny, tmp_path, monkeypatch, capsys):
    from transformers import AutoTokenizer, Qwen3ForCausalLM

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

    out = tmp_path / "run"
    with monkeypatch.context() as patched:
        patched.setattr(Qwen3ForCausalLM, "forward", no_logits)
        assert main(run_args(tiny, out, "--loss_only_on_response")) == 0
    assert probes == [(1, PROBE_TOKENS), (1, PROBE_TOKENS)]  # the student's and the teacher's head check

    train = records(out, "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert all(r.keys() >= {"loss", "learning_rate", "grad_norm"} for r in train)
    assert train[-1]["loss"] < 0.9 * train[0]["loss"]
    before, after = records(out, "eval")
    assert before["step"] == 0 and after["step"] == 6
    assert after["eval_student_ppl"] < before["eval_student_ppl"] and after["eval_kl"] < before["eval_kl"]
    assert after["eval_teacher_ppl"] == before["eval_teacher_ppl"]  # the frozen teacher
    assert (
        AutoTokenizer.from_pretrained(out / "final").get_vocab()
        == AutoTokenizer.from_pretrained(tiny["student"]).get_vocab()
    )
    final, initial = weights(out / "final"), weights(Path(tiny["student"]))
    assert all(not torch.equal(final[name], tensor) for name, tensor in initial.items())
    table = capsys.readouterr().out
    assert "| student after" in table and "| teacher" in table


def checkpointed(tiny: dict, output_dir: Path, *extra: str, save_steps: int = 5) -> list[str]:
    """`run_args` with a checkpoint every `save_steps` steps."""
    return set_option(
        run_args(tiny, output_dir, *extra, "--save_steps", str(save_steps)), "--save_strategy", "steps"
    )


def test_sigterm_saves_and_resume_is_bitwise_and_refuses_changed_settings(
    tiny, tmp_path, monkeypatch, capsys
):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert main(checkpointed(tiny, straight)) == 0
    on_log = MetricsLog.on_log

    def log_then_sigterm(self, args, state, control, logs=None, **kwargs):
        on_log(self, args, state, control, logs=logs, **kwargs)
        if state.global_step == 3 and "loss" in (logs or {}):
            os.kill(os.getpid(), signal.SIGTERM)  # a real SIGTERM, in the middle of the run

    with monkeypatch.context() as patched:
        patched.setattr(MetricsLog, "on_log", log_then_sigterm)
        assert main(checkpointed(tiny, stopped)) == 130
    # the step under way finished, then a checkpoint was saved (the regular ones are every 5 steps)
    assert [p.name for p in stopped.glob("checkpoint-*")] == ["checkpoint-4"]
    assert "stopped by SIGTERM at step 4" in capsys.readouterr().out
    assert not (stopped / "final").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler does not outlive the run

    # Starting over in the same directory without --resume is refused, and the checkpoint is untouched.
    saved = (stopped / "checkpoint-4" / "model.safetensors").read_bytes()
    assert main(checkpointed(tiny, stopped)) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err
    # A resume with settings that change the run is refused, naming them.
    assert main(checkpointed(tiny, stopped, "--resume", "--alpha", "0.7", "--learning_rate", "1e-3")) == 2
    err = capsys.readouterr().err
    assert "alpha 0.5 (now 0.7)" in err and "learning_rate 0.003 (now 0.001)" in err
    assert (stopped / "checkpoint-4" / "model.safetensors").read_bytes() == saved

    assert main(checkpointed(tiny, stopped, "--resume")) == 0
    assert losses(stopped) == losses(straight)  # bit for bit: same data position, RNG, optimizer
    assert records(stopped, "eval") == records(straight, "eval")  # before training, and at the end
    reference = weights(straight / "final")
    assert all(torch.equal(tensor, reference[name]) for name, tensor in weights(stopped / "final").items())


# The recipe's run in a subprocess that SIGKILLs itself right after its step-4 checkpoint is written, before
# step 5: a kill between checkpoints, at a known step whatever the machine's speed (no handler runs).
_KILLED_AFTER_STEP_4 = """
import os, runpy, signal, sys
import transformers
save = transformers.Trainer._save_checkpoint
def save_then_die(self, *args, **kwargs):
    save(self, *args, **kwargs)
    if self.state.global_step == 4:
        os.kill(os.getpid(), signal.SIGKILL)
transformers.Trainer._save_checkpoint = save_then_die
sys.argv = ["fusedkd.distill", *sys.argv[1:]]
runpy.run_module("fusedkd.distill", run_name="__main__")
"""


@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_run(tiny, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main(checkpointed(tiny, straight, "--max_steps", "12", save_steps=4)) == 0
    command = [
        sys.executable,
        "-c",
        _KILLED_AFTER_STEP_4,
        *checkpointed(tiny, killed, "--max_steps", "12", save_steps=4),
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(Path(__file__).parents[1]))
    process = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)
    assert process.returncode == -signal.SIGKILL, process.stderr[-2000:]
    assert (killed / "checkpoint-4").is_dir() and not (killed / "checkpoint-8").exists()
    assert not (killed / "final").exists()
    assert main(checkpointed(tiny, killed, "--max_steps", "12", "--resume", save_steps=4)) == 0
    assert losses(killed) == losses(straight)
    reference = weights(straight / "final")
    assert all(torch.equal(tensor, reference[name]) for name, tensor in weights(killed / "final").items())


def test_gradient_accumulation_takes_the_same_steps(tiny, tmp_path):
    whole, accumulated = tmp_path / "whole", tmp_path / "accumulated"
    assert main(run_args(tiny, whole, "--eval_samples", "0", steps=3)) == 0
    args = set_option(
        run_args(tiny, accumulated, "--eval_samples", "0", steps=3), "--per_device_train_batch_size", "2"
    )
    assert main([*args, "--gradient_accumulation_steps", "2"]) == 0
    for a, b in zip(losses(whole), losses(accumulated), strict=True):
        torch.testing.assert_close(torch.tensor(a[1:]), torch.tensor(b[1:]), rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_activation_checkpointing_recomputes_and_changes_nothing(tiny, tmp_path, monkeypatch):
    from transformers.models.qwen3 import modeling_qwen3

    calls = []
    forward = modeling_qwen3.Qwen3MLP.forward  # inside the decoder layer: runs again when it is recomputed

    def counting_forward(self, *args, **kwargs):
        calls.append(1)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(modeling_qwen3.Qwen3MLP, "forward", counting_forward)
    plain, recomputed = tmp_path / "plain", tmp_path / "recomputed"
    assert main(run_args(tiny, plain, "--eval_samples", "0", steps=3)) == 0
    plain_calls = len(calls)
    assert (
        main(run_args(tiny, recomputed, "--eval_samples", "0", "--activation_checkpointing", "true", steps=3))
        == 0
    )
    # the student's layer runs again in every backward (1 layer x 3 steps)
    assert len(calls) - plain_calls == plain_calls + 3
    assert losses(recomputed) == losses(plain)


@pytest.mark.slow
def test_offline_topk_mode_matches_online_and_reuses_its_cache(tiny, tmp_path, monkeypatch, capsys):
    from transformers import AutoTokenizer

    from fusedkd.distill import models

    vocab = len(AutoTokenizer.from_pretrained(tiny["teacher"]))
    cache = tmp_path / "topk"
    online, offline, again = tmp_path / "online", tmp_path / "offline", tmp_path / "again"
    common = ("--eval_samples", "0", "--alpha", "0.8")
    assert main(run_args(tiny, online, *common, steps=3)) == 0
    # k = the whole vocabulary: the sparse loss is the full forward KL, up to the float16 storage
    topk = ("--teacher_topk", str(vocab), "--topk_cache", str(cache), "--topk_tail", "renormalize")
    assert main(run_args(tiny, offline, *common, *topk, steps=3)) == 0
    assert (cache / "manifest.json").is_file() and (cache / "part-00000" / "index.json").is_file()
    for a, b in zip(losses(online), losses(offline), strict=True):
        torch.testing.assert_close(
            torch.tensor([a[1], a[3]]), torch.tensor([b[1], b[3]]), rtol=2e-3, atol=1e-4
        )

    load_model = models.load_model

    def student_only(name, *, role, dtype=None):
        assert role == "student", "the teacher was loaded although its top-k is cached"
        return load_model(name, role=role, dtype=dtype)

    capsys.readouterr()
    with monkeypatch.context() as patched:
        patched.setattr(models, "load_model", student_only)
        assert main(run_args(tiny, again, *common, *topk, steps=3)) == 0
    assert "using the teacher's top-" in capsys.readouterr().out
    assert losses(again) == losses(offline)

    # a cache of other inputs is never overwritten, and the error says which input changed
    manifest = (cache / "manifest.json").read_bytes()
    changes = {
        "k": (("--teacher_topk", "8"), f"--teacher_topk {vocab} (this run: 8)"),
        "seq len": (("--seq_len", "32"), "--seq_len 40 (this run: 32)"),
        "temperature": (("--temperature", "2.0"), "--temperature 1.0 (this run: 2.0)"),
        "data": (("--max_samples", "100"), "different training data"),
    }
    for change, expected in changes.values():
        args = set_option(run_args(tiny, tmp_path / "other", *common, *topk, steps=3), *change)
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "holds the top-k of another run" in err and expected in err, err
    assert (cache / "manifest.json").read_bytes() == manifest
    # K above the vocabulary is refused before anything is built
    too_big = ("--teacher_topk", str(vocab + 1), "--topk_cache", str(tmp_path / "big"))
    assert main(run_args(tiny, tmp_path / "big-run", *common, *too_big, steps=3)) == 2
    assert (
        f"--teacher_topk {vocab + 1} is larger than the vocabulary ({vocab} rows)" in capsys.readouterr().err
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
            args = set_option(args, "--" + flag, value)
        return args

    return {
        "missing model path": (with_(teacher=str(tmp_path / "no-such-model")), "no such directory"),
        "unknown dataset": (with_(dataset="no-such-user/no-such-dataset-fusedkd"), "no-such-dataset-fusedkd"),
        "empty dataset": (with_(dataset=str(empty)), "empty"),
        "missing text field": (with_(text_field="body"), "no text field 'body'"),
        "sequences shorter than 2 tokens": (with_(dataset=str(blank)), "shorter than 2 tokens"),
        "seq len below 2": (with_(seq_len="1"), "at least 2"),
        "tokenizer mismatch": (with_(student=tiny["student_other_tokenizer"]), "tokenizers differ"),
        "head size mismatch": (with_(student=tiny["student_padded_head"]), "--vocab_size"),
        "logits not the config's head transform": (
            with_(student=tiny["student_false_softcap"]),
            "not its lm_head's W h + b through the head transform of its config",
        ),
        "top-k without its cache": ([*base, "--teacher_topk", "8"], "go together"),
        "unwritable output dir": (with_(output_dir=str(blocker / "out")), "not writable"),
        "alpha out of range": (with_(alpha="1.5"), "--alpha"),
        "teacher without student": (["--teacher", tiny["teacher"]], "needs --student"),
        "real-run flag in the default": (["--dataset", tiny["data"]], "only for real runs"),
        "unknown option": ([*base, "--no-such-option"], "unrecognized arguments: --no-such-option"),
        "bad Trainer option": ([*base, "--per_device_train_batch_size", "x"], "per_device_train_batch_size"),
        "resume without a checkpoint": ([*base, "--resume"], "holds no checkpoint"),
    }


CASES = [
    "missing model path", "unknown dataset", "empty dataset", "missing text field",
    "sequences shorter than 2 tokens", "seq len below 2", "tokenizer mismatch", "head size mismatch",
    "logits not the config's head transform", "top-k without its cache", "unwritable output dir",
    "alpha out of range", "teacher without student", "real-run flag in the default", "unknown option",
    "bad Trainer option", "resume without a checkpoint",
]  # fmt: skip


def _offline(monkeypatch) -> None:
    """The Hub offline for this test. huggingface_hub and datasets read HF_HUB_OFFLINE and
    HF_DATASETS_OFFLINE once, at import, so the variables alone come too late once they are imported
    (an unknown dataset then takes ~20 s of retries to fail): their read values are patched too."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_exit_code_2(case, tiny, tmp_path, monkeypatch, capsys):
    _offline(monkeypatch)
    args, expected = bad_input_cases(tiny, tmp_path)[case]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert expected in err[0]


@pytest.mark.slow
def test_command_line_exit_code_and_single_error_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(Path(__file__).parents[1]))
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


def test_a_yaml_config_is_the_command_line(tiny, tmp_path):
    flags, out = run_args(tiny, tmp_path / "flags", "--eval_samples", "0", steps=2), tmp_path / "yaml"
    config = {flags[i].lstrip("-"): flags[i + 1] for i in range(0, len(flags), 2)} | {"output_dir": str(out)}
    # YAML values: numbers and booleans as such, paths and names as strings
    lines = [f"{k}: {v if v[0].isdigit() or v == 'true' else json.dumps(v)}\n" for k, v in config.items()]
    (tmp_path / "run.yaml").write_text("".join(lines))
    assert main(flags) == 0 and main([str(tmp_path / "run.yaml")]) == 0
    assert losses(out) == losses(tmp_path / "flags")


# --------------------------------------------------------------------------------------------------------
# The embedded default, shrunk (the real one takes minutes; it is measured, not unit-tested)


@pytest.mark.slow
def test_embedded_default_runs_and_reuses_its_cache(tmp_path, monkeypatch, capsys):
    corpus = stdlib_corpus()
    small = Corpus(
        train=corpus.train[:6], heldout=corpus.heldout[-1:], fingerprint="test-" + corpus.fingerprint
    )
    monkeypatch.setattr(default, "stdlib_corpus", lambda: small)
    monkeypatch.setattr(default, "TINY_TEACHER_SHAPE", TEACHER_SHAPE)
    monkeypatch.setattr(default, "TINY_STUDENT_SHAPE", STUDENT_SHAPE)
    monkeypatch.setattr(default, "TeacherRecipe", partial(default.TeacherRecipe, vocab_size=512, steps=3))
    monkeypatch.setattr(default, "EVAL_SEQUENCES", 8)
    cache = tmp_path / "cache"
    args = ["--max_steps", "3", "--disable_tqdm", "true", "--cache_dir", str(cache)]
    threads = torch.get_num_threads()

    assert main([*args, "--output_dir", str(tmp_path / "first")]) == 0
    first = capsys.readouterr().out
    assert "training it from scratch" in first and "tokenizer: byte-level BPE, 512 tokens, trained" in first
    report = (tmp_path / "first" / "report.md").read_text()
    for row in ("teacher", "before training", "distilled with fusedkd", "hard labels only"):
        assert row in report
    assert json.loads((tmp_path / "first" / "report.json").read_text())["eval_tokens"] > 0
    for name in ("kd", "ce"):
        assert (tmp_path / "first" / name / "final" / "config.json").is_file()

    assert main([*args, "--output_dir", str(tmp_path / "second")]) == 0
    torch.set_num_threads(threads)
    second = capsys.readouterr().out
    assert "loaded from the cache" in second and "512 tokens, loaded" in second
    # same cached teacher and tokenizer, same seed: the same numbers (threads fixed: one thread here)
    if threads == 1:
        assert (tmp_path / "second" / "report.md").read_text().split("\n\n")[0] == report.split("\n\n")[0]
    assert main([*args, "--output_dir", str(tmp_path / "first")]) == 2  # a report is never overwritten


# --------------------------------------------------------------------------------------------------------
# Scale-out: torchrun, 2 processes on gloo, against 1 process with the same global batch


def torchrun(nproc: int, args: list[str], cwd: Path) -> str:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
        "-m", "fusedkd.distill", *args,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(Path(__file__).parents[1]))
    completed = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
    return completed.stdout


FSDP2_CONFIG = {"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["Qwen3DecoderLayer"],
                "state_dict_type": "FULL_STATE_DICT"}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["ddp", "fsdp2"])
def test_two_processes_take_the_same_steps_as_one(sharding, tiny, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(run_args(tiny, one, steps=4)) == 0
    extra = []
    if sharding == "fsdp2":
        (tmp_path / "fsdp.json").write_text(json.dumps(FSDP2_CONFIG))
        extra = ["--fsdp", "full_shard", "--fsdp_config", str(tmp_path / "fsdp.json"), "--shard_teacher"]
    args = set_option(run_args(tiny, two, *extra, steps=4), "--per_device_train_batch_size", "2")  # 2 x 2 = 4
    printed = torchrun(2, args, tmp_path)
    assert "| student after" in printed
    # Same global batches, loss normalized by the global number of target tokens: the same steps, up to
    # float32 summation order (per-process matmul shapes and the gradient all-reduce).
    for a, b in zip(losses(one), losses(two), strict=True):
        assert a[0] == b[0]
        torch.testing.assert_close(torch.tensor(a[1:]), torch.tensor(b[1:]), rtol=1e-4, atol=1e-6)
    eval_one, eval_two = records(one, "eval")[-1], records(two, "eval")[-1]
    assert eval_one["eval_tokens"] == eval_two["eval_tokens"]
    for key in ("eval_student_ppl", "eval_teacher_ppl", "eval_agreement", "eval_kl"):
        torch.testing.assert_close(eval_one[key], eval_two[key], rtol=1e-4, atol=1e-6)
    final_one, final_two = weights(one / "final"), weights(two / "final")
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
    from fusedkd.integrations import hf

    seen = []
    loss = hf.fused_linear_kd_loss

    def record(*args, **options):
        seen.append(options)
        return loss(*args, **options)

    monkeypatch.setattr(hf, "fused_linear_kd_loss", record)
    out = tmp_path / "run"
    args = set_option(run_args(tiny, out, steps=2), "--student", tiny["student_scaled_logits"])
    assert main([*args, "--backend", "torch"]) == 0
    assert len(seen) == 2 and seen[0]["student_logit_scale"] == 0.25 and seen[0]["teacher_logit_scale"] == 1.0
    assert seen[0]["student_softcap"] is None and seen[0]["teacher_softcap"] is None
    assert seen[0]["backend"] == "torch" and seen[0]["vocab_size"] == 300
    train = records(out, "train")
    assert [r["step"] for r in train] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in train)


def test_heads_padded_to_different_sizes_distill_over_the_shared_rows(tiny, tmp_path, monkeypatch):
    from fusedkd.integrations import hf

    seen = []
    loss = hf.fused_linear_kd_loss

    def record(student_hidden, student_weight, teacher_hidden, teacher_weight, *args, **options):
        seen.append((student_weight.shape[0], teacher_weight.shape[0], options["vocab_size"]))
        return loss(student_hidden, student_weight, teacher_hidden, teacher_weight, *args, **options)

    monkeypatch.setattr(hf, "fused_linear_kd_loss", record)
    args = set_option(run_args(tiny, tmp_path / "run", steps=1), "--student", tiny["student_padded_head"])
    assert main([*args, "--vocab_size", "300"]) == 0
    assert seen == [(364, 300, 300)]  # the student's 64 padding rows are left out of the loss
    assert all(math.isfinite(r["eval_kl"]) for r in records(tmp_path / "run", "eval"))


def test_fresh_run_starts_clean_over_a_dead_attempts_metrics(tiny, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    stale = {"step": 1, "loss": 123.0}
    (out / METRICS_NAME).write_text(json.dumps(stale) + "\n" + json.dumps(dict(stale, step=2)) + "\n")
    assert main(run_args(tiny, out, "--eval_samples", "0", steps=2)) == 0
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
        "--teacher", teacher, "--student", student, "--dataset", str(data), "--seq_len", "128",
        "--per_device_train_batch_size", "4", "--max_steps", "2", "--eval_samples", "4", "--disable_tqdm",
        "true", "--output_dir", str(out), "--num_proc", "2",
    ]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "chat template: the tokenizer's (no generation markers" in printed
    samples, _ = tokenize(load_records(str(data)), tokenizer, seq_len=128)
    train = printed.split("training: ")[1].split(" target tokens")[0]
    evaluation = printed.split("evaluation: ")[1].split(" target tokens")[0]
    counted = [int(text.split(" sequences, ")[1].replace(",", "")) for text in (train, evaluation)]
    # the run's targets are the assistant turns of every record (unit-tested in test_distill_data)
    assert sum(counted) == samples.num_targets < samples.tokens.numel() / 2
    # its tokenization (2 processes) is cached, and a second run (1 process) reads it back
    cached = list((tmp_path / "cache" / "tokenized").glob("tokenized-*.arrow"))
    assert len(cached) >= 2
    assert main(set_option(set_option(args, "--output_dir", str(tmp_path / "again")), "--num_proc", "1")) == 0
    assert losses(tmp_path / "again") == losses(out)


def test_chunked_evaluation_equals_the_full_logits_computation(tmp_path, monkeypatch):
    """Perplexities, top-1 agreement and KL(teacher || student) per target token, from token chunks of
    logits, equal the plain computation on the models' full logits (dead rows pad the last batch)."""
    from fusedkd.distill import trainer as trainer_module
    from fusedkd.distill.data import TokenizedSamples
    from fusedkd.distill.trainer import DistillTrainer, DistillTrainingArguments

    monkeypatch.setattr(trainer_module, "default_chunk_size", lambda vocab: 7)  # chunks across rows

    config = qwen3_config(STUDENT_SHAPE, vocab_size=300, max_positions=64, eos_token_id=0)
    student, teacher = build_model(config, seed=0), build_model(config, seed=1)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for length in (9, 17, 5, 12, 30):
        ids = torch.randint(0, 300, (length,), generator=generator).tolist()
        rows.append((ids, [False] + [bool(t % 3) for t in ids[1:]]))
    samples = TokenizedSamples.from_lists(rows)
    args = DistillTrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=2, use_cpu=True)
    trainer = DistillTrainer(
        model=student, teacher_model=teacher, args=args, data_collator=Collator(0), eval_vocab=300
    )
    got = trainer.evaluate(samples)
    sums = torch.zeros(4, dtype=torch.float64)
    with torch.no_grad():
        for ids, targets in rows:
            ids, where = torch.tensor([ids]), torch.tensor(targets[1:])
            s, t = (m(input_ids=ids).logits[0, :-1][where].double() for m in (student, teacher))
            labels = ids[0, 1:][where]
            log_p = t.log_softmax(-1)
            sums += torch.stack([torch.nn.functional.cross_entropy(s, labels, reduction="sum"),
                                 torch.nn.functional.cross_entropy(t, labels, reduction="sum"),
                                 (s.argmax(-1) == t.argmax(-1)).sum(),
                                 (log_p.exp() * (log_p - s.log_softmax(-1))).sum()])  # fmt: skip
    tokens = sum(sum(targets) for _, targets in rows)
    assert got["eval_tokens"] == tokens
    mean = (sums / tokens).tolist()
    expected = {"eval_student_ppl": math.exp(mean[0]), "eval_teacher_ppl": math.exp(mean[1])}
    expected |= {"eval_agreement": mean[2], "eval_kl": mean[3]}
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5), key
    assert student.training and not teacher.training  # modes restored


def torch_backend_entry_module():
    """The module of the torch backend's entry point ``fused_linear_kd(student_hidden, student_weight, ...)``,
    looked up by name at every call of the loss."""
    import importlib

    return importlib.import_module("fusedkd.torch_backend.fused_linear_kd")


def test_bf16_runs_the_loss_projections_and_the_evaluation_logits_in_bf16(tiny, tmp_path, monkeypatch):
    """``--bf16`` (autocast, float32 master weights): the loss gets bf16 hidden states and heads (its logit
    projections run in bf16), the student stays float32; evaluation computes the student's logits as
    training does."""
    from fusedkd.distill import trainer as trainer_module

    seen = []
    entry_module = torch_backend_entry_module()
    backend = entry_module.fused_linear_kd

    def spy(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, *args, **kwargs):
        seen.append((student_hidden.dtype, student_weight.dtype, teacher_hidden.dtype, teacher_weight.dtype))
        return backend(
            student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, *args, **kwargs
        )

    monkeypatch.setattr(entry_module, "fused_linear_kd", spy)
    out = tmp_path / "run"
    bf16 = ("--bf16", "true", "--use_cpu", "true", "--backend", "torch", "--eval_samples", "0")
    assert main(run_args(tiny, out, *bf16, steps=1)) == 0
    assert seen == [(torch.bfloat16,) * 4]
    assert all(t.dtype == torch.float32 for t in weights(out / "final").values())  # float32 master weights

    config = qwen3_config(STUDENT_SHAPE, vocab_size=300, max_positions=64, eos_token_id=0)
    student = build_model(config, seed=0)
    hidden = torch.randn(5, STUDENT_SHAPE["hidden_size"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = trainer_module._logits(hidden, student, 300)
    expected = torch.nn.functional.linear(hidden.bfloat16(), student.lm_head.weight.bfloat16()).float()
    assert torch.equal(logits, expected)
    assert torch.equal(trainer_module._logits(hidden, student, 300), hidden @ student.lm_head.weight.T)


# --------------------------------------------------------------------------------------------------------
# The sharded teacher and the parallel top-k cache build, under torchrun (2 processes, gloo)

SHARDED_TEACHER_WORKER = """\
# run by torchrun, 2 processes on gloo; argv: teacher directory, output directory

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from fusedkd.distill import models

teacher_dir, out_dir = sys.argv[1], Path(sys.argv[2])
dist.init_process_group("gloo")
rank = dist.get_rank()
loads = []
load_model = models.load_model


def counting_load_model(*args, **kwargs):
    loads.append(rank)
    return load_model(*args, **kwargs)


models.load_model = counting_load_model
torch.manual_seed(0)
ids = torch.randint(0, 200, (3, 11))
mask = torch.ones_like(ids)
mask[1, 7:] = 0
probe = ids[:1, :8]
reference = load_model(teacher_dir, role="teacher", dtype=torch.float32).eval()
loads.clear()
cpu = torch.device("cpu")
with torch.no_grad():
    expected = models.hidden_states(reference, ids, mask)
    teacher = models.load_teacher(teacher_dir, dtype=torch.float32, device=cpu, probe=probe, shard=True)
    got = models.hidden_states(teacher, ids, mask)
    got_again = models.hidden_states(teacher, ids, mask)

layers = [p for layer in teacher.base_model.layers for p in layer.parameters()]
head = models.lm_head(teacher).weight
sharded = sum(p.to_local().numel() * p.element_size() for p in teacher.parameters() if isinstance(p, DTensor))
whole = sum(p.numel() * p.element_size() for p in teacher.parameters() if not isinstance(p, DTensor))
result = {
    "rank": rank,
    "loads": loads,
    "max_error": float((got - expected).abs().max()),
    "repeat_equal": bool(torch.equal(got, got_again)),
    "layers_resharded": all(isinstance(p, DTensor) for p in layers),
    "root_resharded": all(isinstance(p, DTensor) for p in teacher.base_model.norm.parameters()),
    "base_is_fsdp": isinstance(teacher.base_model, FSDPModule),
    "layers_are_not_roots": all(not layer._get_fsdp_state()._is_root for layer in teacher.base_model.layers),
    "head_whole": not isinstance(head, DTensor) and head.shape == reference.lm_head.weight.shape,
    "head_equal": bool(torch.equal(head, reference.lm_head.weight)),
    "tied": teacher.lm_head.weight is teacher.base_model.embed_tokens.weight,
    "frozen": not any(p.requires_grad for p in teacher.parameters()) and not teacher.training,
    "devices": sorted({str(t.device) for t in list(teacher.parameters()) + list(teacher.buffers())}),
    "bytes": (sharded, whole),
    "full_bytes": sum(p.numel() * p.element_size() for p in reference.parameters()),
}
(out_dir / f"rank{rank}.json").write_text(json.dumps(result))
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_sharded_teacher_equals_the_whole_one_and_stays_sharded(tiny, tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(SHARDED_TEACHER_WORKER)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(worker), tiny["teacher"], str(tmp_path),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(Path(__file__).parents[1]))
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
        assert result["head_whole"] and result["head_equal"] and result["tied"] and result["frozen"]
        assert result["devices"] == ["cpu"]  # nothing left on the meta device
        sharded, whole = result["bytes"]  # only the (tied) head is held whole
        assert sharded < 0.51 * (result["full_bytes"] - whole) and sharded + whole < result["full_bytes"]
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
    common = ("--eval_samples", "0", "--teacher_topk", "16", "--topk_part_tokens", "700")

    def build(nproc: int, cache: Path, run: str) -> str:
        args = run_args(tiny, tmp_path / run, *common, "--topk_cache", str(cache), steps=1)
        return torchrun(nproc, args, tmp_path)

    # The one-process build runs here (a torchrun start costs seconds), on one thread like each of
    # torchrun's processes (OMP_NUM_THREADS=1), so that the teacher's logits round alike.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(run_args(tiny, tmp_path / "run-one", *common, "--topk_cache", str(one), steps=1)) == 0
    finally:
        torch.set_num_threads(threads)
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
