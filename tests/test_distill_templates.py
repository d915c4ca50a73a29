"""Chat masks the way TRL makes them: TRL's training templates, reused (``{% generation %}`` markers)
for Qwen3, Llama 3 and Gemma, chosen when the tokenizer's own template is recognised, and the tokenization
cache of ``datasets.map`` (fast, no training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_distill_data import TEXTS, pair

from fusedkd.distill import data
from fusedkd.distill.data import load_records, tokenize, training_template, training_template_path
from fusedkd.distill.default import train_bpe_tokenizer
from fusedkd.distill.errors import UsageError

trl = pytest.importorskip("trl")
ORIGINALS = Path(trl.__file__).parent / "chat_templates"  # the models' own templates, as TRL keeps them


def family_tokenizer(template: str, special: list[str], **tokens):
    """A small BPE tokenizer with a model family's special tokens and its own chat template."""
    tokenizer = train_bpe_tokenizer(TEXTS + ["reasoning about numbers", "Hello, I add."], vocab_size=320)
    tokenizer.add_special_tokens({"additional_special_tokens": special, **tokens})
    tokenizer.chat_template = (ORIGINALS / template).read_text(encoding="utf-8")
    return tokenizer


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def target_runs(tokenizer, ids, targets) -> list[str]:
    """The decoded runs of consecutive target tokens."""
    runs, current = [], []
    for token, target in zip(ids.tolist(), targets.tolist()):
        if target:
            current.append(token)
        elif current:
            runs, current = runs + [current], []
    return [tokenizer.decode(run) for run in runs + ([current] if current else [])]


REASONING = [
    {"role": "user", "content": "what is 2 plus 3?"},
    {"role": "assistant", "content": "<think>\nreasoning about numbers\n</think>\n\n2 plus 3 is 5."},
    {"role": "user", "content": "and 4 plus 4?"},
    {"role": "assistant", "content": "4 plus 4 is 8."},
]


def test_qwen3_reasoning_in_an_earlier_turn_is_masked_with_trls_training_template(tmp_path):
    tokenizer = family_tokenizer("qwen3.jinja", ["<|im_start|>", "<|im_end|>", "<think>", "</think>"])
    template, source = training_template(tokenizer)
    assert template == training_template_path("qwen3").read_text() and "TRL's qwen3" in source
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": REASONING}])
    samples, report = tokenize(load_records(path), tokenizer, seq_len=512)
    assert report.kept == 1 and not report.unmaskable
    runs = target_runs(tokenizer, *pair(samples, 0))
    # both assistant turns, each with its reasoning block and its end of turn (TRL's template marks the
    # newline after it too); no user text
    assert runs == [
        "<think>\nreasoning about numbers\n</think>\n\n2 plus 3 is 5.<|im_end|>\n",
        "<think>\n\n</think>\n\n4 plus 4 is 8.<|im_end|>\n",
    ]
    # a conversation that opens with the assistant: its first turn is a target too
    opening = [{"role": "assistant", "content": "Hello, I add."}, *REASONING[2:]]
    samples, report = tokenize(load_records(write_jsonl(tmp_path / "o.jsonl", [{"messages": opening}])),
                               tokenizer, seq_len=512)  # fmt: skip
    answers = [run.split("</think>\n\n")[-1] for run in target_runs(tokenizer, *pair(samples, 0))]
    assert report.kept == 1 and answers == ["Hello, I add.<|im_end|>\n", "4 plus 4 is 8.<|im_end|>\n"]
    # Qwen3's own template drops the earlier turn's reasoning: masked by prefix-diff, the record is
    # dropped and named (the run goes on), never trained on wrongly
    samples, report = tokenize(load_records(path), tokenizer, seq_len=512, chat_template="tokenizer")
    [(where, why)] = report.unmaskable
    assert where == f"{path}:1" and "dropped or rewrote assistant message 1" in why and report.kept == 0


def test_llama3_trims_the_content_and_trls_training_template_masks_it(tmp_path):
    special = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tokenizer = family_tokenizer("llama3.jinja", special, bos_token="<|begin_of_text|>")
    assert "TRL's llama3" in training_template(tokenizer)[1]
    messages = [{"role": "user", "content": " what is 4 plus 4?\n"}, {"role": "assistant", "content": "8.\n"}]
    samples, report = tokenize(load_records(write_jsonl(tmp_path / "c.jsonl", [{"messages": messages}])),
                               tokenizer, seq_len=512)  # fmt: skip
    assert report.kept == 1
    assert target_runs(tokenizer, *pair(samples, 0)) == ["8.<|eot_id|>"]


def test_gemma_masks_its_model_turns_and_a_conversation_it_refuses_is_dropped_and_named(tmp_path):
    tokenizer = family_tokenizer("gemma.jinja", ["<start_of_turn>", "<end_of_turn>"], bos_token="<bos>")
    assert "TRL's gemma" in training_template(tokenizer)[1]
    opening = [{"role": "assistant", "content": "Hello, I add."}, *REASONING[2:]]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": REASONING[2:]}, {"messages": opening}])
    samples, report = tokenize(load_records(path), tokenizer, seq_len=512)
    assert report.kept == 1 and target_runs(tokenizer, *pair(samples, 0)) == ["4 plus 4 is 8.<end_of_turn>\n"]
    [(where, why)] = report.unmaskable  # Gemma's template requires user/model turns to alternate
    assert where == f"{path}:2" and "Conversation roles must alternate" in why


def test_template_choice_by_name_file_or_the_tokenizers_own(tmp_path):
    tokenizer = family_tokenizer("qwen3.jinja", ["<|im_start|>", "<|im_end|>"])
    assert training_template(tokenizer, "llama3")[0] == training_template_path("llama3").read_text()
    custom = tmp_path / "mine.jinja"
    custom.write_text("{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}")
    assert training_template(tokenizer, str(custom)) == (custom.read_text(), str(custom))
    assert training_template(tokenizer, "tokenizer")[0] == tokenizer.chat_template
    tokenizer.chat_template = custom.read_text()  # a template with markers of its own is used as it is
    assert training_template(tokenizer) == (custom.read_text(), "the tokenizer's")
    with pytest.raises(
        UsageError, match="--chat_template: auto, tokenizer, qwen3, llama3, gemma or a .jinja"
    ):
        training_template(tokenizer, "mistral")
    with pytest.raises(UsageError, match="cannot read it"):
        training_template(tokenizer, str(tmp_path / "missing.jinja"))


def test_without_trl_the_tokenizers_template_is_masked_by_prefix_diff(monkeypatch):
    """TRL's training templates are reused from its package: without TRL, `auto` falls back to the
    tokenizer's own template (prefix-diff), and naming a family says what is missing."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "trl" else find_spec(name, *a)
    )
    tokenizer = family_tokenizer("qwen3.jinja", ["<|im_start|>", "<|im_end|>", "<think>", "</think>"])
    assert training_template_path("qwen3") is None
    assert training_template(tokenizer) == (tokenizer.chat_template, training_template(tokenizer)[1])
    assert "prefix-diff" in training_template(tokenizer)[1]
    with pytest.raises(UsageError, match="needs TRL"):
        training_template(tokenizer, "qwen3")


def test_tokenization_runs_in_processes_and_is_cached(tmp_path, monkeypatch):
    tokenizer = family_tokenizer("qwen3.jinja", ["<|im_start|>", "<|im_end|>", "<think>", "</think>"])
    rows = [{"messages": REASONING}] * 6 + [{"text": t} for t in TEXTS[:30]]
    records = load_records(write_jsonl(tmp_path / "d.jsonl", rows))
    serial, serial_report = tokenize(records, tokenizer, seq_len=64)
    cache = tmp_path / "cache"
    parallel, report = tokenize(records, tokenizer, seq_len=64, num_proc=2, cache_dir=cache)
    assert parallel.fingerprint() == serial.fingerprint() and report == serial_report
    assert len(list(cache.glob("tokenized-*.arrow"))) == 2  # one file per process

    def not_again(*args, **kwargs):
        raise AssertionError("tokenized again although the result is cached")

    monkeypatch.setattr(data, "_tokenize_one", not_again)
    again, _ = tokenize(records, tokenizer, seq_len=64, num_proc=2, cache_dir=cache)
    assert again.fingerprint() == serial.fingerprint()
    with pytest.raises(AssertionError, match="tokenized again"):  # other records: another cache entry
        tokenize(records[:-1], tokenizer, seq_len=64, num_proc=1, cache_dir=cache)
