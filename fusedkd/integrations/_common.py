"""What the trainer integrations share: head checks and transforms, hidden states, lm_head parameters, the
token-summed divergence.

Only torch and fusedkd are imported here; transformers is imported where it is used.
"""

from __future__ import annotations

import torch

from fusedkd import vocab_parallel
from fusedkd.heads import head_transform
from fusedkd.loss import fused_linear_kd_loss


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The causal LM inside a PEFT wrapper (``PeftModel.get_base_model()``), else the model itself."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def check_head(model: torch.nn.Module, role: str) -> None:
    """Raise ValueError unless ``model`` is a causal LM whose logits are its lm_head's ``W h + b``
    through a head transform fusedkd applies (`fusedkd.head_transform`: Cohere's ``logit_scale``,
    Granite's ``logits_scaling``, Gemma's ``final_logit_softcapping``)."""
    model = causal_lm(model)
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(model, "get_output_embeddings", None)):
        raise ValueError(
            f"{role} must be a transformers causal LM (with a config and get_output_embeddings()), "
            f"got {type(model).__name__}"
        )
    try:
        head_transform(config)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{role}: {exc}") from None
    if model.get_output_embeddings() is None:
        raise ValueError(f"{role} has no output embedding (lm_head); is it a causal LM?")


def head_options(model: torch.nn.Module, role: str) -> dict[str, float | None]:
    """The loss options of ``model``'s head transform for `role` "student" or "teacher" (its logit scale
    and soft cap, read from its config by `fusedkd.head_transform`)."""
    return head_transform(causal_lm(model).config).options(role)


def head_parameters(
    model: torch.nn.Module, hidden_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The lm_head's ``(weight [V, H], bias [V] or None)``.

    A tensor-parallel head (``ColwiseParallel``: a DTensor placed ``(Shard(0),)`` on a 1-D mesh, in a
    model FSDP does not manage) stays sharded: the loss runs vocabulary-parallel (`fusedkd.vocab_parallel`;
    `head_input` places the hidden states for it). Under FSDP2 the parameters are DTensors:
    ``full_tensor()`` gathers them once (its backward scatters the gradient back), cast to the hidden
    states' dtype (under mixed precision the gathered weight is the float32 master copy), as TRL does.
    DeepSpeed ZeRO-3 partitions parameters outside their module's forward, and the fused loss reads the
    head without calling it: refused.
    """
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        raise ValueError(
            "DeepSpeed ZeRO-3 is not supported: the fused loss reads lm_head.weight directly, which ZeRO-3 "
            "keeps partitioned; use FSDP2, DDP or ZeRO-1/2"
        )
    head = causal_lm(model).get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        if is_vocab_parallel(weight) and not _fsdp_managed(model):
            return weight.to(hidden_dtype), None if bias is None else bias.to(hidden_dtype)
        if isinstance(weight, DTensor):
            weight = weight.full_tensor().to(hidden_dtype)
        if isinstance(bias, DTensor):
            bias = bias.full_tensor().to(hidden_dtype)
    return weight, bias


def is_vocab_parallel(weight) -> bool:
    """Whether `weight` is a head sharded by vocabulary rows over a 1-D mesh (``ColwiseParallel``)."""
    if not vocab_parallel.any_dtensor(weight):
        return False
    from torch.distributed.tensor import Shard

    return weight.device_mesh.ndim == 1 and tuple(weight.placements) == (Shard(0),)


def _fsdp_managed(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(module, FSDPModule) for module in model.modules())


def pair_heads(
    student_head: tuple[torch.Tensor, torch.Tensor | None],
    teacher_head: tuple[torch.Tensor, torch.Tensor | None],
):
    """The two heads as the loss takes them together: both vocabulary-parallel on one mesh, or both whole.

    A tensor-parallel student with a replicated (plain) frozen teacher: the teacher's own ``Shard(0)``
    block of rows is cut out on each rank (no communication). A tensor-parallel teacher with a plain
    student, or heads on different meshes: the sharded heads are gathered (``full_tensor()``), as before
    the vocabulary-parallel path existed: a plain student's gradient must stay whole on every rank.
    """
    (student_weight, _), (teacher_weight, teacher_bias) = student_head, teacher_head
    student_vp, teacher_vp = is_vocab_parallel(student_weight), is_vocab_parallel(teacher_weight)
    if student_vp and teacher_vp and student_weight.device_mesh == teacher_weight.device_mesh:
        return student_head, teacher_head
    if student_vp and not teacher_vp and not vocab_parallel.any_dtensor(teacher_weight, teacher_bias):
        from torch.distributed.tensor import DTensor, Shard

        from fusedkd._shard import shard_offsets

        mesh = student_weight.device_mesh
        offset, rows = shard_offsets(teacher_weight.shape[0], mesh.size())[mesh.get_local_rank()]

        def block(x):
            if x is None:
                return None
            local = x.detach()[offset : offset + rows]
            return DTensor.from_local(
                local, mesh, [Shard(0)], run_check=False, shape=x.shape, stride=x.stride()
            )

        return student_head, (block(teacher_weight), block(teacher_bias))
    return tuple(tuple(_whole(x) for x in head) for head in (student_head, teacher_head))


def _whole(x):
    """A DTensor gathered whole (its gradient scattered back), else `x`."""
    return x.full_tensor() if vocab_parallel.any_dtensor(x) else x


def head_input(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`hidden` as the loss takes it with the head `weight`: for a vocabulary-parallel head, a DTensor
    replicated on its mesh (every tensor-parallel rank holds the same tokens; its gradient comes back
    whole on every rank), else `hidden` itself."""
    if not is_vocab_parallel(weight) or vocab_parallel.any_dtensor(hidden):
        return hidden
    from torch.distributed.tensor import DTensor, Replicate

    return DTensor.from_local(hidden, weight.device_mesh, [Replicate()], run_check=False)


def backbone_hidden_states(model: torch.nn.Module, **inputs) -> torch.Tensor:
    """Final hidden states ``[B, L, H]`` of a causal LM's backbone (``input_ids``, ``attention_mask``,
    and any other model inputs): what its lm_head would project. The lm_head is not called."""
    backbone = causal_lm(model).base_model
    return backbone(**inputs, use_cache=False).last_hidden_state


class ForwardRedirection:
    """Run ``method(*args)`` inside ``wrapper(*args)``'s forward (PyTorch Lightning's forward redirection).

    A loss that calls the backbone and reads the lm_head directly must still go through the DDP /
    FSDP wrapper's ``forward``: DDP prepares its gradient reduction there, FSDP unshards the
    parameters. The wrapped module's ``forward`` is swapped for ``method`` for one call.
    """

    def __call__(self, wrapper: torch.nn.Module, module: torch.nn.Module, method, *args, **kwargs):
        patched = module.__dict__.get("forward")  # e.g. accelerate's autocast wrapper, else None

        def restore() -> None:
            if patched is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = patched

        def forward(*inner_args, **inner_kwargs):
            restore()
            return method(*inner_args, **inner_kwargs)

        module.forward = forward
        try:
            return wrapper(*args, **kwargs)
        finally:
            restore()


def divergence_of_beta(beta: float) -> str:
    """TRL's generalized JSD convention: beta = 0 is forward KL, beta = 1 reverse KL, else the JSD."""
    if beta == 0:
        return "forward_kl"
    if beta == 1:
        return "reverse_kl"
    return "jsd"


def summed_divergence(
    student_hidden: torch.Tensor,
    student_head: tuple[torch.Tensor, torch.Tensor | None],
    teacher_hidden: torch.Tensor,
    teacher_head: tuple[torch.Tensor, torch.Tensor | None],
    valid: torch.Tensor,
    *,
    beta: float,
    temperature: float,
    head_options: dict[str, float | None] | None = None,
) -> torch.Tensor:
    """Sum over the tokens where ``valid`` is nonzero of the divergence D at ``temperature``, no T^2.

    D is TRL's generalized JSD (`divergence_of_beta`). Hidden states are ``[..., H]`` with ``valid``
    of their leading shape. fusedkd's loss at ``alpha=1`` is ``T^2 D`` per token; the sum is divided
    by ``T^2`` here, so the result is the plain divergence sum that TRL's losses normalize.
    `head_options`: both models' logit scales and soft caps (`head_options`), as loss options.
    """
    student_head, teacher_head = pair_heads(student_head, teacher_head)
    (student_weight, student_bias), (teacher_weight, teacher_bias) = student_head, teacher_head
    # Labels only select the tokens (alpha = 1: there is no cross-entropy term); 0 is a valid id.
    labels = torch.where(valid.to(device=student_hidden.device) != 0, 0, -100)
    divergence_sum = fused_linear_kd_loss(
        head_input(student_hidden, student_weight),
        student_weight,
        head_input(teacher_hidden, teacher_weight),
        teacher_weight,
        labels,
        divergence=divergence_of_beta(beta),
        beta=beta,
        temperature=temperature,
        alpha=1.0,
        reduction="sum",
        student_bias=student_bias,
        teacher_bias=teacher_bias,
        **(head_options or {}),
    )
    return divergence_sum if temperature == 1 else divergence_sum / temperature**2


def normalize(
    loss_sum: torch.Tensor, valid: torch.Tensor, num_items_in_batch: torch.Tensor | int | float | None
) -> torch.Tensor:
    """``loss_sum / num_items_in_batch`` when given (gradient-accumulation-correct), else the mean over
    the valid tokens (0 when there are none)."""
    if num_items_in_batch is None:
        return loss_sum / (valid != 0).sum().clamp(min=1)
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(loss_sum.device)
    return loss_sum / num_items_in_batch
