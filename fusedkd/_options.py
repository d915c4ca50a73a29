"""The options of every loss: their allowed values, and the validated, normalized form every backend
receives (see DESIGN.md §2).

`fusedkd._inputs` builds a `KDOptions` (and, for the top-k loss, a `SupportOptions`) once, after
checking the arguments; backends trust them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]
Reduction = Literal["mean", "sum", "none"]

DIVERGENCES: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd")
REDUCTIONS: tuple[str, ...] = ("mean", "sum", "none")
# Which code runs: "auto" picks "triton" for CUDA tensors when Triton is importable, else "torch".
BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")
# The sparse top-k teacher (`fused_linear_topk_kd_loss`): its divergences and its tail treatments.
TOPK_DIVERGENCES: tuple[str, ...] = ("forward_kl", "reverse_kl")
TAILS: tuple[str, ...] = ("bucket", "renormalize")


@dataclass(frozen=True)
class KDOptions:
    """Options of one loss evaluation, after validation.

    `divergence` is already normalized: "jsd" reaches a backend only with 0 < beta < 1
    (beta = 0 is forward KL and beta = 1 reverse KL, TRL's GKD convention).
    `vocab_size` is the number of vocabulary rows used from both heads.
    `has_labels` is False when the caller passed `labels=None` (every token counts, alpha == 1).
    `student_logit_scale`, `student_softcap` (and the teacher's): each model's head transform, applied
    to its projection z = W h + b before anything else: s = scale * z, then s = softcap *
    tanh(s / softcap) when `softcap` is not None (Cohere's `logit_scale`, Gemma's
    `final_logit_softcapping`). The defaults leave the logits as they are.
    """

    divergence: Divergence
    beta: float
    temperature: float
    alpha: float
    ignore_index: int
    reduction: Reduction
    vocab_size: int
    has_labels: bool
    student_logit_scale: float = 1.0
    teacher_logit_scale: float = 1.0
    student_softcap: float | None = None
    teacher_softcap: float | None = None

    @property
    def distill_weight(self) -> float:
        """Per-token weight of the divergence in the loss: alpha * T^2."""
        return self.alpha * self.temperature * self.temperature

    @property
    def ce_weight(self) -> float:
        """Per-token weight of the hard-label cross-entropy in the loss: 1 - alpha."""
        return 1.0 - self.alpha


@dataclass(frozen=True)
class SupportOptions:
    """How the sparse loss treats the teacher's support, after validation.

    `tail`: "bucket" or "renormalize". `precision`: the relative precision eps of the teacher's
    log-probabilities (bucket: the teacher's tail mass is never taken below the rounding error of
    1 - sum_K p, see `tail_precision`). `need_ce`: whether the cross-entropy is computed at all.
    """

    tail: str
    precision: float
    need_ce: bool


def tail_precision(logprobs_dtype: torch.dtype, compute: torch.dtype) -> float:
    """eps of the coarser of the logprobs' dtype and the compute dtype.

    Log-probabilities known to a relative precision eps give 1 - sum_K p_j to within
    tau = eps (1 + sum_K p_j |log p_j|); tail="bucket" takes p_tail = max(1 - sum_K p_j, tau).
    """
    return max(torch.finfo(logprobs_dtype).eps, torch.finfo(compute).eps)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other float accumulates in float32 (DESIGN.md §6)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def normalize_divergence(divergence: str, beta: float) -> Divergence:
    """Map the jsd endpoints onto the KL they equal by convention (TRL GKD)."""
    if divergence == "jsd" and beta == 0.0:
        return "forward_kl"
    if divergence == "jsd" and beta == 1.0:
        return "reverse_kl"
    return divergence  # type: ignore[return-value]


def check_unit_interval(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1], got {type(value).__name__}")
    value = float(value)
    if not (0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


# The temperatures a float32 loss can represent. The divergence of logits at temperature T shrinks like
# 1 / T^2 and is scaled back by T^2: past MAX_TEMPERATURE its float32 rounding error is as large as it
# (and T^2 overflows float32 near 1e19, making NaN); below MIN_TEMPERATURE, logits / T overflow.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 1e3


def check_temperature(temperature: float) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a positive float, got {type(temperature).__name__}")
    temperature = float(temperature)
    if not math.isfinite(temperature) or temperature <= 0.0:
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    if not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:
        raise ValueError(
            f"temperature must be in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], got {temperature:g}: beyond "
            "those, float32 cannot represent the tempered divergence (logits / T overflow, or T^2 D "
            "is all rounding error)"
        )
    return temperature


def check_logit_scale(name: str, value: float) -> float:
    """A model's logit scale: a finite float > 0 (the logits are multiplied by it)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a positive float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return value


def check_softcap(name: str, value: float | None) -> float | None:
    """A model's final-logit soft cap: None (no cap) or a finite float > 0 (logits = c tanh(logits / c))."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be None or a positive float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"{name} must be None or finite and > 0, got {value}")
    return value


def apply_head(logits: torch.Tensor, logit_scale: float = 1.0, softcap: float | None = None) -> torch.Tensor:
    """The head transform of `KDOptions` on full logits (not in place): scale, then soft cap."""
    if logit_scale != 1.0:
        logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value
