"""Awkward inputs of the recipe: chat records a template cannot mask, prompts longer than --seq_len,
incomplete prompt/completion records, mismatched tokenizers, a retrained teacher (fast, no training)."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_distill_data import CHAT, QWEN3_STYLE_TEMPLATE, TEXTS, chat_tokenizer, pair

from fusedkd.distill.cli import tokenized
from fusedkd.distill.data import load_records, tokenize
from fusedkd.distill.default import train_bpe_tokenizer
from fusedkd.distill.errors import UsageError

# The one process of a run, as `cli.tokenized` sees it.
TRAINING = SimpleNamespace(process_index=0, main_process_first=lambda **kwargs: nullcontext())
THINK = "<think>\n\n</think>\n\n"

# As Qwen3's own template: an assistant message's <think>...</think> reasoning is not rendered as written.
THINK_STRIPPING_TEMPLATE = QWEN3_STYLE_TEMPLATE.replace(
    "{{- message.content + '<|im_end|>\\n' }}",
    "{{- message.content.split('</think>')[-1].lstrip('\\n') + '<|im_end|>\\n' }}",
)
# As Llama 3's: every message's content is trimmed of surrounding whitespace.
TRIMMING_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content | trim + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# A template that refuses conversations opening with an assistant message (as Llama 2's and Mistral's).
USER_FIRST_TEMPLATE = (
    "{%- if messages[0].role == 'assistant' %}"
    "{{- raise_exception('Conversations must start with a user message') }}{%- endif %}"
) + QWEN3_STYLE_TEMPLATE


def options(seq_len: int = 512, **extra) -> SimpleNamespace:
    options = {"seq_len": seq_len, "loss_only_on_response": False, "pack": False, "num_proc": 1}
    return SimpleNamespace(**options | {"chat_template": "auto", "cache_dir": None} | extra)


def tokenize_or_fail(records: list, tokenizer, distill: SimpleNamespace, what: str):
    return tokenized(records, tokenizer, distill, TRAINING, what)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSEDKD_CACHE_DIR", str(tmp_path / "cache"))


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def target_runs(tokenizer, ids: torch.Tensor, targets: torch.Tensor) -> list[str]:
    """The decoded runs of consecutive target tokens."""
    runs, current = [], []
    for token, target in zip(ids.tolist(), targets.tolist()):
        if target:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


# --------------------------------------------------------------------------------------------------------
# Chat records the template cannot mask: dropped, counted and named, never the run


def test_a_record_the_template_cannot_mask_is_dropped_and_named(tmp_path, capsys):
    tokenizer = chat_tokenizer(THINK_STRIPPING_TEMPLATE)
    reasoning = {"prompt": "what is 2 plus 2?", "completion": "<think>2 and 2</think>4."}
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}, reasoning, {"messages": CHAT}])
    samples, report = tokenize(load_records(data), tokenizer, seq_len=512)
    assert report.kept == 2 and len(samples) == 2
    [(where, why)] = report.unmaskable
    assert where == f"{data}:2" and "dropped or rewrote assistant message 1's content" in why
    # the run goes on, and says which record it dropped and why
    tokenize_or_fail(load_records(data), tokenizer, options(), "training")
    out = capsys.readouterr().out
    assert "training: 2 sequences" in out and "dropped: 1 chat records the template cannot mask" in out
    warning = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and f"{data}:2 (" in warning[0] and "assistant message 1" in warning[0]


def test_a_run_whose_every_record_is_dropped_fails_in_one_line(tmp_path):
    tokenizer = chat_tokenizer(THINK_STRIPPING_TEMPLATE)
    rows = [{"prompt": f"{a} plus 1?", "completion": f"<think>count</think>{a + 1}."} for a in range(7)]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.raises(UsageError) as raised:
        tokenize_or_fail(load_records(data), tokenizer, options(), "training")
    message = str(raised.value)
    assert "\n" not in message and message.startswith("every training sample is a chat record")
    assert f"{data}:1 (" in message and f"{data}:5 (" in message and "and 2 more" in message
    assert f"{data}:6" not in message


def test_a_conversation_opening_with_the_assistant_is_masked(tmp_path):
    tokenizer = chat_tokenizer(QWEN3_STYLE_TEMPLATE)
    opening = {"role": "assistant", "content": "Hello, I add numbers."}
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [opening, *CHAT[1:3]]}])
    samples, report = tokenize(load_records(data), tokenizer, seq_len=512)
    assert report.kept == 1 and not report.unmaskable
    ids, targets = pair(samples, 0)
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template([opening, *CHAT[1:3]], tokenize=False)
    assert target_runs(tokenizer, ids, targets) == [
        "Hello, I add numbers.<|im_end|>",
        THINK + "2 plus 3 is 5.<|im_end|>",
    ]


def test_a_conversation_the_template_refuses_is_dropped_and_named(tmp_path):
    tokenizer = chat_tokenizer(USER_FIRST_TEMPLATE)
    opening = {"role": "assistant", "content": "Hello."}
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [opening, *CHAT[1:3]]}, {"messages": CHAT}])
    samples, report = tokenize(load_records(data), tokenizer, seq_len=512)
    assert report.kept == 1
    [(where, why)] = report.unmaskable
    assert where == f"{data}:1" and "cannot render it: Conversations must start with a user message" in why


def test_a_template_that_trims_the_content_is_masked(tmp_path):
    tokenizer = chat_tokenizer(TRIMMING_TEMPLATE)
    messages = [{"role": "user", "content": " what is 4 plus 4?\n"}, {"role": "assistant", "content": "8.\n"}]
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    samples, report = tokenize(load_records(data), tokenizer, seq_len=512)
    assert report.kept == 1 and not report.unmaskable
    ids, targets = pair(samples, 0)
    assert target_runs(tokenizer, ids, targets) == ["8.<|im_end|>"]


# --------------------------------------------------------------------------------------------------------
# Prompts longer than --seq_len, incomplete prompt/completion records


def test_targets_lost_to_truncation_name_seq_len(tmp_path):
    tokenizer = train_bpe_tokenizer(TEXTS, vocab_size=300)
    long_prompt = "### Human: " + "what is 1 plus 2? " * 20 + "### Assistant: 3."
    args = options(seq_len=16, loss_only_on_response=True)
    with pytest.raises(UsageError) as raised:
        tokenize_or_fail([long_prompt] * 3, tokenizer, args, "training")
    message = str(raised.value)
    assert "truncation" in message and "--seq_len 16" in message and "Assistant:' marker" not in message
    # the same for a chat record whose prompt fills --seq-len
    chat = chat_tokenizer(QWEN3_STYLE_TEMPLATE)
    record = {"prompt": "what is 2 plus 3? " * 20, "completion": "5."}
    with pytest.raises(UsageError, match="truncation.*--seq_len 16"):
        tokenize_or_fail(load_chat(record, tmp_path), chat, options(seq_len=16), "training")
    # mixed causes are each counted
    with pytest.raises(UsageError) as raised:
        tokenize_or_fail([long_prompt, "### Human: no answer"], tokenizer, args, "training")
    assert str(raised.value) == (
        "no training sample is left: 1 lost all their target tokens to truncation at --seq_len 16; "
        "1 have no target token (no assistant turn, or no '### Assistant:' "
        "marker?): nothing to train on"
    )


def load_chat(record: dict, tmp_path: Path) -> list:
    return load_records(write_jsonl(tmp_path / "one.jsonl", [record]))


def test_a_prompt_without_completion_names_the_missing_field(tmp_path):
    data = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "what is 2 plus 3?"}])
    with pytest.raises(UsageError, match=r"pc.jsonl:1: a prompt/completion record needs a 'completion'"):
        load_records(data)
    data = write_jsonl(tmp_path / "c.jsonl", [{"completion": "5."}])
    with pytest.raises(UsageError, match=r"needs a 'prompt' field too"):
        load_records(data)


# --------------------------------------------------------------------------------------------------------
# Tokenizers are compared before any model's weights load


def test_tokenizer_mismatch_is_refused_before_any_weights_load(tmp_path, monkeypatch, capsys):
    from fusedkd.distill import models
    from fusedkd.distill.cli import main

    def no_weights(*args, **kwargs):
        raise AssertionError("model weights were loaded before the tokenizers were compared")

    monkeypatch.setattr(models, "load_model", no_weights)
    monkeypatch.setattr(models, "load_teacher", no_weights)
    # directories that hold a tokenizer and nothing else: no weights to load, nor a config
    train_bpe_tokenizer(TEXTS, vocab_size=300).save_pretrained(tmp_path / "teacher")
    train_bpe_tokenizer([t.upper() for t in TEXTS], vocab_size=280).save_pretrained(tmp_path / "student")
    data = write_jsonl(tmp_path / "data.jsonl", [{"text": t} for t in TEXTS])
    for offline in ((), ("--teacher_topk", "8", "--topk_cache", str(tmp_path / "topk"))):
        args = [
            "--teacher", str(tmp_path / "teacher"), "--student", str(tmp_path / "student"), "--dataset", data,
            "--eval_samples", "0", "--disable_tqdm", "true", "--output_dir", str(tmp_path / "out"), *offline,
        ]  # fmt: skip
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "the teacher's and the student's tokenizers differ" in err[0], err


# --------------------------------------------------------------------------------------------------------
# The top-k cache knows its teacher by its weights and config, not by its path


def test_model_fingerprint_follows_the_files_not_the_path(tmp_path, monkeypatch):
    from fusedkd.distill.models import model_fingerprint

    teacher = tmp_path / "t"
    teacher.mkdir()
    (teacher / "config.json").write_text('{"hidden_size": 8}')
    (teacher / "model.safetensors").write_bytes(b"\x01" * (9 << 20))  # more than one 8 MiB block
    (teacher / "tokenizer.json").write_text("{}")
    (tmp_path / "link").symlink_to(teacher)
    monkeypatch.chdir(tmp_path)
    spellings = ["t", "./t", "t/", str(teacher), str(tmp_path / "link"), "../" + tmp_path.name + "/t"]
    fingerprints = {model_fingerprint(spelling, role="teacher") for spelling in spellings}
    assert len(fingerprints) == 1
    (teacher / "tokenizer.json").write_text('{"other": 1}')  # the cache fingerprints the tokenizer apart
    assert model_fingerprint("t", role="teacher") in fingerprints
    changed = set()
    for name, content in [("model.safetensors", b"\x01" * (9 << 20) + b"\x02"), ("config.json", "{}")]:
        original = (teacher / name).read_bytes()
        (teacher / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        changed.add(model_fingerprint("t", role="teacher"))
        (teacher / name).write_bytes(original)
    assert len(changed) == 2 and not changed & fingerprints
    # a byte flipped deep inside the weights, size unchanged
    weights = bytearray((teacher / "model.safetensors").read_bytes())
    weights[(8 << 20) + 5] ^= 1
    (teacher / "model.safetensors").write_bytes(bytes(weights))
    assert model_fingerprint("t", role="teacher") not in fingerprints | changed


def test_topk_cache_is_reused_for_the_same_teacher_at_another_path_and_refused_for_a_retrained_one(
    tmp_path, monkeypatch, capsys
):
    from test_distill import STUDENT_SHAPE, TEACHER_SHAPE, save_model
    from test_distill import TEXTS as RUN_TEXTS

    from fusedkd.distill import models
    from fusedkd.distill.cli import main

    tokenizer = train_bpe_tokenizer(RUN_TEXTS, vocab_size=300)
    save_model(tmp_path / "teacher", TEACHER_SHAPE, tokenizer, seed=0)
    save_model(tmp_path / "student", STUDENT_SHAPE, tokenizer, seed=1)
    data = write_jsonl(tmp_path / "data.jsonl", [{"text": t} for t in RUN_TEXTS[:24]])
    monkeypatch.chdir(tmp_path)

    def run(teacher: str, out: str) -> int:
        return main([
            "--teacher", teacher, "--student", "student", "--dataset", data, "--seq_len", "40",
            "--per_device_train_batch_size", "4", "--max_steps", "1", "--eval_samples", "0",
            "--save_strategy", "no", "--disable_tqdm", "true", "--teacher_topk", "8", "--topk_cache", "topk",
            "--output_dir", out,
        ])  # fmt: skip

    assert run(str(tmp_path / "teacher"), "built") == 0
    assert "building the teacher's top-8 cache" in capsys.readouterr().out
    manifest = (tmp_path / "topk" / "manifest.json").read_bytes()
    load_model = models.load_model

    def student_only(name, *, role, dtype=None):
        assert role == "student", "the teacher was loaded although its top-k is cached"
        return load_model(name, role=role, dtype=dtype)

    with monkeypatch.context() as patched:
        patched.setattr(models, "load_model", student_only)
        for number, spelling in enumerate(["./teacher", "teacher/", "../" + tmp_path.name + "/teacher"]):
            assert run(spelling, f"again-{number}") == 0
            assert "using the teacher's top-8 cache" in capsys.readouterr().out
    # the teacher retrained and saved over the same path: its cached top-k is stale, and refused
    save_model(tmp_path / "teacher", TEACHER_SHAPE, tokenizer, seed=7)
    assert run("teacher", "retrained") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds the top-k of another run (teacher 'weights+config sha256:" in err[0], err
    assert (tmp_path / "topk" / "manifest.json").read_bytes() == manifest


# --------------------------------------------------------------------------------------------------------
# What the docs say about bf16 matches the torch backend


def test_docs_say_the_torch_backend_weight_gradient_is_float32():
    import inspect

    from fusedkd.torch_backend import fused_linear_kd, gemm

    # the torch backend: float32 logit tiles and weight gradient, G^T h on hidden states cast up to float32
    source = inspect.getsource(fused_linear_kd.stream)
    assert "grad_weight = allocate(student_weight.shape, dtype=dtype" in source
    assert "gradient_products(grad, hidden, student_weight, grads, rows, dtype=dtype" in source
    assert "torch.mm(grad.T, hidden.to(dtype), out=grad_weight)" in inspect.getsource(gemm.gradient_products)
    docs = (Path(__file__).parents[1] / "docs" / "distill.md").read_text()
    bf16 = docs.split("- **bf16**:")[1].split("\n- **")[0]
    assert "its gradient run in bf16" not in bf16
    assert "the weight gradient `G.T @ h` is a float32 GEMM" in " ".join(bf16.split())
