"""Text in, token batches out: loading samples, marking which tokens are targets, batching deterministically.

A *sample* is one text (a JSON record's text field, a line of a .txt file, a dataset row). It becomes a
token sequence with a parallel boolean *target* mask: ``target[j]`` says whether token ``j`` is predicted
by the loss (the first token of a sequence never is, having nothing before it; with
``loss_only_on_response`` only tokens of the ``### Assistant:`` turns are). The tokenizer's
end-of-sequence token is appended to every sample and is a target: the model learns to stop.

Batches are right-padded; `collate` builds the shifted labels from the target mask and the attention
mask, never from ``pad_token_id`` (which equals EOS for Qwen and would drop the real EOS targets).
The order of samples is a pure function of (seed, epoch), so a run's data position is its step number.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fusedkd.distill.errors import UsageError

IGNORE_INDEX = -100
LOCAL_SUFFIXES = (".json", ".jsonl", ".txt")

# A sample: a text, or a chat record {"messages": [...]} (see `chat_record`).
Sample = str | dict

# The openassistant-guanaco turn markers: "### Human: ... ### Assistant: ...", possibly several turns.
TURN_MARKER = re.compile(r"###\s*(Human|Assistant)\s*:")


# ----------------------------------------------------------------------------------------------------------
# Loading texts


def load_texts(
    source: str,
    *,
    text_field: str = "text",
    split: str = "train",
    config_name: str | None = None,
) -> list[Sample]:
    """The samples (texts, or chat records: `chat_record`) of local .json / .jsonl / .txt or a Hub dataset.

    Local files: ``.jsonl`` holds one JSON object per line, ``.json`` a list of objects (or of strings),
    ``.txt`` one sample per non-empty line (as the ``datasets`` text loader); a directory contributes
    its files with those suffixes, in name order. Anything else is taken as a Hugging Face dataset name,
    loaded with ``datasets.load_dataset(source, config_name, split=split)`` (needs ``pip install datasets``).

    Example:
        >>> import json, pathlib, tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "data.jsonl"
        >>> _ = path.write_text("\\n".join(json.dumps({"text": t}) for t in ["a b", "c"]))
        >>> load_texts(str(path))
        ['a b', 'c']
    """
    path = Path(source).expanduser()
    if path.exists():
        files = _local_files(path)
        texts = [text for file in files for text in _read_local(file, text_field)]
    elif source.endswith(LOCAL_SUFFIXES) or source.startswith((".", "/", "~")):
        raise UsageError(f"dataset file {source!r} does not exist")
    else:
        texts = _load_hub(source, text_field=text_field, split=split, config_name=config_name)
    if not texts:
        raise UsageError(f"dataset {source!r} is empty: it has no samples")
    return texts


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix not in LOCAL_SUFFIXES:
            raise UsageError(
                f"dataset file {str(path)!r} has suffix {path.suffix!r}; "
                f"expected one of {', '.join(LOCAL_SUFFIXES)}"
            )
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in LOCAL_SUFFIXES)
    if not files:
        raise UsageError(f"dataset directory {str(path)!r} has no {', '.join(LOCAL_SUFFIXES)} files")
    return files


def _field(record: object, text_field: str, where: str) -> Sample:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise UsageError(f"{where}: expected a JSON object or string, got {type(record).__name__}")
    if text_field not in record and (chat := chat_record(record, where)) is not None:
        return chat
    if text_field not in record:
        fields = ", ".join(map(repr, record)) or "none"
        for have, missing in (("prompt", "completion"), ("completion", "prompt")):
            if have in record and missing not in record:
                raise UsageError(
                    f"{where}: a prompt/completion record needs a {missing!r} field too (fields: {fields})"
                )
        raise UsageError(
            f"{where}: no text field {text_field!r} (fields: {fields}); choose one with --text-field"
        )
    value = record[text_field]
    if not isinstance(value, str):
        raise UsageError(f"{where}: field {text_field!r} is a {type(value).__name__}, not a string")
    return value


def _read_local(path: Path, text_field: str) -> list[Sample]:
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read dataset file {str(path)!r}: {exc}") from None
    if path.suffix == ".txt":
        return [line for line in content.splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(content.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            texts.append(_field(record, text_field, f"{path}:{number}"))
        return texts
    try:
        records = json.loads(content)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(records, list):
        raise UsageError(f"{path}: expected a JSON list of records, got a {type(records).__name__}")
    return [_field(record, text_field, f"{path}[{i}]") for i, record in enumerate(records)]


def _load_hub(source: str, *, text_field: str, split: str, config_name: str | None) -> list[Sample]:
    try:
        import datasets
    except ImportError:
        raise UsageError(
            f"dataset {source!r} is not a local file, and loading it from the Hugging Face Hub needs the "
            "`datasets` package (pip install datasets)"
        ) from None
    try:
        dataset = datasets.load_dataset(source, config_name, split=split)
    except Exception as exc:  # the Hub raises many types: unknown name, offline, bad split, bad config
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(
            f"cannot load dataset {source!r} (split {split!r}): no such local path, "
            f"and the Hub says: {first_line}"
        ) from None
    if text_field not in dataset.column_names and {"messages", "prompt", "completion"} & set(
        dataset.column_names
    ):  # chat records (`_field` names a missing 'prompt' or 'completion')
        return [_field(dict(row), text_field, f"{source}[{i}]") for i, row in enumerate(dataset)]
    if text_field not in dataset.column_names:
        raise UsageError(
            f"dataset {source!r} has no text field {text_field!r} "
            f"(fields: {', '.join(dataset.column_names)}); choose one with --text-field"
        )
    return [_field(value, text_field, f"{source}[{i}]") for i, value in enumerate(dataset[text_field])]


# ----------------------------------------------------------------------------------------------------------
# Tokenizing


def response_spans(text: str) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of the assistant turns of a ``### Human: / ### Assistant:`` text.

    A span starts right after an ``### Assistant:`` marker and ends at the next marker or the end, less
    trailing whitespace (so that a token like ``" ###"`` opening the next turn is not a response token).

    Example:
        >>> text = "### Human: hi ### Assistant: hello ### Human: bye ### Assistant: ciao"
        >>> [text[a:b] for a, b in response_spans(text)]
        [' hello', ' ciao']
    """
    markers = list(TURN_MARKER.finditer(text))
    spans = []
    for i, marker in enumerate(markers):
        if marker.group(1) == "Assistant":
            end = markers[i + 1].start() if i + 1 < len(markers) else len(text)
            while end > marker.end() and text[end - 1].isspace():
                end -= 1
            spans.append((marker.end(), end))
    return spans


# ----------------------------------------------------------------------------------------------------------
# Chat records


def _messages(value: object, where: str, default_role: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if not isinstance(value, list) or not value:
        raise UsageError(f"{where}: expected a non-empty list of messages, got {type(value).__name__}")
    for number, message in enumerate(value):
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise UsageError(
                f"{where}: message {number} must be an object with string 'role' and 'content', "
                f"got {message!r:.80}"
            )
    return [dict(message) for message in value]


class ChatRecord(dict):
    """A chat sample ``{"messages": [...], "train_from": i}``: a plain dict (it compares, hashes into
    fingerprints and serializes as one) that also knows where it was read from (`where`, e.g.
    ``data.jsonl:3``), so that a record `tokenize` has to drop can be named."""

    def __init__(self, messages: list[dict], train_from: int, where: str = "") -> None:
        super().__init__(messages=messages, train_from=train_from)
        self.where = where


class RecordError(UsageError):
    """One chat record the chat template cannot render, or whose assistant turns it cannot locate.

    `tokenize` drops such a record and counts and names it (`TokenizeReport.unmaskable`) instead of
    stopping; a problem of the tokenizer itself (no chat template, ...) stays a plain `UsageError`.
    """


def chat_record(record: dict, where: str) -> ChatRecord | None:
    """A conversational sample as ``{"messages": [...], "train_from": i}``, or None for other records.

    - ``{"messages": [{"role", "content"}, ...]}``: every assistant message is a target.
    - ``{"prompt": ..., "completion": ...}``: each a string (a user / an assistant message) or a list of
      messages; the assistant messages of the completion are targets (``train_from`` = prompt length).

    The result is a `ChatRecord` (a dict) that remembers `where`.

    Example:
        >>> chat_record({"prompt": "2+2?", "completion": "4"}, "x")["messages"]
        [{'role': 'user', 'content': '2+2?'}, {'role': 'assistant', 'content': '4'}]
    """
    if "messages" in record:
        return ChatRecord(_messages(record["messages"], f"{where}: 'messages'", "user"), 0, where)
    if "prompt" in record and "completion" in record:
        prompt = _messages(record["prompt"], f"{where}: 'prompt'", "user")
        completion = _messages(record["completion"], f"{where}: 'completion'", "assistant")
        return ChatRecord(prompt + completion, len(prompt), where)
    return None


_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
_PROBE = "\x00fusedkd-probe\x00"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _render(tokenizer, messages: list[dict], **kwargs):
    """``apply_chat_template`` on one record's messages; `RecordError` if the template refuses them."""
    try:
        return tokenizer.apply_chat_template(messages, **kwargs)
    except Exception as exc:  # jinja's TemplateError (the template's raise_exception), ValueError, ...
        raise RecordError(f"the chat template cannot render it: {_first_line(exc)}") from None


def _end_of_turn(tokenizer) -> str:
    """The text the chat template closes an assistant turn with, less trailing whitespace (``<|im_end|>``)."""
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": _PROBE}], tokenize=False
    )
    if _PROBE not in rendered:
        raise UsageError("the tokenizer's chat template does not render an assistant message's content")
    return rendered[rendered.rindex(_PROBE) + len(_PROBE) :].rstrip()


def _generation_prompt(tokenizer) -> str:
    """The text ``add_generation_prompt`` appends (``<|im_start|>assistant\\n``), or "" if it appends none."""
    probe = [{"role": "user", "content": _PROBE}]
    try:
        plain = tokenizer.apply_chat_template(probe, tokenize=False)
        prompted = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    except Exception:  # a template that cannot render a lone user message has no usable prompt
        return ""
    return prompted[len(plain) :] if prompted.startswith(plain) else ""


def _find_content(text: str, content: str, start: int) -> tuple[int, int]:
    """``[at, end)`` of an assistant message's `content` in `text` from `start` on, or (-1, -1).

    The content as it is, else stripped of surrounding whitespace, which templates may trim (Llama 3's
    ``message['content'] | trim``). Used only to locate the turn: its span is set by the turn's start
    and the end-of-turn text that follows the content.
    """
    at = text.find(content, start)
    if at >= 0:
        return at, at + len(content)
    stripped = content.strip()
    if stripped != content:
        at = text.find(stripped, start)
        if at >= 0:
            return at, at + len(stripped)
    return -1, -1


def assistant_spans(record: dict, tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The chat-template rendering of `record` and the character spans of its target assistant turns.

    A turn's span starts where the rendered conversation before it, with the generation prompt
    (``<|im_start|>assistant\\n``), ends (a prefix-diff), and ends after the template's end-of-turn
    text (``<|im_end|>``) following the message's content; the newline after it is not a target. A
    conversation that opens with an assistant message has nothing before it to render: its first turn
    starts after the first generation prompt text in the rendering.

    `RecordError` if the template cannot render the record, or renders it so that a turn cannot be
    located (a content it drops or rewrites, e.g. ``<think>`` reasoning it strips).
    """
    messages, train_from = record["messages"], record["train_from"]
    text = _render(tokenizer, messages, tokenize=False)
    end_of_turn = _end_of_turn(tokenizer)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < train_from:
            continue
        if i == 0:
            header = _generation_prompt(tokenizer)
            start = text.find(header) + len(header) if header and header in text else -1
            if start < 0:
                raise RecordError(
                    "it starts with an assistant message, and the chat template renders no generation "
                    "prompt to locate that turn by"
                )
        else:
            before = _render(tokenizer, messages[:i], tokenize=False, add_generation_prompt=True)
            if not text.startswith(before):
                raise RecordError(
                    "the tokenizer's chat template renders a conversation's start differently from the "
                    "whole conversation, so the assistant turns cannot be located"
                )
            start = len(before)
        _, end = _find_content(text, message["content"], start)
        if end < 0:
            raise RecordError(
                f"the chat template dropped assistant message {i}'s content (or rewrote it, e.g. "
                "<think> reasoning)"
            )
        if end_of_turn:
            close = text.find(end_of_turn, end)
            end = len(text) if close < 0 else close + len(end_of_turn)
        spans.append((start, end))
    return text, spans


def chat_tokens(record: dict, tokenizer) -> tuple[list[int], list[bool]]:
    """Token ids of `record` rendered with the tokenizer's chat template, and which are targets.

    Targets are exactly the tokens of the assistant turns (from ``train_from`` on) and their end-of-turn
    token. Templates that mark assistant output with ``{% generation %}`` give the mask themselves
    (``return_assistant_tokens_mask``); for the others it comes from `assistant_spans` and the token
    offsets. `RecordError` for a record the template cannot render or mask (`tokenize` drops it).
    """
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise UsageError(
            "the dataset has chat records ('messages' or 'prompt' / 'completion') but the tokenizer has no "
            "chat template"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise UsageError("chat records need a fast tokenizer (one with offset mappings)")
    messages, train_from = record["messages"], record["train_from"]
    if isinstance(template, str) and _GENERATION_TAG.search(template):
        out = _render(tokenizer, messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, targets = list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]
        if train_from:
            before = _render(tokenizer, messages[:train_from], tokenize=False, add_generation_prompt=True)
            prompt_ids = tokenizer(before, add_special_tokens=False)["input_ids"]
            targets[: len(prompt_ids)] = [False] * min(len(prompt_ids), len(targets))
        return ids, targets
    text, spans = assistant_spans(record, tokenizer)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    targets = [
        end > start and any(a <= start < b for a, b in spans) for start, end in encoded["offset_mapping"]
    ]
    return list(encoded["input_ids"]), targets


@dataclass
class TokenizedSamples:
    """Token sequences stored flat: sample ``i`` is ``tokens[offsets[i]:offsets[i + 1]]``.

    ``targets`` is parallel to ``tokens``: True where the token is predicted by the loss.
    """

    tokens: torch.Tensor  # [total] int64
    targets: torch.Tensor  # [total] bool
    offsets: torch.Tensor  # [num_samples + 1] int64

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        return self.tokens[start:end], self.targets[start:end]

    @property
    def num_tokens(self) -> int:
        return self.tokens.numel()

    @property
    def num_targets(self) -> int:
        return int(self.targets.sum())

    @classmethod
    def from_lists(cls, sequences: Sequence[tuple[list[int], list[bool]]]) -> TokenizedSamples:
        lengths = torch.tensor([len(ids) for ids, _ in sequences], dtype=torch.int64)
        offsets = torch.zeros(len(sequences) + 1, dtype=torch.int64)
        torch.cumsum(lengths, 0, out=offsets[1:])
        tokens = torch.tensor([t for ids, _ in sequences for t in ids], dtype=torch.int64)
        targets = torch.tensor([m for _, mask in sequences for m in mask], dtype=torch.bool)
        return cls(tokens=tokens, targets=targets, offsets=offsets)


@dataclass
class TokenizeReport:
    """What tokenization kept and dropped (printed by the CLI).

    ``no_target`` counts the sequences that never had a target token; ``truncated_away`` those whose
    every target token lay beyond `seq_len` (a prompt longer than it), which truncation removed;
    ``unmaskable`` names the chat records the template cannot render or mask, ``(where, why)``
    (`RecordError`), dropped before tokenization.
    """

    kept: int
    too_short: int
    no_target: int
    truncated: int
    truncated_away: int = 0
    unmaskable: list[tuple[str, str]] = field(default_factory=list)


def tokenize(
    texts: Iterable[Sample],
    tokenizer,
    *,
    seq_len: int,
    loss_only_on_response: bool = False,
    pack: bool = False,
) -> tuple[TokenizedSamples, TokenizeReport]:
    """Tokenize `texts` into sequences of at most `seq_len` tokens with their target masks.

    A text is the tokenizer's encoding (with its own special tokens, e.g. a BOS) plus EOS; a chat record
    (`chat_record`) is its chat-template rendering, with the assistant turns as targets (`chat_tokens`).
    Without `pack`, a sample longer than `seq_len` is truncated; with `pack`, all samples are concatenated and
    cut into `seq_len`-token blocks (the last, shorter block is kept if it has a target). Sequences with
    fewer than 2 tokens, or no target token (none at all, or none left after truncation), are dropped
    and counted; so is a chat record the template cannot render or mask (`RecordError`), by name.

    Example:
        >>> from fusedkd.distill.tokenizer import train_bpe_tokenizer
        >>> tokenizer = train_bpe_tokenizer(["hello world"] * 10, vocab_size=280)
        >>> samples, report = tokenize(["hello world", ""], tokenizer, seq_len=16)
        >>> report.kept, report.too_short
        (1, 1)
        >>> ids, targets = samples[0]
        >>> tokenizer.decode(ids), targets.tolist()[0], bool(targets[-1])
        ('hello world<|endoftext|>', False, True)
    """
    if seq_len < 2:
        raise UsageError(f"--seq-len must be at least 2 (one input and one target token), got {seq_len}")
    texts = list(texts)
    eos = tokenizer.eos_token_id
    plain = [i for i, text in enumerate(texts) if isinstance(text, str)]
    if loss_only_on_response and plain and not getattr(tokenizer, "is_fast", False):
        raise UsageError("--loss-only-on-response needs a fast tokenizer (one with offset mappings)")
    encoded = (
        tokenizer([texts[i] for i in plain], return_offsets_mapping=loss_only_on_response) if plain else {}
    )
    encoded_at = {i: n for n, i in enumerate(plain)}
    report = TokenizeReport(kept=0, too_short=0, no_target=0, truncated=0)
    sequences: list[tuple[list[int], list[bool]]] = []
    for i, sample in enumerate(texts):
        if not isinstance(sample, str):  # a chat record: rendered with the template, which ends each turn
            try:
                sequences.append(chat_tokens(sample, tokenizer))
            except RecordError as exc:
                report.unmaskable.append((getattr(sample, "where", "") or f"sample {i}", str(exc)))
            continue
        n = encoded_at[i]
        ids = list(encoded["input_ids"][n])
        if loss_only_on_response:
            spans = response_spans(sample)
            targets = [
                end > start and any(a <= start < b for a, b in spans)
                for start, end in encoded["offset_mapping"][n]
            ]
        else:
            targets = [True] * len(ids)
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
            # EOS closes the sample: a target if the sample's last token was (or, plain text, always).
            targets.append(targets[-1] if (loss_only_on_response and targets) else not loss_only_on_response)
        sequences.append((ids, targets))

    if pack:
        flat_ids = [t for ids, _ in sequences for t in ids]
        flat_targets = [m for _, mask in sequences for m in mask]
        sequences = [
            (flat_ids[s : s + seq_len], flat_targets[s : s + seq_len])
            for s in range(0, len(flat_ids), seq_len)
        ]

    kept = []
    for ids, targets in sequences:
        had_targets = any(targets[1:])
        if len(ids) > seq_len:
            ids, targets = ids[:seq_len], targets[:seq_len]
            report.truncated += 1
        if len(ids) < 2:
            report.too_short += 1
            continue
        targets = [False] + targets[1:]  # the first token has nothing before it
        if not any(targets):
            if had_targets:  # all of them beyond seq_len
                report.truncated_away += 1
            else:
                report.no_target += 1
            continue
        kept.append((ids, targets))
    report.kept = len(kept)
    return TokenizedSamples.from_lists(kept), report


# ----------------------------------------------------------------------------------------------------------
# Batching


@dataclass
class Batch:
    """A right-padded batch. ``labels[b, i]`` is the target of position i (token i+1), or IGNORE_INDEX."""

    input_ids: torch.Tensor  # [B, L] int64
    attention_mask: torch.Tensor  # [B, L] int64, 1 on real tokens
    labels: torch.Tensor  # [B, L] int64, already shifted
    sample_indices: torch.Tensor  # [B] int64, which samples (for the top-k cache)

    @property
    def num_targets(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def to(self, device: torch.device) -> Batch:
        return Batch(
            input_ids=self.input_ids.to(device, non_blocking=True),
            attention_mask=self.attention_mask.to(device, non_blocking=True),
            labels=self.labels.to(device, non_blocking=True),
            sample_indices=self.sample_indices,
        )


def collate(
    samples: TokenizedSamples,
    indices: Sequence[int],
    *,
    pad_id: int,
    weight_mask: Sequence[bool] | None = None,
) -> Batch:
    """Right-pad samples `indices` into a `Batch`; labels come from the target and attention masks.

    `weight_mask`, if given, marks which rows count: rows with False get no label at all (used to pad
    an evaluation shard to the same number of batches on every process).

    Example:
        >>> samples = TokenizedSamples.from_lists([([5, 6, 0], [False, True, True]), ([7, 0], [False, True])])
        >>> batch = collate(samples, [0, 1], pad_id=0)
        >>> batch.labels.tolist()   # EOS (= pad id 0) stays a target; the padding position does not
        [[6, 0, -100], [0, -100, -100]]
    """
    rows = [samples[int(i)] for i in indices]
    length = max(ids.numel() for ids, _ in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.int64)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.int64)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.int64)
    for b, (ids, targets) in enumerate(rows):
        n = ids.numel()
        input_ids[b, :n] = ids
        attention_mask[b, :n] = 1
        if weight_mask is None or weight_mask[b]:
            # position i predicts token i + 1, where token i + 1 is a real (attended) target token
            labels[b, : n - 1] = torch.where(targets[1:], ids[1:], IGNORE_INDEX)
    return Batch(input_ids, attention_mask, labels, torch.as_tensor(list(indices), dtype=torch.int64))


@dataclass(frozen=True)
class BatchPlan:
    """Which samples every process takes at every optimizer step: a pure function of (seed, epoch, step).

    The global batch of a step is ``batch_size * grad_accum * world_size`` samples of a seeded
    permutation of the training set (one permutation per epoch; the incomplete tail is dropped). Micro-
    batch ``m`` of process ``r`` is the ``(m * world_size + r)``-th block of `batch_size` samples of it,
    so a run with the same global batch on any number of processes sees the same samples per step.
    """

    num_samples: int
    batch_size: int
    grad_accum: int
    world_size: int
    seed: int

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=generator)

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """The `grad_accum` lists of sample indices process `rank` takes at optimizer step `step`.

        Example:
            >>> plan = BatchPlan(num_samples=10, batch_size=2, grad_accum=1, world_size=2, seed=0)
            >>> one = BatchPlan(num_samples=10, batch_size=4, grad_accum=1, world_size=1, seed=0)
            >>> two_processes = plan.micro_batches(3, 0)[0] + plan.micro_batches(3, 1)[0]
            >>> sorted(two_processes) == sorted(one.micro_batches(3, 0)[0])
            True
        """
        epoch, within = divmod(step, self.steps_per_epoch)
        order = self.permutation(epoch)[within * self.global_batch : (within + 1) * self.global_batch]
        return [
            order[(m * self.world_size + rank) * self.batch_size :][: self.batch_size].tolist()
            for m in range(self.grad_accum)
        ]
