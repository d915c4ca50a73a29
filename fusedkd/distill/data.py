"""Records in, token sequences out: loading, marking which tokens are targets, tokenizing in parallel.

Plain text trains on every token (with ``loss_only_on_response``, on its ``### Assistant:`` turns); chat
records (``messages``, or ``prompt`` + ``completion``) on their assistant turns, masked as TRL does: by a
template's ``{% generation %}`` markers (the tokenizer's, or TRL's training template of its family), else by a
prefix-diff of renderings. A record no template can mask is dropped, counted and named (``file:line``)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from fusedkd.distill.errors import UsageError, first_line

IGNORE_INDEX = -100
LOCAL_SUFFIXES = (".json", ".jsonl", ".txt")
TURN_MARKER = re.compile(r"###\s*(Human|Assistant)\s*:")  # openassistant-guanaco turns
# The families whose training templates TRL ships, and what in a tokenizer's own template identifies them.
TEMPLATE_SIGNATURES = {
    "qwen3": ("<|im_start|>", "<think>", "last_query_index"),
    "llama3": ("<|start_header_id|>", "<|eot_id|>"),
    "gemma": ("<start_of_turn>", "<end_of_turn>"),
}
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
_PROBE = "\x00fusedkd-probe\x00"


def load_records(source: str, *, text_field: str = "text", split: str = "train", config_name=None) -> list:
    """The records of local .json / .jsonl / .txt (a file, or a directory's such files) or a Hub dataset."""
    path, expected = Path(source).expanduser(), "expected .json, .jsonl or .txt"
    if path.is_file() and path.suffix not in LOCAL_SUFFIXES:
        raise UsageError(f"dataset file {str(path)!r} has suffix {path.suffix!r}; {expected}")
    if path.exists():
        files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in LOCAL_SUFFIXES)
        if not files:
            raise UsageError(f"dataset directory {str(path)!r} has no data files: {expected}")
        records = [record for file in files for record in _read_local(file, text_field)]
    elif source.endswith(LOCAL_SUFFIXES) or source.startswith((".", "/", "~")):
        raise UsageError(f"dataset file {source!r} does not exist")
    else:
        import datasets

        try:
            dataset = datasets.load_dataset(source, config_name, split=split)
        except Exception as exc:  # unknown name, offline, bad split or config: many exception types
            where = f"dataset {source!r} (split {split!r}): no such local path, and the Hub says"
            raise UsageError(f"cannot load {where}: {first_line(exc)}") from None
        columns = set(dataset.column_names)
        if text_field not in columns and not {"messages", "prompt", "completion"} & columns:
            raise UsageError(
                f"dataset {source!r} has no text field {text_field!r} (fields: "
                f"{', '.join(dataset.column_names)}); choose one with --text_field"
            )
        records = [_record(dict(row), text_field, f"{source}[{i}]") for i, row in enumerate(dataset)]
    if not records:
        raise UsageError(f"dataset {source!r} is empty: it has no samples")
    return records


def _read_local(path: Path, text_field: str) -> list[dict]:
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read dataset file {str(path)!r}: {exc}") from None
    lines = [(n, line) for n, line in enumerate(content.splitlines(), start=1) if line.strip()]
    if path.suffix == ".txt":
        return [{"text": line, "where": f"{path}:{n}"} for n, line in lines]
    if path.suffix == ".jsonl":
        records = []
        for n, line in lines:
            try:
                records.append(_record(json.loads(line), text_field, f"{path}:{n}"))
            except json.JSONDecodeError as exc:
                raise UsageError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
        return records
    try:
        rows = json.loads(content)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(rows, list):
        raise UsageError(f"{path}: expected a JSON list of records, got a {type(rows).__name__}")
    return [_record(row, text_field, f"{path}[{i}]") for i, row in enumerate(rows)]


def _record(raw: object, text_field: str, where: str) -> dict:
    """``{"text", "where"}``, or a chat record ``{"messages", "train_from", "where"}`` (its messages from
    ``train_from`` on are the completion: its assistant turns are the targets)."""
    if isinstance(raw, str):
        return {"text": raw, "where": where}
    if not isinstance(raw, dict):
        raise UsageError(f"{where}: expected a JSON object or string, got {type(raw).__name__}")
    fields, kind = ", ".join(map(repr, raw)) or "none", type(raw.get(text_field)).__name__
    if text_field in raw and kind != "str":
        raise UsageError(f"{where}: field {text_field!r} is a {kind}, not a string")
    if text_field in raw:
        return {"text": raw[text_field], "where": where}
    if "messages" in raw:
        return {
            "messages": _messages(raw["messages"], f"{where}: 'messages'", "user"),
            "train_from": 0,
            "where": where,
        }
    for have, missing in (("prompt", "completion"), ("completion", "prompt")):
        if have in raw and missing not in raw:
            raise UsageError(
                f"{where}: a prompt/completion record needs a {missing!r} field too (fields: {fields})"
            )
    if "prompt" not in raw:
        raise UsageError(
            f"{where}: no text field {text_field!r} (fields: {fields}); choose one with --text_field"
        )
    prompt = _messages(raw["prompt"], f"{where}: 'prompt'", "user")
    completion = _messages(raw["completion"], f"{where}: 'completion'", "assistant")
    return {"messages": prompt + completion, "train_from": len(prompt), "where": where}


def _messages(value: object, where: str, default_role: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if not isinstance(value, list) or not value:
        raise UsageError(f"{where}: expected a non-empty list of messages, got {type(value).__name__}")
    for n, message in enumerate(value):
        if not all(
            isinstance(message, dict) and isinstance(message.get(k), str) for k in ("role", "content")
        ):
            raise UsageError(f"{where}: message {n} must have string 'role' and 'content': {message!r:.80}")
    return [dict(message) for message in value]


def training_template(tokenizer, choice: str = "auto") -> tuple[str | None, str]:
    """The chat template that masks chat records, and what it is (for the log).

    `choice`: ``auto`` (the tokenizer's if it has ``{% generation %}`` markers; else TRL's training
    template of its family, Qwen3, Llama 3 or Gemma, if recognised and rendering a probe conversation the
    same; else the tokenizer's, masked by prefix-diff), ``tokenizer``, a family's name, or a .jinja file."""
    own = tokenizer.chat_template if isinstance(getattr(tokenizer, "chat_template", None), str) else None
    if choice in TEMPLATE_SIGNATURES or choice.endswith(".jinja"):
        path = training_template_path(choice) if choice in TEMPLATE_SIGNATURES else Path(choice).expanduser()
        if path is None:
            raise UsageError(f"--chat_template {choice} needs TRL (pip install trl), or pass a .jinja")
        try:
            return path.read_text(encoding="utf-8"), str(path)
        except OSError as exc:
            raise UsageError(f"--chat_template {choice!r}: cannot read it: {exc.strerror or exc}") from None
    if choice not in ("auto", "tokenizer"):
        raise UsageError(
            f"--chat_template: auto, tokenizer, qwen3, llama3, gemma or a .jinja, not {choice!r}"
        )
    if choice == "tokenizer" or own is None or GENERATION_TAG.search(own):
        return own, "the tokenizer's"
    probe = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    for name, signature in TEMPLATE_SIGNATURES.items():
        if (path := training_template_path(name)) is None:  # no TRL: the tokenizer's, by prefix-diff
            break
        shipped = path.read_text(encoding="utf-8")
        render = partial(tokenizer.apply_chat_template, probe, tokenize=False)
        try:
            same = all(s in own for s in signature) and render() == render(chat_template=shipped)
        except Exception:  # a template that cannot render the probe is not the family's
            same = False
        if same:
            return shipped, f"TRL's {name} training template (the tokenizer's is {name}'s)"
    return own, "the tokenizer's (no generation markers: assistant turns located by prefix-diff)"


def training_template_path(name: str) -> Path | None:
    """TRL's training template of a model family (``{% generation %}`` markers), reused as TRL ships it
    (``trl/chat_templates/<name>_training.jinja``); None when TRL is not installed."""
    spec = importlib.util.find_spec("trl")
    folder = Path(spec.origin).parent / "chat_templates" if spec and spec.origin else None
    return None if folder is None else folder / f"{name}_training.jinja"


class RecordError(Exception):
    """A chat record the template cannot render or mask: dropped, counted and named, never the run."""


def _render(tokenizer, template, messages, **kwargs):
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, **kwargs)
    except Exception as exc:  # jinja's TemplateError (the template's raise_exception), ValueError, ...
        raise RecordError(f"the chat template cannot render it: {first_line(exc)}") from None


def _prefix_spans(tokenizer, template, messages: list[dict], train_from: int) -> tuple[str, list]:
    """The rendering and the character spans of its target assistant turns, by prefix-diff: a turn starts
    where the rendering of the conversation before it, with the generation prompt, ends (after the first
    generation prompt for a conversation that opens with it), and ends after the end-of-turn text
    (``<|im_end|>``) that follows its content, found as is or stripped (Llama 3 trims it)."""
    render = partial(_render, tokenizer, template)
    text = render(messages, tokenize=False)
    turn = [{"role": "user", "content": "q"}, {"role": "assistant", "content": _PROBE}]
    closing = render(turn, tokenize=False)
    end_of_turn = closing[closing.rindex(_PROBE) + len(_PROBE) :].rstrip() if _PROBE in closing else ""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < train_from:
            continue
        if i == 0:
            plain = render(turn[:1], tokenize=False)
            header = render(turn[:1], tokenize=False, add_generation_prompt=True)[len(plain) :]
            if not header or header not in text:
                raise RecordError(
                    "it starts with an assistant message, and the chat template renders no generation prompt "
                    "to locate that turn by"
                )
            start = text.index(header) + len(header)
        else:
            before = render(messages[:i], tokenize=False, add_generation_prompt=True)
            if not text.startswith(before):
                raise RecordError(
                    f"the chat template renders the conversation before assistant message {i} differently "
                    "from the whole conversation"
                )
            start = len(before)
        content = message["content"]
        found = next((c for c in (content, content.strip()) if text.find(c, start) >= 0), None)
        if found is None:
            raise RecordError(
                f"the chat template dropped or rewrote assistant message {i}'s content (e.g. <think> "
                "reasoning); a template with {% generation %} markers masks it"
            )
        end = text.find(found, start) + len(found)
        if end_of_turn:  # the turn ends after the template's end-of-turn text
            close = text.find(end_of_turn, end)
            end = len(text) if close < 0 else close + len(end_of_turn)
        spans.append((start, end))
    return text, spans


def chat_tokens(record: dict, tokenizer, template: str | None) -> tuple[list[int], list[bool]]:
    """A chat record's token ids and targets: its assistant turns from ``train_from`` on (with their
    end-of-turn token). From the template's ``{% generation %}`` markers (``return_assistant_tokens_mask``)
    if it has them, else from `_prefix_spans` and the token offsets. `RecordError` if it cannot be masked."""
    messages, train_from = record["messages"], record["train_from"]
    render = partial(_render, tokenizer, template)
    if template and GENERATION_TAG.search(template):
        out = render(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, targets = list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]
        if train_from:
            before = render(messages[:train_from], tokenize=False, add_generation_prompt=True)
            prompt = len(tokenizer(before, add_special_tokens=False)["input_ids"])
            targets[:prompt] = [False] * min(prompt, len(targets))
        if not any(targets):
            raise RecordError("the chat template marks none of its tokens as an assistant turn")
        return ids, targets
    text, spans = _prefix_spans(tokenizer, template, messages, train_from)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    targets = [b > a and any(s <= a < e for s, e in spans) for a, b in encoded["offset_mapping"]]
    return list(encoded["input_ids"]), targets


def response_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the assistant turns of a ``### Human: / ### Assistant:`` text, less trailing
    whitespace (a token opening the next turn is not a target).

    Example:
        >>> text = "### Human: hi ### Assistant: hello ### Human: bye ### Assistant: ciao"
        >>> [text[a:b] for a, b in response_spans(text)]
        [' hello', ' ciao']"""
    markers, spans = list(TURN_MARKER.finditer(text)), []
    for i, marker in enumerate(markers):
        if marker.group(1) == "Assistant":
            end = markers[i + 1].start() if i + 1 < len(markers) else len(text)
            spans.append((marker.end(), marker.end() + len(text[marker.end() : end].rstrip())))
    return spans


def _tokenize_one(record: dict, tokenizer, template, loss_only_on_response: bool) -> dict:
    """One record's ``input_ids`` and ``targets``, or why it is ``dropped`` (a ``datasets.map`` function)."""
    if record["chat"]:
        try:
            ids, targets = chat_tokens(json.loads(record["chat"]), tokenizer, template)
        except RecordError as exc:
            return {"input_ids": [], "targets": [], "dropped": str(exc)}
        return {"input_ids": ids, "targets": targets, "dropped": ""}
    encoded = tokenizer(record["text"], return_offsets_mapping=loss_only_on_response)
    ids, targets = list(encoded["input_ids"]), [True] * len(encoded["input_ids"])
    if loss_only_on_response:
        spans = response_spans(record["text"])
        targets = [b > a and any(s <= a < e for s, e in spans) for a, b in encoded["offset_mapping"]]
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)  # closes the sample: a target if the last token was
        targets.append(targets[-1] if targets else not loss_only_on_response)
    return {"input_ids": ids, "targets": targets, "dropped": ""}


@dataclass
class TokenizedSamples:
    """Token sequences stored flat: sample ``i`` is ``tokens[offsets[i]:offsets[i + 1]]``, with targets."""

    tokens: torch.Tensor  # [total] int64
    targets: torch.Tensor  # [total] bool
    offsets: torch.Tensor  # [num_samples + 1] int64

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    def __getitem__(self, index: int) -> dict:
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        return {"input_ids": self.tokens[start:end], "targets": self.targets[start:end], "index": index}

    @property
    def num_targets(self) -> int:
        return int(self.targets.sum())

    @classmethod
    def from_lists(cls, sequences: list[tuple[list[int], list[bool]]]) -> TokenizedSamples:
        lengths = torch.tensor([len(ids) for ids, _ in sequences], dtype=torch.int64)
        tokens = torch.tensor([t for ids, _ in sequences for t in ids], dtype=torch.int64)
        targets = torch.tensor([m for _, mask in sequences for m in mask], dtype=torch.bool)
        return cls(tokens, targets, torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]))

    def fingerprint(self, targets: bool = True) -> str:
        """A hash of the tokens (and targets): a resume must match it, a top-k cache its tokens."""
        digest = hashlib.sha256()
        for tensor in [self.tokens, self.offsets] + ([self.targets] if targets else []):
            digest.update(tensor.numpy().tobytes())
        return digest.hexdigest()[:16]


@dataclass
class TokenizeReport:
    """What tokenization kept and dropped; `unmaskable`: ``(where, why)`` of the chat records dropped."""

    kept: int = 0
    too_short: int = 0
    no_target: int = 0
    truncated: int = 0
    truncated_away: int = 0
    unmaskable: list = field(default_factory=list)
    targets: int = 0

    def named(self, most: int = 5) -> str:
        """The first `most` dropped chat records as ``where (why)``, and how many more there are."""
        more = len(self.unmaskable) - most
        return "; ".join(f"{w} ({why})" for w, why in self.unmaskable[:most]) + f"; and {more} more" * (
            more > 0
        )

    def _causes(self, seq_len: int) -> list[tuple[int, str, str, str]]:
        """``(count, said of one sample, of several, in short)`` of each reason samples were dropped."""
        marker = "no target token (no assistant turn, or no '### Assistant:' marker?)"
        cut = f"target tokens to truncation at --seq_len {seq_len}"
        mask = f"the chat template cannot mask: {self.named()}"
        causes = [
            (self.truncated_away, f"lost all its {cut}: its prompt is longer; raise --seq_len",
             f"lost all their {cut}", f"without targets once truncated to --seq_len {seq_len}"),
            (self.no_target, f"has {marker}", f"have {marker}", "without targets"),
            (self.too_short, "is shorter than 2 tokens", "are shorter than 2 tokens", "under 2 tokens"),
            (len(self.unmaskable), f"is a chat record {mask}", f"are chat records {mask}",
             "chat records the template cannot mask"),
        ]  # fmt: skip
        return [cause for cause in causes if cause[0]]

    def summary(self, seq_len: int) -> str:
        """What was kept, dropped (how many, why) and truncated, in one line."""
        dropped = ", ".join(f"{cause[0]} {cause[3]}" for cause in self._causes(seq_len))
        return (
            f"{self.kept} sequences, {self.targets:,} target tokens"
            + (f" (dropped: {dropped})" if dropped else "")
            + (f", {self.truncated} truncated to {seq_len} tokens" if self.truncated else "")
        )

    def nothing_left(self, what: str, seq_len: int) -> str:
        """The error when no sequence is left: why the samples went, in one line."""
        causes = self._causes(seq_len)
        if len(causes) == 1:
            return f"every {what} sample {causes[0][1]}: nothing to train on"
        listed = "; ".join(f"{cause[0]} {cause[2]}" for cause in causes)
        return f"no {what} sample is left: {listed}: nothing to train on"


def tokenize(records: list, tokenizer, *, seq_len: int, loss_only_on_response: bool = False, pack=False,
             chat_template: str = "auto", num_proc: int = 1, cache_dir: Path | None = None):  # fmt: skip
    """`records` (`load_records`, or strings) as ``(TokenizedSamples, TokenizeReport)``: ``datasets.map`` over
    `num_proc` processes (cached in `cache_dir` under a hash of everything it depends on), then packed
    into `seq_len` blocks or truncated; dropped and counted: sequences under 2 tokens, without targets
    (or with all of them truncated away), and chat records the template cannot mask.

    Example:
        >>> from fusedkd.distill.default import train_bpe_tokenizer
        >>> tokenizer = train_bpe_tokenizer(["hello world"] * 10, vocab_size=280)
        >>> samples, report = tokenize(["hello world", ""], tokenizer, seq_len=16)
        >>> report.kept, report.too_short, tokenizer.decode(samples[0]["input_ids"])
        (1, 1, 'hello world<|endoftext|>')"""
    import datasets

    if seq_len < 2:
        raise UsageError(f"--seq_len must be at least 2 (one input and one target token), got {seq_len}")
    records = [
        r if isinstance(r, dict) else {"text": r, "where": f"sample {i}"} for i, r in enumerate(records)
    ]
    chats = any("messages" in r for r in records)
    template = training_template(tokenizer, chat_template)[0] if chats else None
    if chats and template is None:
        raise UsageError(
            "the dataset has chat records ('messages' or 'prompt' / 'completion') but the tokenizer has no "
            "chat template"
        )
    if (chats or loss_only_on_response) and not getattr(tokenizer, "is_fast", False):
        raise UsageError("chat records and --loss_only_on_response need a fast tokenizer (offset mappings)")
    rows = [
        {"text": r.get("text", ""), "chat": json.dumps(r) * ("messages" in r), "where": r["where"]}
        for r in records
    ]
    kwargs = {}
    if cache_dir is not None:  # the key: everything the result depends on
        from fusedkd.distill.models import tokenizer_fingerprint

        key = hashlib.sha256(
            json.dumps([tokenizer_fingerprint(tokenizer), template, loss_only_on_response]).encode()
        )
        for row in rows:
            key.update(json.dumps(row).encode())
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        name = f"tokenized-{key.hexdigest()[:16]}"
        kwargs = dict(cache_file_name=str(Path(cache_dir) / f"{name}.arrow"), new_fingerprint=name)
    datasets.disable_progress_bars()
    fn_kwargs = dict(tokenizer=tokenizer, template=template, loss_only_on_response=loss_only_on_response)
    kwargs |= dict(num_proc=num_proc if num_proc > 1 else None, remove_columns=["text", "chat"])
    dataset = datasets.Dataset.from_list(rows).map(_tokenize_one, fn_kwargs=fn_kwargs, **kwargs)
    report, sequences = TokenizeReport(), []
    for where, ids, targets, dropped in zip(
        *(dataset[c] for c in ("where", "input_ids", "targets", "dropped"))
    ):
        if dropped:
            report.unmaskable.append((where, dropped))
        else:
            sequences.append((ids, targets))
    if pack:
        ids = [t for sequence, _ in sequences for t in sequence]
        targets = [m for _, mask in sequences for m in mask]
        sequences = [(ids[s : s + seq_len], targets[s : s + seq_len]) for s in range(0, len(ids), seq_len)]
    kept = []
    for ids, targets in sequences:
        had_targets = any(targets[1:])
        if len(ids) > seq_len:
            ids, targets, report.truncated = ids[:seq_len], targets[:seq_len], report.truncated + 1
        targets = [False] + list(targets[1:])  # the first token has nothing before it
        if len(ids) < 2:
            report.too_short += 1
        elif not any(targets):
            report.truncated_away += had_targets
            report.no_target += not had_targets
        else:
            kept.append((ids, targets))
    samples = TokenizedSamples.from_lists(kept)
    report.kept, report.targets = len(kept), samples.num_targets
    return samples, report


class Collator:
    """Right-pads `TokenizedSamples` items into a batch: labels from the targets (never from the pad id,
    which is EOS for Qwen: the real EOS targets would be lost), -100 elsewhere and on rows marked
    ``live=False`` (evaluation padding); ``index``: which samples (the top-k cache's key).

    Example:
        >>> samples = TokenizedSamples.from_lists([([5, 6, 0], [False, True, True]), ([7, 0], [False, True])])
        >>> Collator(pad_id=0)([samples[0], samples[1]])["labels"].tolist()
        [[-100, 6, 0], [-100, 0, -100]]"""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict:
        length = max(row["input_ids"].numel() for row in rows)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.int64)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.int64)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.int64)
        for b, row in enumerate(rows):
            ids, n = row["input_ids"], row["input_ids"].numel()
            input_ids[b, :n], attention_mask[b, :n] = ids, 1
            if row.get("live", True):
                labels[b, :n] = torch.where(row["targets"], ids, IGNORE_INDEX)
        index = torch.tensor([row["index"] for row in rows], dtype=torch.int64)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "index": index}
