"""Offline teacher: its top-k precomputed once into a cache (``--teacher_topk K --topk_cache DIR``), then
training without it (`trainer.TopKTrainer`; position ``j`` of sample ``i`` is row ``offsets[i] + j``).

The samples are cut into parts of about a million tokens (`sample_parts`); process ``r`` of ``n`` builds
parts ``r, r + n, ...`` (`fusedkd.topk.teacher_topk` into ``DIR/part-NNNNN``), then rank 0 writes
``DIR/manifest.json``. A build that dies keeps its finished parts. A cache is reused only if built from
the same inputs (`cache_identity`: the teacher's weights, not its path; tokenizer, data, K, ...); else
the run stops, naming what changed, rather than overwrite it."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from fusedkd.distill.data import Collator, TokenizedSamples
from fusedkd.distill.errors import UsageError
from fusedkd.distill.models import hidden_states, lm_head

# Padding positions need valid top-k entries too: distinct ids, log-probabilities of negligible mass.
FILLER_LOGPROB = -30.0
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "fusedkd.distill.topk_cache"
PART_TOKENS = 1 << 20  # tokens per part: the unit of work of one process, and of a resumed build
# What a cache is built from: (key, its name in messages, whether messages show its values).
IDENTITY_KEYS = (
    ("teacher", "teacher", True), ("tokenizer", "tokenizer", False), ("data", "training data", False),
    ("seq_len", "--seq_len", True), ("pack", "--pack", True), ("k", "--teacher_topk", True),
    ("temperature", "--temperature", True), ("vocab", "vocabulary rows", True),
    ("tokens", "token sequences", False),
)  # fmt: skip


def cache_identity(teacher: str, *, vocab_size: int, **inputs) -> dict:
    """What a cache must have been built from to be reused: `teacher` (`models.model_fingerprint`),
    fingerprints of the ``tokenizer``, the training ``data`` and the token sequences (``tokens``: whatever
    else changes them is caught too), ``seq_len``, ``pack``, ``k``, ``temperature``, `vocab_size`."""
    return {"teacher": teacher, **inputs, "vocab": vocab_size}


def identity_difference(found: object, wanted: dict) -> str:
    """Which inputs of a cache differ from this run's, in words (for the mismatch error)."""
    if not isinstance(found, dict):
        return "it was not written by fusedkd.distill"
    parts = [
        f"{name} {found.get(key)!r} (this run: {wanted.get(key)!r})" if shows else f"different {name}"
        for key, name, shows in IDENTITY_KEYS
        if found.get(key) != wanted.get(key)
    ]
    if len(parts) > 1 and parts[-1] == "different token sequences":
        parts.pop()  # a consequence of the other differences
    return ", ".join(parts) or "different settings"


def sample_parts(samples: TokenizedSamples, part_tokens: int = PART_TOKENS) -> list[tuple[int, int]]:
    """Consecutive sample ranges ``[first, stop)`` of about `part_tokens` tokens (at least one sample)."""
    offsets, parts, first = samples.offsets.tolist(), [], 0
    for i in range(1, len(samples) + 1):
        if offsets[i] - offsets[first] >= part_tokens or i == len(samples):
            parts.append((first, i))
            first = i
    return parts


class PartedCache:
    """The parts (`fusedkd.topk_cache.TopKCache`s) as one: ``cache[start:stop]`` is ``(ids, logprobs)``."""

    def __init__(self, parts: list) -> None:
        self.parts, self.offsets = parts, [0]
        for part in parts:
            self.offsets.append(self.offsets[-1] + len(part))
        self.k, self.logprob_dtype = parts[0].k, parts[0].logprob_dtype

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, index: slice) -> tuple[torch.Tensor, torch.Tensor]:
        start, stop, _ = index.indices(len(self))
        pieces = [
            part[max(start, begin) - begin : min(stop, end) - begin]
            for part, begin, end in zip(self.parts, self.offsets, self.offsets[1:])
            if end > start and begin < stop
        ]
        if len(pieces) == 1:  # (samples are never empty: there is always a piece)
            return pieces[0]
        return torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces])


def _metadata(path: Path, what: str) -> dict | None:
    """The JSON of the manifest (`what` "manifest") or of a part's index ("part"), None if unreadable."""
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        if what == "manifest" and path.is_file():
            raise UsageError(
                f"--topk_cache {str(path.parent)!r}: unreadable {MANIFEST_NAME} ({exc}); delete it"
            ) from None
        return None
    if what == "manifest" and (not isinstance(loaded, dict) or loaded.get("format") != MANIFEST_FORMAT):
        raise UsageError(
            f"--topk_cache {str(path.parent)!r}: {MANIFEST_NAME} is not a fusedkd.distill manifest"
        )
    return loaded if what == "manifest" else (loaded.get("metadata") if isinstance(loaded, dict) else None)


def open_cache(directory: Path, identity: dict) -> PartedCache | None:
    """The complete cache in `directory` if built from `identity`; None if there is none (or only parts of
    an interrupted build of the same inputs). `UsageError` for (part of) a cache of other inputs (it is
    never overwritten), a bare `fusedkd.topk_cache`, or a damaged cache."""
    from fusedkd.topk_cache import INDEX_NAME, TopKCache, TopKCacheError

    def mismatch(found) -> UsageError:
        return UsageError(
            f"--topk_cache {str(directory)!r} holds the top-k of another run "
            f"({identity_difference(found, identity)}); choose another --topk_cache directory, or delete it "
            "to rebuild"
        )

    manifest = _metadata(directory / MANIFEST_NAME, "manifest")
    if manifest is None:
        if (directory / INDEX_NAME).is_file():
            raise UsageError(
                f"--topk_cache {str(directory)!r} holds a top-k cache not written by fusedkd.distill; "
                "choose another --topk_cache directory"
            )
        for index in sorted(directory.glob(f"part-*/{INDEX_NAME}")):
            found = _metadata(index, "part")
            if found is not None and found.get("identity") != identity:
                raise mismatch(found.get("identity"))
        return None
    if manifest.get("identity") != identity:
        raise mismatch(manifest.get("identity"))
    try:
        cache = PartedCache([TopKCache(directory / entry["name"]) for entry in manifest["parts"]])
    except (TopKCacheError, KeyError, TypeError) as exc:
        raise UsageError(
            f"--topk_cache {str(directory)!r} is damaged ({exc}); delete it to rebuild"
        ) from None
    if len(cache) != manifest.get("num_tokens"):
        raise UsageError(
            f"--topk_cache {str(directory)!r} is damaged (its parts hold {len(cache)} positions, the "
            f"manifest says {manifest.get('num_tokens')}); delete it to rebuild"
        )
    return cache


@torch.no_grad()
def build_cache(directory: Path, identity: dict, teacher, samples, *, batch_size: int, pad_id: int, device,
                autocast_dtype, progress: bool, part_tokens: int = PART_TOKENS) -> list[int]:  # fmt: skip
    """Write this process's parts of the top-k (``r, r + n, ...``; those an interrupted build finished
    are kept), then rank 0 the manifest. A collective: every process calls it, with its own teacher.
    Returns the numbers of the parts this process built."""
    import torch.distributed as dist
    from tqdm.auto import tqdm

    from fusedkd.topk import teacher_topk
    from fusedkd.topk_cache import TopKCache, TopKCacheError, TopKCacheWriter

    distributed = dist.is_initialized()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    parts, offsets, collate = sample_parts(samples, part_tokens), samples.offsets, Collator(pad_id)
    tokens = [int(offsets[stop] - offsets[first]) for first, stop in parts]
    options = dict(k=identity["k"], temperature=identity["temperature"], vocab_size=identity["vocab"])

    def finished(number: int) -> bool:
        found = _metadata(directory / f"part-{number:05d}" / "index.json", "part") or {}
        if found.get("identity") != identity or found.get("samples") != list(parts[number]):
            return False
        try:
            return len(TopKCache(directory / f"part-{number:05d}")) == tokens[number]
        except TopKCacheError:
            return False

    todo, head = [n for n in range(rank, len(parts), world_size) if not finished(n)], lm_head(teacher)
    bar = tqdm(total=sum(tokens[n] for n in todo), desc="teacher top-k", disable=not (progress and rank == 0))
    for number in todo:
        first, stop = parts[number]
        metadata = {"identity": identity, "samples": [first, stop]}
        # overwrite: an unfinished part of an interrupted build
        with TopKCacheWriter(directory / f"part-{number:05d}", teacher=identity["teacher"], metadata=metadata,
                             overwrite=True, **options) as writer:  # fmt: skip
            for start in range(first, stop, batch_size):
                batch = collate([samples[i] for i in range(start, min(start + batch_size, stop))])
                ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    hidden = hidden_states(teacher, ids, mask)[mask.bool()]  # [tokens, H], sample by sample
                bias = None if head.bias is None else head.bias.to(hidden.dtype)
                # the teacher's logit scale and soft cap too
                topk = teacher_topk(hidden, head.weight.to(hidden.dtype), options["k"], teacher_bias=bias,
                                    temperature=options["temperature"], vocab_size=options["vocab_size"],
                                    **head.transform.options("teacher"))  # fmt: skip
                writer.write(*(t.cpu() for t in topk))
                bar.update(int(mask.sum()))
    bar.close()
    if distributed:
        dist.barrier()
    if rank == 0:
        entries = [
            {"name": f"part-{n:05d}", "samples": list(p), "tokens": tokens[n]} for n, p in enumerate(parts)
        ]
        manifest = {"format": MANIFEST_FORMAT, "identity": identity, "num_tokens": int(offsets[-1])}
        text = json.dumps(manifest | {"parts": entries}, indent=1) + "\n"
        (directory / f".{MANIFEST_NAME}.tmp").write_text(text, encoding="utf-8")
        os.replace(directory / f".{MANIFEST_NAME}.tmp", directory / MANIFEST_NAME)
    if distributed:
        dist.barrier()
    return todo


class CachedTopK:
    """``(topk_ids, topk_logprobs)`` ``[rows, length, k]`` of a batch's samples (by index), filler-padded."""

    def __init__(self, cache: PartedCache, samples: TokenizedSamples) -> None:
        if len(cache) != int(samples.offsets[-1]):
            raise UsageError(
                f"the top-k cache has {len(cache)} positions, the training data {int(samples.offsets[-1])}"
            )
        self.cache, self.offsets = cache, samples.offsets

    def __call__(self, index: torch.Tensor, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        rows, k = index.numel(), self.cache.k
        ids = torch.arange(k, dtype=torch.int32).expand(rows, length, k).clone()
        logprobs = torch.full((rows, length, k), FILLER_LOGPROB, dtype=self.cache.logprob_dtype)
        for row, sample in enumerate(index.tolist()):
            start, stop = int(self.offsets[sample]), int(self.offsets[sample + 1])
            ids[row, : stop - start], logprobs[row, : stop - start] = self.cache[start:stop]
        return ids.to(device), logprobs.to(device)


def teacher_topk_cache(
    distill, training, samples: TokenizedSamples, tokenizer, records: list, vocab: int, probe
):
    """The `CachedTopK` of the training samples: opened, or built first (every process builds its parts
    with its own copy of the teacher, loaded only for that)."""
    import torch.distributed as dist

    from fusedkd.distill import models

    directory, main = Path(distill.topk_cache).expanduser(), training.process_index == 0
    try:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f".write-test-{training.process_index}").write_text("ok")
        (directory / f".write-test-{training.process_index}").unlink()
    except OSError as exc:
        raise UsageError(f"--topk_cache {str(directory)!r} is not writable: {exc.strerror or exc}") from None
    texts = json.dumps([{k: v for k, v in r.items() if k != "where"} for r in records], sort_keys=True)
    data = hashlib.sha256(texts.encode()).hexdigest()[:16]
    inputs = dict(tokenizer=models.tokenizer_fingerprint(tokenizer), data=data, k=distill.teacher_topk)
    inputs |= dict(seq_len=distill.seq_len, pack=distill.pack, temperature=distill.temperature)
    teacher = models.model_fingerprint(distill.teacher, role="teacher")  # its weights, not its path
    identity = cache_identity(teacher, vocab_size=vocab, tokens=samples.fingerprint(targets=False), **inputs)
    cache = open_cache(directory, identity)
    say = (lambda message: print(message, flush=True)) if main else (lambda message: None)
    if cache is not None:
        say(f"using the teacher's top-{cache.k} cache in {directory} ({len(cache):,} positions)")
        return CachedTopK(cache, samples)
    k, processes = distill.teacher_topk, training.world_size
    say(f"building the teacher's top-{k} cache in {directory} ({processes} processes)")
    dtype = torch.bfloat16 if training.bf16 else None
    teacher = models.load_model(distill.teacher, role="teacher", dtype=dtype).to(training.device).eval()
    models.check_linear_head(teacher, "teacher", probe)
    options = dict(batch_size=training.per_device_eval_batch_size, pad_id=tokenizer.pad_token_id or 0)
    options |= dict(device=training.device, autocast_dtype=dtype, progress=not training.disable_tqdm)
    options["part_tokens"] = distill.topk_part_tokens
    built = build_cache(directory, identity, teacher, samples, **options)
    del teacher
    counts = [len(built)] * training.world_size
    if dist.is_initialized():
        dist.all_gather_object(counts, len(built))
    cache = open_cache(directory, identity)
    if cache is None:
        raise UsageError(f"--topk_cache {str(directory)!r}: the build finished without a manifest")
    total, parts = sum(counts), len(cache.parts)
    say(f"built {total} of the cache's {parts} parts ({parts - total} kept from an earlier build)")
    return CachedTopK(cache, samples)
