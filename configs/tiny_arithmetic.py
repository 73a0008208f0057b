"""The second CPU topic: self-play on addition, subtraction and multiplication by one digit.

  python -m sqlm_jax.main --config configs/tiny_arithmetic.py

The model (sqlm_jax/assets/tiny_arithmetic, remade by the command in its pretrain_summary.json)
knows the three operations on numbers of up to 3 digits and has rarely seen 4-digit ones; the
held-out set arithmetic4 is 4-digit problems it has never seen. Everything else is the tiny
addition default (configs/tiny.py), the paraphrase guard included, but the run's length and
how malformed proposals train. Each setting was chosen on arithmetic4's validation split
(docs/results.md, "A second CPU topic"), on the previous base: the guard gave 0.287 -> 0.353
against 0.283 without (seed 0, 150 steps; without it the proposer is paid for products the
solver cannot compute and the solver learns their wrong majorities); 400 steps instead of 150,
+10.7 / +3.0 / +10.3 points (seeds 0 / 1 / 2); then the topic's stricter paraphrase (a product
or a difference re-asked with other digits) with malformed proposals trained, +12.3 / +7.7 /
+10.7. On today's base: +9.7 / +11.7 / +8.3 (validation), +8.0 / +13.6 / +10.6 (test).
"""

import os

import sqlm_jax
from sqlm_jax.config_base import load_config


def get_config():
  c = load_config("tiny")
  c.model.path = os.path.join(os.path.dirname(sqlm_jax.__file__), "assets", "tiny_arithmetic")
  c.task.name = "tiny_arithmetic"
  c.eval.heldout = "arithmetic4"
  # Longer than tiny addition's 150: held-out accuracy was still rising at step 150 when the
  # cosine decay stopped it (validation split; docs/results.md, "Longer runs").
  c.total_steps = 400
  c.eval.every = 50
  # A malformed proposal is trained on with proposer reward 0 (the reference trainer's way), not
  # masked out: masked, nothing pushed back when the proposer drifted from products into
  # malformed ones, and then nothing trained (docs/results.md, "A stricter paraphrase").
  c.rewards.train_malformed_proposals = True
  return c
