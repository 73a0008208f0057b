"""Log-probs and advantages -> the PPO clipped policy loss with KL (`policy_loss`), and values
and returns -> the value model's clipped loss (`_value_sums`).

Both are computed as un-normalised sums so that micro-batches add up: the batch's loss is the
sum over its micro-batches divided once by the whole batch's `loss_normaliser`, and metric sums
merge across micro-batches by key suffix (`_merge_sums`) before becoming token means
(`_finish_metrics`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sqlm_jax.rl.config import KL_ESTIMATORS, LOSS_AGGREGATIONS, _choice, _field

# How per-micro-batch metric sums combine: by key suffix, otherwise added.
_MERGE = {"_max": jnp.maximum, "_min": jnp.minimum}


def _merge_sums(a, b):
  merged = {}
  for key in a:
    op = next((f for suffix, f in _MERGE.items() if key.endswith(suffix)), jnp.add)
    merged[key] = op(a[key], b[key])
  return merged


def _empty_sums(like):
  """Zero statistics with the keys of `like` (max / min keys start at -inf / inf)."""
  start = {"_max": -jnp.inf, "_min": jnp.inf}
  return {key: jnp.array(next((v for suffix, v in start.items() if key.endswith(suffix)), 0.0),
                         jnp.float32) for key in like}


def _finish_metrics(sums):
  """Token means from summed statistics (one micro-batch or many); counts and extremes as is."""
  tokens = jnp.maximum(sums["tokens"], 1.0)
  return {key: value if key in ("tokens", "sequences") or key.endswith(tuple(_MERGE))
          else value / tokens for key, value in sums.items()}


def loss_normaliser(loss_mask, sample_weight, loss_agg):
  """The denominator of the batch loss: weighted token count or weighted sequence count.

  Computed once over the whole batch so that micro-batch losses add up to the batch loss.
  """
  loss_mask = jnp.asarray(loss_mask, jnp.float32)
  sample_weight = jnp.asarray(sample_weight, jnp.float32)
  if loss_agg == "token_mean":
    total = jnp.sum(loss_mask * sample_weight[:, None])
  elif loss_agg in LOSS_AGGREGATIONS:
    total = jnp.sum(sample_weight)
  else:
    raise ValueError(f"loss_agg={loss_agg!r} is not one of {', '.join(LOSS_AGGREGATIONS)}.")
  return jnp.where(total > 0, total, 1.0)  # an all-masked batch has loss 0, not NaN


_MAX_LOG_RATIO = 20.0


def _policy_sums(logprobs, old_logprobs, advantages, loss_mask, sample_weight, cfg,
                 ref_logprobs=None, entropy=None):
  """Un-normalised objective (the loss times `loss_normaliser`) and metric sums."""
  eps_low, eps_high = float(_field(cfg, "clip_eps_low")), float(_field(cfg, "clip_eps_high"))
  dual_clip = float(_field(cfg, "dual_clip"))
  if dual_clip != 0 and dual_clip <= 1:
    raise ValueError(f"RL config dual_clip={dual_clip} must be 0 (off) or > 1 (verl: 3.0).")
  kl_coef = float(_field(cfg, "kl_coef"))
  kl_estimator = _choice(cfg, "kl_estimator", KL_ESTIMATORS)
  loss_agg = _choice(cfg, "loss_agg", LOSS_AGGREGATIONS)
  if kl_coef != 0 and ref_logprobs is None:
    raise ValueError(f"kl_coef={kl_coef} needs ref_logprobs; pass them, or set kl_coef=0.")

  logprobs = logprobs.astype(jnp.float32)
  loss_mask = jnp.asarray(loss_mask, jnp.float32)
  sample_weight = jnp.asarray(sample_weight, jnp.float32)
  weight = loss_mask * sample_weight[:, None]  # [B, T]
  scored = weight != 0  # [B, T]
  live = sample_weight != 0  # [B]
  # `where` before exp/log: an unscored token's log-ratio can be anything (even inf), and
  # must not leak NaN into the gradient through 0 * inf. The clamp keeps exp finite for a
  # scored token whose sampling log-prob is garbage; real log-ratios are a few units at most.
  log_ratio = jnp.where(scored, logprobs - old_logprobs, 0.0)  # [B, T]
  log_ratio = jnp.clip(log_ratio, -_MAX_LOG_RATIO, _MAX_LOG_RATIO)
  ratio = jnp.exp(log_ratio)
  advantages = jnp.asarray(advantages, jnp.float32)
  if advantages.ndim == 1:  # One advantage per sequence, or (GAE) one per token.
    advantages = advantages[:, None]
  adv = jnp.where(live[:, None], advantages, 0.0)  # [B, 1] or [B, T]
  clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
  pg = jnp.maximum(-adv * ratio, -adv * clipped)  # [B, T], pessimistic
  dual_clipped = jnp.zeros_like(pg, dtype=bool)
  if dual_clip:  # Negative advantages: the loss is capped at -c * A.
    dual_clipped = (adv < 0) & (pg > -adv * dual_clip)
    pg = jnp.where(adv < 0, jnp.minimum(pg, -adv * dual_clip), pg)
  per_token = pg

  kl = jnp.zeros_like(pg)
  if ref_logprobs is not None:
    ref_minus = jnp.where(scored, ref_logprobs - logprobs, 0.0)  # [B, T]
    if kl_estimator == "k1":
      kl = -ref_minus
    else:
      kl = jnp.exp(ref_minus) - ref_minus - 1.0
    kl_clamp = float(_field(cfg, "kl_clamp"))
    if kl_clamp > 0:
      kl = jnp.clip(kl, -kl_clamp, kl_clamp)
    if kl_coef != 0:
      per_token = per_token + kl_coef * kl

  if loss_agg == "token_mean":
    objective = jnp.sum(weight * per_token)
  else:
    token_sum = jnp.sum(loss_mask * per_token, axis=-1)  # [B]
    if loss_agg == "seq_mean_token_mean":
      per_seq = token_sum / jnp.maximum(jnp.sum(loss_mask, axis=-1), 1.0)
    else:
      length = _field(cfg, "max_completion_length")
      if not length or length <= 0:
        raise ValueError(
            f"loss_agg='seq_mean_token_sum_norm' needs max_completion_length > 0, got {length}.")
      per_seq = token_sum / float(length)
    objective = jnp.sum(sample_weight * per_seq)

  def tsum(x):
    return jnp.sum(jnp.where(scored, x, 0.0))

  sums = dict(
      tokens=jnp.sum(scored, dtype=jnp.float32),
      sequences=jnp.sum(live, dtype=jnp.float32),
      clip_low=tsum((ratio < 1.0 - eps_low) & (adv < 0)),
      clip_high=tsum((ratio > 1.0 + eps_high) & (adv > 0)),
      clip_dual=tsum(dual_clipped),
      ratio=tsum(ratio),
      ratio_max=jnp.max(jnp.where(scored, ratio, -jnp.inf)),
      ratio_min=jnp.min(jnp.where(scored, ratio, jnp.inf)),
      approx_kl_old=tsum(ratio - 1.0 - log_ratio),
      pg_loss=tsum(pg),
      kl=tsum(kl),
      entropy=tsum(jnp.zeros_like(pg) if entropy is None else entropy),
      logprob=tsum(logprobs),
  )
  sums = jax.tree.map(lambda x: jax.lax.stop_gradient(x.astype(jnp.float32)), sums)
  return objective, sums


def policy_loss(logprobs, old_logprobs, advantages, loss_mask, sample_weight, cfg,
                ref_logprobs=None, entropy=None, normaliser=None):
  """PPO clipped policy-gradient loss with an optional KL penalty to a frozen reference.

  Per scored token: max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)) + kl_coef * KL, with
  r = exp(logprobs - old_logprobs), the first term capped at -c A where A < 0 with
  cfg.dual_clip = c > 0; aggregated by cfg.loss_agg (see `default_config`).

  Args:
    logprobs, old_logprobs, loss_mask, ref_logprobs, entropy: [B, T], target-aligned.
    advantages: [B] (one per sequence) or [B, T] (one per token, GAE).
    sample_weight: [B].
    entropy: optional, only reported.
    normaliser: the loss denominator; default `loss_normaliser` of this batch. A
      micro-batch passes the whole batch's, so that micro-batch losses sum to the batch loss.

  Returns:
    (loss, metrics): metrics are means over scored tokens: clip_low / clip_high (fraction
    of tokens whose clipped side is active), clip_dual (fraction capped by dual_clip), ratio
    (mean), ratio_min / ratio_max,
    approx_kl_old (KL to the sampling policy), pg_loss, kl, entropy, logprob; plus tokens
    and sequences (counts).
  """
  objective, sums = _policy_sums(logprobs, old_logprobs, advantages, loss_mask, sample_weight,
                                 cfg, ref_logprobs, entropy)
  if normaliser is None:
    normaliser = loss_normaliser(loss_mask, sample_weight, _field(cfg, "loss_agg"))
  loss = objective / normaliser
  metrics = _finish_metrics(sums)
  metrics["loss"] = loss
  return loss, metrics


def _value_sums(values, old_values, returns, loss_mask, sample_weight, cfg):
  """Un-normalised clipped value loss (token sums) and metric sums, as verl's critic.

  Per scored token: max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2), c = value_clip,
  with no factor 1/2 (verl's compute_value_loss): the value cannot gain by moving further
  than c from where it was at sampling time.
  """
  clip = float(_field(cfg, "value_clip"))
  weight = jnp.asarray(loss_mask, jnp.float32) * jnp.asarray(sample_weight, jnp.float32)[:, None]
  scored = weight != 0
  values = values.astype(jnp.float32)
  clipped = jnp.clip(values, old_values - clip, old_values + clip)
  plain_loss, clipped_loss = jnp.square(values - returns), jnp.square(clipped - returns)
  per_token = jnp.maximum(plain_loss, clipped_loss)

  def tsum(x):
    return jnp.sum(jnp.where(scored, x, 0.0))

  sums = dict(tokens=jnp.sum(scored, dtype=jnp.float32),
              sequences=jnp.sum(sample_weight != 0, dtype=jnp.float32),
              value_loss=tsum(per_token), value_clip_frac=tsum(clipped_loss > plain_loss),
              value=tsum(values), value_error=tsum(jnp.abs(values - returns)))
  sums = jax.tree.map(lambda x: jax.lax.stop_gradient(x.astype(jnp.float32)), sums)
  return jnp.sum(weight * per_token), sums
