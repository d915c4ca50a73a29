"""Offline teacher: its top-k precomputed once into a cache, then training without it.

``--teacher-topk K --topk-cache DIR``: if DIR holds no complete cache, the teacher runs over the training
samples and `fusedkd.topk.teacher_topk` keeps every position's K most likely next tokens and their
log-probabilities at ``--temperature``. The samples are cut into parts of about a million tokens
(`sample_parts`, fixed by the data alone); under ``torchrun`` process ``r`` of ``n`` builds parts
``r, r + n, ...`` with its own replica of the teacher, each part a `fusedkd.topk_cache` written with
`fusedkd.topk_cache.TopKCacheWriter` into ``DIR/part-NNNNN``; rank 0 then writes ``DIR/manifest.json``,
which makes the cache complete. A build that dies keeps its finished parts: the next run (on any number
of processes) builds only the others.

Position ``j`` of sample ``i`` is cache row ``samples.offsets[i] + j``, so a batch reads its rows from
the memory-mapped parts by sample index. The student then trains with `objectives.TopKObjective`
(`fusedkd.topk.fused_linear_topk_kd_loss`), the teacher never loaded. A cache (or a part) is reused only
if it was built from the same teacher, tokenizer, data, sequence settings, K, temperature and vocabulary
(`cache_identity`, recorded in the manifest and in every part); otherwise the run stops, naming what
changed, rather than overwrite it. The teacher is identified by its weights and config
(`models.model_fingerprint`), not by how its path is spelled: a teacher retrained and saved at the same
path is a different teacher, the same files reached as ``./t`` or ``t`` the same one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from fusedkd.distill.data import Batch, TokenizedSamples, collate
from fusedkd.distill.distributed import DistContext, barrier
from fusedkd.distill.errors import UsageError
from fusedkd.distill.models import hidden_states, lm_head

# Padding positions have no label; they still need valid top-k entries: distinct ids, log-probabilities
# whose mass is negligible (k * e^-30 < 1e-7 for any vocabulary up to 10^6).
FILLER_LOGPROB = -30.0
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "fusedkd.distill.topk_cache"
PART_TOKENS = 1 << 20  # tokens per part (a part is the unit of work of one process and of a resume)

# What a cache is built from, with how a mismatch is worded: (key, name in messages, shows values).
IDENTITY_KEYS = (
    ("teacher", "teacher", True),
    ("tokenizer", "tokenizer", False),
    ("data", "training data", False),
    ("seq_len", "--seq-len", True),
    ("pack", "--pack", True),
    ("k", "--teacher-topk", True),
    ("temperature", "--temperature", True),
    ("vocab", "vocabulary rows", True),
    ("tokens", "token sequences", False),
)


def cache_identity(
    teacher: str,
    *,
    tokenizer: str,
    data: str,
    seq_len: int,
    pack: bool,
    k: int,
    temperature: float,
    vocab_size: int,
    tokens: str,
) -> dict:
    """What a top-k cache must have been built from to be reused.

    `teacher` identifies the teacher's weights and config (`models.model_fingerprint`: a hash of a local
    directory's files, a Hub name at its commit), not its path. `tokenizer`, `data` and `tokens` are
    fingerprints: of the tokenizer (its full definition and chat
    template), of the training samples before tokenization, and of the token sequences themselves (so
    that anything else that changes them, e.g. a new tokenizers release, is caught too).
    """
    return {
        "teacher": teacher,
        "tokenizer": tokenizer,
        "data": data,
        "seq_len": seq_len,
        "pack": pack,
        "k": k,
        "temperature": temperature,
        "vocab": vocab_size,
        "tokens": tokens,
    }


def identity_difference(found: object, wanted: dict) -> str:
    """Which inputs of a cache differ from this run's, in words (for the mismatch error)."""
    if not isinstance(found, dict):
        return "it was not written by fusedkd.distill"
    parts = []
    for key, name, shows_values in IDENTITY_KEYS:
        if found.get(key) != wanted.get(key):
            if shows_values:
                parts.append(f"{name} {found.get(key)!r} (this run: {wanted.get(key)!r})")
            else:
                parts.append(f"different {name}")
    if not parts:
        return "different settings"
    if parts[-1] == "different token sequences" and len(parts) > 1:
        parts.pop()  # a consequence of the other differences
    return ", ".join(parts)


def sample_parts(samples: TokenizedSamples, part_tokens: int = PART_TOKENS) -> list[tuple[int, int]]:
    """Consecutive sample ranges ``[first, stop)`` of about `part_tokens` tokens each (at least 1 sample).

    The parts depend on the data only, not on the number of processes, so a build can resume on any.
    """
    offsets = samples.offsets.tolist()
    parts, first = [], 0
    for i in range(1, len(samples) + 1):
        if offsets[i] - offsets[first] >= part_tokens or i == len(samples):
            parts.append((first, i))
            first = i
    return parts


def _part_name(number: int) -> str:
    return f"part-{number:05d}"


class PartedCache:
    """A distill top-k cache: parts (each a `fusedkd.topk_cache.TopKCache`) over consecutive token ranges.

    ``cache[start:stop]`` -> ``(ids, logprobs)`` over the whole training set's token positions, like a
    single `TopKCache`.
    """

    def __init__(self, parts: list) -> None:
        self.parts = parts
        self.offsets = [0]
        for part in parts:
            self.offsets.append(self.offsets[-1] + len(part))
        self.k = parts[0].k
        self.logprob_dtype = parts[0].logprob_dtype

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, index: slice) -> tuple[torch.Tensor, torch.Tensor]:
        start, stop, _ = index.indices(len(self))
        pieces = []
        for number, part in enumerate(self.parts):
            begin, end = self.offsets[number], self.offsets[number + 1]
            if end <= start or begin >= stop:
                continue
            pieces.append(part[max(start, begin) - begin : min(stop, end) - begin])
        if len(pieces) == 1:
            return pieces[0]
        if not pieces:
            return (
                torch.empty(0, self.k, dtype=torch.int32),
                torch.empty(0, self.k, dtype=self.logprob_dtype),
            )
        return torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces])


def _read_manifest(directory: Path) -> dict | None:
    path = directory / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(
            f"--topk-cache {str(directory)!r}: unreadable {MANIFEST_NAME} ({exc}); delete it"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise UsageError(
            f"--topk-cache {str(directory)!r}: {MANIFEST_NAME} is not a fusedkd.distill manifest"
        )
    return manifest


def _mismatch(directory: Path, found: object, identity: dict) -> UsageError:
    differ = identity_difference(found, identity)
    return UsageError(
        f"--topk-cache {str(directory)!r} holds the top-k of another run ({differ}); "
        "choose another --topk-cache directory, or delete it to rebuild"
    )


def check_reusable(directory: Path, identity: dict) -> None:
    """`UsageError` if `directory` holds (part of) a cache built from other inputs: it is never overwritten.

    Checked before anything is built: the manifest of a complete cache, else the finished parts of an
    interrupted build (a resume only continues a build of the same inputs).
    """
    from fusedkd.topk_cache import INDEX_NAME

    manifest = _read_manifest(directory)
    if manifest is not None:
        if manifest.get("identity") != identity:
            raise _mismatch(directory, manifest.get("identity"), identity)
        return
    if (directory / INDEX_NAME).is_file():  # a bare fusedkd.topk_cache, not one of this recipe's
        raise UsageError(
            f"--topk-cache {str(directory)!r} holds a top-k cache not written by fusedkd.distill; "
            "choose another --topk-cache directory"
        )
    for index in sorted(directory.glob(f"part-*/{INDEX_NAME}")):
        found = _part_metadata(index.parent)
        if found is not None and found.get("identity") != identity:
            raise _mismatch(directory, found.get("identity"), identity)


def _part_metadata(part_dir: Path) -> dict | None:
    from fusedkd.topk_cache import INDEX_NAME

    try:
        return json.loads((part_dir / INDEX_NAME).read_text(encoding="utf-8")).get("metadata")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None


def _finished_part(part_dir: Path, identity: dict, samples: tuple[int, int], tokens: int) -> bool:
    """Whether `part_dir` holds the complete, intact top-k of this part (a resume keeps it)."""
    from fusedkd.topk_cache import TopKCache, TopKCacheError

    metadata = _part_metadata(part_dir)
    if metadata is None or metadata.get("identity") != identity or metadata.get("samples") != list(samples):
        return False
    try:
        return len(TopKCache(part_dir)) == tokens
    except TopKCacheError:
        return False


def open_cache(directory: Path, identity: dict) -> PartedCache | None:
    """The complete cache in `directory` if it matches `identity`; None if there is none (or part of one).

    `UsageError` if it is a cache of something else (it is not overwritten), or a damaged one.
    """
    from fusedkd.topk_cache import TopKCache, TopKCacheError

    check_reusable(directory, identity)
    manifest = _read_manifest(directory)
    if manifest is None:
        return None
    try:
        parts = [TopKCache(directory / entry["name"]) for entry in manifest["parts"]]
    except (TopKCacheError, KeyError, TypeError) as exc:
        raise UsageError(
            f"--topk-cache {str(directory)!r} is damaged ({exc}); delete it to rebuild"
        ) from None
    cache = PartedCache(parts)
    if len(cache) != manifest.get("num_tokens"):
        raise UsageError(
            f"--topk-cache {str(directory)!r} is damaged (its parts hold {len(cache)} positions, the "
            f"manifest says {manifest.get('num_tokens')}); delete it to rebuild"
        )
    return cache


@torch.no_grad()
def build_cache(
    directory: Path,
    identity: dict,
    teacher,
    samples: TokenizedSamples,
    *,
    batch_size: int,
    pad_id: int,
    ctx: DistContext,
    autocast_dtype: torch.dtype | None,
    progress: bool,
    part_tokens: int = PART_TOKENS,
) -> list[int]:
    """Run `teacher` over this process's parts of `samples` and write their top-k; rank 0 then writes the
    manifest. A collective: every process calls it (with its own replica of the teacher).

    The samples are cut into parts (`sample_parts`); process ``r`` of ``n`` builds parts ``r, r + n, ...``,
    each into its own ``part-NNNNN`` directory, and skips the parts a previous, interrupted build finished
    (a part is finished when its index is written). Returns the numbers of the parts this process built.
    """
    from tqdm.auto import tqdm

    from fusedkd.topk_cache import TopKCacheWriter

    parts = sample_parts(samples, part_tokens)
    offsets = samples.offsets
    built = []
    mine = [n for n in range(len(parts)) if n % ctx.world_size == ctx.rank]
    todo = []
    for number in mine:
        first, stop = parts[number]
        tokens = int(offsets[stop] - offsets[first])
        if not _finished_part(directory / _part_name(number), identity, parts[number], tokens):
            todo.append(number)
    total = sum(int(offsets[parts[n][1]] - offsets[parts[n][0]]) for n in todo)
    head = lm_head(teacher)
    with tqdm(total=total, desc="teacher top-k", unit="tok", disable=not (progress and ctx.is_main)) as bar:
        for number in todo:
            first, stop = parts[number]
            writer = TopKCacheWriter(
                directory / _part_name(number),
                k=identity["k"],
                temperature=identity["temperature"],
                vocab_size=identity["vocab"],
                teacher=identity["teacher"],
                metadata={"identity": identity, "samples": [first, stop]},
                overwrite=True,  # an unfinished part of an interrupted build
            )
            with writer:
                for start in range(first, stop, batch_size):
                    indices = list(range(start, min(start + batch_size, stop)))
                    batch = collate(samples, indices, pad_id=pad_id).to(ctx.device)
                    writer.write(*_batch_topk(teacher, head, batch, identity, autocast_dtype))
                    bar.update(int(batch.attention_mask.sum()))
            built.append(number)
    barrier(ctx)
    if ctx.is_main:
        manifest = {
            "format": MANIFEST_FORMAT,
            "identity": identity,
            "num_tokens": samples.num_tokens,
            "parts": [
                {"name": _part_name(n), "samples": [a, b], "tokens": int(offsets[b] - offsets[a])}
                for n, (a, b) in enumerate(parts)
            ],
        }
        scratch = directory / f".{MANIFEST_NAME}.tmp"
        scratch.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        os.replace(scratch, directory / MANIFEST_NAME)
    barrier(ctx)
    return built


def _batch_topk(teacher, head, batch: Batch, identity: dict, autocast_dtype: torch.dtype | None):
    """The top-k ids and log-probabilities of a batch's real positions, sample by sample, on the CPU."""
    from fusedkd.topk import teacher_topk

    device = batch.input_ids.device
    with torch.autocast(
        device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
    ):
        hidden = hidden_states(teacher, batch.input_ids, batch.attention_mask)
    real = batch.attention_mask.bool()
    ids, logprobs = teacher_topk(
        hidden[real],  # [tokens, H], sample by sample, position by position
        head.weight.to(hidden.dtype),
        identity["k"],
        temperature=identity["temperature"],
        vocab_size=identity["vocab"],
        teacher_bias=None if head.bias is None else head.bias.to(hidden.dtype),
        **head.transform.options("teacher"),  # the teacher's logit scale and soft cap
    )
    return ids.cpu(), logprobs.cpu()


class CachedTopK:
    """The ``topk_ids`` / ``topk_logprobs`` of a batch, read from the cache by sample index and padded."""

    def __init__(self, cache, samples: TokenizedSamples) -> None:
        if len(cache) != samples.num_tokens:
            raise UsageError(
                f"the top-k cache has {len(cache)} positions but the training data {samples.num_tokens}"
            )
        self.cache = cache
        self.offsets = samples.offsets

    def __call__(self, batch: Batch) -> dict:
        rows, length = batch.input_ids.shape
        k = self.cache.k
        ids = torch.arange(k, dtype=torch.int32).expand(rows, length, k).clone()
        logprobs = torch.full((rows, length, k), FILLER_LOGPROB, dtype=self.cache.logprob_dtype)
        for row, sample in enumerate(batch.sample_indices.tolist()):
            start, stop = int(self.offsets[sample]), int(self.offsets[sample + 1])
            sample_ids, sample_logprobs = self.cache[start:stop]
            ids[row, : stop - start] = sample_ids
            logprobs[row, : stop - start] = sample_logprobs
        device = batch.input_ids.device
        return {"topk_ids": ids.to(device), "topk_logprobs": logprobs.to(device)}
