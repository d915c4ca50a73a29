"""Vocabulary-parallel distillation: heads and logits sharded over a tensor-parallel mesh, never gathered.

`fusedkd.fused_linear_kd_loss` and `fusedkd.kd_loss` come here when they are handed DTensors
(docs/design.md §10):

- **fused linear loss**: both heads ``Shard(0)`` (by vocabulary rows, as ``ColwiseParallel`` shards an
  ``lm_head``) on one 1-D mesh, biases likewise or None, hidden states ``Replicate()`` on that mesh (as
  a ``ColwiseParallel`` head receives them), labels a plain tensor (or a replicated DTensor) equal on
  every rank;
- **logits loss**: student and teacher logits ``Shard(-1)`` on one 1-D mesh (as
  ``ColwiseParallel(use_local_output=False)`` returns them).

Each rank projects (or reads) only its block of the vocabulary for every token. The per-token numbers
each token's loss needs from the whole vocabulary (maxima, log-sums of exponentials, the label's logit on
the rank that owns it, the divergence's sums) cross the ranks in two gathers of 6 and 2 numbers per token
per chunk; G = dloss/dlogits stays on its rank. The student's weight (and bias) gradient comes back
sharded like the weight, the logits' gradient like the logits; the hidden-state gradient is summed over
the ranks (one all-reduce of ``[N, H_s]`` per call). The loss is a plain tensor, equal on every rank.

A DTensor head with plain hidden states is what an FSDP-sharded head looks like outside its module's
forward (each rank holding different tokens): refused, naming what to do instead.
"""

from __future__ import annotations

import math
import sys

import torch

from fusedkd._autograd import autocast_off
from fusedkd._dispatch import backend_for, shaped_outputs
from fusedkd._inputs import (
    check_devices,
    check_float,
    check_model,
    check_no_functorch,
    check_same_leading,
    check_sizes,
    check_tensor,
    contiguous,
    first_rows,
    prepare_labels,
    resolve_vocab_size,
)
from fusedkd._options import KDOptions
from fusedkd._shard import VocabShard, shard_offsets
from fusedkd._values import check_values, counted_tokens

SUPPORTED = (
    "vocabulary-parallel inputs are: for fused_linear_kd_loss, both heads (and biases) DTensors placed "
    "(Shard(0),) on one 1-D mesh with hidden states DTensors placed (Replicate(),) on that mesh; for "
    "kd_loss, both logits DTensors placed (Shard(-1),) on one 1-D mesh; labels a plain tensor equal on "
    "every rank (docs/design.md §10)"
)


def _dtensor_type():
    """The DTensor class when torch.distributed.tensor is loaded (no DTensor can exist otherwise)."""
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def any_dtensor(*tensors) -> bool:
    """Whether any of `tensors` is a DTensor."""
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(x, dtensor) for x in tensors)


def _describe(x) -> str:
    if x is None:
        return "None"
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(x, dtensor):
        return f"a DTensor placed {tuple(x.placements)} on a mesh of shape {tuple(x.device_mesh.shape)}"
    return "a plain tensor"


def _is_placed(x, mesh, placement) -> bool:
    dtensor = _dtensor_type()
    return isinstance(x, dtensor) and x.device_mesh == mesh and tuple(x.placements) == (placement,)


def _check_mesh(name: str, x) -> object:
    mesh = x.device_mesh
    if mesh.ndim != 1:
        raise ValueError(
            f"{name} is a DTensor on a {mesh.ndim}-D mesh {tuple(mesh.shape)}; the vocabulary-parallel loss "
            f"takes heads on a 1-D (tensor-parallel) mesh, e.g. world_mesh['tp']. {SUPPORTED}"
        )
    return mesh


def _plain_labels(labels, mesh):
    """Labels as a plain tensor: a plain tensor, or a DTensor replicated on `mesh` (its local tensor)."""
    if labels is None or not any_dtensor(labels):
        return labels
    from torch.distributed.tensor import Replicate

    if not _is_placed(labels, mesh, Replicate()):
        raise ValueError(
            f"labels must be a plain tensor or replicated on the heads' mesh; got {_describe(labels)}"
        )
    return labels.to_local()


def _shard(mesh, rows: int, vocab: int) -> VocabShard:
    """This rank's block of a head (or logits) of `rows` rows over `mesh`, `vocab` of them counted."""
    world = mesh.size()
    rank = mesh.get_local_rank()
    layout = shard_offsets(rows, world)
    offset, block_rows = layout[rank]
    return VocabShard(
        group=mesh.get_group(),
        rank=rank,
        world=world,
        offset=offset,
        rows=max(0, min(block_rows, vocab - offset)),
        block=max(1, max(r for _, r in layout)),
        vocab=vocab,
    )


def _teacher_block(shard: VocabShard, local, rows: int, student_rows: int, dim: int):
    """The teacher's rows (or entries) of this rank's student block: its own block's first `shard.rows`
    when both split alike, else moved from the ranks that hold them (`VocabShard.realigned`)."""
    if local is None:
        return None
    world = shard.world
    if [o for o, _ in shard_offsets(rows, world)] == [o for o, _ in shard_offsets(student_rows, world)]:
        return local.narrow(dim, 0, shard.rows) if local.shape[dim] != shard.rows else local
    return shard.realigned(local.detach(), rows, dim)


def _check_same_tokens(shard: VocabShard, labels: torch.Tensor | None, n: int, device: torch.device) -> None:
    """Every rank must hold the same tokens and labels, on the same kind of device (their chunks, kernel
    grids and collectives pair up): one gather of (token count, label checksum, no-labels flag, the
    device's multiprocessors) per call, compared on every rank (`_values.check_values`), so that all raise
    together."""
    checksum = torch.zeros((), dtype=torch.int64, device=device)
    if labels is not None:  # a position-weighted sum: a label moved, changed or masked changes it
        weights = torch.arange(1, labels.numel() + 1, device=device, dtype=torch.int64) % 1_000_003
        checksum = ((labels + 1_000_000) * weights).sum()
    processors = (
        torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0
    )
    fields = (n, int(labels is None), processors)
    mine = torch.cat([torch.tensor(fields, dtype=torch.int64, device=device), checksum.reshape(1)])
    every = shard.gather(mine)
    # Eager on a CPU (every rank raises, having compared the same numbers); an asynchronous device-side
    # assertion on an accelerator, so that the check costs no host synchronization.
    check_values(
        (every != every[0]).any().reshape(1),
        "the ranks of the vocabulary-parallel mesh hold different tokens, labels or devices: every rank of "
        "a tensor-parallel group must pass the same hidden states (or logits rows) and labels, on the same "
        "kind of device",
        lambda: f"token count, no-labels flag, multiprocessors, label checksum per rank: {every.tolist()}",
    )


def _refuse_plain_hidden(weight_name: str, weight, hidden_name: str) -> None:
    raise ValueError(
        f"{weight_name} is {_describe(weight)} but {hidden_name} is a plain tensor. This is what an "
        f"FSDP-sharded head looks like outside its module's forward, each rank holding different tokens: "
        f"call the loss inside the module's forward (FSDP then hands it the whole head, as "
        f"fusedkd.integrations do) or pass the gathered head ({weight_name}.full_tensor()). For a "
        f"tensor-parallel head, pass the hidden states as a DTensor replicated on its mesh "
        f"(DTensor.from_local(hidden, mesh, [Replicate()])). {SUPPORTED}"
    )


def _check_local_finite(
    shard: VocabShard,
    named: dict[str, torch.Tensor | None],
    logits: set[str],
    tokens: set[str],
    counts: torch.Tensor | None,
) -> None:
    """`check_finite=True` on each rank's blocks: the ranks agree (one all-reduce of a flag) and all raise
    when any of them found a NaN or an inf (for logits and biases a NaN or +inf: -inf is a mask). Rows of
    the tensors named in `tokens` are tokens: only those that count (`counts`, or all) are checked."""
    found = None
    for name, x in named.items():
        if x is None or x.numel() == 0:
            continue
        x = x.detach()
        bad = (x.isnan() | (x == float("inf"))) if name in logits else ~torch.isfinite(x)
        if name in tokens and counts is not None:
            bad = bad & counts.view(-1, *([1] * (bad.dim() - 1)))
        if bool(bad.any()):
            index = tuple(int(i) for i in bad.nonzero()[0])
            found = f"{name} holds a NaN or an inf on rank {shard.rank} (local index {index})"
            break
    flag = torch.tensor([0.0 if found is None else 1.0], device=next(iter(named.values())).device)
    shard.all_reduce_(flag)
    if found is not None:
        raise ValueError(f"check_finite: {found}")
    if flag.item() > 0:
        raise ValueError("check_finite: another rank of the mesh found a NaN or an inf (see its error)")


def _refuse_plain(name: str, others) -> None:
    """`name` is a plain tensor: say whether another input is a DTensor (then it must be one too), or
    that none is (then this is the wrong entry point)."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(x, DTensor) for x in others):
        raise ValueError(f"{name} is a plain tensor but another input is a DTensor. {SUPPORTED}")
    raise ValueError(
        f"{name} is a plain tensor and so is every other input: the vocabulary-parallel losses take "
        f"DTensors (the public losses route DTensor inputs here; plain tensors run as usual). {SUPPORTED}"
    )


def linear_kd(
    student_hidden,
    student_weight,
    teacher_hidden,
    teacher_weight,
    labels,
    student_bias,
    teacher_bias,
    options: KDOptions,
):
    """`fused_linear_kd_loss` on DTensor inputs (module docstring): checks, then the chosen backend on
    this rank's block. Returns (loss, distill, ce) shaped like the plain call's."""
    check_no_functorch()
    from torch.distributed.tensor import DTensor, Replicate, Shard

    for name, weight, hidden in (
        ("student_weight", student_weight, student_hidden),
        ("teacher_weight", teacher_weight, teacher_hidden),
    ):
        if isinstance(weight, DTensor) and not isinstance(hidden, DTensor):
            _refuse_plain_hidden(name, weight, name.replace("weight", "hidden"))
    if not isinstance(student_weight, DTensor):
        _refuse_plain(
            "student_weight", (student_hidden, teacher_hidden, teacher_weight, student_bias, teacher_bias)
        )
    mesh = _check_mesh("student_weight", student_weight)
    named = {
        "student_weight": (student_weight, Shard(0)),
        "teacher_weight": (teacher_weight, Shard(0)),
        "student_hidden": (student_hidden, Replicate()),
        "teacher_hidden": (teacher_hidden, Replicate()),
        "student_bias": (student_bias, Shard(0)),
        "teacher_bias": (teacher_bias, Shard(0)),
    }
    for name, (x, placement) in named.items():
        if x is not None and not _is_placed(x, mesh, placement):
            hint = ""
            if name.endswith("_hidden") and isinstance(x, DTensor) and x.device_mesh == mesh:
                hint = (
                    f" (sequence-parallel hidden states, for one: pass "
                    f"{name}.redistribute(placements=[Replicate()]))"
                )
            raise ValueError(
                f"{name} must be a DTensor placed ({placement!r},) on student_weight's mesh; got "
                f"{_describe(x)}{hint}. {SUPPORTED}"
            )
    labels = _plain_labels(labels, mesh)
    global_rows = {"student_weight": student_weight.shape[0], "teacher_weight": teacher_weight.shape[0]}
    for role, bias, weight in (
        ("student", student_bias, student_weight),
        ("teacher", teacher_bias, teacher_weight),
    ):
        if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
            raise ValueError(
                f"{role}_bias must have one entry per row of {role}_weight ({weight.shape[0]}), got "
                f"{tuple(bias.shape)}"
            )
    sh, sw, sb = check_model("student", *(_local(x) for x in (student_hidden, student_weight, student_bias)))
    th, tw, tb = check_model("teacher", *(_local(x) for x in (teacher_hidden, teacher_weight, teacher_bias)))
    if labels is not None:
        check_tensor("labels", labels)
    check_devices(
        {"student_hidden": sh, "student_weight": sw, "teacher_hidden": th, "teacher_weight": tw,
         "labels": labels, "student_bias": sb, "teacher_bias": tb}
    )  # fmt: skip
    check_same_leading("teacher_hidden", th, "student_hidden", sh)
    leading_shape = sh.shape[:-1]
    vocab = resolve_vocab_size(options.vocab_size, global_rows)
    options = options.resolve(vocab_size=vocab, has_labels=labels is not None)
    labels = prepare_labels(labels, leading_shape, vocab, options, shape_name="student_hidden")
    shard = _shard(mesh, global_rows["student_weight"], vocab)
    _check_same_tokens(shard, labels, sh.reshape(-1, sh.shape[-1]).shape[0], sh.device)
    tensors = (
        sh.reshape(-1, sh.shape[-1]),
        first_rows(sw, shard.rows),
        contiguous(first_rows(sb, shard.rows)),
        th.reshape(-1, th.shape[-1]),
        _teacher_block(shard, tw, global_rows["teacher_weight"], global_rows["student_weight"], 0),
        contiguous(
            _teacher_block(shard, tb, global_rows["teacher_weight"], global_rows["student_weight"], 0)
        ),
        labels,
    )
    if options.check_finite:
        names = ("student_hidden", "student_weight", "student_bias", "teacher_hidden", "teacher_weight",
                 "teacher_bias")  # fmt: skip
        _check_local_finite(
            shard, dict(zip(names, tensors[:6])), {"student_bias", "teacher_bias"},
            {"student_hidden", "teacher_hidden"}, counted_tokens(labels, options),
        )  # fmt: skip
    backend = _backend(options, sh.device, sh.dtype)
    with autocast_off(sh.device):
        if backend == "triton":
            from fusedkd.kernels.fused_linear_kd import fused_linear_kd

            outputs = fused_linear_kd(*tensors, options, shard=shard)
        else:
            from fusedkd.torch_backend.fused_linear_kd import fused_linear_kd

            outputs = fused_linear_kd(*tensors, options, chunk_size=options.chunk_size, shard=shard)
    return shaped_outputs(outputs, options, leading_shape)


def logits_kd(student_logits, teacher_logits, labels, options: KDOptions):
    """`kd_loss` on DTensor logits sharded on the vocabulary (module docstring). Returns (loss, distill,
    ce) shaped like the plain call's; the student logits' gradient is sharded like them."""
    check_no_functorch()
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(student_logits, DTensor):
        _refuse_plain("student_logits", (teacher_logits,))
    mesh = _check_mesh("student_logits", student_logits)
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        last = Shard(x.dim() - 1) if isinstance(x, DTensor) else None
        if last is None or not (_is_placed(x, mesh, last) or _is_placed(x, mesh, Shard(-1))):
            raise ValueError(
                f"{name} must be a DTensor placed (Shard(-1),) (its vocabulary dimension) on student_logits' "
                f"mesh; got {_describe(x)}. {SUPPORTED}"
            )
    labels = _plain_labels(labels, mesh)
    # Sizes are checked on the whole (global) logits: a rank's block may be empty (Shard's last blocks).
    for name, logits in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        check_tensor(name, logits, min_ndim=1)
        check_float(name, logits)
        check_sizes(name, logits, "vocabulary size")
    local_student, local_teacher = student_logits.to_local(), teacher_logits.to_local()
    if labels is not None:
        check_tensor("labels", labels)
    check_devices({"student_logits": local_student, "teacher_logits": local_teacher, "labels": labels})
    check_same_leading("teacher_logits", local_teacher, "student_logits", local_student)
    leading_shape = local_student.shape[:-1]
    global_entries = {"student_logits": student_logits.shape[-1], "teacher_logits": teacher_logits.shape[-1]}
    vocab = resolve_vocab_size(options.vocab_size, global_entries, unit="entries")
    options = options.resolve(vocab_size=vocab, has_labels=labels is not None)
    labels = prepare_labels(labels, leading_shape, vocab, options, shape_name="student_logits")
    shard = _shard(mesh, global_entries["student_logits"], vocab)
    local_teacher = _teacher_block(
        shard, local_teacher, global_entries["teacher_logits"], global_entries["student_logits"], -1
    )
    _check_same_tokens(shard, labels, math.prod(leading_shape), local_student.device)
    if options.check_finite:
        named = {
            name: x[..., : shard.rows].reshape(math.prod(leading_shape), shard.rows)
            for name, x in (("student_logits", local_student), ("teacher_logits", local_teacher))
        }
        _check_local_finite(shard, named, set(named), set(named), counted_tokens(labels, options))
    backend = _backend(options, local_student.device, local_student.dtype)
    with autocast_off(local_student.device):
        if backend == "triton":
            from fusedkd.kernels.kd_logits_sharded import sharded_kd_logits

            outputs = sharded_kd_logits(local_student, local_teacher, labels, options, shard)
            return shaped_outputs(outputs, options, leading_shape)
        from fusedkd.torch_backend.kd_logits import kd_logits

        outputs = kd_logits(local_student, local_teacher.detach(), labels, options,
                            chunk_size=options.chunk_size, shard=shard)  # fmt: skip
    return shaped_outputs(outputs, options, leading_shape)


def _local(x):
    """A DTensor's local tensor (differentiable: its gradient comes back placed like it), or None."""
    return None if x is None else x.to_local()


def _backend(options: KDOptions, device: torch.device, dtype: torch.dtype) -> str:
    """The backend of a vocabulary-parallel call: `fusedkd._dispatch.backend_for`'s rule without the tile
    path ("tiles" is not vocabulary-parallel): the fused Triton kernels on CUDA under "auto"."""
    if options.backend == "tiles":
        raise ValueError(
            "backend='tiles' does not run vocabulary-parallel; use backend='auto', 'torch' or 'triton' "
            "with sharded heads"
        )
    return backend_for(options, device, dtype, allow_tiles=False)
