"""Rewards -> advantages: one per sequence from its group of samples alone (`group_advantages`:
GRPO, RLOO, Dr.GRPO), or one per token with a value model (`gae_advantages`, over the outcome
reward placed on the last scored token by `last_token_rewards`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sqlm_jax.rl.config import GROUP_ESTIMATORS


def group_advantages(rewards, estimator="grpo", eps=1e-6, mask=None, ddof=0):
  """float [G, M]: sequence advantages from the rewards of G groups of M samples each.

  A group is the M answers to one question (solver) or the proposals from one prompt
  (proposer). Estimators:
    "grpo":   (r - mean) / (std + eps), std over the group with `ddof` (0: population std;
              1: unbiased, verl's torch.std).
    "rloo":   r - mean of the other members (leave-one-out baseline).
    "drgrpo": r - mean (Dr.GRPO: no std division, so easy and hard groups weigh the same).
  mask: bool [G, M], False for invalid members: left out of the group's statistics and given
    advantage 0. A group whose valid rewards are all equal, or that has fewer than two valid
    members, carries no signal and gets exactly 0. That includes a singleton group (a topic
    prompt with one valid proposal): verl gives it (r - 0) / (1 + eps) = r, a push towards
    whatever that lone proposal was, with no baseline; we give it 0 on purpose.
  """
  rewards = jnp.asarray(rewards, jnp.float32)
  if rewards.ndim != 2:
    raise ValueError(f"rewards must be [groups, members], got shape {rewards.shape}.")
  if estimator not in GROUP_ESTIMATORS:
    raise ValueError(
        f"Unknown group advantage estimator {estimator!r}; choose one of "
        f"{', '.join(GROUP_ESTIMATORS)} (\"gae\" needs a value model: see `gae_advantages`).")
  mask = jnp.ones(rewards.shape, bool) if mask is None else jnp.asarray(mask, bool)
  m = mask.astype(jnp.float32)
  count = jnp.sum(m, axis=-1, keepdims=True)  # [G, 1]
  total = jnp.sum(rewards * m, axis=-1, keepdims=True)  # [G, 1]
  mean = total / jnp.maximum(count, 1.0)
  if estimator == "grpo":
    var = (jnp.sum(m * jnp.square(rewards - mean), axis=-1, keepdims=True)
           / jnp.maximum(count - ddof, 1.0))
    adv = (rewards - mean) / (jnp.sqrt(var) + eps)
  elif estimator == "rloo":
    adv = rewards - (total - rewards) / jnp.maximum(count - 1.0, 1.0)
  else:
    adv = rewards - mean
  # Rounding in the mean would otherwise turn an all-equal group into tiny, eps-amplified
  # advantages; such a group has no signal.
  hi = jnp.max(jnp.where(mask, rewards, -jnp.inf), axis=-1, keepdims=True)
  lo = jnp.min(jnp.where(mask, rewards, jnp.inf), axis=-1, keepdims=True)
  informative = (count > 1) & (hi > lo)  # [G, 1]
  return jnp.where(mask & informative, adv, 0.0)


def last_token_rewards(rewards, loss_mask):
  """float [B, T]: each sequence's scalar reward [B] on its last scored token, 0 elsewhere.

  An outcome reward as a per-token reward, where GAE expects it (verl puts it there too).
  """
  loss_mask = jnp.asarray(loss_mask, jnp.float32)
  t = loss_mask.shape[1]
  last = t - 1 - jnp.argmax(loss_mask[:, ::-1] > 0, axis=-1)  # [B]
  at_last = (jnp.arange(t)[None, :] == last[:, None]) & (loss_mask > 0)  # [B, T]
  return jnp.where(at_last, jnp.asarray(rewards, jnp.float32)[:, None], 0.0)


def gae_advantages(token_rewards, values, mask, gamma=1.0, lam=1.0, whiten=True):
  """(advantages, returns), float [B, T]: generalised advantage estimation over completions.

  Args:
    token_rewards: [B, T], the reward of each scored token (see `last_token_rewards`).
    values: [B, T], the value model's estimate before each scored token, target-aligned
      (entry t is the value of the prefix tokens[:, :t]).
    mask: [B, T], 1 on scored tokens (completion tokens of live sequences); other tokens are
      skipped: they carry neither a TD error nor a value to bootstrap from.
  Returns:
    advantages: A_t = sum_l (gamma lam)^l delta_{t+l} over the scored tokens that follow,
      delta_t = r_t + gamma V_{t+1} - V_t (V after the last scored token is 0); whitened over
      the batch's scored tokens (mean 0, unbiased std 1, as verl does) unless whiten=False.
      0 on unscored tokens.
    returns: A_t + V_t before whitening: the value model's regression targets.
  """
  token_rewards = jnp.asarray(token_rewards, jnp.float32)
  values = jnp.asarray(values, jnp.float32)
  mask = jnp.asarray(mask, jnp.float32)

  def back(carry, xs):  # One token, from the last to the first.
    next_value, next_adv = carry
    r, v, m = xs  # [B]
    adv = r + gamma * next_value - v + gamma * lam * next_adv
    next_value = m * v + (1 - m) * next_value
    next_adv = m * adv + (1 - m) * next_adv
    return (next_value, next_adv), next_adv

  zeros = jnp.zeros(values.shape[:1], jnp.float32)
  xs = tuple(jnp.swapaxes(x, 0, 1)[::-1] for x in (token_rewards, values, mask))  # [T, B]
  _, adv = jax.lax.scan(back, (zeros, zeros), xs)
  adv = jnp.swapaxes(adv[::-1], 0, 1)  # [B, T]
  returns = (adv + values) * mask
  if whiten:
    count = jnp.maximum(jnp.sum(mask), 2.0)
    mean = jnp.sum(adv * mask) / count
    var = jnp.sum(mask * jnp.square(adv - mean)) / (count - 1.0)
    adv = (adv - mean) * jax.lax.rsqrt(var + 1e-8)
  return adv * mask, returns
