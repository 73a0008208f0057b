"""The optimizer: AdamW with global-norm clipping (`make_optimizer`) and its learning-rate
schedule over self-play steps (`make_lr_schedule`; the rule is in `default_config`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from sqlm_jax.rl.config import LR_SCHEDULES, WEIGHT_DECAY_MASKS, _choice, _field


def make_lr_schedule(cfg):
  """step -> learning rate: linear warm-up, then constant or cosine (see `default_config`).

  step is the self-play step (or, without one, the optimizer's step count).
  """
  lr = float(_field(cfg, "learning_rate"))
  warmup = int(_field(cfg, "warmup_steps"))
  schedule = _choice(cfg, "lr_schedule", LR_SCHEDULES)
  total = _field(cfg, "total_steps")
  final = float(_field(cfg, "final_lr_ratio"))
  if schedule == "cosine" and (not total or total <= warmup):
    raise ValueError(f"lr_schedule='cosine' needs total_steps > warmup_steps={warmup}, got "
                     f"total_steps={total}.")

  def lr_at(step):
    step = jnp.asarray(step, jnp.float32)
    scale = jnp.minimum(1.0, (step + 1.0) / warmup) if warmup > 0 else jnp.ones_like(step)
    if schedule == "cosine":
      progress = jnp.clip((step - warmup) / (total - warmup), 0.0, 1.0)
      scale = scale * (final + (1.0 - final) * 0.5 * (1.0 + jnp.cos(math.pi * progress)))
    return lr * scale

  return lr_at


def make_optimizer(cfg):
  """optax AdamW, global-norm clipping first, with the learning rate as an injected
  hyper-parameter that `make_update_fn`'s update sets from the schedule at every step."""
  max_norm = _field(cfg, "max_grad_norm")
  decay_all = _choice(cfg, "weight_decay_mask", WEIGHT_DECAY_MASKS) == "all"

  def adamw(learning_rate):
    clip = optax.clip_by_global_norm(float(max_norm)) if max_norm else optax.identity()
    return optax.chain(clip, optax.adamw(
        learning_rate, b1=float(_field(cfg, "b1")), b2=float(_field(cfg, "b2")),
        eps=float(_field(cfg, "adam_eps")), weight_decay=float(_field(cfg, "weight_decay")),
        mask=lambda params: jax.tree.map(lambda p: decay_all or p.ndim >= 2, params)))

  return optax.inject_hyperparams(adamw)(learning_rate=float(_field(cfg, "learning_rate")))
