"""fusedkd as the loss of TRL's `DistillationTrainer` and `GKDTrainer`.

`FusedDistillationTrainer` and `FusedGKDTrainer` are drop-in subclasses of ``trl.DistillationTrainer``
and ``trl.experimental.gkd.GKDTrainer`` (TRL 1.16). Everything but the loss is TRL's: on-policy
generation, ``lmbda``, ``seq_kd``, the data collators, the prompt / padding / tool masks, the
``num_items_in_batch`` normalization, DDP / FSDP2 handling. The loss reads the student's and the
teacher's final hidden states and ``lm_head`` weights and calls `fusedkd.fused_linear_kd_loss`, so
neither model's ``[tokens x vocab]`` logits are built, and it is the objective TRL computes::

    loss = sum over loss tokens of D_beta(p_teacher, p_student) / normalizer

with TRL's generalized JSD ``D_beta`` (``beta = 0`` forward KL, ``beta = 1`` reverse KL), and as
normalizer ``num_items_in_batch`` when TRL passes it, else the number of loss tokens.

- `FusedDistillationTrainer`: both distributions at ``args.temperature``, as TRL's chunked loss.
  The student-entropy metric TRL's loss logs is not computed (it would cost a pass over the
  vocabulary) and is not logged.
- `FusedGKDTrainer`: GKD's loss at temperature 1 (``GKDTrainer`` uses ``args.temperature`` for
  sampling only); returns no logits to evaluation (it has none).

Heads whose logits are scaled or soft-capped (``logit_scale``, ``logits_scaling``,
``final_logit_softcapping``) are distilled through their own transform, read from each model's config
(`fusedkd.head_transform`); both refuse, at construction, other head multipliers
(``output_multiplier``, ``lm_head_multiplier``).

Example::

    from fusedkd.integrations.trl import FusedDistillationTrainer

    trainer = FusedDistillationTrainer(model=student, teacher_model=teacher, args=config,
                                       train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
"""

from __future__ import annotations

try:
    import trl
    from trl import DistillationTrainer
except ImportError as exc:  # trl missing, or too old to have DistillationTrainer
    raise ImportError(
        'fusedkd.integrations.trl needs TRL >= 1.16: install it with pip install "fusedkd[trl]"'
    ) from exc

import torch

from fusedkd.integrations._common import (
    ForwardRedirection,
    backbone_hidden_states,
    check_head,
    head_options,
    head_parameters,
    normalize,
    summed_divergence,
)

__all__ = ["FusedDistillationTrainer", "FusedGKDTrainer"]  # noqa: F822 (FusedGKDTrainer: module __getattr__)

# The DistillationTrainer internals the subclass relies on; checked so that a TRL that renamed them
# fails here, clearly, rather than silently falling back to TRL's own loss.
for _name in ("_compute_loss", "_get_last_hidden_state"):
    if not hasattr(DistillationTrainer, _name):
        raise ImportError(
            f"fusedkd.integrations.trl supports TRL 1.16 (DistillationTrainer.{_name}); "
            f"the installed trl {trl.__version__} does not have it"
        )

_MULTIMODAL_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "pixel_attention_mask",
    "spatial_shapes",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


def _check_heads(trainer) -> None:
    unwrap = trainer.accelerator.unwrap_model
    check_head(unwrap(trainer.model), "the student model")
    check_head(unwrap(trainer.teacher_model), "the teacher model")


class FusedDistillationTrainer(DistillationTrainer):
    """``trl.DistillationTrainer`` with its loss computed by `fusedkd.fused_linear_kd_loss`.

    Same arguments and behaviour as ``DistillationTrainer``; the loss equals TRL's chunked
    generalized JSD (``beta``, ``temperature``, completion and tool masks, ``num_items_in_batch``)
    to float rounding. The ``entropy`` metric is not logged.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _check_heads(self)

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        # DistillationTrainer._compute_loss, with fusedkd in place of TRL's chunked divergence.
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        completion_mask = inputs["completion_mask"]
        loss_mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        logits_to_keep = inputs["completion_ids"].size(1)
        multimodal_inputs = {k: inputs[k] for k in _MULTIMODAL_KEYS if k in inputs}

        student_hidden = self._get_last_hidden_state(
            unwrapped_student, input_ids, attention_mask, logits_to_keep, **multimodal_inputs
        )
        self.teacher_model.eval()
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            teacher_hidden = self._forward_redirection(
                self.teacher_model,
                unwrapped_teacher,
                self._get_last_hidden_state,
                unwrapped_teacher,
                input_ids,
                attention_mask,
                logits_to_keep,
                **multimodal_inputs,
            )
        student_head = head_parameters(unwrapped_student, student_hidden.dtype)
        teacher_head = head_parameters(unwrapped_teacher, teacher_hidden.dtype)
        device = student_head[0].device
        if teacher_head[0].device != device:
            raise ValueError(
                f"The student lm_head is on {device} but the teacher lm_head is on {teacher_head[0].device}; "
                "place both on the same device in their device_map."
            )
        loss_mask = loss_mask.to(device)
        divergence_sum = summed_divergence(
            student_hidden.to(device),
            student_head,
            teacher_hidden.to(device),
            teacher_head,
            loss_mask,
            head_options={
                **head_options(unwrapped_student, "student"),
                **head_options(unwrapped_teacher, "teacher"),
            },
            beta=self.beta,
            temperature=self.temperature,
        )
        loss = normalize(divergence_sum, loss_mask, num_items_in_batch)
        num_valid = (loss_mask != 0).sum()
        # No entropy: `compute_loss` reduces it to NaN, which `log` drops (see below).
        entropy_sum = torch.full((), float("nan"), device=device)
        return loss, entropy_sum, num_valid

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        for metrics in self._metrics.values():
            metrics.pop("entropy", None)
        super().log(logs, start_time)


def _build_gkd_trainer() -> type:
    # Imported on first use: trl.experimental warns on import, which DistillationTrainer users need not see.
    from transformers.modeling_outputs import CausalLMOutputWithPast
    from trl.experimental.gkd import GKDTrainer
    from trl.experimental.utils import empty_cache

    class FusedGKDTrainer(GKDTrainer):
        """``trl.experimental.gkd.GKDTrainer`` with its loss computed by `fusedkd.fused_linear_kd_loss`.

        Same arguments and behaviour as ``GKDTrainer`` (on-policy generation with probability
        ``lmbda``, ``seq_kd``, ``beta``); the loss equals ``GKDTrainer.generalized_jsd_loss`` on the
        shifted logits (temperature 1, ``labels != -100`` mask, ``num_items_in_batch``) to float
        rounding. ``compute_loss(..., return_outputs=True)`` returns an output holding only the loss.
        """

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._forward_redirection = ForwardRedirection()
            _check_heads(self)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # Through the wrapper's forward (DDP's prepare_for_backward, FSDP's unsharding of the head).
            unwrapped_student = self.accelerator.unwrap_model(model)
            loss = self._forward_redirection(
                model, unwrapped_student, self._fused_loss, unwrapped_student, inputs, num_items_in_batch
            )
            empty_cache()
            return (loss, CausalLMOutputWithPast(loss=loss)) if return_outputs else loss

        def _teacher_hidden(self, unwrapped_teacher, input_ids, attention_mask):
            return backbone_hidden_states(
                unwrapped_teacher, input_ids=input_ids, attention_mask=attention_mask
            )

        def _fused_loss(self, unwrapped_student, inputs, num_items_in_batch):
            input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
            student_hidden = backbone_hidden_states(
                unwrapped_student, input_ids=input_ids, attention_mask=attention_mask
            )
            self.teacher_model.eval()
            unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
            with torch.no_grad():
                teacher_hidden = self._forward_redirection(
                    self.teacher_model,
                    unwrapped_teacher,
                    self._teacher_hidden,
                    unwrapped_teacher,
                    input_ids,
                    attention_mask,
                )
            student_head = head_parameters(unwrapped_student, student_hidden.dtype)
            teacher_head = head_parameters(unwrapped_teacher, teacher_hidden.dtype)
            device = student_head[0].device
            # Position i predicts token i + 1; GKD's loss counts the shifted labels that are not -100.
            valid = inputs["labels"][:, 1:].to(device) != -100
            divergence_sum = summed_divergence(
                student_hidden[:, :-1].to(device),
                student_head,
                teacher_hidden[:, :-1].to(device),
                teacher_head,
                valid,
                head_options={
                    **head_options(unwrapped_student, "student"),
                    **head_options(unwrapped_teacher, "teacher"),
                },
                beta=self.beta,
                temperature=1.0,
            )
            return normalize(divergence_sum, valid, num_items_in_batch)

    FusedGKDTrainer.__module__ = __name__
    FusedGKDTrainer.__qualname__ = "FusedGKDTrainer"  # found through the module's __getattr__
    return FusedGKDTrainer


_lazy: dict[str, type] = {}


def __getattr__(name: str):
    if name == "FusedGKDTrainer":
        if name not in _lazy:
            _lazy[name] = _build_gkd_trainer()
        return _lazy[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
