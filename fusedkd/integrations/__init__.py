"""fusedkd as the loss of the trainers KD users already run.

- `fusedkd.integrations.hf`: `KDTrainer`, a `transformers.Trainer` that distills a frozen teacher
  into the student with `fusedkd.fused_linear_kd_loss` (needs the ``train`` extra).
- `fusedkd.integrations.trl`: `FusedDistillationTrainer` and `FusedGKDTrainer`, TRL's
  `DistillationTrainer` and `GKDTrainer` with their loss computed by fusedkd, the same objective
  (needs the ``trl`` extra: ``pip install "fusedkd[trl]"``).

Both read the models' final hidden states and ``lm_head.weight``; neither model's
``[tokens x vocab]`` logits are built. Heads that scale or soft-cap their logits (``logit_scale``,
``logits_scaling``, ``final_logit_softcapping``) get the loss of their own logits: each model's values
are read from its config (`fusedkd.head_transform`); other head multipliers are refused.
This package imports neither transformers nor trl; its submodules do.
"""
