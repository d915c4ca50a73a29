"""What the recipe adds to ``transformers.Trainer``: `DistillTrainer` (`KDTrainer`, the online teacher)
and `TopKTrainer` (the offline one), both with `ChunkedEvaluation`; the callbacks `StopOnSignal` (SIGTERM
or Ctrl-C: checkpoint, then stop), `MetricsLog` and `ThreadTuner`; `check_settings` (a saved run is never
overwritten, a resume never changes its settings). The loop, optimizer, schedule, clipping, accumulation,
token normalization across processes, DDP / FSDP2 of the student and the checkpoints (with RNG states and
data position: a resume is exact) are the Trainer's."""

from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.modeling_outputs import CausalLMOutputWithPast

from fusedkd.distill.data import IGNORE_INDEX, Collator
from fusedkd.distill.errors import UsageError
from fusedkd.distill.models import lm_head
from fusedkd.integrations._common import backbone_hidden_states, head_options, head_parameters
from fusedkd.integrations.hf import KDTrainer
from fusedkd.torch_backend.tiles import default_chunk_size

METRICS_NAME = "metrics.jsonl"


COSINE_TO_10 = {"min_lr_rate": 0.1}  # the cosine schedule ends at 10% of the peak learning rate


def _option(default, help: str, **kwargs):
    return field(metadata={"help": help}, **(kwargs or {"default": default}))


@dataclass
class DistillTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with the recipe's defaults: one epoch, 3% warmup, cosine to 10% of the peak, a
    log every step; the collator's columns kept (its ``index`` keys the top-k cache)."""

    output_dir: str | None = _option(None, "run directory (default: runs/<time>)")
    learning_rate: float = _option(2e-5, "peak learning rate (3e-3 for the embedded default)")
    num_train_epochs: float = _option(1.0, "passes over the data (without --max_steps)")
    warmup_steps: float = _option(0.03, "warmup steps, or a fraction of all steps if < 1")
    lr_scheduler_type: str = _option("cosine_with_min_lr", "learning-rate schedule")
    lr_scheduler_kwargs: dict | str | None = _option(
        None, "schedule options", default_factory=COSINE_TO_10.copy
    )
    logging_steps: float = _option(1, "log every N steps")
    remove_unused_columns: bool = _option(False, "False: the recipe's collator builds the inputs")

    def __post_init__(self):
        if self.output_dir is None:  # each process would pick its own: under torchrun they must agree
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise ValueError("under torchrun, pass --output_dir (every process writes to the same one)")
            self.output_dir = f"runs/{time.strftime('%Y%m%d-%H%M%S')}"
        # Without an accelerator, the CPU: said explicitly, or the Trainer does not join torchrun's processes.
        self.use_cpu = self.use_cpu or not torch.accelerator.is_available()
        super().__post_init__()


def _logits(hidden: torch.Tensor, model, vocab: int) -> torch.Tensor:
    """float32 logits of `hidden` through the model's head transform: in the autocast dtype inside an
    autocast region (as in training), else in the hidden states' dtype."""
    head = lm_head(model)
    weight, bias = head.weight[:vocab], None if head.bias is None else head.bias[:vocab]
    if not torch.is_autocast_enabled(hidden.device.type):
        weight, bias = weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype)
    return head.transform(F.linear(hidden, weight, bias).float())


class ChunkedEvaluation:
    """``evaluate()`` without ``[tokens x vocab]`` logits: per target token of the evaluation samples, the
    student's (and the teacher's) cross-entropy, their top-1 agreement and KL(teacher || student) at
    temperature 1, from the logits of one token chunk at a time. The samples are split across processes
    (every process the same number of batches, dead rows padding the last) and the sums reduced."""

    eval_vocab: int
    teacher_model = None

    def _hidden(self, wrapper, model, inputs: dict) -> torch.Tensor:
        # Through the wrapper's forward (FSDP2 gathers the parameters there), as the loss does.
        return self._forward_redirection(wrapper, model, backbone_hidden_states, model, **inputs)

    @torch.no_grad()
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        samples = eval_dataset if eval_dataset is not None else self.eval_dataset
        student = self.accelerator.unwrap_model(self.model)
        teacher = None if self.teacher_model is None else self.accelerator.unwrap_model(self.teacher_model)
        modes = [(m, m.training) for m in (student, teacher) if m is not None]
        for model, _ in modes:
            model.eval()
        sums = torch.zeros(5, dtype=torch.float64, device=self.args.device)  # CE s, CE t, agree, KL, tokens
        args = self.args
        size, rank, world = args.per_device_eval_batch_size, args.process_index, args.world_size
        collate, chunk = Collator(pad_id=0), default_chunk_size(self.eval_vocab)
        try:
            for first in range(0, len(samples), size * world):
                rows = [first + rank * size + i for i in range(size)]
                batch = collate(
                    [dict(samples[min(i, len(samples) - 1)], live=i < len(samples)) for i in rows]
                )
                inputs = {k: batch[k].to(self.args.device) for k in ("input_ids", "attention_mask")}
                labels = batch["labels"][:, 1:].to(self.args.device)
                valid = labels != IGNORE_INDEX
                with self.accelerator.autocast():
                    hidden = self._hidden(self.model, student, inputs)[:, :-1][valid]
                    if teacher is not None:
                        teacher_hidden = self._hidden(self.teacher_model, teacher, inputs)[:, :-1][valid]
                labels = labels[valid]
                for start in range(0, labels.numel(), chunk):
                    part = slice(start, start + chunk)
                    with self.accelerator.autocast():  # the student's logits as training has them
                        logits = _logits(hidden[part], student, self.eval_vocab)
                    sums[0] += F.cross_entropy(logits, labels[part], reduction="sum").double()
                    sums[4] += logits.shape[0]
                    if teacher is None:
                        continue
                    teacher_logits = _logits(teacher_hidden[part], teacher, self.eval_vocab)
                    sums[1] += F.cross_entropy(teacher_logits, labels[part], reduction="sum").double()
                    sums[2] += (logits.argmax(-1) == teacher_logits.argmax(-1)).sum()
                    log_p = F.log_softmax(teacher_logits, -1)
                    sums[3] += (log_p.exp() * (log_p - F.log_softmax(logits, -1))).sum().double()
        finally:
            for model, mode in modes:
                model.train(mode)
        ce, teacher_ce, agree, kl, tokens = self.accelerator.reduce(sums, "sum").tolist()
        metrics = {"tokens": int(tokens), "student_ppl": math.exp(ce / tokens) if tokens else math.nan}
        if teacher is not None and tokens:
            metrics |= {"teacher_ppl": math.exp(teacher_ce / tokens), "agreement": agree / tokens}
            metrics["kl"] = kl / tokens
        metrics = {f"{metric_key_prefix}_{key}": value for key, value in metrics.items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


class DistillTrainer(ChunkedEvaluation, KDTrainer):
    """`KDTrainer` (``fused_linear_kd_loss`` against the online teacher) with `ChunkedEvaluation`."""

    def __init__(self, *args, eval_vocab: int, **kwargs) -> None:
        self.eval_vocab = eval_vocab
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {k: v for k, v in inputs.items() if k != "index"}  # the top-k cache's key, unused here
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


class TopKTrainer(ChunkedEvaluation, Trainer):
    """The offline teacher: ``fused_linear_topk_kd_loss`` against the teacher's cached top-k (`topk`:
    ``index, length, device -> (ids, logprobs)``, `offline.CachedTopK`). `loss_options`: divergence,
    temperature, alpha, tail, vocab_size, backend. The reduction follows the Trainer's, as `KDTrainer`'s."""

    def __init__(self, *args, topk, loss_options: dict, eval_vocab: int, **kwargs) -> None:
        from fusedkd.integrations._common import ForwardRedirection

        self.topk, self.loss_options, self.eval_vocab = topk, loss_options, eval_vocab
        self._forward_redirection = ForwardRedirection()
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        student = self.accelerator.unwrap_model(model)
        with self.accelerator.autocast():  # as `DistillTrainer.compute_loss`
            loss = self._forward_redirection(
                model, student, self._topk_loss, student, inputs, num_items_in_batch
            )
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # the count is global; DDP averages gradients
        return (loss, CausalLMOutputWithPast(loss=loss)) if return_outputs else loss

    def _topk_loss(self, student, inputs, num_items_in_batch):
        from fusedkd.topk import fused_linear_topk_kd_loss

        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        hidden = backbone_hidden_states(student, input_ids=ids, attention_mask=mask)[:, :-1]
        ids, logprobs = self.topk(inputs["index"], ids.shape[1], hidden.device)
        weight, bias = head_parameters(student, hidden.dtype)
        loss = fused_linear_topk_kd_loss(
            hidden, weight, ids[:, :-1], logprobs[:, :-1], inputs["labels"][:, 1:], student_bias=bias,
            reduction="mean" if num_items_in_batch is None else "sum", **self.loss_options,
            **head_options(student, "student"),
        )  # fmt: skip
        count = None if num_items_in_batch is None else torch.as_tensor(num_items_in_batch).to(loss.device)
        return loss if count is None else loss / count


class StopOnSignal(TrainerCallback):
    """SIGTERM or Ctrl-C (SIGINT) during training: finish the step, save a checkpoint, stop (`received`);
    under torchrun every process stops at the same step (the flag is all-reduced after each step)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received, self.previous = None, {}

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def on_train_begin(self, args, state, control, **kwargs):
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def on_step_end(self, args, state, control, **kwargs):
        stop = torch.tensor([float(self.received is not None)], device=args.device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(stop, op=torch.distributed.ReduceOp.MAX)
        if stop.item():
            self.received = self.received or "SIGTERM"  # another process got it
            control.should_save, control.should_training_stop = True, True

    def on_train_end(self, args, state, control, **kwargs):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class MetricsLog(TrainerCallback):
    """``metrics.jsonl`` in the output directory (rank 0): one JSON object per log. A fresh run starts it
    empty; a resumed one keeps its records up to the checkpoint's step: a dead attempt's later ones go."""

    def __init__(self, path: Path, *, fresh: bool, is_main: bool) -> None:
        self.path = path
        if fresh and is_main:
            path.unlink(missing_ok=True)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and state.global_step > 0 and self.path.is_file():
            lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
            kept = [line for line in lines if json.loads(line)["step"] <= state.global_step]
            self.path.write_text("".join(kept), encoding="utf-8")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero:
            with self.path.open("a", encoding="utf-8") as file:
                file.write(json.dumps({"step": state.global_step, **(logs or {})}) + "\n")


class ThreadTuner(TrainerCallback):
    """CPU intra-op threads at whichever of 1 or all runs `probe` (a forward) faster, re-timed every
    `every` steps: on a shared 2-core machine a preempted thread stalls every parallel region (a step of
    the default's student took 3.5 s with 2 threads, 0.33 s with 1 while another job ran). The choice
    changes float summation order, so only the embedded default uses it, never real runs or tests."""

    def __init__(self, probe, every: int = 25) -> None:
        self.probe, self.every = probe, every
        self.max_threads = self.threads = torch.get_num_threads()
        self.steps_at: dict[int, int] = {}

    def _time(self, threads: int) -> float:
        torch.set_num_threads(threads)
        self.probe()  # warm-up
        start = time.perf_counter()
        self.probe()
        return time.perf_counter() - start

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 and self.max_threads > 1:
            timings = {threads: self._time(threads) for threads in (1, self.max_threads)}
            self.threads = min(timings, key=timings.get)
            torch.set_num_threads(self.threads)
        self.steps_at[self.threads] = self.steps_at.get(self.threads, 0) + 1

    def summary(self) -> str:
        """E.g. ``"1 thread for 25 steps, 2 threads for 175 steps"``."""
        return ", ".join(f"{n} thread{'s' * (n > 1)} for {k} steps" for n, k in sorted(self.steps_at.items()))


def check_settings(output_dir: Path, settings: dict, resume: bool, is_main: bool) -> str | None:
    """The checkpoint to resume from (None for a fresh run, whose `settings` are saved); `UsageError` for a
    fresh run over a saved one, or a resume whose settings differ from those it was started with."""
    from transformers.trainer_utils import get_last_checkpoint

    checkpoint = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    saved = output_dir / "distill_settings.json"
    if resume:
        if checkpoint is None or not saved.is_file():
            raise UsageError(f"--resume: --output_dir {str(output_dir)!r} holds no checkpoint to continue")
        before = json.loads(saved.read_text(encoding="utf-8"))
        keys = sorted(before.keys() | settings.keys())
        changed = [
            f"{k} {before.get(k)!r} (now {settings.get(k)!r})"
            for k in keys
            if before.get(k) != settings.get(k)
        ]
        if changed:
            raise UsageError(
                f"--resume: the run in {str(output_dir)!r} was started with other settings: "
                f"{', '.join(changed)}; resume with the same settings, or start a new --output_dir"
            )
        return checkpoint
    if checkpoint or (output_dir / "final").exists():
        what = "a checkpoint" if checkpoint else "a finished run"
        raise UsageError(
            f"--output_dir {str(output_dir)!r} already holds {what}; pass --resume to continue it, or choose "
            "another --output_dir"
        )
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        if is_main:
            saved.write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"--output_dir {str(output_dir)!r} is not writable: {exc.strerror or exc}") from None
    return None
