"""Checks of tensor *values*, after `fusedkd._inputs` has checked shapes, dtypes and devices.

On a CPU they raise at once (reading a flag there costs nothing); on an accelerator they are
asynchronous device-side assertions with the same message (`torch._assert_async`: no host
synchronization, the step never waits). `check_finite_rows`, the opt-in ``check_finite=True``, reads its
flag on the host wherever it runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from fusedkd._options import KDOptions


def eager_value_checks(device: torch.device) -> bool:
    """Whether checks of tensor *values* raise eagerly on `device`: on a CPU, where reading a flag costs
    nothing. On an accelerator that read would synchronize the host with the device on every call, so
    there the checks are asynchronous (`torch._assert_async`): a bad value stops the program at the
    device's next synchronization, with the same message, and the training step never waits."""
    return device.type == "cpu"


def check_values(bad: torch.Tensor, expected: str, found: Callable[[], str] | None = None) -> None:
    """Raise ``ValueError(expected; found())`` if any entry of the boolean tensor `bad` is set.

    Eager on a CPU; on an accelerator an asynchronous device-side assertion with the message `expected`
    (no host synchronization, see `eager_value_checks`).
    """
    if bad.numel() == 0:
        return
    if eager_value_checks(bad.device):
        if bool(bad.any()):
            raise ValueError(expected if found is None else f"{expected}; {found()}")
        return
    torch._assert_async(~bad.any(), expected)


def counted_tokens(labels: torch.Tensor | None, options: KDOptions) -> torch.Tensor | None:
    """[N] bool: the tokens that count (label not `ignore_index`), or None when every token counts."""
    return None if labels is None else labels != options.ignore_index


def check_finite_rows(
    name: str, x: torch.Tensor | None, row: str, counts: torch.Tensor | None = None, *, logits: bool = False
) -> None:
    """``check_finite=True``: a ValueError naming `name` and its first bad `row` (over the first
    dimensions; only rows that count, `counts`). Bad is a NaN or an inf; for logits and biases (`logits`)
    a NaN or +inf, or a row of -inf only (no distribution): -inf entries are masked tokens. Reads the
    flag on the host (a synchronization on an accelerator, which the option asks for)."""
    if x is None or x.numel() == 0:
        return
    x = x.detach()
    if logits:
        bad_entry = x.isnan() | (x == math.inf)
        bad = bad_entry.any(-1) if x.dim() > 1 else bad_entry
        if x.dim() > 1:
            bad = bad | (x == -math.inf).all(-1)
    else:
        bad = ~x.isfinite()
        bad = bad.any(-1) if x.dim() > 1 else bad
    bad = bad.reshape(-1)
    if counts is not None and bad.numel() == counts.numel():
        bad = bad & counts
    if bool(bad.any()):
        index = int(bad.nonzero()[0])
        values = x.reshape(-1, x.shape[-1])[index] if x.dim() > 1 else x[index : index + 1]
        if bool(values.isnan().any()):
            found = "NaN"
        elif bool((values == math.inf).any()):
            found = "+inf"
        else:
            found = "-inf only" if logits else "-inf"
        raise ValueError(
            f"check_finite: {name} has {found} at {row} {index}"
            + (f" (of {int(bad.sum())} such {row}s)" if int(bad.sum()) > 1 else "")
        )


def check_topk_values(
    ids: torch.Tensor, logprobs: torch.Tensor, vocab: int, counts: torch.Tensor | None = None
) -> None:
    """ids in [0, V) and distinct per token; logprobs <= 0 (no NaN) with a mass of at most 1 (+ rounding),
    and more than 0 at every position that counts (`counts`, [N] bool; None: all).

    Five reductions over [N, k], so that bad data is an error, not a NaN: eager on a CPU, asynchronous
    device-side assertions on an accelerator (no host sync, `check_values`).
    """
    if ids.numel() == 0:
        return
    out_of_range = (ids < 0) | (ids >= vocab)
    check_values(
        out_of_range, f"ids must be token ids in [0, {vocab})", lambda: f"found {ids[out_of_range][0].item()}"
    )
    ordered = ids.sort(dim=-1).values
    repeated = ordered[:, 1:] == ordered[:, :-1]

    def repeated_found() -> str:
        token, position = repeated.nonzero()[0].tolist()
        return f"position {token} lists id {ordered[token, position].item()} twice"

    check_values(repeated, "ids must list k distinct tokens per position", repeated_found)
    not_log_prob = ~(logprobs <= 0)  # also catches NaN
    check_values(
        not_log_prob,
        "logprobs must be log-probabilities (<= 0, not NaN)",
        lambda: f"found {logprobs[not_log_prob][0].item()}",
    )
    # Their mass sum_j exp(logprobs_j) is at most 1, up to the rounding of the stored dtype.
    tolerance = 1e-6 + 4 * torch.finfo(logprobs.dtype).eps * max(1.0, math.log(ids.shape[-1]))
    mass = torch.logsumexp(logprobs.float(), dim=-1).exp()
    empty = mass == 0 if counts is None else (mass == 0) & counts
    check_values(
        empty,
        "logprobs must give every position that counts some mass: a row of -inf log-probabilities lists no "
        "teacher distribution (mark such positions with ignore_index)",
        lambda: f"position {empty.nonzero()[0].item()} has all its log-probabilities -inf",
    )
    check_values(
        mass > 1 + tolerance,
        "logprobs must be log-probabilities normalized over the full vocabulary (log softmax, not logits)",
        lambda: f"the listed probabilities of a position sum to {mass.max().item():.6g} > 1",
    )
