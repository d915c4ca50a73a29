"""The training loop shared by every mode (online teacher, cached top-k teacher, hard labels only).

One optimizer step takes the global batch of `data.BatchPlan` (``batch_size`` samples per micro-batch,
``grad_accum`` micro-batches per process, every process). The summed loss of each micro-batch is
divided by the number of target tokens of the whole global batch (one all-reduce of counts per step),
so the step is the mean over its target tokens however the batch is split across micro-batches and
processes: one process with batch 8 and two with batch 4 take the same step. AdamW (no weight decay
on norms and biases), a linear warmup then a cosine decay to ``min_lr_ratio * lr``, gradient-norm
clipping.

Ctrl-C (SIGINT) or SIGTERM: the step in flight finishes, a checkpoint is written and the run stops
with `TrainResult.interrupted`; every process stops at the same step (the stop flag rides on the
per-step all-reduce). A second signal, a second or more later, aborts at once (a signal forwarded by
``torchrun`` right after the terminal's own is not taken for a second one).
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fusedkd.distill.checkpoint import (
    CHECKPOINT_NAME,
    check_resumable,
    read_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from fusedkd.distill.data import Batch, BatchPlan, TokenizedSamples, collate
from fusedkd.distill.distributed import DistContext, all_reduce_sum, is_fsdp
from fusedkd.distill.errors import UsageError

METRICS_NAME = "metrics.jsonl"


@dataclass(frozen=True)
class TrainConfig:
    """Optimization settings of one training run."""

    lr: float
    batch_size: int
    grad_accum: int = 1
    max_steps: int | None = None
    epochs: float = 1.0
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.95)
    max_grad_norm: float = 1.0
    seed: int = 0
    eval_every: int = 0
    save_every: int = 0
    log_every: int = 1

    def check(self) -> None:
        """`UsageError` for values no run can use."""
        positive = (
            ("--lr", self.lr),
            ("--batch-size", self.batch_size),
            ("--grad-accum", self.grad_accum),
            ("--log-every", self.log_every),
        )
        for name, value in positive:
            if not value > 0:
                raise UsageError(f"{name} must be > 0, got {value}")
        if self.max_steps is not None and self.max_steps < 1:
            raise UsageError(f"--max-steps must be >= 1, got {self.max_steps}")
        if self.max_steps is None and not self.epochs > 0:
            raise UsageError(f"--epochs must be > 0, got {self.epochs}")
        for name, value in (("--warmup-ratio", self.warmup_ratio), ("--min-lr-ratio", self.min_lr_ratio)):
            if not 0.0 <= value <= 1.0:
                raise UsageError(f"{name} must be in [0, 1], got {value}")
        for name, value in (("--eval-every", self.eval_every), ("--save-every", self.save_every)):
            if value < 0:
                raise UsageError(f"{name} must be >= 0 (0: never), got {value}")

    def total_steps(self, plan: BatchPlan) -> int:
        if plan.steps_per_epoch < 1:
            raise UsageError(
                f"the training set has {plan.num_samples} samples, fewer than one global batch of "
                f"{plan.global_batch} (batch size x grad accumulation x processes); use a smaller batch"
            )
        if self.max_steps is not None:
            return self.max_steps
        return max(1, int(self.epochs * plan.steps_per_epoch))


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warmup over `warmup_steps`, then cosine from 1 to `min_ratio` at the last step.

    Example:
        >>> f = warmup_cosine(total_steps=10, warmup_steps=2, min_ratio=0.1)
        >>> [round(f(s), 3) for s in (0, 1, 2, 9)]
        [0.5, 1.0, 1.0, 0.1]
    """

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return multiplier


class MetricsLog:
    """Append-only JSON-lines log of a run (written by rank 0): one record per logged step or evaluation."""

    def __init__(self, path: Path | None, enabled: bool) -> None:
        self.path = path if enabled else None

    def write(self, record: dict) -> None:
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    def drop_after(self, step: int) -> None:
        """Forget records of steps after `step` (done by a run killed after its last checkpoint)."""
        if self.path is None or not self.path.is_file():
            return
        lines = self.path.read_text(encoding="utf-8").splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


class StopFlag:
    """Set by the first SIGINT / SIGTERM; a second one at least `abort_after` seconds later aborts."""

    def __init__(self, abort_after: float = 1.0) -> None:
        self.requested = False
        self.first_at = 0.0
        self.abort_after = abort_after

    def request(self) -> None:
        self.requested = True
        self.first_at = time.monotonic()

    def handle(self, signum, frame) -> None:
        if not self.requested:
            self.request()
            print(
                f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
                "(signal again to abort without saving)",
                file=sys.stderr,
                flush=True,
            )
        elif time.monotonic() - self.first_at >= self.abort_after:
            raise KeyboardInterrupt


@contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    """Install the SIGINT / SIGTERM handlers of a training run (main thread only) for its duration."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {sig: signal.signal(sig, flag.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@dataclass
class TrainResult:
    steps_done: int
    total_steps: int
    interrupted: bool
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


TeacherInputs = Callable[[Batch], dict]
Evaluator = Callable[[], dict]


class Trainer:
    """Runs `objective` over `samples` with `config`; see the module docstring.

    Args:
        objective: the module whose ``forward(input_ids, attention_mask, labels, **teacher_inputs(batch))``
            returns summed ``(loss, distill or None, ce)``: a `objectives` module, possibly wrapped
            (DDP, FSDP2) by `distributed.wrap_objective`.
        samples: the training samples; pad_id: the padding token id (masked by the attention mask).
        teacher_inputs: the extra keyword tensors of a micro-batch (the teacher's hidden states and head,
            cached top-k, or nothing); called under no_grad and autocast.
        output_dir: where ``checkpoint.pt`` and ``metrics.jsonl`` go (None: neither).
        settings: values a resume must match (stored in the checkpoint, with the optimization settings).
        checkpoints: False for runs that are never resumed (the embedded default's): no checkpoint at
            all, not even on Ctrl-C.
        evaluate: called every ``eval_every`` steps and at the end; returns metrics to log.
        autocast_dtype: torch.bfloat16 for bf16 autocast, None for full precision.
        before_step: called with the step number before every optimizer step (the default's
            `threads.ThreadTuner`).
    """

    def __init__(
        self,
        objective: torch.nn.Module,
        samples: TokenizedSamples,
        config: TrainConfig,
        ctx: DistContext,
        *,
        pad_id: int,
        teacher_inputs: TeacherInputs | None = None,
        output_dir: Path | None = None,
        settings: dict | None = None,
        evaluate: Evaluator | None = None,
        autocast_dtype: torch.dtype | None = None,
        checkpoints: bool = True,
        progress: bool = True,
        description: str = "train",
        before_step: Callable[[int], object] | None = None,
    ) -> None:
        config.check()
        self.objective = objective
        self.samples = samples
        self.config = config
        self.ctx = ctx
        self.pad_id = pad_id
        self.teacher_inputs = teacher_inputs or (lambda batch: {})
        self.output_dir = output_dir
        self.checkpoints = checkpoints
        # Settings a resume must match: everything that changes the losses (not eval / save / log cadence).
        cadence = ("eval_every", "save_every", "log_every")
        self.settings = dict(settings or {})
        self.settings.update({f"train.{k}": v for k, v in asdict(config).items() if k not in cadence})
        self.evaluate_fn = evaluate
        self.autocast_dtype = autocast_dtype
        self.progress = progress and ctx.is_main
        self.description = description
        self.before_step = before_step
        self.plan = BatchPlan(
            num_samples=len(samples),
            batch_size=config.batch_size,
            grad_accum=config.grad_accum,
            world_size=ctx.world_size,
            seed=config.seed,
        )
        self.total_steps = config.total_steps(self.plan)
        self.parameters = [p for p in objective.parameters() if p.requires_grad]
        # no weight decay on norms and biases (1-D parameters)
        groups = [
            {"params": [p for p in self.parameters if p.dim() >= 2], "weight_decay": config.weight_decay},
            {"params": [p for p in self.parameters if p.dim() < 2], "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.adam_betas)
        warmup = round(config.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(self.total_steps, warmup, config.min_lr_ratio)
        )
        self.metrics = MetricsLog(None if output_dir is None else output_dir / METRICS_NAME, ctx.is_main)
        self.step = 0
        self.has_distill_term = True

    @property
    def checkpoint_path(self) -> Path | None:
        if self.output_dir is None or not self.checkpoints:
            return None
        return self.output_dir / CHECKPOINT_NAME

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.ctx.device.type, dtype=self.autocast_dtype)

    def resume(self) -> int:
        """Continue from ``output_dir/checkpoint.pt``; return the step it was written at."""
        if self.checkpoint_path is None:
            raise UsageError("--resume needs an --output-dir holding a checkpoint")
        state = read_checkpoint(self.checkpoint_path)
        check_resumable(state, self.settings, self.ctx)
        self.step = restore_checkpoint(
            state, model=self.objective, optimizer=self.optimizer, scheduler=self.scheduler, ctx=self.ctx
        )
        self.metrics.drop_after(self.step)
        return self.step

    def save(self) -> None:
        if self.checkpoint_path is not None:
            save_checkpoint(
                self.checkpoint_path,
                model=self.objective,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                step=self.step,
                settings=self.settings,
                ctx=self.ctx,
            )

    def _record(self, record: dict, history: list[dict]) -> None:
        history.append(record)
        self.metrics.write(record)

    def evaluate(self) -> dict:
        """Run the evaluation callback now (every process must call it); returns its metrics."""
        # Under FSDP2 the root's parameters (embedding, lm_head) are gathered only inside its forward;
        # evaluation reads the lm_head outside it, so gather them for its duration.
        fsdp = is_fsdp(self.objective)
        if fsdp:
            self.objective.unshard()
        try:
            return self.evaluate_fn()
        finally:
            if fsdp:
                self.objective.reshard()

    def _micro_step(self, batch: Batch, scale: float, sync: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns its (loss, distill, ce) sums, detached."""
        batch = batch.to(self.ctx.device)
        with torch.no_grad(), self.autocast():
            extra = self.teacher_inputs(batch)
        if is_fsdp(self.objective):
            self.objective.set_requires_gradient_sync(sync)
            context = nullcontext()
        else:
            context = (
                nullcontext() if sync or not hasattr(self.objective, "no_sync") else self.objective.no_sync()
            )
        with context:
            with self.autocast():
                loss, distill, ce = self.objective(
                    batch.input_ids, batch.attention_mask, batch.labels, **extra
                )
            (loss * scale).backward()
        self.has_distill_term = distill is not None
        if distill is None:
            distill = torch.zeros((), device=loss.device)
        return torch.stack([loss.detach().float(), distill.detach().float(), ce.detach().float()])

    def _train_record(
        self, sums: torch.Tensor, targets: float, lr: float, grad_norm: torch.Tensor, tokens_per_s: float
    ) -> dict:
        loss, distill, ce = (all_reduce_sum(sums, self.ctx) / max(targets, 1.0)).tolist()
        record = {"event": "train", "step": self.step, "loss": loss}
        if self.has_distill_term:
            record["kd"] = distill
        record.update(
            ce=ce, lr=lr, grad_norm=float(grad_norm), target_tokens=int(targets), tokens_per_s=tokens_per_s
        )
        return record

    def train(self) -> TrainResult:
        """Run from `self.step` (0, or where `resume` left off) to the last step, or to a stop signal."""
        from tqdm.auto import tqdm

        history: list[dict] = []
        started = time.perf_counter()
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc=self.description,
            disable=not self.progress,
            dynamic_ncols=True,
        )
        interrupted = False
        window_tokens, window_start = 0, time.perf_counter()
        with stop_on_signals() as stop:
            while self.step < self.total_steps:
                if self.before_step is not None:
                    self.before_step(self.step)
                batches = [
                    collate(self.samples, indices, pad_id=self.pad_id)
                    for indices in self.plan.micro_batches(self.step, self.ctx.rank)
                ]
                # one all-reduce per step: target tokens (the loss denominator), input tokens, stop flag
                counts = [
                    sum(b.num_targets for b in batches),
                    sum(int(b.attention_mask.sum()) for b in batches),
                    float(stop.requested),
                ]
                counts = torch.tensor(counts, dtype=torch.float64, device=self.ctx.device)
                targets, tokens, stops = all_reduce_sum(counts, self.ctx).tolist()
                if stops > 0:
                    interrupted = True
                    break
                scale = self.ctx.world_size / max(targets, 1.0)
                sums = torch.zeros(3, device=self.ctx.device)
                for m, batch in enumerate(batches):
                    sums += self._micro_step(batch, scale, sync=m == len(batches) - 1)
                grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.config.max_grad_norm)
                if hasattr(grad_norm, "full_tensor"):
                    grad_norm = grad_norm.full_tensor()
                lr = self.scheduler.get_last_lr()[0]
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                window_tokens += int(tokens)

                if self.step % self.config.log_every == 0 or self.step == self.total_steps:
                    now = time.perf_counter()
                    record = self._train_record(
                        sums, targets, lr, grad_norm, window_tokens / (now - window_start)
                    )
                    record["elapsed_s"] = now - started
                    window_tokens, window_start = 0, now
                    self._record(record, history)
                    bar.set_postfix(
                        {k: f"{record[k]:.4f}" for k in ("loss", "kd", "ce") if k in record}
                        | {"tok/s": f"{record['tokens_per_s']:.0f}"},
                        refresh=False,
                    )
                bar.update(1)

                if self.config.save_every and self.step % self.config.save_every == 0:
                    self.save()
                last = self.step == self.total_steps
                if self.evaluate_fn is not None and (
                    last or (self.config.eval_every and self.step % self.config.eval_every == 0)
                ):
                    record = {"event": "eval", "step": self.step, **self.evaluate()}
                    self._record(record, history)
                    if self.progress:
                        bar.write(" ".join(f"{k}={v:.5g}" for k, v in record.items() if k != "event"))
            if interrupted:
                self.save()
        bar.close()
        return TrainResult(
            steps_done=self.step,
            total_steps=self.total_steps,
            interrupted=interrupted,
            history=history,
            seconds=time.perf_counter() - started,
        )
