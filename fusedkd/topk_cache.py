"""On-disk cache of a teacher's top-k (offline distillation): compact shards, written once, read mmapped.

A cache is a directory of shard files and an index written last::

    cache/
      index.json            {"format": "fusedkd.topk_cache", "version": 1, "num_tokens", "shards", ...}
      shard-00000.fkdtopk
      shard-00001.fkdtopk   ...

Each shard holds the top-k of consecutive tokens (in the order they were written)::

    bytes 0-7     magic b"FKDTOPK\\0"
    bytes 8-11    format version, uint32 little-endian (1)
    bytes 12-15   header length L, uint32 little-endian
    bytes 16-     header: L bytes of UTF-8 JSON (k, temperature, vocab_size, teacher, logprob_dtype,
                  num_tokens, shard, ids_offset, logprobs_offset, ids_crc32, logprobs_crc32, metadata)
    ids_offset    token ids, int32 little-endian, [num_tokens, k]              (64-byte aligned)
    logprobs_off  log-probabilities, float16 / bfloat16 / float32 little-endian, [num_tokens, k]

That is 4 + 2 = 6 bytes per (token, k) in float16 or bfloat16: k = 64 costs 384 bytes per token, against
4 V bytes (600 KB at V = 151,936) for float32 logits. Every shard is written under a temporary name and
renamed when complete, and the index only on `close()`; a reader checks the magic, the version, the
header, that every shard agrees with the index and that each file has exactly the size its header
implies (a truncated or padded file is an error), and `verify()` checks the CRC32 of the data.

Log-probabilities stored in float16 keep ~3 significant digits (bfloat16: ~2); the loss's bucket tail,
1 - sum_k p, is then only resolved to about eps (1 + sum_k p |log p|) (`fusedkd._options.tail_precision`).
"""

from __future__ import annotations

import json
import os
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import torch

from fusedkd._options import check_temperature

MAGIC = b"FKDTOPK\0"
VERSION = 1
FORMAT = "fusedkd.topk_cache"
INDEX_NAME = "index.json"
SHARD_SUFFIX = ".fkdtopk"
ALIGNMENT = 64
DEFAULT_SHARD_BYTES = 256 * 2**20
# Stored log-probability dtypes: name -> (torch dtype, numpy dtype of the stored bits).
LOGPROB_DTYPES = {
    "float16": (torch.float16, np.dtype("<f2")),
    "bfloat16": (torch.bfloat16, np.dtype("<u2")),  # numpy has no bfloat16: read its bits, view in torch
    "float32": (torch.float32, np.dtype("<f4")),
}
IDS_DTYPE = np.dtype("<i4")
_PREFIX = struct.Struct("<8sII")  # magic, version, header length
_SHARED_KEYS = ("k", "temperature", "vocab_size", "teacher", "logprob_dtype")


class TopKCacheError(ValueError):
    """A top-k cache file or directory that is missing, truncated, corrupt or inconsistent."""


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}{SHARD_SUFFIX}"


def _aligned(offset: int) -> int:
    return -(-offset // ALIGNMENT) * ALIGNMENT


def _require_little_endian() -> None:
    if sys.byteorder != "little":
        raise TopKCacheError("fusedkd top-k caches are little-endian; this host is big-endian")


def _dtype_name(dtype: torch.dtype | str) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in LOGPROB_DTYPES:
        raise ValueError(f"logprob_dtype must be one of {', '.join(LOGPROB_DTYPES)}; got {dtype!r}")
    return name


def _atomic_write(path: Path, chunks: list[bytes | memoryview]) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as f:
        for chunk in chunks:
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


class TopKCacheWriter:
    """Write a teacher's top-k to a cache directory, in shards of `shard_tokens` tokens.

    Tokens are appended in the order of the `write` calls; `close()` (or leaving the ``with`` block
    without an exception) writes the last shard and the index. A directory that already holds a cache
    is an error unless ``overwrite=True``.

    Args:
        directory: where the cache goes (created if needed).
        k: ids per token.
        temperature: the temperature the log-probabilities were computed at (distill at the same one).
        vocab_size: size of the vocabulary the ids index (checked: every id is below it).
        teacher: a name for the teacher model (recorded, e.g. its Hugging Face id).
        logprob_dtype: ``torch.float16`` (default), ``torch.bfloat16`` or ``torch.float32``.
        shard_tokens: tokens per shard (default: shards of about 256 MiB).
        metadata: any JSON-serializable dict to record in every header (dataset, tokenizer, ...).
        overwrite: replace an existing cache in `directory`.

    Example:
        >>> import tempfile, torch
        >>> from fusedkd.topk import teacher_topk
        >>> from fusedkd.topk_cache import TopKCache, TopKCacheWriter
        >>> directory = tempfile.mkdtemp()
        >>> weight = torch.randn(1000, 16)
        >>> with TopKCacheWriter(directory, k=8, temperature=2.0, vocab_size=1000, teacher="toy") as writer:
        ...     for _ in range(3):  # batches of teacher hidden states
        ...         writer.write(*teacher_topk(torch.randn(4, 10, 16), weight, k=8, temperature=2.0))
        >>> cache = TopKCache(directory)
        >>> len(cache), cache.k, cache.temperature
        (120, 8, 2.0)
        >>> ids, logprobs = cache[40:50]
        >>> ids.dtype, logprobs.dtype, tuple(ids.shape)
        (torch.int32, torch.float16, (10, 8))
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        k: int,
        temperature: float,
        vocab_size: int,
        teacher: str,
        logprob_dtype: torch.dtype | str = torch.float16,
        shard_tokens: int | None = None,
        metadata: dict | None = None,
        overwrite: bool = False,
    ) -> None:
        _require_little_endian()
        for name, value in (("k", k), ("vocab_size", vocab_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if k > vocab_size:
            raise ValueError(f"k={k} is larger than vocab_size={vocab_size}")
        if vocab_size > 2**31 - 1:
            raise ValueError(
                f"vocab_size must be at most 2**31 - 1 (ids are stored as int32), got {vocab_size}"
            )
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
        # The losses' own range (a cache of another temperature could not be used by them).
        check_temperature(temperature)
        if not isinstance(teacher, str):
            raise TypeError(f"teacher must be a str (the teacher's name), got {type(teacher).__name__}")
        dtype_name = _dtype_name(logprob_dtype)
        if shard_tokens is None:
            shard_tokens = max(1, DEFAULT_SHARD_BYTES // (k * (4 + LOGPROB_DTYPES[dtype_name][1].itemsize)))
        if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, int) or shard_tokens < 1:
            raise ValueError(f"shard_tokens must be a positive int, got {shard_tokens!r}")
        metadata = {} if metadata is None else metadata
        try:
            json.dumps(metadata)
        except TypeError as exc:
            raise TypeError(f"metadata must be JSON-serializable: {exc}") from exc

        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        existing = [self.directory / INDEX_NAME, *self.directory.glob(f"shard-*{SHARD_SUFFIX}")]
        if any(path.exists() for path in existing):
            if not overwrite:
                raise FileExistsError(f"{self.directory} already holds a top-k cache; pass overwrite=True")
            for path in existing:
                path.unlink(missing_ok=True)
        self.shared = dict(
            k=k,
            temperature=float(temperature),
            vocab_size=vocab_size,
            teacher=teacher,
            logprob_dtype=dtype_name,
        )
        self.metadata = metadata
        self.shard_tokens = shard_tokens
        self.num_tokens = 0
        self._pending_ids: list[np.ndarray] = []
        self._pending_logprobs: list[np.ndarray] = []
        self._pending_tokens = 0
        self._shards: list[dict] = []
        self._closed = False

    def write(self, ids: torch.Tensor, logprobs: torch.Tensor) -> None:
        """Append tokens: ``ids`` ``[..., k]`` integers in [0, vocab_size), ``logprobs`` ``[..., k]`` <= 0."""
        if self._closed:
            raise ValueError("this TopKCacheWriter is closed")
        k, vocab = self.shared["k"], self.shared["vocab_size"]
        for name, x in (("ids", ids), ("logprobs", logprobs)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
            if x.dim() < 1 or x.shape[-1] != k:
                raise ValueError(f"{name} must be [..., k={k}], got shape {tuple(x.shape)}")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"ids must be an integer tensor, got {ids.dtype}")
        if not logprobs.dtype.is_floating_point:
            raise TypeError(f"logprobs must be a float tensor, got {logprobs.dtype}")
        if logprobs.shape != ids.shape:
            raise ValueError(
                f"logprobs must have the shape of ids, {tuple(ids.shape)}; got {tuple(logprobs.shape)}"
            )
        ids = ids.detach().reshape(-1, k).cpu()
        logprobs = logprobs.detach().reshape(-1, k).cpu()
        if ids.numel() and (bool((ids < 0).any()) or bool((ids >= vocab).any())):
            bad = ids[(ids < 0) | (ids >= vocab)][0].item()
            raise ValueError(f"ids must be in [0, vocab_size={vocab}); found {bad}")
        if ids.numel() and not bool((logprobs <= 0).all()):
            bad = logprobs[~(logprobs <= 0)][0].item()
            raise ValueError(f"logprobs must be log-probabilities (<= 0, not NaN); found {bad}")
        torch_dtype, numpy_dtype = LOGPROB_DTYPES[self.shared["logprob_dtype"]]
        ids_array = ids.to(torch.int32).numpy()
        logprob_array = logprobs.to(torch_dtype).contiguous().view(_same_size_int(torch_dtype)).numpy()
        logprob_array = logprob_array.view(numpy_dtype)
        start = 0
        while start < ids_array.shape[0]:
            take = min(self.shard_tokens - self._pending_tokens, ids_array.shape[0] - start)
            self._pending_ids.append(ids_array[start : start + take])
            self._pending_logprobs.append(logprob_array[start : start + take])
            self._pending_tokens += take
            start += take
            if self._pending_tokens == self.shard_tokens:
                self._flush()

    def _flush(self) -> None:
        if self._pending_tokens == 0:
            return
        k = self.shared["k"]
        ids = np.concatenate(self._pending_ids).reshape(-1, k)
        logprobs = np.concatenate(self._pending_logprobs).reshape(-1, k)
        shard = len(self._shards)
        header = dict(
            format=FORMAT,
            **self.shared,
            num_tokens=int(ids.shape[0]),
            shard=shard,
            ids_crc32=zlib.crc32(ids.tobytes()),
            logprobs_crc32=zlib.crc32(logprobs.tobytes()),
            metadata=self.metadata,
        )
        # The offsets depend on the header's length, which depends on the offsets' digits: fix them up.
        header["ids_offset"] = header["logprobs_offset"] = 0
        for _ in range(3):
            encoded = json.dumps(header, sort_keys=True).encode()
            ids_offset = _aligned(_PREFIX.size + len(encoded))
            header["ids_offset"], header["logprobs_offset"] = ids_offset, ids_offset + ids.nbytes
        encoded = json.dumps(header, sort_keys=True).encode()
        assert _aligned(_PREFIX.size + len(encoded)) == header["ids_offset"]
        prefix = _PREFIX.pack(MAGIC, VERSION, len(encoded)) + encoded
        padding = b"\0" * (header["ids_offset"] - len(prefix))
        _atomic_write(self.directory / _shard_name(shard), [prefix, padding, ids.data, logprobs.data])
        self._shards.append(dict(name=_shard_name(shard), num_tokens=header["num_tokens"]))
        self.num_tokens += header["num_tokens"]
        self._pending_ids, self._pending_logprobs, self._pending_tokens = [], [], 0

    def close(self) -> None:
        """Write the last shard and the index. The cache is readable only after this."""
        if self._closed:
            return
        self._flush()
        index = dict(
            format=FORMAT,
            version=VERSION,
            **self.shared,
            num_tokens=self.num_tokens,
            shards=self._shards,
            metadata=self.metadata,
        )
        _atomic_write(self.directory / INDEX_NAME, [json.dumps(index, indent=1, sort_keys=True).encode()])
        self._closed = True

    def __enter__(self) -> TopKCacheWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
        else:  # an interrupted write leaves no index: the partial cache cannot be mistaken for a whole one
            self._closed = True


def _same_size_int(dtype: torch.dtype) -> torch.dtype:
    return {2: torch.int16, 4: torch.int32}[torch.empty((), dtype=dtype).element_size()]


class _Shard:
    """One checked, memory-mapped shard file."""

    def __init__(self, path: Path, expected: dict):
        self.path = path
        if not path.is_file():
            raise TopKCacheError(f"{path}: missing shard (the index lists it)")
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(_PREFIX.size)
            if len(prefix) < _PREFIX.size:
                raise TopKCacheError(f"{path}: truncated ({size} bytes): shorter than the file prefix")
            magic, version, header_length = _PREFIX.unpack(prefix)
            if magic != MAGIC:
                raise TopKCacheError(f"{path}: not a fusedkd top-k cache shard (magic {magic!r})")
            if version != VERSION:
                raise TopKCacheError(
                    f"{path}: format version {version}; this fusedkd reads version {VERSION}"
                )
            encoded = f.read(header_length)
        if len(encoded) < header_length:
            raise TopKCacheError(f"{path}: truncated ({size} bytes) inside its {header_length}-byte header")
        try:
            header = json.loads(encoded.decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TopKCacheError(f"{path}: corrupt header ({exc})") from exc
        required = (*_SHARED_KEYS, "num_tokens", "shard", "ids_offset", "logprobs_offset")
        missing = [key for key in required if key not in header]
        if header.get("format") != FORMAT or missing:
            raise TopKCacheError(f"{path}: not a fusedkd top-k cache header (missing {', '.join(missing)})")
        for key, value in expected.items():
            if header[key] != value:
                raise TopKCacheError(f"{path}: {key}={header[key]!r} but the cache's index says {value!r}")
        k, n = header["k"], header["num_tokens"]
        _, numpy_dtype = LOGPROB_DTYPES[header["logprob_dtype"]]
        ids_offset, logprobs_offset = header["ids_offset"], header["logprobs_offset"]
        expected_size = logprobs_offset + n * k * numpy_dtype.itemsize
        if (
            ids_offset < _PREFIX.size + header_length
            or logprobs_offset != ids_offset + n * k * IDS_DTYPE.itemsize
        ):
            raise TopKCacheError(f"{path}: inconsistent offsets in the header")
        if size != expected_size:
            state = "truncated" if size < expected_size else "longer than its header says"
            raise TopKCacheError(
                f"{path}: {state}: {size} bytes, expected {expected_size} for {n} tokens x k={k}"
            )
        self.header = header
        self.num_tokens = n
        # Copy-on-write maps: zero-copy, writable for torch, and the file is never modified.
        self._ids = np.memmap(path, dtype=IDS_DTYPE, mode="c", offset=ids_offset, shape=(n, k)) if n else None
        self._logprobs = (
            np.memmap(path, dtype=numpy_dtype, mode="c", offset=logprobs_offset, shape=(n, k)) if n else None
        )
        self.logprob_dtype = LOGPROB_DTYPES[header["logprob_dtype"]][0]

    def read(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.from_numpy(self._ids[start:stop])
        logprobs = torch.from_numpy(self._logprobs[start:stop]).view(self.logprob_dtype)
        return ids, logprobs

    def verify(self) -> None:
        for name, array in (("ids", self._ids), ("logprobs", self._logprobs)):
            if array is None:
                continue
            crc = 0
            flat = array.reshape(-1)
            step = 1 << 24
            for start in range(0, flat.shape[0], step):
                crc = zlib.crc32(flat[start : start + step].tobytes(), crc)
            expected = self.header[f"{name}_crc32"]
            if crc != expected:
                raise TopKCacheError(
                    f"{self.path}: {name} data corrupt (CRC32 {crc:#010x}, expected {expected:#010x})"
                )


class TopKCache:
    """A top-k cache directory, memory-mapped: ``cache[start:stop]`` -> ``(ids, logprobs)``.

    ``ids`` are int32 and ``logprobs`` in the stored dtype, both ``[stop - start, k]`` and zero-copy
    views of the files when the range lies in one shard (else concatenated); `fused_linear_topk_kd_loss`
    takes them as they are. Opening checks the index and every shard's header and size (truncated,
    corrupt, missing or inconsistent files raise `TopKCacheError`); ``verify=True`` also checks the
    CRC32 of all the data (reads everything).

    Attributes: ``k``, ``temperature``, ``vocab_size``, ``teacher``, ``logprob_dtype``, ``metadata``,
    ``len(cache)`` (tokens).
    """

    def __init__(self, directory: str | os.PathLike, *, verify: bool = False) -> None:
        _require_little_endian()
        self.directory = Path(directory)
        index_path = self.directory / INDEX_NAME
        if not index_path.is_file():
            raise TopKCacheError(
                f"{self.directory}: no {INDEX_NAME}: not a top-k cache, or its writer was not closed"
            )
        try:
            index = json.loads(index_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TopKCacheError(f"{index_path}: corrupt index ({exc})") from exc
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise TopKCacheError(f"{index_path}: not a fusedkd top-k cache index")
        if index.get("version") != VERSION:
            raise TopKCacheError(
                f"{index_path}: format version {index.get('version')}; this fusedkd reads {VERSION}"
            )
        missing = [key for key in (*_SHARED_KEYS, "num_tokens", "shards") if key not in index]
        if missing:
            raise TopKCacheError(f"{index_path}: index lacks {', '.join(missing)}")
        if index["logprob_dtype"] not in LOGPROB_DTYPES:
            raise TopKCacheError(f"{index_path}: unknown logprob_dtype {index['logprob_dtype']!r}")
        shared = {key: index[key] for key in _SHARED_KEYS}
        entries = index["shards"]
        if not isinstance(entries, list) or not all(
            isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("num_tokens"), int)
            for e in entries
        ):
            raise TopKCacheError(
                f"{index_path}: corrupt index: shards must be a list of {{name, num_tokens}} entries"
            )
        self.shards: list[_Shard] = []
        for position, entry in enumerate(entries):
            shard = _Shard(self.directory / entry["name"], dict(shared, shard=position))
            if shard.num_tokens != entry["num_tokens"]:
                raise TopKCacheError(
                    f"{shard.path}: {shard.num_tokens} tokens but the index says {entry['num_tokens']}"
                )
            self.shards.append(shard)
        self.offsets = np.cumsum([0] + [shard.num_tokens for shard in self.shards])
        if int(self.offsets[-1]) != index["num_tokens"]:
            raise TopKCacheError(
                f"{index_path}: the shards hold {int(self.offsets[-1])} tokens, not {index['num_tokens']}"
            )
        self.k: int = index["k"]
        self.temperature: float = index["temperature"]
        self.vocab_size: int = index["vocab_size"]
        self.teacher: str = index["teacher"]
        self.logprob_dtype: torch.dtype = LOGPROB_DTYPES[index["logprob_dtype"]][0]
        self.metadata: dict = index.get("metadata", {})
        if verify:
            self.verify()

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def verify(self) -> None:
        """Check the CRC32 of every shard's data (reads the whole cache)."""
        for shard in self.shards:
            shard.verify()

    def read(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, logprobs)`` of tokens ``start .. stop - 1``, each ``[stop - start, k]``."""
        if not (0 <= start <= stop <= len(self)):
            raise IndexError(f"token range [{start}, {stop}) is outside the cache's [0, {len(self)})")
        parts = []
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        for position in range(max(first, 0), len(self.shards)):
            begin = int(self.offsets[position])
            if begin >= stop:
                break
            shard = self.shards[position]
            parts.append(shard.read(max(start - begin, 0), min(stop, begin + shard.num_tokens) - begin))
        if not parts:
            return (
                torch.empty(0, self.k, dtype=torch.int32),
                torch.empty(0, self.k, dtype=self.logprob_dtype),
            )
        if len(parts) == 1:
            return parts[0]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def __getitem__(self, index: slice) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("index a TopKCache with a token range, cache[start:stop]")
        start, stop, _ = index.indices(len(self))
        return self.read(start, max(start, stop))

    def __repr__(self) -> str:
        return (
            f"TopKCache({str(self.directory)!r}, tokens={len(self)}, k={self.k}, "
            f"temperature={self.temperature}, vocab_size={self.vocab_size}, teacher={self.teacher!r}, "
            f"logprob_dtype={self.logprob_dtype}, shards={len(self.shards)})"
        )
