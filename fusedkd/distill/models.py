"""Models: the scaled-down Qwen3 pair of the embedded default, loading real ones, and the vocabulary check.

The distillation loss needs, from each model, the final hidden states (after the last norm) and the
lm_head weight (and bias, if any): `hidden_states` runs the base model only, so no logits are built.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from fusedkd.distill.distributed import DistContext, broadcast_object, shard_teacher
from fusedkd.distill.errors import UsageError
from fusedkd.heads import HeadTransform, head_transform

# The real pair, for reference (Qwen/Qwen3-4B and Qwen/Qwen3-0.6B on the Hugging Face Hub; both tie the
# lm_head to the input embedding and share the tokenizer, vocabulary 151,936 rows).
QWEN3_4B_SHAPE = dict(
    hidden_size=2560,
    intermediate_size=9728,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
)
QWEN3_0_6B_SHAPE = dict(
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
)

# The embedded default: hidden sizes / 10 and / 8, depth / 9, head_dim 64; the pair keeps the real one's
# ratios of width (2.5 -> 2), depth (36:28 -> 4:3), MLP expansion (3.8x, 3x), GQA and tied embeddings.
# With the default's 4,096-token vocabulary: 4.8M and 1.1M parameters, 3.7M and 0.6M without the (tied)
# embedding, ~6x (Qwen3-4B : Qwen3-0.6B without embeddings is 3.6B : 0.44B, ~8x).
TINY_TEACHER_SHAPE = dict(
    hidden_size=256, intermediate_size=960, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2
)
TINY_STUDENT_SHAPE = dict(
    hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1
)


def qwen3_config(shape: dict, *, vocab_size: int, max_positions: int, eos_token_id: int):
    """A `transformers.Qwen3Config` of the given shape (head_dim 64 unless `shape` says; tied embeddings).

    Example:
        >>> config = qwen3_config(TINY_STUDENT_SHAPE, vocab_size=4096, max_positions=256, eos_token_id=0)
        >>> config.model_type, config.hidden_size, config.tie_word_embeddings
        ('qwen3', 128, True)
    """
    from transformers import Qwen3Config

    return Qwen3Config(
        **{"head_dim": 64, **shape},
        vocab_size=vocab_size,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
        bos_token_id=None,
    )


def build_model(config, *, seed: int):
    """A freshly initialized causal LM for `config`, reproducible from `seed`."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config)


def quiet_transformers() -> None:
    """Silence transformers' own progress bars (loading / writing shards) and info logs: ours say enough."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _locate(name_or_path: str, role: str) -> tuple[str, bool]:
    """(what to pass to from_pretrained, whether it is a local directory); a missing path is an error."""
    path = os.path.expanduser(name_or_path)
    local = os.path.isdir(path)
    if not local and (name_or_path.startswith((".", "/", "~")) or os.path.exists(path)):
        raise UsageError(f"--{role} {name_or_path!r}: no such directory")
    return path, local


def load_model(name_or_path: str, *, role: str, dtype: torch.dtype | None = None):
    """`AutoModelForCausalLM.from_pretrained`, with one clear `UsageError` when it cannot be loaded."""
    from transformers import AutoModelForCausalLM

    path, local = _locate(name_or_path, role)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except Exception as exc:  # OSError (missing), ValueError (unknown architecture), hub errors
        where = "the local directory could not be loaded" if local else "no such local directory, and the Hub"
        raise UsageError(f"--{role} {name_or_path!r}: {where}: {_first_line(exc)}") from None
    check_supported_head(model, role)
    return model


@contextmanager
def parameters_on_meta():
    """Build modules with their parameters on the meta device (no memory) and their buffers real.

    Buffers such as the rotary embedding's frequencies are computed at construction and are not in a
    checkpoint's state dict; parameters are loaded afterwards.
    """
    register = torch.nn.Module.register_parameter

    def register_on_meta(module, name, parameter):
        register(module, name, parameter)
        if parameter is not None and parameter.device.type != "meta":
            module._parameters[name] = torch.nn.Parameter(
                parameter.to("meta"), requires_grad=parameter.requires_grad
            )

    torch.nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def load_teacher(
    name_or_path: str, *, dtype: torch.dtype, ctx: DistContext, probe: torch.Tensor, shard: bool
):
    """The teacher, checked (`check_linear_head` on `probe`), on `ctx.device`: whole, or sharded.

    With `shard` (``--shard-teacher``, under torchrun) only rank 0 loads the checkpoint (a full copy in
    CPU memory); every process builds the model with its parameters on the meta device, shards it
    (`distributed.shard_teacher`), allocates its own shards on its device and receives their values
    from rank 0 (``set_model_state_dict(..., broadcast_from_rank0=True)``): no other process ever holds
    the whole teacher.
    """
    if not shard:
        teacher = load_model(name_or_path, role="teacher", dtype=dtype).to(ctx.device)
        check_linear_head(teacher, "teacher", probe)  # on the device: the teacher may be large
        return teacher
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from transformers import AutoModelForCausalLM

    full, message = None, None
    if ctx.is_main:
        try:
            full = load_model(name_or_path, role="teacher", dtype=dtype)
            check_linear_head(full, "teacher", probe)
        except UsageError as exc:
            message = str(exc)
    message = broadcast_object(message, ctx)
    if message is not None:
        raise UsageError(message)
    config = broadcast_object(full.config if full is not None else None, ctx)
    with parameters_on_meta():
        teacher = AutoModelForCausalLM.from_config(config, dtype=dtype)
    teacher.requires_grad_(False).eval()
    buffers = {name: buffer.clone() for name, buffer in teacher.named_buffers()}
    tied = teacher.get_output_embeddings().weight is teacher.get_input_embeddings().weight
    shard_teacher(teacher, ctx)
    teacher.to_empty(device=ctx.device)
    if tied:  # to_empty gives each module a new parameter: tie the (whole, ignored) head again
        teacher.get_output_embeddings().weight = teacher.get_input_embeddings().weight
    with torch.no_grad():
        for name, buffer in teacher.named_buffers():
            buffer.copy_(buffers[name])
    state = full.state_dict() if full is not None else {}
    set_model_state_dict(
        teacher, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    )
    del full, state
    return teacher


def load_tokenizer(name_or_path: str, *, role: str):
    """`AutoTokenizer.from_pretrained`, with one clear `UsageError` when it cannot be loaded."""
    from transformers import AutoTokenizer

    path, _ = _locate(name_or_path, role)
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise UsageError(
            f"--{role} {name_or_path!r}: cannot load its tokenizer: {_first_line(exc)}"
        ) from None


def check_supported_head(model, role: str) -> None:
    """`UsageError` for a model without an output embedding (the loss needs its lm_head), or whose config
    asks for a head transform fusedkd does not apply (`fusedkd.head_transform`)."""
    if model.get_output_embeddings() is None:
        raise UsageError(f"--{role}: the model has no output embedding (lm_head); is it a causal LM?")
    try:
        head_transform(model.config)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"--{role}: {exc}") from None


PROBE_TOKENS = 16  # tokens of the startup head check's batch


@torch.no_grad()
def linear_head_error(model, input_ids: torch.Tensor) -> float:
    """Largest ``|model(x).logits - head(hidden @ W.T + b)|`` on `input_ids`, relative to the logits'
    scale, with ``head`` the transform read from the model's config (`fusedkd.head_transform`: logit
    scale, then soft cap).

    The loss computes the logits as that transform of the lm_head's ``W h + b`` from the final hidden
    states; a model whose own logits are anything else (other multipliers or width scaling, ...) would be
    distilled towards the wrong distribution. Both sides run in the model's dtype (a full forward of
    `input_ids`, one short batch); the transform is applied in float32.
    """
    training = model.training
    model.eval()
    input_ids = input_ids.to(next(model.parameters()).device)
    try:
        mask = torch.ones_like(input_ids)
        logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits.float()
        hidden = hidden_states(model, input_ids, mask)
        head = lm_head(model)
        weight = head.weight.to(hidden.dtype)
        bias = None if head.bias is None else head.bias.to(hidden.dtype)
        ours = head.transform(torch.nn.functional.linear(hidden, weight, bias).float())
    finally:
        model.train(training)
    if logits.shape != ours.shape:
        return float("inf")
    scale = float(ours.abs().max()) + 1.0
    return float((logits - ours).abs().max()) / scale


def check_linear_head(model, role: str, input_ids: torch.Tensor) -> None:
    """`UsageError` unless ``model(x).logits == head(hidden @ W.T + b)`` on `input_ids` (see
    `linear_head_error`).

    The tolerance follows the dtype of the model's parameters: 1e-4 of the logits' scale in float32,
    2e-2 in bfloat16 / float16 (rounding of the same matmul); a logit multiplier of 1.05 or a soft-cap
    on logits of size 10 is far outside it.
    """
    dtype = next(model.parameters()).dtype
    tolerance = 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2
    error = linear_head_error(model, input_ids)
    if not error <= tolerance:
        raise UsageError(
            f"--{role}: the model's logits are not its lm_head's W h + b through the head transform of "
            f"its config ({lm_head(model).transform}; relative difference {error:.3g} on a "
            f"{input_ids.shape[-1]}-token probe; other logit multipliers or scaling?): "
            "fusedkd's loss would distill the wrong distribution"
        )


@dataclass(frozen=True)
class Head:
    """An lm_head as the loss takes it: weight [V, H], optional bias [V], and the transform of its
    projections into the model's logits (logit scale, soft cap: `fusedkd.HeadTransform`)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    transform: HeadTransform = HeadTransform()


def lm_head(model) -> Head:
    """The model's output projection (the unsharded parameter while inside an FSDP forward)."""
    head = model.get_output_embeddings()
    return Head(head.weight, getattr(head, "bias", None), head_transform(model.config))


def hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The final hidden states [B, L, H] of a causal LM's base model: what its lm_head would project."""
    output = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return output.last_hidden_state


def enable_activation_checkpointing(model) -> None:
    """Recompute each decoder layer in backward (transformers 5: ``activation_checkpointing_enable``)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers 4
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def head_rows(model) -> int:
    """Rows of a loaded model's lm_head."""
    return int(model.get_output_embeddings().weight.shape[0])


def config_head_rows(name_or_path: str, *, role: str) -> int:
    """Rows of a model's lm_head from its config alone (its ``vocab_size``), without loading weights."""
    from transformers import AutoConfig

    path, _ = _locate(name_or_path, role)
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:
        raise UsageError(f"--{role} {name_or_path!r}: cannot load its config: {_first_line(exc)}") from None
    return int(config.get_text_config().vocab_size)


# The files of a saved model that determine its logits: its config and its weights (and their indexes).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")
HASH_BLOCK = 8 << 20  # bytes read at a time when hashing weights


def _directory_fingerprint(directory: Path) -> str:
    """A sha256 of `directory`'s config and weight files: names, sizes and contents (all its files, if it
    has no file of a known weight format)."""
    files = sorted(p for p in directory.iterdir() if p.is_file())
    known = [p for p in files if p.name == "config.json" or p.name.endswith(WEIGHT_SUFFIXES)]
    if any(p.name != "config.json" for p in known):
        files = known
    digest = hashlib.sha256()
    buffer = bytearray(HASH_BLOCK)
    view = memoryview(buffer)
    for path in files:
        digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as file:
            while count := file.readinto(buffer):
                digest.update(view[:count])
    return "weights+config sha256:" + digest.hexdigest()[:16]


def model_fingerprint(name_or_path: str, *, role: str) -> str:
    """What identifies a model's logits (for the top-k cache): its weights and config, not its path.

    A local directory: a sha256 of its ``config.json`` and weight files (``*.safetensors``, ``*.bin``,
    ...; names, sizes and contents, read in 8 MiB blocks: about a second per GB), so the same files under
    any spelling of the path (``./t``, ``t``, ``t/``, a symlink) give the same fingerprint, and a
    retrained model saved over them another. A Hub name: ``<name>@<commit>``, the revision its files
    resolve to (from the Hub, or its local cache when offline).

    Example:
        >>> import pathlib, tempfile
        >>> model = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (model / "config.json").write_text("{}")
        >>> _ = (model / "model.safetensors").write_bytes(b"weights")
        >>> model_fingerprint(str(model), role="teacher") == model_fingerprint(f"{model}/./", role="teacher")
        True
        >>> before = model_fingerprint(str(model), role="teacher")
        >>> _ = (model / "model.safetensors").write_bytes(b"retrained")
        >>> model_fingerprint(str(model), role="teacher") == before
        False
    """
    path, local = _locate(name_or_path, role)
    if local:
        return _directory_fingerprint(Path(path))
    from transformers.utils.hub import cached_file, extract_commit_hash

    try:
        config = cached_file(path, "config.json")
    except Exception as exc:
        raise UsageError(f"--{role} {name_or_path!r}: cannot load its config: {_first_line(exc)}") from None
    commit = extract_commit_hash(config, None)
    return f"{name_or_path}@{commit}" if commit else _directory_fingerprint(Path(config).parent)


def check_tokenizers(teacher_tokenizer, student_tokenizer) -> None:
    """`UsageError` unless the two tokenizers are the same (same token -> id map).

    Needs the tokenizers only: a real run calls it before it loads any model's weights.
    """
    if teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise UsageError(
            f"the teacher's and the student's tokenizers differ ({len(teacher_tokenizer)} vs "
            f"{len(student_tokenizer)} tokens, different ids): distillation compares distributions token by "
            "token, so use a student with the teacher's tokenizer (same model family)"
        )


def check_vocabularies(
    teacher_tokenizer, student_tokenizer, rows_teacher: int, rows_student: int, vocab_size: int | None
) -> int:
    """The number of vocabulary rows the loss uses; `UsageError` if the two models cannot be compared.

    The two tokenizers must be the same (`check_tokenizers`). The heads (`rows_teacher`,
    `rows_student` rows) may differ in padding; then `vocab_size` must say how many shared rows to use,
    at least the tokenizer's size.
    """
    check_tokenizers(teacher_tokenizer, student_tokenizer)
    needed = len(student_tokenizer)
    if vocab_size is None:
        if rows_teacher != rows_student:
            raise UsageError(
                f"the teacher's lm_head has {rows_teacher} rows and the student's {rows_student}: pass "
                f"--vocab-size {needed} (the tokenizer's size) to distill over the shared rows"
            )
        vocab_size = rows_student
    if vocab_size < needed or vocab_size > min(rows_teacher, rows_student):
        raise UsageError(
            f"--vocab-size {vocab_size} must be at least the tokenizer's {needed} tokens and at most the "
            f"smaller head's {min(rows_teacher, rows_student)} rows"
        )
    return vocab_size
