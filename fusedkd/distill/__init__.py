"""The reference distillation recipe: ``python -m fusedkd.distill`` (see ``docs/distill.md``).

Without arguments it runs the embedded default, an offline CPU-sized distillation of a scaled-down
Qwen3-4B into a scaled-down Qwen3-0.6B on the Python standard library's source (`recipe`); with
``--teacher`` and ``--student`` it distills real Hugging Face models (`run`). Modules, one job each:

- `corpus`, `tokenizer`, `cache`: the default's data, its BPE tokenizer, the on-disk cache;
- `data`: loading texts, tokenizing with target masks, deterministic batching;
- `models`: the scaled Qwen3 shapes, loading models, hidden states and lm_head access;
- `objectives`: the student forward plus loss (fused KD, top-k KD, cross-entropy) as one module;
- `trainer`, `checkpoint`, `distributed`: the training loop, exact resume, DDP / FSDP2;
- `evaluate`, `report`: held-out metrics and the results table;
- `offline`: the teacher's top-k precomputed to a cache, for training without the teacher;
- `cli`: the command line.

Importing this package does not import transformers; the modules that need it import it when called.
"""

from fusedkd.distill.cli import main

__all__ = ["main"]
