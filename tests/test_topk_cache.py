"""`fusedkd.topk_cache`: round trips, memory mapping, and clear errors for bad or truncated files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fusedkd.topk import fused_linear_topk_kd_loss, teacher_topk
from fusedkd.topk_cache import INDEX_NAME, TopKCache, TopKCacheError, TopKCacheWriter

K, VOCAB = 6, 301


def batches(count=5, tokens=(3, 7)):
    """Random top-k batches of various leading shapes, as teacher_topk returns them."""
    out = []
    for _ in range(count):
        hidden = torch.randn(*tokens, 16)
        out.append(teacher_topk(hidden, WEIGHT, K, temperature=2.0))
    return out


WEIGHT = torch.randn(VOCAB, 16)


def write(directory, data, **options):
    options = dict(k=K, temperature=2.0, vocab_size=VOCAB, teacher="toy-teacher") | options
    with TopKCacheWriter(directory, **options) as writer:
        for ids, logprobs in data:
            writer.write(ids, logprobs)
    return writer


@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"]
)
def test_round_trip_across_shards(tmp_path, dtype):
    data = batches()
    write(tmp_path, data, logprob_dtype=dtype, shard_tokens=8, metadata={"dataset": "unit"})
    all_ids = torch.cat([ids.reshape(-1, K) for ids, _ in data]).int()
    all_logprobs = torch.cat([lp.reshape(-1, K) for _, lp in data]).to(dtype)
    cache = TopKCache(tmp_path, verify=True)
    assert len(cache) == all_ids.shape[0] == 105 and len(cache.shards) == 14  # 13 full shards + 1 of 1 token
    assert (cache.k, cache.temperature, cache.vocab_size, cache.teacher) == (K, 2.0, VOCAB, "toy-teacher")
    assert cache.logprob_dtype == dtype and cache.metadata == {"dataset": "unit"}
    for start, stop in [(0, 105), (0, 8), (5, 30), (8, 16), (103, 105), (40, 40)]:
        ids, logprobs = cache[start:stop]
        assert ids.dtype == torch.int32 and logprobs.dtype == dtype
        assert torch.equal(ids, all_ids[start:stop])
        assert torch.equal(
            logprobs.view(torch.int16 if dtype != torch.float32 else torch.int32),
            all_logprobs[start:stop].view(torch.int16 if dtype != torch.float32 else torch.int32),
        )
    assert "tokens=105" in repr(cache)


def test_reads_are_memory_mapped(tmp_path):
    write(tmp_path, batches(count=2), shard_tokens=32)
    cache = TopKCache(tmp_path)
    shard = cache.shards[0]
    assert isinstance(shard._ids, np.memmap) and isinstance(shard._logprobs, np.memmap)
    ids, logprobs = cache[3:20]  # inside the first shard: views of the mapping, no copy
    assert ids.data_ptr() == shard._ids[3:20].ctypes.data
    assert logprobs.data_ptr() == shard._logprobs[3:20].ctypes.data


def test_offline_distillation_end_to_end(tmp_path):
    """teacher_topk -> cache (float16) -> memory-mapped read -> sparse loss, as the README shows."""
    teacher_hidden = torch.randn(4, 9, 16)
    ids, logprobs = teacher_topk(teacher_hidden, WEIGHT, K, temperature=2.0)
    with TopKCacheWriter(
        tmp_path, k=K, temperature=2.0, vocab_size=VOCAB, teacher="toy", shard_tokens=10
    ) as w:
        w.write(ids, logprobs)
    cache = TopKCache(tmp_path)
    cached_ids, cached_logprobs = cache[0:36]
    student_hidden = torch.randn(4, 9, 12, requires_grad=True)
    student_weight = torch.randn(VOCAB, 12, requires_grad=True)
    labels = torch.randint(0, VOCAB, (4, 9))
    options = dict(temperature=cache.temperature, alpha=0.7, tail="bucket")
    loss = fused_linear_topk_kd_loss(
        student_hidden,
        student_weight,
        cached_ids.reshape(4, 9, K),
        cached_logprobs.reshape(4, 9, K),
        labels,
        **options,
    )
    expected = fused_linear_topk_kd_loss(
        student_hidden, student_weight, ids.int(), logprobs.half(), labels, **options
    )
    assert loss.item() == expected.item()
    loss.backward()
    assert torch.isfinite(student_weight.grad).all()


# ----------------------------------------------------------------------------------------------------
# Bad files
# ----------------------------------------------------------------------------------------------------


@pytest.fixture
def cache_dir(tmp_path):
    write(tmp_path, batches(count=3), shard_tokens=20)
    return tmp_path


def shard_path(directory, index=0):
    return directory / f"shard-{index:05d}.fkdtopk"


def test_truncated_shard_is_detected(cache_dir):
    path = shard_path(cache_dir, 1)
    data = path.read_bytes()
    path.write_bytes(data[:-5])
    with pytest.raises(TopKCacheError, match=r"shard-00001.fkdtopk: truncated: \d+ bytes, expected"):
        TopKCache(cache_dir)
    path.write_bytes(data[:10])
    with pytest.raises(TopKCacheError, match="truncated .* shorter than the file prefix"):
        TopKCache(cache_dir)
    path.write_bytes(data[:40])
    with pytest.raises(TopKCacheError, match="truncated .* inside its"):
        TopKCache(cache_dir)


def test_padded_shard_is_detected(cache_dir):
    with open(shard_path(cache_dir), "ab") as f:
        f.write(b"\0" * 12)
    with pytest.raises(TopKCacheError, match="longer than its header says"):
        TopKCache(cache_dir)


def test_foreign_or_corrupt_header_is_detected(cache_dir):
    path = shard_path(cache_dir)
    data = bytearray(path.read_bytes())
    path.write_bytes(b"NOTMAGIC" + bytes(data[8:]))
    with pytest.raises(TopKCacheError, match="not a fusedkd top-k cache shard"):
        TopKCache(cache_dir)
    data[20] = 0xFF  # inside the JSON header
    path.write_bytes(bytes(data))
    with pytest.raises(TopKCacheError, match="corrupt header"):
        TopKCache(cache_dir)
    data[8] = 99  # the format version
    path.write_bytes(bytes(data))
    with pytest.raises(TopKCacheError, match="format version 99"):
        TopKCache(cache_dir)


def test_missing_shard_and_missing_index_are_detected(cache_dir):
    shard_path(cache_dir, 2).unlink()
    with pytest.raises(TopKCacheError, match="shard-00002.fkdtopk: missing shard"):
        TopKCache(cache_dir)
    (cache_dir / INDEX_NAME).unlink()
    with pytest.raises(
        TopKCacheError, match="no index.json: not a top-k cache, or its writer was not closed"
    ):
        TopKCache(cache_dir)


@pytest.mark.parametrize(
    "shards", ["x", [{"num_tokens": 20}], [{"name": 3, "num_tokens": 20}], [{"name": "shard-00000.fkdtopk"}]]
)
def test_corrupt_shard_list_in_the_index_is_detected(cache_dir, shards):
    """A hand-edited or damaged index: TopKCacheError naming it, never a KeyError / TypeError."""
    index_path = cache_dir / INDEX_NAME
    index = json.loads(index_path.read_text())
    index_path.write_text(json.dumps(dict(index, shards=shards)))
    with pytest.raises(TopKCacheError, match="corrupt index: shards must be a list"):
        TopKCache(cache_dir)


def test_interrupted_writer_leaves_no_readable_cache(tmp_path):
    with pytest.raises(RuntimeError, match="interrupted"):
        with TopKCacheWriter(
            tmp_path, k=K, temperature=1.0, vocab_size=VOCAB, teacher="t", shard_tokens=4
        ) as w:
            w.write(*batches(count=1)[0])
            raise RuntimeError("interrupted")
    assert list(tmp_path.glob("shard-*"))  # complete shards were written ...
    with pytest.raises(TopKCacheError, match="writer was not closed"):
        TopKCache(tmp_path)  # ... but without an index the cache is not taken for a whole one


def test_shards_from_another_cache_are_detected(tmp_path, cache_dir):
    other = tmp_path / "other"
    write(other, batches(count=3), shard_tokens=20, temperature=1.0)
    shard_path(cache_dir, 1).write_bytes(shard_path(other, 1).read_bytes())
    with pytest.raises(TopKCacheError, match="temperature=1.0 but the cache's index says 2.0"):
        TopKCache(cache_dir)


def test_index_token_count_is_checked(cache_dir):
    index_path = cache_dir / INDEX_NAME
    index = json.loads(index_path.read_text())
    index["num_tokens"] += 1
    index_path.write_text(json.dumps(index))
    with pytest.raises(TopKCacheError, match="the shards hold 63 tokens, not 64"):
        TopKCache(cache_dir)


def test_verify_detects_corrupt_data(cache_dir):
    path = shard_path(cache_dir)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40  # a logprob bit: sizes and headers still check out
    path.write_bytes(bytes(data))
    cache = TopKCache(cache_dir)  # opening checks headers and sizes only
    with pytest.raises(TopKCacheError, match="logprobs data corrupt"):
        cache.verify()
    with pytest.raises(TopKCacheError, match="logprobs data corrupt"):
        TopKCache(cache_dir, verify=True)


def test_bad_reads(cache_dir):
    cache = TopKCache(cache_dir)
    with pytest.raises(IndexError, match="outside the cache"):
        cache.read(10, 1000)
    with pytest.raises(TypeError, match="cache\\[start:stop\\]"):
        cache[3]


# ----------------------------------------------------------------------------------------------------
# Bad writes
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options,exception,message",
    [
        (dict(k=0), ValueError, "k must be a positive int"),
        (dict(k=400), ValueError, "k=400 is larger than vocab_size=301"),
        (dict(temperature=0.0), ValueError, "temperature must be finite and > 0"),
        (dict(temperature=1e6), ValueError, r"temperature must be in \[0.001, 1000\]"),  # as the losses
        (dict(k=4, vocab_size=2**32), ValueError, "vocab_size must be at most 2\\*\\*31 - 1"),
        (dict(teacher=3), TypeError, "teacher must be a str"),
        (
            dict(logprob_dtype=torch.float64),
            ValueError,
            "logprob_dtype must be one of float16, bfloat16, float32",
        ),
        (dict(shard_tokens=0), ValueError, "shard_tokens must be a positive int"),
        (dict(metadata={"x": object()}), TypeError, "metadata must be JSON-serializable"),
    ],
)
def test_bad_writer_options(tmp_path, options, exception, message):
    arguments = dict(k=K, temperature=2.0, vocab_size=VOCAB, teacher="t") | options
    with pytest.raises(exception, match=message):
        TopKCacheWriter(tmp_path, **arguments)


@pytest.mark.parametrize(
    "ids,logprobs,exception,message",
    [
        (
            torch.zeros(3, K + 1, dtype=torch.long),
            torch.zeros(3, K + 1),
            ValueError,
            r"ids must be \[..., k=6\]",
        ),
        (
            torch.full((3, K), VOCAB),
            -torch.ones(3, K),
            ValueError,
            r"ids must be in \[0, vocab_size=301\); found 301",
        ),
        (
            torch.zeros(3, K, dtype=torch.long),
            torch.full((3, K), 0.1),
            ValueError,
            "logprobs must be log-probabilities",
        ),
        (torch.zeros(3, K), -torch.ones(3, K), TypeError, "ids must be an integer tensor"),
        (
            torch.zeros(3, K, dtype=torch.long),
            -torch.ones(2, K),
            ValueError,
            "logprobs must have the shape of ids",
        ),
    ],
)
def test_bad_writes(tmp_path, ids, logprobs, exception, message):
    writer = TopKCacheWriter(tmp_path, k=K, temperature=2.0, vocab_size=VOCAB, teacher="t")
    with pytest.raises(exception, match=message):
        writer.write(ids, logprobs)


def test_existing_cache_is_not_overwritten_by_accident(cache_dir):
    with pytest.raises(FileExistsError, match="overwrite=True"):
        TopKCacheWriter(cache_dir, k=K, temperature=2.0, vocab_size=VOCAB, teacher="t")
    write(cache_dir, batches(count=1), overwrite=True)
    assert len(TopKCache(cache_dir)) == 21
