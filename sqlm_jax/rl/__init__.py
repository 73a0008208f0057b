"""GRPO-style policy gradient for a causal LM: advantages, the clipped loss with KL, the train step.

The data flow, rewards -> advantages -> losses -> update, one module per stage:
  config.py      `default_config` (every field documented), the allowed values of its choices,
                 `critic_config`
  advantages.py  rewards -> advantages: from a group of samples (GRPO, RLOO, Dr.GRPO), or per
                 token with a value model (GAE)
  batching.py    the batch an update takes (keys, shapes, target-aligned masks, padding), its
                 checks, PPO mini-batches and micro-batches
  logprobs.py    a model's output -> per-token log-probs and entropy (chunked over positions
                 when it returns (hidden, head)); the jitted log-prob and value passes that give
                 old, reference and value estimates
  losses.py      log-probs and advantages -> the PPO clipped loss with KL, the value loss, and
                 their metrics, as sums that micro-batches add up
  update.py      losses -> gradients accumulated over micro-batches -> one optimizer step
  optim.py       AdamW and its learning-rate schedule over self-play steps
  critic.py      the value model for "gae": the base with a scalar head
                 (`from sqlm_jax.rl import critic`)

`from sqlm_jax import rl` gives every public name (`rl.default_config()`, `rl.group_advantages`,
`rl.make_update_fn`, ...); private helpers are reached through their module
(`rl.losses._value_sums`).
"""

from sqlm_jax.models.transformer import positions_from_mask
from sqlm_jax.rl.advantages import gae_advantages, group_advantages, last_token_rewards
from sqlm_jax.rl.batching import BATCH_KEYS, OBJECTIVES, VALUE_BATCH_KEYS, mini_batches
from sqlm_jax.rl.config import (ADVANTAGE_ESTIMATORS, GROUP_ESTIMATORS, KL_ESTIMATORS,
                                LOSS_AGGREGATIONS, LR_SCHEDULES, WEIGHT_DECAY_MASKS,
                                critic_config, default_config)
from sqlm_jax.rl.logprobs import (chunked_token_logprobs, make_logprob_fn, make_value_fn,
                                  token_logprobs)
from sqlm_jax.rl.losses import loss_normaliser, policy_loss
from sqlm_jax.rl.optim import make_lr_schedule, make_optimizer
from sqlm_jax.rl.update import make_grad_fn, make_update_fn

__all__ = [
    # config
    "ADVANTAGE_ESTIMATORS", "GROUP_ESTIMATORS", "KL_ESTIMATORS", "LOSS_AGGREGATIONS",
    "LR_SCHEDULES", "WEIGHT_DECAY_MASKS", "critic_config", "default_config",
    # advantages
    "gae_advantages", "group_advantages", "last_token_rewards",
    # batching
    "BATCH_KEYS", "OBJECTIVES", "VALUE_BATCH_KEYS", "mini_batches", "positions_from_mask",
    # logprobs
    "chunked_token_logprobs", "make_logprob_fn", "make_value_fn", "token_logprobs",
    # losses
    "loss_normaliser", "policy_loss",
    # update and optimizer
    "make_grad_fn", "make_update_fn", "make_lr_schedule", "make_optimizer",
]
