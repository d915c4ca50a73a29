"""Vocabulary-parallel distillation with tensor-parallel heads, in the style of torchtitan.

    torchrun --nproc-per-node 2 examples/tensor_parallel_kd.py           # CPU (gloo)
    torchrun --nproc-per-node 8 examples/tensor_parallel_kd.py --cuda    # one node of GPUs (NCCL)

Both models' ``lm_head`` are sharded by vocabulary rows over a tensor-parallel mesh with
``parallelize_module(..., ColwiseParallel())``. fusedkd takes the sharded heads as they are: each rank
projects only its rows, the ranks exchange a few numbers per token (docs/design.md §10), and no rank
ever holds a whole head or whole logits. Rank 0 then checks the loss and the student head's gradient
against one process computing the same loss on the gathered heads.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

import fusedkd


class TinyLM(torch.nn.Module):
    """A stand-in causal LM: an embedding and an MLP as the backbone, then the lm_head."""

    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.GELU())
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=False)

    def backbone(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.embed(input_ids))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cuda", action="store_true", help="NCCL on one GPU per rank (default: gloo, CPU)")
    parser.add_argument("--vocab", type=int, default=151_936, help="vocabulary size (default: Qwen3's)")
    parser.add_argument("--tokens", type=int, default=512)
    args = parser.parse_args()

    device_type = "cuda" if args.cuda else "cpu"
    if args.cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if args.cuda else "gloo")
    tp_mesh = init_device_mesh(device_type, (dist.get_world_size(),), mesh_dim_names=("tp",))
    rank = dist.get_rank()

    torch.manual_seed(0)  # the same models and batch on every rank (one tensor-parallel group)
    student = TinyLM(args.vocab, 64).to(device_type)
    teacher = TinyLM(args.vocab, 128).to(device_type).requires_grad_(False)
    reference = {name: p.detach().clone() for name, p in student.lm_head.named_parameters()}
    teacher_head = teacher.lm_head.weight.detach().clone()
    for model in (student, teacher):
        # As torchtitan does for its output layer: the head's rows (vocabulary) over the mesh.
        parallelize_module(model, tp_mesh, {"lm_head": ColwiseParallel(use_local_output=False)})

    input_ids = torch.randint(0, args.vocab, (1, args.tokens + 1), device=device_type)
    labels = input_ids[:, 1:].clone()
    labels[:, : args.tokens // 4] = -100  # e.g. the prompt

    # The hidden states are the same on every rank of the tensor-parallel group: replicated DTensors.
    student_hidden = student.backbone(input_ids[:, :-1])
    with torch.no_grad():
        teacher_hidden = teacher.backbone(input_ids[:, :-1])
    loss = fusedkd.fused_linear_kd_loss(
        DTensor.from_local(student_hidden, tp_mesh, [Replicate()]),
        student.lm_head.weight,  # DTensor, Shard(0): this rank's vocabulary rows
        DTensor.from_local(teacher_hidden, tp_mesh, [Replicate()]),
        teacher.lm_head.weight,
        labels,
        temperature=2.0,
        alpha=0.5,
    )
    loss.backward()
    grad_head = student.lm_head.weight.grad  # sharded like the weight
    print(f"rank {rank}: loss {loss.item():.6f}, head gradient block {tuple(grad_head.to_local().shape)}")

    # The same loss and head gradient from whole heads in one process (for the check only).
    whole_grad = grad_head.full_tensor()
    if rank == 0:
        weight = reference["weight"].requires_grad_(True)
        expected = fusedkd.fused_linear_kd_loss(
            student_hidden.detach(), weight, teacher_hidden, teacher_head, labels, temperature=2.0, alpha=0.5
        )
        expected.backward()
        torch.testing.assert_close(loss, expected, rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(whole_grad, weight.grad, rtol=2e-5, atol=1e-7)
        print(f"matches one process on whole heads: loss {expected.item():.6f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
