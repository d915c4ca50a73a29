"""Models: the embedded default's scaled-down Qwen3 pair, loading real ones (the teacher sharded with its
head whole and loaded by rank 0 only), the startup head check, and what identifies tokenizers and weights.

The loss needs each model's final hidden states (`hidden_states`: the base model only, no logits) and its
lm_head's weight and bias, with the head transform (logit scale, soft cap) its config declares."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from fusedkd.distill.errors import UsageError, first_line
from fusedkd.heads import HeadTransform, head_transform

# Qwen3-4B and Qwen3-0.6B scaled down (hidden / 10 and / 8, depth / 9, head_dim 64), keeping their ratios
# of width, depth and MLP expansion, GQA and tied embeddings: 4.8M and 1.1M parameters at 4,096 tokens.
TINY_TEACHER_SHAPE = dict(
    hidden_size=256, intermediate_size=960, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2
)
TINY_STUDENT_SHAPE = dict(
    hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1
)
PROBE_TOKENS = 16  # tokens of the startup head check's batch
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")


def qwen3_config(shape: dict, *, vocab_size: int, max_positions: int, eos_token_id: int):
    """A ``Qwen3Config`` of `shape` (head_dim 64 unless it says), tied embeddings, EOS as padding."""
    from transformers import Qwen3Config

    tokens = dict(eos_token_id=eos_token_id, pad_token_id=eos_token_id, bos_token_id=None)
    shape = {"head_dim": 64, **shape, "vocab_size": vocab_size, "max_position_embeddings": max_positions}
    return Qwen3Config(**shape, tie_word_embeddings=True, **tokens)


def build_model(config, *, seed: int):
    """A freshly initialized causal LM for `config`, reproducible from `seed`."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config)


def quiet_transformers() -> None:
    """Silence transformers' progress bars and info logs: the recipe's own messages say enough."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def _locate(name_or_path: str, role: str) -> tuple[str, bool]:
    """(what to pass to from_pretrained, whether it is a local directory); a missing path is an error."""
    path = os.path.expanduser(name_or_path)
    local = os.path.isdir(path)
    if not local and (name_or_path.startswith((".", "/", "~")) or os.path.exists(path)):
        raise UsageError(f"--{role} {name_or_path!r}: no such directory")
    return path, local


def load_tokenizer(name_or_path: str, *, role: str):
    from transformers import AutoTokenizer

    path = _locate(name_or_path, role)[0]
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # OSError, ValueError, Hub errors
        raise UsageError(f"--{role} {name_or_path!r}: cannot load its tokenizer: {first_line(exc)}") from None


def load_model(name_or_path: str, *, role: str, dtype: torch.dtype | None = None):
    """``AutoModelForCausalLM.from_pretrained``; a `UsageError` if it cannot be loaded, has no lm_head, or
    declares a head transform fusedkd does not apply (`fusedkd.head_transform`)."""
    from transformers import AutoModelForCausalLM

    path, local = _locate(name_or_path, role)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except Exception as exc:  # OSError (missing), ValueError (unknown architecture), Hub errors
        where = "the local directory could not be loaded" if local else "no such local directory, and the Hub"
        raise UsageError(f"--{role} {name_or_path!r}: {where}: {first_line(exc)}") from None
    if model.get_output_embeddings() is None:
        raise UsageError(f"--{role}: the model has no output embedding (lm_head); is it a causal LM?")
    try:
        head_transform(model.config)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"--{role}: {exc}") from None
    return model


def check_tokenizers(teacher_tokenizer, student_tokenizer) -> None:
    """`UsageError` unless the tokenizers map the same tokens to the same ids (before any weights load)."""
    if teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise UsageError(
            f"the teacher's and the student's tokenizers differ ({len(teacher_tokenizer)} vs "
            f"{len(student_tokenizer)} tokens, different ids): distillation compares distributions token by "
            "token, so use a student with the teacher's tokenizer (same model family)"
        )


def check_vocabularies(tokenizer, rows_teacher: int, rows_student: int, vocab_size: int | None) -> int:
    """The vocabulary rows the loss uses: both heads' size, or `vocab_size` (``--vocab_size``, for heads
    padded to different sizes), at least the tokenizer's size; else a `UsageError`."""
    needed = len(tokenizer)
    if vocab_size is None:
        if rows_teacher != rows_student:
            raise UsageError(
                f"the teacher's lm_head has {rows_teacher} rows and the student's {rows_student}: pass "
                f"--vocab_size {needed} (the tokenizer's size) to distill over the shared rows"
            )
        vocab_size = rows_student
    if not needed <= vocab_size <= min(rows_teacher, rows_student):
        raise UsageError(
            f"--vocab_size {vocab_size} must be at least the tokenizer's {needed} tokens and at most the "
            f"smaller head's {min(rows_teacher, rows_student)} rows"
        )
    return vocab_size


def load_teacher(name_or_path: str, *, dtype, device: torch.device, probe: torch.Tensor, shard: bool):
    """The teacher, checked (`check_linear_head` on `probe`), frozen, on `device`: whole, or sharded.

    With `shard` (``--shard_teacher``, under torchrun) only rank 0 loads the checkpoint; every process
    builds the model with its parameters on the meta device (buffers real: the rotary frequencies are
    not in a checkpoint), shards it (`shard_teacher`), allocates its shards and receives their values
    from rank 0 (``broadcast_from_rank0``): no other process ever holds the whole teacher."""
    if not shard:
        teacher = load_model(name_or_path, role="teacher", dtype=dtype).to(device)
        check_linear_head(teacher, "teacher", probe)  # on the device: the teacher may be large
        return teacher.requires_grad_(False).eval()
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from transformers import AutoModelForCausalLM

    if not dist.is_initialized():
        raise UsageError("--shard_teacher shards the teacher across processes: run it under torchrun")
    full, message = None, None
    if dist.get_rank() == 0:
        try:
            full = load_model(name_or_path, role="teacher", dtype=dtype)
            check_linear_head(full, "teacher", probe)
        except UsageError as exc:
            message = str(exc)
    holder = [message, None if full is None else full.config]
    dist.broadcast_object_list(holder, src=0)
    if holder[0] is not None:
        raise UsageError(holder[0])
    register = torch.nn.Module.register_parameter

    def register_on_meta(module, name, parameter):  # (a parameter already on meta keeps its ties)
        if parameter is not None and parameter.device.type != "meta":
            parameter = torch.nn.Parameter(parameter.to("meta"), parameter.requires_grad)
        register(module, name, parameter)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        teacher = AutoModelForCausalLM.from_config(holder[1], dtype=dtype)
    finally:
        torch.nn.Module.register_parameter = register
    teacher.requires_grad_(False).eval()
    buffers = {name: buffer.clone() for name, buffer in teacher.named_buffers()}
    tied = teacher.get_output_embeddings().weight is teacher.get_input_embeddings().weight
    shard_teacher(teacher, device)
    teacher.to_empty(device=device)
    if tied:  # to_empty gives each module a new parameter: tie the (whole, ignored) head again
        teacher.get_output_embeddings().weight = teacher.get_input_embeddings().weight
    with torch.no_grad():
        for name, buffer in teacher.named_buffers():
            buffer.copy_(buffers[name])
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(teacher, full.state_dict() if full is not None else {}, options=options)
    return teacher


def shard_teacher(teacher: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Shard a frozen teacher with FSDP2: each decoder layer a unit resharded after its forward, the base
    model the root (resharded after every forward too, by a hook), the lm_head (and the embedding tied to
    it) ``ignored_params``: whole on every process, for the loss to read."""
    from torch.distributed.fsdp import fully_shard

    names = set(getattr(teacher, "_no_split_modules", None) or ())
    layers = [m for m in teacher.modules() if type(m).__name__ in names]
    if not layers:
        raise UsageError(f"--shard_teacher: {type(teacher).__name__} declares no decoder-layer classes")
    ignored = set(teacher.get_output_embeddings().parameters())
    for layer in layers:
        fully_shard(layer, reshard_after_forward=True)
    fully_shard(teacher.base_model, ignored_params=ignored, reshard_after_forward=True)
    teacher.base_model.register_forward_hook(lambda module, args, output: module.reshard())
    for parameter in ignored:
        if parameter.device != device and parameter.device.type != "meta":
            parameter.data = parameter.data.to(device)
    return teacher


@dataclass(frozen=True)
class Head:
    """An lm_head as the loss takes it: weight [V, H], bias [V] or None, logit transform (scale, soft cap)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    transform: HeadTransform = HeadTransform()


def lm_head(model) -> Head:
    head = model.get_output_embeddings()
    return Head(head.weight, getattr(head, "bias", None), head_transform(model.config))


def hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The final hidden states [B, L, H] of a causal LM's base model: what its lm_head would project."""
    output = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return output.last_hidden_state


@torch.no_grad()
def linear_head_error(model, input_ids: torch.Tensor) -> float:
    """Largest ``|model(x).logits - head(hidden @ W.T + b)|`` on `input_ids` relative to the logits' scale,
    ``head`` the transform of the model's config (logit scale, then soft cap). The loss computes logits
    that way; a model whose own logits are anything else (another multiplier, width scaling) would be
    distilled towards the wrong distribution. Both sides in the model's dtype, the transform in float32."""
    training = model.training
    model.eval()
    input_ids = input_ids.to(next(model.parameters()).device)
    try:
        mask = torch.ones_like(input_ids)
        logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits.float()
        hidden, head = hidden_states(model, input_ids, mask), lm_head(model)
        bias = None if head.bias is None else head.bias.to(hidden.dtype)
        ours = head.transform(torch.nn.functional.linear(hidden, head.weight.to(hidden.dtype), bias).float())
    finally:
        model.train(training)
    if logits.shape != ours.shape:
        return float("inf")
    return float((logits - ours).abs().max()) / (float(ours.abs().max()) + 1.0)


def check_linear_head(model, role: str, input_ids: torch.Tensor) -> None:
    """`UsageError` unless ``model(x).logits == head(hidden @ W.T + b)`` (`linear_head_error`) within 1e-4 of
    the logits' scale in float32, 2e-2 in bf16 / float16 (the same matmul's rounding); a logit multiplier
    of 1.05, or a soft cap on logits of size 10, is far outside it."""
    dtype = next(model.parameters()).dtype
    error = linear_head_error(model, input_ids)
    if not error <= (1e-4 if dtype in (torch.float32, torch.float64) else 2e-2):
        raise UsageError(
            f"--{role}: the model's logits are not its lm_head's W h + b through the head transform of "
            f"its config ({lm_head(model).transform}; relative difference {error:.3g} on a "
            f"{input_ids.shape[-1]}-token probe; other logit multipliers or scaling?): "
            "fusedkd's loss would distill the wrong distribution"
        )


def model_fingerprint(name_or_path: str, *, role: str) -> str:
    """What identifies a model's logits (the top-k cache's teacher): a sha256 of a local directory's config
    and weight files (all its files if none has a weight suffix), so that ``./t``, ``t/`` and a symlink
    agree and a teacher retrained over the same files does not; a Hub name at its resolved commit."""
    path, local = _locate(name_or_path, role)
    if not local:
        from transformers.utils.hub import cached_file, extract_commit_hash

        try:
            config = cached_file(path, "config.json")
        except Exception as exc:
            raise UsageError(
                f"--{role} {name_or_path!r}: cannot load its config: {first_line(exc)}"
            ) from None
        commit = extract_commit_hash(config, None)
        if commit:
            return f"{name_or_path}@{commit}"
        path = str(Path(config).parent)
    files = sorted(p for p in Path(path).iterdir() if p.is_file())
    known = [p for p in files if p.name == "config.json" or p.name.endswith(WEIGHT_SUFFIXES)]
    digest = hashlib.sha256()
    for file in known if any(p.name != "config.json" for p in known) else files:
        digest.update(f"{file.name}\0{file.stat().st_size}\0".encode())
        with open(file, "rb") as stream:
            while block := stream.read(8 << 20):
                digest.update(block)
    return "weights+config sha256:" + digest.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of a tokenizer's whole definition (vocabulary, merges, normalizer, ...) and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = json.dumps(sorted(tokenizer.get_vocab().items()))
    definition = backend.to_str() if backend is not None else vocabulary
    extra = json.dumps([getattr(tokenizer, "chat_template", None), tokenizer.eos_token_id], default=str)
    return hashlib.sha256((definition + extra).encode()).hexdigest()[:16]
