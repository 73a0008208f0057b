"""GRPO-style policy gradient for a causal LM: advantages, the clipped loss with KL, the train step.

One role's update sees a batch of B sequences of T tokens (prompt left-padded, completion
right-padded), as a dict of arrays:

  tokens          int [B, T]
  attention_mask  int/bool [B, T]  1 for real tokens (prompt and completion)
  loss_mask       float [B, T]     1 where the token at t is a completion token to score
  old_logprobs    float [B, T]     sampling-time log-prob of tokens[:, t] (0 where unscored)
  advantages      float [B]        one advantage per sequence
  sample_weight   float [B]        0 removes a sequence exactly (malformed proposal, padding)
  ref_logprobs    float [B, T]     optional; frozen reference log-probs, needed if kl_coef > 0

All masks are indexed by the TARGET token: logits at t - 1 predict tokens[:, t], and the
shift happens in `token_logprobs`. A sample_weight other than 0 / 1 weighs a sequence inside
a weighted mean (the loss divides by the summed weights, see `loss_normaliser`). The model is
any `apply_fn(params, tokens, positions, attention_mask) -> logits [B, T, V]`.

Padding rows (sample_weight 0) contribute exactly zero gradient as long as the model's
output for them is finite: pad with copies of a real row, not with all-masked rows, which
can make attention softmax NaN (and 0 * NaN is NaN in the backward pass).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import optax

from sqlm_jax.models.transformer import positions_from_mask  # noqa: F401 (re-exported)

ADVANTAGE_ESTIMATORS = ("grpo", "rloo", "drgrpo")
KL_ESTIMATORS = ("k1", "k3", "low_var")
LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
LR_SCHEDULES = ("constant", "cosine")
BATCH_KEYS = ("tokens", "attention_mask", "loss_mask", "old_logprobs", "advantages",
              "sample_weight")


def default_config() -> ml_collections.ConfigDict:
  """RL hyper-parameters with the reference setup's values where it has one.

  Any object with these attributes works in place of the ConfigDict; fields marked
  (optional) fall back to the default shown here when absent.

  Fields:
    learning_rate: peak AdamW learning rate (the paper uses 1e-6 on 3B models).
    warmup_steps: linear warm-up length; step s uses lr * min(1, (s + 1) / warmup_steps),
      so the first step already moves. 0 = no warm-up.
    lr_schedule (optional): after warm-up, "constant" or "cosine" (decays to
      final_lr_ratio * learning_rate at total_steps).
    total_steps (optional): where the cosine schedule ends.
    final_lr_ratio (optional): cosine floor as a fraction of learning_rate.
    weight_decay: decoupled AdamW decay, applied to matrices only (leaves with ndim >= 2),
      never to norms and biases.
    b1, b2, adam_eps (optional): Adam moments and epsilon.
    max_grad_norm: global-norm gradient clip; 0 disables it. The update reports the norm
      before clipping.
    clip_eps_low, clip_eps_high: the PPO ratio is clipped to [1 - low, 1 + high]; a larger
      high side (DAPO's clip-higher) lets unlikely tokens with positive advantage grow.
    kl_coef: weight of the KL penalty to the frozen reference; 0 disables it (no
      ref_logprobs needed).
    kl_estimator: "k1" (logp - ref) or "k3" / "low_var" (exp(ref - logp) - (ref - logp) - 1,
      unbiased and never negative).
    loss_agg: how token losses become one number:
      "token_mean": sum over every scored token / number of scored tokens in the batch
        (long answers weigh more);
      "seq_mean_token_mean": mean over each sequence's tokens, then over sequences (GRPO);
      "seq_mean_token_sum_norm": each sequence's token sum / max_completion_length, then mean
        over sequences (Dr.GRPO: no length bias).
    max_completion_length (optional): the constant for "seq_mean_token_sum_norm".
    temperature: sampling temperature; log-probs are taken of logits / temperature so that
      they match the sampler's.
    advantage_estimator: "grpo", "rloo" or "drgrpo" (see `group_advantages`).
    advantage_eps (optional): added to the group std in "grpo".
  """
  return ml_collections.ConfigDict(dict(
      learning_rate=1e-6,
      warmup_steps=0,
      lr_schedule="constant",
      total_steps=1000,
      final_lr_ratio=0.0,
      weight_decay=0.0,
      b1=0.9,
      b2=0.999,
      adam_eps=1e-8,
      max_grad_norm=1.0,
      clip_eps_low=0.2,
      clip_eps_high=0.28,
      kl_coef=0.0,
      kl_estimator="low_var",
      loss_agg="seq_mean_token_mean",
      max_completion_length=1024,
      temperature=1.0,
      advantage_estimator="grpo",
      advantage_eps=1e-6,
  ))


_OPTIONAL_DEFAULTS = dict(lr_schedule="constant", total_steps=None, final_lr_ratio=0.0,
                          b1=0.9, b2=0.999, adam_eps=1e-8, max_completion_length=None,
                          advantage_eps=1e-6)


def _field(cfg, name):
  """cfg.name, with a message that says which field is missing and where defaults live."""
  try:
    return getattr(cfg, name)
  except AttributeError:
    if name in _OPTIONAL_DEFAULTS:
      return _OPTIONAL_DEFAULTS[name]
    raise AttributeError(
        f"RL config has no field {name!r}; start from sqlm_jax.rl.default_config(), which "
        "documents every field.") from None


def _choice(cfg, name, choices):
  value = _field(cfg, name)
  if value not in choices:
    raise ValueError(f"RL config {name}={value!r} is not one of {', '.join(choices)}.")
  return value


# ---------------------------------------------------------------------------------------------
# Advantages


def group_advantages(rewards, estimator="grpo", eps=1e-6, mask=None):
  """float [G, M]: sequence advantages from the rewards of G groups of M samples each.

  A group is the M answers to one question (solver) or the proposals from one prompt
  (proposer). Estimators:
    "grpo":   (r - mean) / (std + eps), std over the group (population std, ddof = 0).
    "rloo":   r - mean of the other members (leave-one-out baseline).
    "drgrpo": r - mean (Dr.GRPO: no std division, so easy and hard groups weigh the same).
  mask: bool [G, M], False for invalid members: left out of the group's statistics and given
    advantage 0. A group whose valid rewards are all equal, or that has fewer than two valid
    members, carries no signal and gets exactly 0.
  """
  rewards = jnp.asarray(rewards, jnp.float32)
  if rewards.ndim != 2:
    raise ValueError(f"rewards must be [groups, members], got shape {rewards.shape}.")
  if estimator not in ADVANTAGE_ESTIMATORS:
    raise ValueError(
        f"Unknown advantage estimator {estimator!r}; choose one of "
        f"{', '.join(ADVANTAGE_ESTIMATORS)}.")
  mask = jnp.ones(rewards.shape, bool) if mask is None else jnp.asarray(mask, bool)
  m = mask.astype(jnp.float32)
  count = jnp.sum(m, axis=-1, keepdims=True)  # [G, 1]
  total = jnp.sum(rewards * m, axis=-1, keepdims=True)  # [G, 1]
  mean = total / jnp.maximum(count, 1.0)
  if estimator == "grpo":
    var = jnp.sum(m * jnp.square(rewards - mean), axis=-1, keepdims=True) / jnp.maximum(count, 1)
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


# ---------------------------------------------------------------------------------------------
# Log-probs


def token_logprobs(logits, tokens, temperature=1.0):
  """Log-prob and entropy of each target token under logits / temperature.

  Returns (logprobs, entropy), both float32 [B, T] aligned with `tokens`: entry t comes
  from the logits at t - 1. Entry 0 has no prediction and is 0.
  """
  logits = logits[:, :-1].astype(jnp.float32) / temperature  # [B, T-1, V]
  log_z = jax.nn.logsumexp(logits, axis=-1)  # [B, T-1]
  target = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]  # [B, T-1]
  logprobs = target - log_z
  probs = jnp.exp(logits - log_z[..., None])
  entropy = log_z - jnp.sum(probs * logits, axis=-1)  # -sum p log p
  pad = jnp.zeros((tokens.shape[0], 1), jnp.float32)
  return jnp.concatenate([pad, logprobs], axis=1), jnp.concatenate([pad, entropy], axis=1)


# ---------------------------------------------------------------------------------------------
# Loss

# How per-micro-batch metric sums combine: by key suffix, otherwise added.
_MERGE = {"_max": jnp.maximum, "_min": jnp.minimum}


def _merge_sums(a, b):
  merged = {}
  for key in a:
    op = next((f for suffix, f in _MERGE.items() if key.endswith(suffix)), jnp.add)
    merged[key] = op(a[key], b[key])
  return merged


def _empty_sums():
  sums = {key: jnp.zeros((), jnp.float32) for key in (
      "tokens", "sequences", "clip_low", "clip_high", "ratio", "approx_kl_old", "pg_loss",
      "kl", "entropy", "logprob")}
  sums["ratio_max"] = jnp.array(-jnp.inf, jnp.float32)
  sums["ratio_min"] = jnp.array(jnp.inf, jnp.float32)
  return sums


def _finish_metrics(sums):
  """Token means from summed statistics (one micro-batch or many)."""
  tokens = jnp.maximum(sums["tokens"], 1.0)
  metrics = {key: sums[key] / tokens for key in (
      "clip_low", "clip_high", "ratio", "approx_kl_old", "pg_loss", "kl", "entropy", "logprob")}
  metrics.update(ratio_max=sums["ratio_max"], ratio_min=sums["ratio_min"],
                 tokens=sums["tokens"], sequences=sums["sequences"])
  return metrics


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
  adv = jnp.where(live, advantages, 0.0).astype(jnp.float32)[:, None]  # [B, 1]
  clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
  pg = jnp.maximum(-adv * ratio, -adv * clipped)  # [B, T], pessimistic
  per_token = pg

  kl = jnp.zeros_like(pg)
  if ref_logprobs is not None:
    ref_minus = jnp.where(scored, ref_logprobs - logprobs, 0.0)  # [B, T]
    if kl_estimator == "k1":
      kl = -ref_minus
    else:
      kl = jnp.exp(ref_minus) - ref_minus - 1.0
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
  r = exp(logprobs - old_logprobs); aggregated by cfg.loss_agg (see `default_config`).

  Args:
    logprobs, old_logprobs, loss_mask, ref_logprobs, entropy: [B, T], target-aligned.
    advantages, sample_weight: [B].
    entropy: optional, only reported.
    normaliser: the loss denominator; default `loss_normaliser` of this batch. A
      micro-batch passes the whole batch's, so that micro-batch losses sum to the batch loss.

  Returns:
    (loss, metrics): metrics are means over scored tokens: clip_low / clip_high (fraction
    of tokens whose clipped side is active), ratio (mean), ratio_min / ratio_max,
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


# ---------------------------------------------------------------------------------------------
# Train step


def _check_batch(batch, cfg, micro_batch_size):
  missing = [key for key in BATCH_KEYS if key not in batch]
  if missing:
    raise KeyError(f"RL batch is missing {missing}; it needs {list(BATCH_KEYS)} "
                   "(and ref_logprobs when kl_coef > 0).")
  if float(_field(cfg, "kl_coef")) != 0 and "ref_logprobs" not in batch:
    raise KeyError(f"kl_coef={_field(cfg, 'kl_coef')} needs batch['ref_logprobs']; add them, or "
                   "set kl_coef=0.")
  b, t = batch["tokens"].shape
  for key, value in batch.items():
    want = (b,) if key in ("advantages", "sample_weight") else (b, t)
    if key not in BATCH_KEYS + ("ref_logprobs",):
      want = (b,) + value.shape[1:]  # extra keys ride along, split like the rest
    if value.shape != want:
      raise ValueError(f"batch[{key!r}] has shape {value.shape}; expected {want} to match "
                       f"tokens {batch['tokens'].shape}.")
  if b % micro_batch_size:
    raise ValueError(
        f"Batch size {b} is not divisible by micro_batch_size={micro_batch_size}; pad the batch "
        f"to {-(-b // micro_batch_size) * micro_batch_size} rows with sample_weight 0 (copies "
        "of a real row), or change micro_batch_size.")


def _split_micro(x, micro_batch_size):
  """[B, ...] -> [B / m, m, ...], micro-batch j = rows j, j + B/m, j + 2B/m, ...

  Strided rather than contiguous so that a batch sharded over devices along B keeps every
  micro-batch spread over all devices.
  """
  n_micro = x.shape[0] // micro_batch_size
  return jnp.swapaxes(x.reshape((micro_batch_size, n_micro) + x.shape[1:]), 0, 1)


def make_grad_fn(apply_fn, cfg, micro_batch_size, layout=None):
  """(params, batch) -> (grads, metrics): the batch-loss gradient, accumulated over micro-batches.

  Peak memory is that of one micro-batch's forward and backward (logits [m, T, V]); the
  result equals the full-batch gradient for every loss_agg, because each micro-batch loss
  is divided by the whole batch's `loss_normaliser`. Gradients accumulate in float32 and
  come back in the parameters' dtype. With a `sharding.Layout`, each micro-batch's rows stay
  split over the mesh's batch axes. Not jitted: `make_update_fn` jits it.
  """
  if micro_batch_size < 1:
    raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}.")
  temperature = float(_field(cfg, "temperature"))
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0 for log-probs, got {temperature}.")
  loss_agg = _choice(cfg, "loss_agg", LOSS_AGGREGATIONS)

  def micro_loss(params, mb, normaliser):
    if layout is not None:
      mb = {k: layout.constrain(v, ("batch",) + (None,) * (v.ndim - 1)) for k, v in mb.items()}
    positions = positions_from_mask(mb["attention_mask"])
    logits = apply_fn(params, mb["tokens"], positions, mb["attention_mask"])  # [m, T, V]
    logprobs, entropy = token_logprobs(logits, mb["tokens"], temperature)
    objective, sums = _policy_sums(
        logprobs, mb["old_logprobs"], mb["advantages"], mb["loss_mask"], mb["sample_weight"],
        cfg, mb.get("ref_logprobs"), jax.lax.stop_gradient(entropy))
    return objective / normaliser, sums

  grad_micro = jax.value_and_grad(micro_loss, has_aux=True)

  def grad_fn(params, batch):
    _check_batch(batch, cfg, micro_batch_size)
    normaliser = loss_normaliser(batch["loss_mask"], batch["sample_weight"], loss_agg)
    micro = jax.tree.map(lambda x: _split_micro(x, micro_batch_size), batch)

    def accumulate(carry, mb):
      grads, loss, sums = carry
      (mb_loss, mb_sums), mb_grads = grad_micro(params, mb, normaliser)
      grads = jax.tree.map(lambda g, d: g + d.astype(jnp.float32), grads, mb_grads)
      return (grads, loss + mb_loss, _merge_sums(sums, mb_sums)), None

    init = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
            jnp.zeros((), jnp.float32), _empty_sums())
    (grads, loss, sums), _ = jax.lax.scan(accumulate, init, micro)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    metrics = _finish_metrics(sums)
    metrics["loss"] = loss
    return grads, metrics

  return grad_fn


def make_update_fn(apply_fn, optimizer, cfg, micro_batch_size, layout=None,
                   param_shardings=None, opt_shardings=None):
  """Jitted `update(params, opt_state, batches) -> (params, opt_state, metrics)`: the one update.

  `batches` is one batch or a tuple of batches (one per role when proposer and solver share
  weights): one optimizer step on the sum of their losses' gradients, each accumulated over
  micro-batches (see `make_grad_fn`); metrics is a dict, or a tuple of dicts, with grad_norm
  (the global norm of the summed gradient, before clipping) added to those of `policy_loss`.
  params and opt_state are donated, so the update holds one copy of each: do not reuse the
  arrays passed in. With shardings, they are the explicit in/out shardings of both (the
  parameters' and optimizer state's layouts never change); batches keep the layout they come
  with (`Layout.put_batch`). B must be divisible by micro_batch_size.
  """
  grad_fn = make_grad_fn(apply_fn, cfg, micro_batch_size, layout)

  def update(params, opt_state, batches):
    single = isinstance(batches, dict)
    results = [grad_fn(params, batch) for batch in ((batches,) if single else batches)]
    grads = jax.tree.map(lambda *g: sum(g[1:], g[0]), *[g for g, _ in results])
    grad_norm = optax.tree.norm(grads)
    metrics = tuple(dict(m, grad_norm=grad_norm) for _, m in results)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, metrics[0] if single else metrics

  if param_shardings is None:
    return jax.jit(update, donate_argnums=(0, 1))
  return jax.jit(update, donate_argnums=(0, 1),
                 in_shardings=(param_shardings, opt_shardings, None),
                 out_shardings=(param_shardings, opt_shardings, None))


def make_logprob_fn(apply_fn, temperature, micro_batch_size, param_shardings=None):
  """Jitted `(params, tokens, attention_mask) -> logprobs [B, T]` of each target token.

  For the frozen reference's ref_logprobs, or to recompute old_logprobs with the training
  forward pass (sampler and trainer numerics can differ, e.g. bf16 KV cache). Entry t is
  log p(tokens[:, t] | tokens[:, :t]); multiply by loss_mask before use. Runs micro-batch by
  micro-batch to bound memory.
  """
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0 for log-probs, got {temperature}.")

  def one(params, tokens, attention_mask):
    positions = positions_from_mask(attention_mask)
    logits = apply_fn(params, tokens, positions, attention_mask)
    return token_logprobs(logits, tokens, temperature)[0]

  def logprob_fn(params, tokens, attention_mask):
    b = tokens.shape[0]
    if b % micro_batch_size:
      raise ValueError(f"Batch size {b} is not divisible by micro_batch_size={micro_batch_size}.")
    micro = (_split_micro(tokens, micro_batch_size), _split_micro(attention_mask, micro_batch_size))
    out = jax.lax.map(lambda xs: one(params, *xs), micro)  # [B/m, m, T]
    # Undo the strided split: [n_micro, m, T] -> [m, n_micro, T] -> [B, T].
    return jnp.swapaxes(out, 0, 1).reshape(tokens.shape)

  if param_shardings is None:
    return jax.jit(logprob_fn)
  return jax.jit(logprob_fn, in_shardings=(param_shardings, None, None))


# ---------------------------------------------------------------------------------------------
# Optimizer


def make_lr_schedule(cfg):
  """step -> learning rate: linear warm-up, then constant or cosine (see `default_config`)."""
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
  """optax AdamW with the schedule of `make_lr_schedule` and global-norm clipping first."""
  max_norm = _field(cfg, "max_grad_norm")
  clip = optax.clip_by_global_norm(float(max_norm)) if max_norm else optax.identity()
  adamw = optax.adamw(
      make_lr_schedule(cfg), b1=float(_field(cfg, "b1")), b2=float(_field(cfg, "b2")),
      eps=float(_field(cfg, "adam_eps")), weight_decay=float(_field(cfg, "weight_decay")),
      mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params))
  return optax.chain(clip, adamw)
