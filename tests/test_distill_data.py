"""Unit tests of the recipe's data path and caches (fast, no training runs)."""

from __future__ import annotations

import json

import pytest
import torch

from fusedkd.distill.data import (
    IGNORE_INDEX,
    Collator,
    TokenizedSamples,
    load_records,
    response_spans,
    tokenize,
)
from fusedkd.distill.default import (
    HELDOUT_MODULES,
    TRAIN_MODULES,
    building,
    cache_key,
    stdlib_corpus,
    train_bpe_tokenizer,
)
from fusedkd.distill.errors import UsageError

TEXTS = [
    f"### Human: what is {a} plus {b}? ### Assistant: {a} plus {b} is {a + b}."
    for a in range(9)
    for b in range(9)
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(TEXTS, vocab_size=300)


def pair(samples: TokenizedSamples, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    return samples[i]["input_ids"], samples[i]["targets"]


def texts_of(records: list) -> list:
    """Records as plain values: a text, or ``{"messages", "train_from"}`` (without where they were read)."""
    return [r["text"] if "text" in r else {k: v for k, v in r.items() if k != "where"} for r in records]


def test_corpus_is_fixed_and_heldout_is_disjoint():
    corpus = stdlib_corpus()
    assert not set(TRAIN_MODULES) & set(HELDOUT_MODULES)
    assert [name for name, _ in corpus.heldout] == list(HELDOUT_MODULES)
    assert len(corpus.train) >= 0.9 * len(TRAIN_MODULES)
    assert stdlib_corpus().fingerprint == corpus.fingerprint
    assert all(text for _, text in corpus.train + corpus.heldout)


def test_response_spans_and_masks(tokenizer):
    text = "### Human: hi there ### Assistant: hello ### Human: more ### Assistant: done"
    assert [text[a:b] for a, b in response_spans(text)] == [" hello", " done"]
    samples, report = tokenize([text], tokenizer, seq_len=64, loss_only_on_response=True)
    ids, targets = pair(samples, 0)
    target_text = tokenizer.decode(ids[targets])
    # the assistant turns and the closing EOS are targets; the human turns and markers are not
    assert target_text.replace(" ", "") == "hellodone<|endoftext|>"
    assert report.kept == 1


def test_eos_is_a_target_and_padding_is_not(tokenizer):
    eos = tokenizer.eos_token_id
    assert tokenizer.pad_token_id == eos  # as for Qwen: masking by pad id would drop the EOS targets
    samples, _ = tokenize(["1 plus 2", "3"], tokenizer, seq_len=32)
    batch = Collator(pad_id=eos)([samples[0], samples[1]])
    assert batch["index"].tolist() == [0, 1]
    lengths = batch["attention_mask"].sum(1).tolist()
    labels = batch["labels"][:, 1:]  # shifted as the loss shifts them: position i predicts token i + 1
    for row, n in enumerate(lengths):
        assert labels[row, n - 2].item() == eos  # the last real position predicts EOS
        assert (labels[row, n - 1 :] == IGNORE_INDEX).all()  # padding (and the last token) predict nothing
        assert labels[row, : n - 1].tolist() == batch["input_ids"][row, 1:n].tolist()


def test_tokenize_drops_and_truncates(tokenizer):
    samples, report = tokenize(["", "1 plus 2 is 3", "### Human: no answer"], tokenizer, seq_len=4)
    assert (report.kept, report.too_short, report.truncated) == (2, 1, 2)
    assert all(pair(samples, i)[0].numel() == 4 for i in range(len(samples)))
    _, report = tokenize(["### Human: no answer"], tokenizer, seq_len=16, loss_only_on_response=True)
    assert (report.kept, report.no_target) == (0, 1)
    with pytest.raises(UsageError, match="at least 2"):
        tokenize(["x"], tokenizer, seq_len=1)


def test_pack_fills_blocks(tokenizer):
    samples, _ = tokenize(TEXTS[:20], tokenizer, seq_len=16, pack=True)
    lengths = [pair(samples, i)[0].numel() for i in range(len(samples))]
    assert all(n == 16 for n in lengths[:-1]) and 2 <= lengths[-1] <= 16
    unpacked, _ = tokenize(TEXTS[:20], tokenizer, seq_len=1000)
    assert samples.tokens.numel() == unpacked.tokens.numel()


def test_load_records_formats_and_errors(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in ["x", "y"]) + "\n\n")
    (tmp_path / "b.json").write_text(json.dumps([{"text": "z"}]))
    (tmp_path / "c.txt").write_text("line one\n\nline two\n")
    records = load_records(str(tmp_path))
    assert texts_of(records) == ["x", "y", "z", "line one", "line two"]
    assert [r["where"] for r in records][:3] == [f"{tmp_path / 'a.jsonl'}:1", f"{tmp_path / 'a.jsonl'}:2",
                                                 f"{tmp_path / 'b.json'}[0]"]  # fmt: skip
    with pytest.raises(UsageError, match="no text field 'body'.*'text'"):
        load_records(str(tmp_path / "a.jsonl"), text_field="body")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UsageError, match="empty"):
        load_records(str(tmp_path / "empty.jsonl"))
    with pytest.raises(UsageError, match="does not exist"):
        load_records(str(tmp_path / "missing.jsonl"))


def test_cache_entries_are_written_whole(tmp_path):
    entry = tmp_path / "entry"
    with pytest.raises(RuntimeError), building(entry) as scratch:
        (scratch / "half").write_text("x")
        raise RuntimeError("interrupted")
    assert not entry.exists() and list(tmp_path.iterdir()) == []  # nothing half-written is left
    with building(entry) as scratch:
        (scratch / "whole").write_text("x")
    assert [p.name for p in tmp_path.iterdir()] == ["entry"] and (entry / "whole").is_file()
    assert cache_key("a", 1) != cache_key("a", 2) and cache_key("a", 1) == cache_key("a", 1)


def test_tokenized_samples_roundtrip():
    samples = TokenizedSamples.from_lists([([1, 2, 3], [False, True, True]), ([4, 5], [False, True])])
    assert len(samples) == 2 and samples.tokens.numel() == 5 and samples.num_targets == 3
    assert pair(samples, 1)[0].tolist() == [4, 5] and samples[1]["index"] == 1


# A Qwen3-style chat template (im_start / im_end turns, an empty think block in the last assistant turn),
# once plain and once with {% generation %} marks around what the assistant generates.
QWEN3_STYLE_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if loop.last %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{{- message.content + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
GENERATION_TEMPLATE = QWEN3_STYLE_TEMPLATE.replace(
    "{{- '<|im_start|>assistant\\n' }}{%- if loop.last %}",
    "{{- '<|im_start|>assistant\\n' }}{% generation %}{%- if loop.last %}",
).replace(
    "{{- message.content + '<|im_end|>\\n' }}{%- else %}",
    "{{- message.content + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}{%- else %}",
)

CHAT = [
    {"role": "system", "content": "You add numbers."},
    {"role": "user", "content": "what is 2 plus 3?"},
    {"role": "assistant", "content": "2 plus 3 is 5."},
    {"role": "user", "content": "and 4 plus 4?"},
    {"role": "assistant", "content": "4 plus 4 is 8."},
]


def chat_tokenizer(template: str):
    tokenizer = train_bpe_tokenizer(TEXTS + [m["content"] for m in CHAT], vocab_size=320)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = template
    return tokenizer


@pytest.mark.parametrize(
    "template", [QWEN3_STYLE_TEMPLATE, GENERATION_TEMPLATE], ids=["prefix-diff", "generation"]
)
def test_chat_records_train_exactly_on_the_assistant_turns(template, tmp_path):
    assert "{% generation %}" in GENERATION_TEMPLATE and "{% endgeneration %}" in GENERATION_TEMPLATE
    tokenizer = chat_tokenizer(template)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    data = tmp_path / "chat.jsonl"
    rows = [
        {"messages": CHAT},
        {"prompt": "what is 1 plus 1?", "completion": "1 plus 1 is 2."},
        {"prompt": CHAT[:3] + [CHAT[3]], "completion": [CHAT[4]]},  # a few-shot prompt: its turn is context
    ]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    records = load_records(str(data))
    assert all("messages" in r for r in records)
    samples, report = tokenize(records, tokenizer, seq_len=512)
    assert report.kept == 3 and report.truncated == 0
    think = "<think>\n\n</think>\n\n"
    expected = [
        ["2 plus 3 is 5.<|im_end|>", think + "4 plus 4 is 8.<|im_end|>"],
        [think + "1 plus 1 is 2.<|im_end|>"],
        [think + "4 plus 4 is 8.<|im_end|>"],
    ]
    for n, turns in enumerate(expected):
        ids, targets = pair(samples, n)
        rendered = tokenizer.apply_chat_template(records[n]["messages"], tokenize=False)
        assert tokenizer.decode(ids) == rendered  # the template's rendering, nothing added
        # the targets, run by run, are exactly the assistant turns with their end-of-turn token
        runs, current = [], []
        for token, target in zip(ids.tolist(), targets.tolist()):
            if target:
                current.append(token)
            elif current:
                runs.append(current)
                current = []
        if current:
            runs.append(current)
        assert [tokenizer.decode(run) for run in runs] == turns
        assert all(run[-1] == im_end for run in runs)
        assert ids[-1] == tokenizer.convert_tokens_to_ids("\n") or tokenizer.decode(ids[-1:]) == "\n"
        assert not targets[-1]  # the newline after <|im_end|> is not a target


def test_chat_records_need_a_chat_template_and_valid_messages(tmp_path):
    tokenizer = train_bpe_tokenizer(TEXTS, vocab_size=300)
    record = {"messages": CHAT, "train_from": 0}
    with pytest.raises(UsageError, match="no chat template"):
        tokenize([record], tokenizer, seq_len=64)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user"}]}) + "\n")
    with pytest.raises(UsageError, match="'role' and 'content'"):
        load_records(str(bad))
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(
        json.dumps({"text": "plain"}) + "\n" + json.dumps({"prompt": "p", "completion": "c"}) + "\n"
    )
    assert texts_of(load_records(str(mixed))) == [
        "plain",
        {
            "messages": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}],
            "train_from": 1,
        },
    ]


def test_cache_mismatch_names_every_changed_input():
    from fusedkd.distill.offline import IDENTITY_KEYS, cache_identity, identity_difference

    base = dict(
        tokenizer="t1",
        data="d1",
        seq_len=1024,
        pack=False,
        k=64,
        temperature=1.0,
        vocab_size=151936,
        tokens="x1",
    )
    built = cache_identity("Qwen/Qwen3-4B", **base)
    assert {key for key, _, _ in IDENTITY_KEYS} == set(built)
    assert identity_difference(built, dict(built)) == "different settings"
    cases = {
        "teacher": ("Qwen/Qwen3-8B", "teacher 'Qwen/Qwen3-4B' (this run: 'Qwen/Qwen3-8B')"),
        "tokenizer": ("t2", "different tokenizer"),
        "data": ("d2", "different training data"),
        "seq_len": (512, "--seq_len 1024 (this run: 512)"),
        "pack": (True, "--pack False (this run: True)"),
        "k": (32, "--teacher_topk 64 (this run: 32)"),
        "temperature": (2.0, "--temperature 1.0 (this run: 2.0)"),
        "vocab": (151669, "vocabulary rows 151936 (this run: 151669)"),
    }
    for key, (value, expected) in cases.items():
        # a change of input changes the token sequences too: that consequence is not listed
        wanted = dict(built, **{key: value, "tokens": "x2"})
        assert identity_difference(built, wanted) == expected
    assert identity_difference(built, dict(built, tokens="x2")) == "different token sequences"
    assert identity_difference(built, dict(built, k=32, seq_len=512)) == (
        "--seq_len 1024 (this run: 512), --teacher_topk 64 (this run: 32)"
    )
    assert identity_difference(None, built) == "it was not written by fusedkd.distill"
