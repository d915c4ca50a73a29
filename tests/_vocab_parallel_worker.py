"""Runs vocabulary-parallel cases on P gloo processes (CPU) for tests/test_vocab_parallel.py.

``python tests/_vocab_parallel_worker.py WORLD CASES.pt OUT.pt``: every rank builds each case's inputs
from its seed (the same tensors on every rank), shards the heads / logits with DTensor, runs the loss and
its backward while recording every collective (name and element count) and the largest tensor any op
produces, and gathers the gradients whole (after the recording) for rank 0 to save.
"""

from __future__ import annotations

import math
import sys
import traceback

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import fusedkd

COLLECTIVES = (
    "all_gather", "all_gather_into_tensor", "all_gather_single", "all_reduce", "broadcast", "reduce",
    "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "send", "recv", "scatter",
    "gather", "batch_isend_irecv",
)  # fmt: skip
FUNCTIONAL = tuple(
    f"{name}{suffix}"
    for name in ("all_gather_tensor", "all_gather_single", "all_reduce", "reduce_scatter_tensor",
                 "reduce_scatter_single", "all_to_all_single", "broadcast", "all_gather_into_tensor")
    for suffix in ("", "_autograd", "_coalesced", "_inplace")
)  # fmt: skip


def make_inputs(case: dict) -> dict:
    """The case's full (unsharded) tensors, from its seed: identical in every process."""
    g = torch.Generator().manual_seed(case["seed"])
    shape, vocab, hs, ht = case["shape"], case["rows"], case.get("hs", 12), case.get("ht", 20)
    teacher_vocab = case.get("teacher_rows", vocab)
    scale = case.get("logit_scale", 1.0)
    labels = torch.randint(0, case.get("vocab_size") or vocab, shape, generator=g)
    ignore = torch.rand(shape, generator=g) < case.get("ignore", 0.25)
    labels[ignore] = case.get("ignore_index", -100)
    out = dict(labels=labels)
    if case["kind"] == "logits":
        out["student_logits"] = torch.randn(*shape, vocab, generator=g) * 3 * scale
        out["teacher_logits"] = torch.randn(*shape, teacher_vocab, generator=g) * 3 * scale
    else:
        out["student_hidden"] = torch.randn(*shape, hs, generator=g)
        out["student_weight"] = torch.randn(vocab, hs, generator=g) * scale / math.sqrt(hs) * 3
        out["teacher_hidden"] = torch.randn(*shape, ht, generator=g)
        out["teacher_weight"] = torch.randn(teacher_vocab, ht, generator=g) * scale / math.sqrt(ht) * 3
        if case.get("bias"):
            out["student_bias"] = torch.randn(vocab, generator=g)
            out["teacher_bias"] = torch.randn(teacher_vocab, generator=g)
    for name, (index, value) in case.get("poke", {}).items():  # non-finite entries
        out[name][index] = value
    dtype = getattr(torch, case.get("dtype", "float32"))
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in out.items()}


def run_plain(case: dict, inputs: dict) -> dict:
    """The loss on whole tensors in one process: what the vocabulary-parallel run must equal."""
    inputs = {k: v.clone().requires_grad_(k in ("student_hidden", "student_weight", "student_bias",
                                                "student_logits")) for k, v in inputs.items()
              if k != "labels"}  # fmt: skip
    return _call(case, inputs, case_labels(case, inputs), whole=True)


def case_labels(case, inputs):
    return make_inputs(case)["labels"] if case.get("labels", True) else None


def _call(case: dict, tensors: dict, labels, whole: bool) -> dict:
    options = dict(case.get("options", {}))
    if case.get("module") and case["kind"] == "logits":
        criterion = fusedkd.KDLoss(**options)
        out = criterion(tensors["student_logits"], tensors["teacher_logits"], labels)
    elif case.get("module"):
        criterion = fusedkd.FusedLinearKDLoss(**options)
        out = criterion(
            tensors["student_hidden"], tensors["student_weight"], tensors["teacher_hidden"],
            tensors["teacher_weight"], labels, tensors.get("student_bias"), tensors.get("teacher_bias"),
        )  # fmt: skip
    elif case["kind"] == "logits":
        out = fusedkd.kd_loss(tensors["student_logits"], tensors["teacher_logits"], labels, **options)
    else:
        out = fusedkd.fused_linear_kd_loss(
            tensors["student_hidden"], tensors["student_weight"], tensors["teacher_hidden"],
            tensors["teacher_weight"], labels, student_bias=tensors.get("student_bias"),
            teacher_bias=tensors.get("teacher_bias"), **options,
        )  # fmt: skip
    outs = out if isinstance(out, tuple) else (out,)
    total = sum((o * (i + 1)).sum() for i, o in enumerate(outs))  # every output gets a gradient
    total.backward()
    result = {f"out{i}": o.detach() for i, o in enumerate(outs)}
    for name, x in tensors.items():
        if x.grad is not None:
            result[f"grad_{name}"] = x.grad
    return result


class Largest(TorchDispatchMode):
    """The largest tensor (elements) any op produces."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in tree_flatten(out)[0]:
            if isinstance(x, torch.Tensor):  # a DTensor's own storage is its local tensor
                self.numel = max(self.numel, getattr(x, "_local_tensor", x).numel())
        return out


def _record_collectives(log: list):
    """Wrap every c10d and functional collective to append (name, elements) to `log`. Returns an undo."""
    import torch.distributed._functional_collectives as funcol

    saved = []
    for module, names, prefix in ((dist, COLLECTIVES, ""), (funcol, FUNCTIONAL, "functional.")):
        for name in names:
            fn = getattr(module, name, None)
            if fn is None:
                continue

            def wrapper(*args, __fn=fn, __name=prefix + name, **kwargs):
                tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
                log.append((__name, max((t.numel() for t in tensors), default=0)))
                return __fn(*args, **kwargs)

            saved.append((module, name, fn))
            setattr(module, name, wrapper)

    def undo():
        for module, name, fn in saved:
            setattr(module, name, fn)

    return undo


def run_sharded(case: dict, mesh) -> dict:
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    inputs = make_inputs(case)
    labels = case_labels(case, inputs)
    if case.get("perturb_rank") == dist.get_rank():  # a data-loading bug: this rank's labels differ
        labels = labels.roll(1)
    tensors = {}
    for name, x in inputs.items():
        if name == "labels":
            continue
        if name.endswith("_logits"):
            placement = Shard(x.dim() - 1)
        elif name.endswith("_hidden"):
            placement = Replicate()
        else:
            placement = Shard(0)
        d = distribute_tensor(x, mesh, [placement])
        if name.startswith("student"):
            d.requires_grad_(True)
        tensors[name] = d
    log: list = []
    undo = _record_collectives(log)
    largest = Largest()
    try:
        with largest:
            result = _call(case, tensors, labels, whole=False)
    finally:
        undo()
    placements = {}
    for key, value in list(result.items()):
        if hasattr(value, "full_tensor"):
            placements[key] = tuple(repr(p) for p in value.placements)
            result[key] = value.full_tensor()
    local_rows = tensors["student_logits" if case["kind"] == "logits" else "student_weight"].to_local()
    result.update(
        collectives=log, largest=largest.numel, local_shape=tuple(local_rows.shape), placements=placements
    )
    return result


def run_refusals(mesh) -> dict:
    """Layouts the vocabulary-parallel loss refuses: each message, by name."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(5, 8, generator=g), torch.randn(11, 8, generator=g)
    th, tw = torch.randn(5, 6, generator=g), torch.randn(11, 6, generator=g)
    labels = torch.randint(0, 11, (5,), generator=g)
    messages = {}

    def attempt(name, fn):
        try:
            fn()
            messages[name] = None
        except (ValueError, TypeError) as exc:
            messages[name] = str(exc)

    # An FSDP2-sharded head, read outside its module's forward: a DTensor weight, plain hidden states.
    student_head, teacher_head = torch.nn.Linear(8, 11, bias=False), torch.nn.Linear(6, 11)
    fully_shard(student_head, mesh=mesh)
    fully_shard(teacher_head, mesh=mesh)
    attempt(
        "fsdp", lambda: fusedkd.fused_linear_kd_loss(h, student_head.weight, th, teacher_head.weight, labels)
    )
    sw, tw_ = (distribute_tensor(x, mesh, [Shard(0)]) for x in (w, tw))
    sh, th_ = (distribute_tensor(x, mesh, [Replicate()]) for x in (h, th))
    attempt("hidden_sharded", lambda: fusedkd.fused_linear_kd_loss(
        distribute_tensor(h, mesh, [Shard(0)]), sw, th_, tw_, labels))  # fmt: skip
    attempt("weight_dim1", lambda: fusedkd.fused_linear_kd_loss(
        sh, distribute_tensor(w, mesh, [Shard(1)]), th_, tw_, labels))  # fmt: skip
    attempt("teacher_plain", lambda: fusedkd.fused_linear_kd_loss(sh, sw, th_, tw, labels))
    attempt("tiles", lambda: fusedkd.fused_linear_kd_loss(sh, sw, th_, tw_, labels, backend="tiles"))
    logits = distribute_tensor(torch.randn(5, 11, generator=g), mesh, [Shard(1)])
    attempt("logits_replicated", lambda: fusedkd.kd_loss(
        logits, distribute_tensor(torch.randn(5, 11), mesh, [Replicate()]), labels))  # fmt: skip
    attempt("labels_range", lambda: fusedkd.fused_linear_kd_loss(sh, sw, th_, tw_, labels + 11))
    padded = distribute_tensor(torch.randn(13, 6, generator=g), mesh, [Shard(0)])
    attempt("blocks", lambda: fusedkd.fused_linear_kd_loss(sh, sw, th_, padded, labels, vocab_size=11))
    return messages


def run_integration(mesh) -> dict:
    """The trainer integrations' loss pieces (`fusedkd.integrations._common`) on Hugging Face models whose
    lm_heads were made tensor-parallel with ``parallelize_module(..., ColwiseParallel())`` (both, the
    teacher's only, the student's only), against the same models unsharded: the loss, the student head's
    and its embedding's gradients, and the collectives."""
    from _helpers import tiny_gemma2, tiny_granite
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    from fusedkd.integrations import _common

    out = {}
    for layout in ("plain", "both", "teacher", "student"):
        student = tiny_granite(53, 16, seed=0, logits_scaling=2.0, head_scale=3.0)
        teacher = tiny_gemma2(53, 32, seed=1, final_logit_softcapping=5.0, head_scale=3.0)
        for role, model in (("student", student), ("teacher", teacher)):
            if layout in ("both", role):
                parallelize_module(model, mesh, {"lm_head": ColwiseParallel(use_local_output=False)})
        ids = torch.randint(0, 53, (2, 9), generator=torch.Generator().manual_seed(5))
        valid = ids % 4 != 0
        log: list = []
        undo = _record_collectives(log)
        try:
            student_hidden = _common.backbone_hidden_states(student, input_ids=ids)
            with torch.no_grad():
                teacher_hidden = _common.backbone_hidden_states(teacher, input_ids=ids)
            student_head = _common.head_parameters(student, student_hidden.dtype)
            teacher_head = _common.head_parameters(teacher, teacher_hidden.dtype)
            options = {**_common.head_options(student, "student"), **_common.head_options(teacher, "teacher")}
            loss = _common.summed_divergence(
                student_hidden, student_head, teacher_hidden, teacher_head, valid, beta=0.4, temperature=2.0,
                head_options=options,
            )  # fmt: skip
            loss.backward()
        finally:
            undo()
        grad = student.lm_head.weight.grad
        out[layout] = dict(
            loss=loss.detach(),
            head_is_dtensor=hasattr(student_head[0], "device_mesh"),
            grad_head=grad.full_tensor() if hasattr(grad, "full_tensor") else grad,
            grad_embedding=student.model.embed_tokens.weight.grad,
            collectives=log,
        )
    return out


def main(rank: int, world: int, cases_path: str, out_path: str, rendezvous: str) -> None:
    # A file rendezvous (a fresh path per launch): no TCP port to pick, so none can be taken by
    # another launch between picking and binding it.
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,))
        results = {}
        for name, case in torch.load(cases_path).items():
            try:
                results[name] = run_sharded(case, mesh)
            except Exception:  # noqa: BLE001 - reported by the test, by case
                results[name] = {"error": traceback.format_exc()}
        if world > 1:
            results["refusals"] = run_refusals(mesh)
            results["integration"] = run_integration(mesh)
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(results, gathered, dst=0)
        if rank == 0:
            torch.save(gathered, out_path)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    world, cases_file, out_file, rendezvous_file = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    torch.multiprocessing.spawn(main, args=(world, cases_file, out_file, rendezvous_file), nprocs=world)
