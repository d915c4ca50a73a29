"""Knowledge distillation with a plain Hugging Face ``transformers.Trainer`` and a frozen teacher.

`KDTrainer` is a ``transformers.Trainer`` whose loss is `fusedkd.fused_linear_kd_loss` between the
student being trained and a frozen teacher: both models' backbones return their final hidden
states, and the loss reads their ``lm_head`` weights, so neither model's ``[tokens x vocab]``
logits are built. For every token whose (shifted) label is not -100::

    loss_i = alpha * T^2 * D(p_teacher, p_student) + (1 - alpha) * CE(student, label)

the same value and gradients as the naive recipe on the models' logits. The reduction follows the
Trainer's: with ``num_items_in_batch`` (models that take loss kwargs, such as every causal LM in
transformers) the sum over the accumulated batch's tokens divided by their number, so gradient
accumulation gives the loss of the whole batch; else the mean over the batch's valid tokens.

Example::

    from fusedkd.integrations.hf import KDTrainer

    trainer = KDTrainer(model=student, teacher_model=teacher, args=TrainingArguments(...),
                        train_dataset=dataset, data_collator=collator,
                        temperature=2.0, alpha=0.5, divergence="forward_kl")
    trainer.train()

Why not ``compute_loss_func``: ``Trainer`` calls the model (and so its lm_head, over every token)
before ``compute_loss_func`` runs, and does not hand it the inputs the teacher needs. Heads that
scale or soft-cap their logits (``logit_scale``, ``logits_scaling``, ``final_logit_softcapping``) are
distilled through their own transform, read from each model's config (`fusedkd.head_transform`);
other head multipliers (``output_multiplier``, ``lm_head_multiplier``) are refused.
"""

from __future__ import annotations

import torch
from transformers import Trainer
from transformers.modeling_outputs import CausalLMOutputWithPast

from fusedkd.integrations._common import (
    ForwardRedirection,
    backbone_hidden_states,
    check_head,
    head_input,
    head_options,
    head_parameters,
    pair_heads,
)
from fusedkd.loss import fused_linear_kd_loss

__all__ = ["KDTrainer"]

_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
_LABEL_KEYS = ("labels", "shift_labels")


def _unit_interval(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1], got {type(value).__name__}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


class KDTrainer(Trainer):
    """``transformers.Trainer`` distilling a frozen ``teacher_model`` into ``model`` with fusedkd's loss.

    Args:
        teacher_model: a causal LM over the same vocabulary (same lm_head rows) as the student. It is
            put in eval mode, frozen, and placed like the student (``accelerator.prepare_model``).
        temperature: softmax temperature ``T > 0`` of the distillation term.
        alpha: weight in [0, 1] of the distillation term; ``1 - alpha`` weights the hard-label
            cross-entropy (at temperature 1).
        divergence: ``"forward_kl"`` ``KL(p_teacher || p_student)``, ``"reverse_kl"`` or ``"jsd"``.
        beta: JSD mixture weight in [0, 1] (``"jsd"`` only; 0 is forward KL, 1 reverse KL).
        vocab_size: distill over the first ``vocab_size`` rows of both heads (heads padded to
            different sizes over one tokenizer); None: all rows, which must then match.
        backend: the loss backend (``"auto"``, ``"torch"``, ``"tiles"``, ``"triton"``).
        *args, **kwargs: those of ``transformers.Trainer``. ``compute_loss_func`` is not accepted
            (the loss is this trainer's), nor ``args.label_smoothing_factor > 0``.

    The batches need ``labels`` (or ``shift_labels``, already shifted), -100 on tokens that count
    for nothing; every other input goes to the student's and the teacher's backbones.
    """

    def __init__(
        self,
        model=None,
        args=None,
        *trainer_args,
        teacher_model: torch.nn.Module,
        temperature: float = 1.0,
        alpha: float = 0.5,
        divergence: str = "forward_kl",
        beta: float = 0.5,
        vocab_size: int | None = None,
        backend: str = "auto",
        **trainer_kwargs,
    ):
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise TypeError(f"temperature must be a float > 0, got {type(temperature).__name__}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.alpha = _unit_interval("alpha", alpha)
        self.beta = _unit_interval("beta", beta)
        if divergence not in _DIVERGENCES:
            raise ValueError(f"divergence must be one of {_DIVERGENCES}, got {divergence!r}")
        if trainer_kwargs.get("compute_loss_func") is not None:
            raise ValueError("KDTrainer computes its own loss: compute_loss_func is not accepted")
        if teacher_model is None:
            raise ValueError("teacher_model is required")
        check_head(teacher_model, "teacher_model")
        self.temperature = float(temperature)
        self.divergence = divergence
        self.vocab_size = vocab_size
        self.backend = backend
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        if self.args.label_smoothing_factor != 0:
            raise ValueError(
                "KDTrainer does not apply label smoothing: set label_smoothing_factor=0 (the distillation "
                "term already softens the targets)"
            )
        check_head(self.accelerator.unwrap_model(self.model), "model")
        teacher_model.eval()
        teacher_model.requires_grad_(False)
        self.teacher_model = self.accelerator.prepare_model(teacher_model, evaluation_mode=True)
        self._forward_redirection = ForwardRedirection()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Through the wrapper's forward: DDP's prepare_for_backward, FSDP's unsharding of the head.
        unwrapped = self.accelerator.unwrap_model(model)
        # transformers 5 autocasts through accelerate's wrapper of the model's forward, which the forward
        # redirection replaces for this call: the mixed-precision context (bf16=True) is entered here.
        with self.accelerator.autocast():
            loss = self._forward_redirection(
                model, unwrapped, self._kd_loss, unwrapped, inputs, num_items_in_batch
            )
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # As Trainer.compute_loss: the count is over all processes, DDP averages the gradients.
            tp_size = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
            loss_scale = self.accelerator.num_processes // tp_size
            loss = loss * (loss_scale if self.args.n_gpu <= 1 else self.args.n_gpu)
        return (loss, CausalLMOutputWithPast(loss=loss)) if return_outputs else loss

    def _teacher_hidden(self, teacher, model_inputs):
        return backbone_hidden_states(teacher, **model_inputs)

    def _kd_loss(self, student, inputs, num_items_in_batch):
        if not any(key in inputs for key in _LABEL_KEYS):
            raise ValueError(
                "KDTrainer needs labels (or shift_labels) in every batch; -100 marks ignored tokens"
            )
        model_inputs = {k: v for k, v in inputs.items() if k not in _LABEL_KEYS}
        student_hidden = backbone_hidden_states(student, **model_inputs)
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            teacher_hidden = self._forward_redirection(
                self.teacher_model, teacher, self._teacher_hidden, teacher, model_inputs
            )
        if "shift_labels" in inputs:  # already shifted, e.g. by a padding-free collator
            labels = inputs["shift_labels"]
        else:  # position i predicts token i + 1
            labels = inputs["labels"][..., 1:]
            student_hidden, teacher_hidden = student_hidden[..., :-1, :], teacher_hidden[..., :-1, :]
        (student_weight, student_bias), (teacher_weight, teacher_bias) = pair_heads(
            head_parameters(student, student_hidden.dtype), head_parameters(teacher, teacher_hidden.dtype)
        )
        loss = fused_linear_kd_loss(
            head_input(student_hidden, student_weight),
            student_weight,
            head_input(teacher_hidden.to(teacher_weight.device), teacher_weight),
            teacher_weight,
            labels.to(student_hidden.device),
            divergence=self.divergence,
            beta=self.beta,
            temperature=self.temperature,
            alpha=self.alpha,
            reduction="mean" if num_items_in_batch is None else "sum",
            vocab_size=self.vocab_size,
            backend=self.backend,
            student_bias=student_bias,
            teacher_bias=teacher_bias,
            # Each model's logit scale and soft cap, from its config.
            **head_options(student, "student"),
            **head_options(teacher, "teacher"),
        )
        if num_items_in_batch is None:
            return loss
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        return loss / num_items_in_batch
