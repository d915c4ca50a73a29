"""CPU intra-op threads on a shared machine: use all cores only while that is actually faster.

A small model's training step is thousands of small operations, each a parallel region that ends in a
barrier. When another job keeps a core busy, one of our threads is preempted at every barrier and the
others wait for it: on the 2-core machine this recipe is sized for, a step of the default's student
took 3.5 s with 2 threads and 0.33 s with 1 while another engineer's job ran (quiet: 0.2 s with 2).
`ThreadTuner` times a probe (a forward pass) with 1 thread and with all of them and keeps the faster,
re-checking every few steps. The thread count changes floating-point summation order in a few kernels
(last-bit differences in gradients, which training amplifies to a few percent in the default's final
perplexities), so it is used only by the embedded default, never by real runs or tests, which must be
bit-reproducible.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

import torch


class ThreadTuner:
    """Keeps ``torch.get_num_threads()`` at whichever of 1 or `max_threads` runs `probe` faster.

    Call it with the step number before every training step; it re-times every `every` steps.

    Example:
        >>> tuner = ThreadTuner(lambda: torch.randn(64, 64) @ torch.randn(64, 64), every=10)
        >>> tuner(0) in (1, tuner.max_threads)
        True
        >>> tuner.restore()
    """

    def __init__(
        self, probe: Callable[[], object] | None = None, *, every: int = 25, max_threads: int | None = None
    ) -> None:
        self.probe = probe  # settable: the default probes the model it is about to train with
        self.every = every
        self.initial_threads = torch.get_num_threads()
        self.max_threads = max_threads or self.initial_threads
        self.threads = self.initial_threads
        self.steps_at = Counter()  # threads -> steps run with that many

    def _time(self, threads: int) -> float:
        torch.set_num_threads(threads)
        self.probe()  # warm-up: thread pool, allocator
        start = time.perf_counter()
        self.probe()
        return time.perf_counter() - start

    def tune(self) -> int:
        """Time the probe with each candidate and keep the faster; returns the chosen thread count."""
        candidates = sorted({1, self.max_threads})
        if len(candidates) > 1 and self.probe is not None:
            timings = {threads: self._time(threads) for threads in candidates}
            self.threads = min(timings, key=timings.get)
        torch.set_num_threads(self.threads)
        return self.threads

    def __call__(self, step: int) -> int:
        if step % self.every == 0:
            self.tune()
        self.steps_at[self.threads] += 1
        return self.threads

    def summary(self) -> str:
        """E.g. ``"2 threads for 125 steps, 1 thread for 25"``."""
        parts = [
            f"{n} thread{'s' if n > 1 else ''} for {steps} steps"
            for n, steps in sorted(self.steps_at.items())
        ]
        return ", ".join(parts) or "no steps"

    def restore(self) -> None:
        torch.set_num_threads(self.initial_threads)
