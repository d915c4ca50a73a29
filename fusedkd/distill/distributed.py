"""Processes and devices: one process, or `torchrun` with DistributedDataParallel or FSDP2.

Under ``torchrun --nproc-per-node N`` every process trains on its share of each global batch. The
student is wrapped (with the loss, see `objectives`) in DistributedDataParallel, or, with ``--fsdp``,
sharded with ``torch.distributed.fsdp.fully_shard`` per decoder layer and at the root. The teacher
runs under ``no_grad``: replicated on every process, or with ``--shard-teacher`` sharded with FSDP2
(`shard_teacher`: decoder layers and the base model resharded after every forward, the lm_head kept
whole so the loss can read it), loaded without a full copy on every process (`models.load_teacher`).
The backend is NCCL on CUDA and gloo on the CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from fusedkd.distill.errors import UsageError


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def choose_device(request: str, local_rank: int) -> torch.device:
    """``"auto"``: CUDA device `local_rank` if CUDA is available, else the CPU."""
    if request not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu or cuda; got {request!r}")
    if request == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    if request == "cpu" or (request == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def init_distributed(device_request: str = "auto", timeout_minutes: float | None = None) -> DistContext:
    """Join the `torchrun` job described by the environment (WORLD_SIZE, RANK, LOCAL_RANK), if any.

    `timeout_minutes`: how long a collective may wait for the slowest process (``--dist-timeout``;
    None: torch's default, 10 minutes for gloo and NCCL).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = choose_device(device_request, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        timeout = None if timeout_minutes is None else timedelta(minutes=timeout_minutes)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def require_backend(backend: str, device: torch.device) -> None:
    """`UsageError` if fusedkd's loss `backend` cannot run on `device` (e.g. "triton" without a GPU)."""
    from fusedkd._dispatch import resolve_backend

    try:
        resolve_backend(backend, device)
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"--backend {backend}: {exc}") from None


def shutdown(ctx: DistContext, *, synchronize: bool = False) -> None:
    """Destroy the process group. `synchronize` (after a run that succeeded on this process): wait for
    every process first, so that none tears its connections down while another is still closing
    its own (with gloo that race can abort a process that has finished its work: "terminate called
    without an active exception"). Not after an error, where the others may never arrive."""
    if ctx.distributed and dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum `tensor` over processes, in place (a no-op with one process)."""
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def broadcast_object(value, ctx: DistContext):
    """Rank 0's `value` on every process."""
    if not ctx.distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_objects(value, ctx: DistContext) -> list:
    """Every process's `value`, in rank order, on every process."""
    if not ctx.distributed:
        return [value]
    gathered: list = [None] * ctx.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def decoder_layers(model) -> list[torch.nn.Module]:
    """The transformer blocks of a Hugging Face model (the classes it declares unsplittable)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise UsageError(
            f"cannot shard {type(model).__name__}: it declares no decoder-layer classes (_no_split_modules)"
        )
    return layers


def wrap_objective(objective: torch.nn.Module, ctx: DistContext, *, fsdp: bool) -> torch.nn.Module:
    """The module the trainer calls: `objective` itself, DDP over it, or FSDP2-sharded in place."""
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        if not ctx.distributed:
            raise UsageError(
                "--fsdp shards the student across processes: run it under torchrun --nproc-per-node N"
            )
        for layer in decoder_layers(objective.student):
            fully_shard(layer)
        fully_shard(objective)
        return objective
    if not ctx.distributed:
        return objective
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(objective, device_ids=device_ids)


def shard_teacher(teacher: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """Shard a (frozen, forward-only) teacher across processes with FSDP2; returns it, on `ctx.device`.

    Each decoder layer is its own FSDP2 unit, resharded after its forward; the base model (embedding,
    final norm, rotary buffers) is the root, so the layers are not roots (a root never reshards after
    its forward) and its own parameters are resharded after every forward too (a hook). The lm_head, and
    the embedding when tied to it, are ``ignored_params``: kept whole on every process, so the loss reads
    the head directly. Everything FSDP2 does not manage (the ignored head, buffers) is moved to
    `ctx.device`; the teacher may come with its parameters on the meta device (`models.load_teacher`).
    """
    from torch.distributed.fsdp import fully_shard

    if not ctx.distributed:
        raise UsageError("--shard-teacher shards the teacher across processes: run it under torchrun")
    head = teacher.get_output_embeddings()
    ignored = set(head.parameters())
    base = teacher.base_model
    for layer in decoder_layers(teacher):
        fully_shard(layer, reshard_after_forward=True)
    fully_shard(base, ignored_params=ignored, reshard_after_forward=True)
    base.register_forward_hook(lambda module, args, output: module.reshard())
    for parameter in ignored:
        if parameter.device != ctx.device and parameter.device.type != "meta":
            parameter.data = parameter.data.to(ctx.device)
    for module in teacher.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.device != ctx.device and buffer.device.type != "meta":
                module._buffers[name] = buffer.to(ctx.device)
    return teacher


def sharded_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes of this process's parameter shards, bytes of the parameters held whole) of `model`."""
    from torch.distributed.tensor import DTensor

    sharded = whole = 0
    for parameter in model.parameters():
        if isinstance(parameter, DTensor):
            sharded += parameter.to_local().numel() * parameter.element_size()
        else:
            whole += parameter.numel() * parameter.element_size()
    return sharded, whole


def is_fsdp(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)
