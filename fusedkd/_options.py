"""The options of every loss: one validated object per call (`KDOptions`, `TopKOptions`), built from
the public function's keyword arguments or stored by its Module, and handed to the backends as is.

Adding an option to a loss touches its signature and docstring, the options class here (a field and
its check in `__post_init__`), and the code that uses it. Each model's logit scale and soft cap are one
`HeadTransform` per model (`student_head`, `teacher_head`); see docs/design.md §2.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import ClassVar, Literal

import torch

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]
Reduction = Literal["mean", "sum", "none"]

DIVERGENCES: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd")
REDUCTIONS: tuple[str, ...] = ("mean", "sum", "none")
# Which code runs (fusedkd._dispatch): "torch" (PyTorch, token chunks, any device), "tiles" (per token
# chunk, both logit tiles on cuBLAS and one Triton pass over them), "triton" (the fused Triton kernels:
# no logit tile at all, O(N) memory); "auto" picks one by device, dtype and `memory_budget`.
BACKENDS: tuple[str, ...] = ("auto", "torch", "tiles", "triton")
# The sparse top-k teacher (`fused_linear_topk_kd_loss`): its divergences and its tail treatments.
TOPK_DIVERGENCES: tuple[str, ...] = ("forward_kl", "reverse_kl")
TAILS: tuple[str, ...] = ("bucket", "renormalize")


def tail_precision(logprobs_dtype: torch.dtype, compute: torch.dtype) -> float:
    """eps of the coarser of the logprobs' dtype and the compute dtype.

    Log-probabilities known to a relative precision eps give 1 - sum_K p_j to within
    tau = eps (1 + sum_K p_j |log p_j|); tail="bucket" takes p_tail = max(1 - sum_K p_j, tau).
    """
    return max(torch.finfo(logprobs_dtype).eps, torch.finfo(compute).eps)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other float accumulates in float32 (docs/design.md §6)."""
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


# The logit scales and soft caps whose scaled logits float32 represents: the GEMMs take the scale as
# their float32 alpha, and a cap c divides the logits by c before tanh (1/c, c x tanh in float32).
LOGIT_SCALE_RANGE = (1e-6, 1e6)
SOFTCAP_RANGE = (1e-3, 1e6)


def check_logit_scale(name: str, value: float) -> float:
    """A model's logit scale: a finite float > 0 in LOGIT_SCALE_RANGE (the logits are multiplied by it)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a positive float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    low, high = LOGIT_SCALE_RANGE
    if not low <= value <= high:
        raise ValueError(
            f"{name} must be in [{low:g}, {high:g}], got {value:g}: beyond those, float32 cannot "
            "represent the scaled logits"
        )
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
    low, high = SOFTCAP_RANGE
    if not low <= value <= high:
        raise ValueError(
            f"{name} must be None or in [{low:g}, {high:g}], got {value:g}: beyond those, float32 cannot "
            "represent the capped logits"
        )
    return value


def head_factors(
    logit_scale: float, softcap: float | None, folded: float, divisor: float
) -> tuple[float, float]:
    """The two factors that finish a head's transform on a tile holding ``folded * z`` (z = W h + b):
    ``head(z) / divisor = cap_mult * tanh(mult * x)`` for a soft-capped head, ``mult * x`` otherwise
    (cap_mult 1). One place for both backends' tiles (`torch_backend.tiles.finish_head`, the tile
    kernel's launcher)."""
    if softcap is None:
        return logit_scale / divisor / folded, 1.0
    return logit_scale / softcap / folded, softcap / divisor


def head_chain_rule(
    head: HeadTransform,
    w_distill: torch.Tensor | None,
    w_ce: torch.Tensor | None = None,
    tile: torch.Tensor | None = None,
    folded: float = 1.0,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The chain rule of a student head, in one place for the torch backend and the kernels' launchers
    (docs/design.md §4). With x = logit_scale z and s = c tanh(x / c) (s = x without a cap):

        dloss/dz = logit_scale (1 - tanh^2(x / c)) dloss/ds

    The scale goes into the per-token gradient weights, G being linear in them: returns `w_distill` and
    `w_ce` times it (as given for a scale of 1; None stays None). The cap's factor multiplies G element
    by element: for a capped head and a `tile` holding ``folded * z``, the third value is
    1 - tanh^2(u) = 1 / cosh^2(u) of tanh's argument u = x / c (written to `out` when given), exact where
    tanh saturates and 1 - tanh^2 would cancel (cosh overflowing to inf gives 0, the right limit);
    else None. The kernels compute the same factor with `tl_utils.soft_cap_derivative`.
    """
    scale = head.logit_scale
    if scale != 1.0:
        w_distill = None if w_distill is None else w_distill * scale
        w_ce = None if w_ce is None else w_ce * scale
    derivative = None
    if tile is not None and head.softcap is not None:
        mult, _ = head_factors(scale, head.softcap, folded, 1.0)
        derivative = torch.mul(tile, mult, out=out) if out is not None else tile * mult
        derivative.cosh_().square_().reciprocal_()
    return w_distill, w_ce, derivative


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


@dataclass(frozen=True)
class HeadTransform:
    """How a model's logits follow from its lm_head's projection z = W h + b: ``s = logit_scale * z``,
    then ``s = softcap * tanh(s / softcap)`` when `softcap` is not None (Cohere's ``logit_scale``,
    Granite's ``1 / logits_scaling``, Gemma's ``final_logit_softcapping``; `fusedkd.head_transform` reads
    them from a config)."""

    logit_scale: float = 1.0
    softcap: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "logit_scale", check_logit_scale("logit_scale", self.logit_scale))
        object.__setattr__(self, "softcap", check_softcap("softcap", self.softcap))

    @classmethod
    def of(cls, role: str, logit_scale: float = 1.0, softcap: float | None = None) -> HeadTransform:
        """The head of `role` ("student" / "teacher") from a loss's keyword arguments, errors naming them."""
        return cls(
            check_logit_scale(f"{role}_logit_scale", logit_scale), check_softcap(f"{role}_softcap", softcap)
        )

    @property
    def is_identity(self) -> bool:
        return self.logit_scale == 1.0 and self.softcap is None

    def options(self, role: str) -> dict[str, float | None]:
        """The loss keyword arguments of this head for `role` "student" or "teacher", e.g.
        ``{"student_logit_scale": 0.0625, "student_softcap": None}``."""
        if role not in ("student", "teacher"):
            raise ValueError(f"role must be 'student' or 'teacher', got {role!r}")
        return {f"{role}_logit_scale": self.logit_scale, f"{role}_softcap": self.softcap}

    def __call__(self, projections: torch.Tensor) -> torch.Tensor:
        """The model's logits from its head's projections ``W h + b`` (not in place)."""
        if not isinstance(projections, torch.Tensor):
            raise TypeError(
                f"a HeadTransform applies to a torch.Tensor of projections, got {type(projections).__name__}"
            )
        return apply_head(projections, self.logit_scale, self.softcap)


IDENTITY_HEAD = HeadTransform()


@dataclass(frozen=True)
class KDOptions:
    """The options of one dense loss evaluation (`fused_linear_kd_loss`, `kd_loss`), validated on
    construction: a bad value raises a TypeError / ValueError naming its keyword argument.

    The first eight fields are what a backend computes with. `divergence` is normalized: "jsd" stays
    only with 0 < beta < 1 (beta = 0 is forward KL and beta = 1 reverse KL, TRL's GKD convention).
    `vocab_size` is the caller's request (None: the heads' size) until `resolve` sets the number of
    vocabulary rows used; `has_labels` is False when the caller passed ``labels=None`` (every token
    counts, alpha == 1). `student_head`, `teacher_head`: each model's head transform. The rest say how
    the call runs: `backend`, `chunk_size` (torch and tiles backends), `return_components`,
    `check_finite` (an up-front check for NaN / inf inputs), `shift_labels` (labels given unshifted, as
    Hugging Face models take them), `memory_budget` (bytes of logit tiles the tiles backend may hold).
    """

    divergence: Divergence = "forward_kl"
    beta: float = 0.5
    temperature: float = 1.0
    alpha: float = 0.5
    ignore_index: int = -100
    reduction: Reduction = "mean"
    vocab_size: int | None = None
    has_labels: bool = True
    student_head: HeadTransform = field(default=IDENTITY_HEAD)
    teacher_head: HeadTransform = field(default=IDENTITY_HEAD)
    backend: str = "auto"
    chunk_size: int | None = None
    return_components: bool = False
    check_finite: bool = False
    shift_labels: bool = False
    memory_budget: int | None = None

    # What the loss accepts: its divergences, whether it has fused Triton kernels ("triton") and a tile
    # path ("tiles": logit tiles it projects from a head, one Triton pass over them), the models with a
    # head.
    LOSS: ClassVar[str] = "fused_linear_kd_loss (FusedLinearKDLoss)"
    DIVERGENCES: ClassVar[tuple[str, ...]] = DIVERGENCES
    HAS_TRITON: ClassVar[bool] = True
    HAS_TILES: ClassVar[bool] = True
    ROLES: ClassVar[tuple[str, ...]] = ("student", "teacher")
    # Fields the loss does not take as keyword arguments (they keep their defaults).
    NOT_OPTIONS: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        check_choice("divergence", self.divergence, self.DIVERGENCES)
        check_choice("reduction", self.reduction, REDUCTIONS)
        check_backend(self.backend, has_triton=self.HAS_TRITON, has_tiles=self.HAS_TILES, loss=self.LOSS)
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(self.ignore_index).__name__}")
        if not -(2**63) <= self.ignore_index < 2**63:
            raise ValueError(f"ignore_index must fit in int64 (the labels' dtype), got {self.ignore_index}")
        if self.vocab_size is not None:
            check_vocab_size(self.vocab_size)
        if self.chunk_size is not None:
            check_positive_int("chunk_size", self.chunk_size)
        if self.memory_budget is not None:
            check_positive_int("memory_budget", self.memory_budget)
        for name in ("has_labels", "return_components", "check_finite", "shift_labels"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        for role in ("student", "teacher"):
            if not isinstance(getattr(self, f"{role}_head"), HeadTransform):
                raise TypeError(f"{role}_head must be a fusedkd.HeadTransform")
        beta = check_unit_interval("beta", self.beta)
        set_field = functools.partial(object.__setattr__, self)
        set_field("beta", beta)
        set_field("alpha", check_unit_interval("alpha", self.alpha))
        set_field("temperature", check_temperature(self.temperature))
        set_field("divergence", normalize_divergence(self.divergence, beta))

    @classmethod
    def of(cls, arguments: Mapping[str, object], *, strict: bool = False):
        """The options from a loss's keyword arguments (e.g. a public function's ``locals()``): names
        that are not options (the tensors) are skipped, unless `strict` (a Module's keyword
        arguments), where they are a TypeError. ``<role>_logit_scale`` / ``<role>_softcap`` become
        ``<role>_head``."""
        names = {f.name for f in fields(cls)} - {
            "has_labels",
            "student_head",
            "teacher_head",
            *cls.NOT_OPTIONS,
        }
        head_names = {f"{role}_{part}" for role in cls.ROLES for part in ("logit_scale", "softcap")}
        if strict:
            unknown = sorted(set(arguments) - names - head_names)
            if unknown:
                raise TypeError(
                    f"{cls.LOSS} got unexpected option(s) {', '.join(unknown)}; its options are "
                    f"{', '.join(sorted(names | head_names))}"
                )
        values = {name: arguments[name] for name in names if name in arguments}
        for role in cls.ROLES:
            values[f"{role}_head"] = HeadTransform.of(
                role, arguments.get(f"{role}_logit_scale", 1.0), arguments.get(f"{role}_softcap")
            )
        return cls(**values)

    def resolve(self, *, vocab_size: int, has_labels: bool):
        """These options for one call: the vocabulary rows it uses, and whether it has labels."""
        if not has_labels:
            if self.alpha != 1.0:
                raise ValueError(
                    f"labels=None means no hard-label cross-entropy, which needs alpha == 1; got "
                    f"alpha={self.alpha} (pass labels, or alpha=1.0)"
                )
            if self.shift_labels:
                raise ValueError("shift_labels=True shifts the labels: pass labels (or shift_labels=False)")
        return replace(self, vocab_size=vocab_size, has_labels=has_labels)

    def describe(self) -> str:
        """The options that differ from their defaults, as keyword arguments (a Module's repr)."""
        default, parts = type(self)(), []
        for f in fields(self):
            value = getattr(self, f.name)
            if value == getattr(default, f.name):
                continue
            if isinstance(value, HeadTransform):
                parts += [f"{k}={v!r}" for k, v in value.options(f.name.removesuffix("_head")).items()]
            else:
                parts.append(f"{f.name}={value!r}")
        return ", ".join(parts)

    @property
    def distill_weight(self) -> float:
        """Per-token weight of the divergence in the loss: alpha * T^2."""
        return self.alpha * self.temperature * self.temperature

    @property
    def ce_weight(self) -> float:
        """Per-token weight of the hard-label cross-entropy in the loss: 1 - alpha."""
        return 1.0 - self.alpha

    # Each model's head transform as the backends read it.
    @property
    def student_logit_scale(self) -> float:
        return self.student_head.logit_scale

    @property
    def student_softcap(self) -> float | None:
        return self.student_head.softcap

    @property
    def teacher_logit_scale(self) -> float:
        return self.teacher_head.logit_scale

    @property
    def teacher_softcap(self) -> float | None:
        return self.teacher_head.softcap


@dataclass(frozen=True)
class LogitsKDOptions(KDOptions):
    """The options of `kd_loss`: `KDOptions` less `memory_budget` (its inputs are the logits)."""

    LOSS: ClassVar[str] = "kd_loss (KDLoss)"
    HAS_TILES: ClassVar[bool] = False
    NOT_OPTIONS: ClassVar[tuple[str, ...]] = ("memory_budget",)


@dataclass(frozen=True)
class TopKOptions(KDOptions):
    """The options of `fused_linear_topk_kd_loss`: `KDOptions` (forward or reverse KL, no teacher head:
    the teacher's log-probabilities are given) and the treatment of the teacher's tail, `tail`."""

    tail: str = "bucket"

    LOSS: ClassVar[str] = "fused_linear_topk_kd_loss (FusedLinearTopKKDLoss)"
    DIVERGENCES: ClassVar[tuple[str, ...]] = TOPK_DIVERGENCES
    HAS_TRITON: ClassVar[bool] = False
    ROLES: ClassVar[tuple[str, ...]] = ("student",)
    NOT_OPTIONS: ClassVar[tuple[str, ...]] = ("beta",)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("tail", self.tail, TAILS)


def check_backend(
    backend: str, *, has_triton: bool = True, has_tiles: bool = True, loss: str = "this loss"
) -> str:
    """`backend` is one of `BACKENDS`, and one the loss has: "triton" (its fused Triton kernels) and
    "tiles" (logit tiles it projects from a head) only where it has them."""
    check_choice("backend", backend, BACKENDS)
    offered = ["auto", "torch"] + ["triton"] * has_triton + ["tiles"] * has_tiles
    if backend not in offered:
        what = (
            "no fused Triton kernels"
            if backend == "triton"
            else "no logit tiles to make (backend='tiles' projects a head into them: the fused linear losses)"
        )
        raise ValueError(f"{loss} has {what}; its backends are {', '.join(map(repr, offered))}")
    return backend


def check_vocab_size(vocab_size) -> int:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size must be an int or None, got {type(vocab_size).__name__}")
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    return vocab_size


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

    @property
    def sparse(self) -> bool:
        """Whether the loss reads only the k head rows W_s[ids] per token (renormalize, no cross-entropy):
        no logit tile, on every backend."""
        return self.tail == "renormalize" and not self.need_ce
