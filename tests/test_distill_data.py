"""Unit tests of the recipe's data path, schedule, objectives and caches (fast, no training runs)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from fusedkd.distill.cache import cache_key
from fusedkd.distill.corpus import HELDOUT_MODULES, TRAIN_MODULES, stdlib_corpus
from fusedkd.distill.data import (
    IGNORE_INDEX,
    BatchPlan,
    TokenizedSamples,
    collate,
    load_texts,
    response_spans,
    tokenize,
)
from fusedkd.distill.errors import UsageError
from fusedkd.distill.objectives import chunked_cross_entropy_sum
from fusedkd.distill.tokenizer import cached_bpe_tokenizer, train_bpe_tokenizer
from fusedkd.distill.trainer import warmup_cosine

TEXTS = [
    f"### Human: what is {a} plus {b}? ### Assistant: {a} plus {b} is {a + b}."
    for a in range(9)
    for b in range(9)
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(TEXTS, vocab_size=300)


def test_corpus_is_fixed_and_heldout_is_disjoint():
    corpus = stdlib_corpus()
    assert not set(TRAIN_MODULES) & set(HELDOUT_MODULES)
    assert [d.name for d in corpus.heldout] == list(HELDOUT_MODULES)
    assert len(corpus.train) >= 0.9 * len(TRAIN_MODULES)
    assert stdlib_corpus().fingerprint == corpus.fingerprint
    assert all(d.text for d in corpus.train + corpus.heldout)


def test_response_spans_and_masks(tokenizer):
    text = "### Human: hi there ### Assistant: hello ### Human: more ### Assistant: done"
    assert [text[a:b] for a, b in response_spans(text)] == [" hello", " done"]
    samples, report = tokenize([text], tokenizer, seq_len=64, loss_only_on_response=True)
    ids, targets = samples[0]
    target_text = tokenizer.decode(ids[targets])
    # the assistant turns and the closing EOS are targets; the human turns and markers are not
    assert target_text.replace(" ", "") == "hellodone<|endoftext|>"
    assert report.kept == 1


def test_eos_is_a_target_and_padding_is_not(tokenizer):
    eos = tokenizer.eos_token_id
    assert tokenizer.pad_token_id == eos  # as for Qwen: masking by pad id would drop the EOS targets
    samples, _ = tokenize(["1 plus 2", "3"], tokenizer, seq_len=32)
    batch = collate(samples, [0, 1], pad_id=eos)
    lengths = batch.attention_mask.sum(1).tolist()
    for row, n in enumerate(lengths):
        assert batch.labels[row, n - 2].item() == eos  # the last real position predicts EOS
        assert (
            batch.labels[row, n - 1 :] == IGNORE_INDEX
        ).all()  # padding (and the last token) predict nothing
        assert batch.labels[row, : n - 1].tolist() == batch.input_ids[row, 1:n].tolist()


def test_tokenize_drops_and_truncates(tokenizer):
    samples, report = tokenize(["", "1 plus 2 is 3", "### Human: no answer"], tokenizer, seq_len=4)
    assert (report.kept, report.too_short, report.truncated) == (2, 1, 2)
    assert all(samples[i][0].numel() == 4 for i in range(len(samples)))
    _, report = tokenize(["### Human: no answer"], tokenizer, seq_len=16, loss_only_on_response=True)
    assert (report.kept, report.no_target) == (0, 1)
    with pytest.raises(UsageError, match="at least 2"):
        tokenize(["x"], tokenizer, seq_len=1)


def test_pack_fills_blocks(tokenizer):
    samples, _ = tokenize(TEXTS[:20], tokenizer, seq_len=16, pack=True)
    lengths = [samples[i][0].numel() for i in range(len(samples))]
    assert all(n == 16 for n in lengths[:-1]) and 2 <= lengths[-1] <= 16
    unpacked, _ = tokenize(TEXTS[:20], tokenizer, seq_len=1000)
    assert samples.num_tokens == unpacked.num_tokens


def test_batch_plan_is_split_invariant():
    one = BatchPlan(num_samples=37, batch_size=8, grad_accum=1, world_size=1, seed=3)
    two = BatchPlan(num_samples=37, batch_size=2, grad_accum=2, world_size=2, seed=3)
    assert one.steps_per_epoch == two.steps_per_epoch == 4
    for step in range(9):  # crosses epochs: a fresh permutation each epoch
        split = [i for rank in range(2) for micro in two.micro_batches(step, rank) for i in micro]
        assert sorted(split) == sorted(one.micro_batches(step, 0)[0])
        assert len(set(split)) == 8
    assert one.micro_batches(0, 0) != one.micro_batches(4, 0)  # epoch 1 is reshuffled


def test_load_texts_formats_and_errors(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in ["x", "y"]) + "\n\n")
    (tmp_path / "b.json").write_text(json.dumps([{"text": "z"}]))
    (tmp_path / "c.txt").write_text("line one\n\nline two\n")
    assert load_texts(str(tmp_path)) == ["x", "y", "z", "line one", "line two"]
    with pytest.raises(UsageError, match="no text field 'body'.*'text'"):
        load_texts(str(tmp_path / "a.jsonl"), text_field="body")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UsageError, match="empty"):
        load_texts(str(tmp_path / "empty.jsonl"))
    with pytest.raises(UsageError, match="does not exist"):
        load_texts(str(tmp_path / "missing.jsonl"))


def test_warmup_cosine_endpoints():
    f = warmup_cosine(total_steps=100, warmup_steps=10, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(99) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 99))


def test_chunked_cross_entropy_matches_full_with_grads():
    torch.manual_seed(0)
    hidden = torch.randn(37, 12, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(29, 12, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 25, (37,))
    labels[::5] = IGNORE_INDEX
    full = F.cross_entropy(hidden @ weight[:25].T, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    expected = torch.autograd.grad(full, (hidden, weight))
    chunked = chunked_cross_entropy_sum(hidden, weight, labels, vocab_size=25, chunk_size=8)
    got = torch.autograd.grad(chunked, (hidden, weight))
    # float32 logits inside (as in training): float32 tolerances
    torch.testing.assert_close(chunked.double(), full, rtol=1e-5, atol=1e-4)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def test_tokenizer_cache_is_reused(tmp_path):
    first, path, built = cached_bpe_tokenizer(TEXTS, 300, "fp", tmp_path)
    second, path2, built2 = cached_bpe_tokenizer(TEXTS, 300, "fp", tmp_path)
    assert built and not built2 and path == path2
    assert first.get_vocab() == second.get_vocab()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no scratch directories left behind
    assert cache_key("a", 1) != cache_key("a", 2)


def test_tokenized_samples_roundtrip():
    samples = TokenizedSamples.from_lists([([1, 2, 3], [False, True, True]), ([4, 5], [False, True])])
    assert len(samples) == 2 and samples.num_tokens == 5 and samples.num_targets == 3
    assert samples[1][0].tolist() == [4, 5]
