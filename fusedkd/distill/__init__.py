"""The reference distillation recipe, ``python -m fusedkd.distill`` (docs/distill.md): a thin script (`cli`)
over ``transformers.Trainer`` and `fusedkd.integrations.hf.KDTrainer` (`trainer`), with its data (`data`),
models (`models`), offline top-k teacher (`offline`) and embedded default (`default`). No transformers
import here."""

from fusedkd.distill.cli import main

__all__ = ["main"]
