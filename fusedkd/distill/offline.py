"""Offline teacher: its top-k precomputed once into a `fusedkd.topk_cache`, then training without it.

``--teacher-topk K --topk-cache DIR``: if DIR holds no complete cache, the teacher (alone in memory,
on rank 0) runs over the training samples in index order and `fusedkd.topk.teacher_topk` keeps every
position's K most likely next tokens and their log-probabilities at ``--temperature``; they are
written with `fusedkd.topk_cache.TopKCacheWriter`. Position ``j`` of sample ``i`` is cache row
``samples.offsets[i] + j``, so a batch reads its rows from the memory-mapped cache by sample index.
The student then trains with `objectives.TopKObjective` (`fusedkd.topk.fused_linear_topk_kd_loss`),
the teacher never loaded. A cache is reused only if it was built from the same teacher, data, K,
temperature and vocabulary (recorded in its header); otherwise the run stops rather than overwrite it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fusedkd.distill.data import Batch, TokenizedSamples, collate
from fusedkd.distill.errors import UsageError
from fusedkd.distill.models import hidden_states, lm_head

# Padding positions have no label; they still need valid top-k entries: distinct ids, log-probabilities
# whose mass is negligible (k * e^-30 < 1e-7 for any vocabulary up to 10^6).
FILLER_LOGPROB = -30.0


def cache_identity(teacher: str, data_fingerprint: str, k: int, temperature: float, vocab_size: int) -> dict:
    """What a top-k cache must have been built from to be reused."""
    return {
        "teacher": teacher,
        "data": data_fingerprint,
        "k": k,
        "temperature": temperature,
        "vocab": vocab_size,
    }


def open_cache(directory: Path, identity: dict):
    """The complete cache in `directory` if it matches `identity`; None if there is none (or half a one).

    `UsageError` if it is a complete cache of something else (it is not overwritten).
    """
    from fusedkd.topk_cache import INDEX_NAME, TopKCache, TopKCacheError

    if not (directory / INDEX_NAME).is_file():
        return None
    try:
        cache = TopKCache(directory)
    except TopKCacheError as exc:
        raise UsageError(
            f"--topk-cache {str(directory)!r} is damaged ({exc}); delete it to rebuild"
        ) from None
    found = cache.metadata.get("identity")
    if found != identity:
        if isinstance(found, dict):
            differ = ", ".join(
                f"{key} {found.get(key)!r}, not {value!r}"
                for key, value in identity.items()
                if found.get(key) != value
            )
        else:
            differ = "not written by fusedkd.distill"
        raise UsageError(
            f"--topk-cache {str(directory)!r} holds the top-k of another run ({differ}); "
            "choose another --topk-cache directory"
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
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    progress: bool,
) -> None:
    """Run `teacher` over `samples` (in index order) and write every position's top-k to `directory`."""
    from tqdm.auto import tqdm

    from fusedkd.topk import teacher_topk
    from fusedkd.topk_cache import TopKCacheWriter

    head = lm_head(teacher)
    writer = TopKCacheWriter(
        directory,
        k=identity["k"],
        temperature=identity["temperature"],
        vocab_size=identity["vocab"],
        teacher=identity["teacher"],
        metadata={"identity": identity},
        overwrite=True,  # only ever reached without a complete cache: clears a half-written one
    )
    with (
        writer,
        tqdm(total=samples.num_tokens, desc="teacher top-k", unit="tok", disable=not progress) as bar,
    ):
        for start in range(0, len(samples), batch_size):
            indices = list(range(start, min(start + batch_size, len(samples))))
            batch = collate(samples, indices, pad_id=pad_id).to(device)
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
            )
            writer.write(ids.cpu(), logprobs.cpu())
            bar.update(int(real.sum()))


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
