"""The CPU default on the weak tiny base: 4-digit addition at 0.40 (validation greedy).

  python -m sqlm_jax.main --config configs/tiny_weak.py

Everything but the base is configs/tiny.py, the paraphrase guard included (the weak base's
results in docs/results.md were measured before it was the default, without it). The base
(sqlm_jax/assets/tiny_addition_weak) saw fewer answered 4-digit problems in pretraining; on it
the majority of the solver's answers is right on far fewer of the hard questions, which is where
plain self-play stops working (docs/results.md, "A weak base").
"""

import os

import sqlm_jax
from sqlm_jax.config_base import load_config


def get_config():
  c = load_config("tiny")
  c.model.path = os.path.join(os.path.dirname(sqlm_jax.__file__), "assets", "tiny_addition_weak")
  return c
