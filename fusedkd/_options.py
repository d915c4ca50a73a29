"""The validated, normalized options every backend receives (see DESIGN.md §2).

`fusedkd.loss` builds a `KDOptions` once, after checking the arguments; backends trust it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]
Reduction = Literal["mean", "sum", "none"]

DIVERGENCES: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd")
REDUCTIONS: tuple[str, ...] = ("mean", "sum", "none")


@dataclass(frozen=True)
class KDOptions:
    """Options of one loss evaluation, after validation.

    `divergence` is already normalized: "jsd" reaches a backend only with 0 < beta < 1
    (beta = 0 is forward KL and beta = 1 reverse KL, TRL's GKD convention).
    `vocab_size` is the number of vocabulary rows used from both heads.
    `has_labels` is False when the caller passed `labels=None` (every token counts, alpha == 1).
    """

    divergence: Divergence
    beta: float
    temperature: float
    alpha: float
    ignore_index: int
    reduction: Reduction
    vocab_size: int
    has_labels: bool

    @property
    def distill_weight(self) -> float:
        """Per-token weight of the divergence in the loss: alpha * T^2."""
        return self.alpha * self.temperature * self.temperature

    @property
    def ce_weight(self) -> float:
        """Per-token weight of the hard-label cross-entropy in the loss: 1 - alpha."""
        return 1.0 - self.alpha


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


def check_temperature(temperature: float) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a positive float, got {type(temperature).__name__}")
    temperature = float(temperature)
    if not math.isfinite(temperature) or temperature <= 0.0:
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    return temperature


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value
