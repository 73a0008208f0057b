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
a weighted mean (the loss divides by the summed weights, see `loss_normaliser`).

The model is any `apply_fn(params, tokens, positions, attention_mask)` returning either
  logits          float32 [B, T, V], or
  (hidden, head)  the final hidden states [B, T, E] (compute dtype) and the output head [E, V];
                  rl computes the logits as the model would (`_head_logits`: operands in the
                  hidden states' dtype, float32 accumulation). Only this form lets log-probs
                  be taken `logprob_chunk` positions at a time (`chunked_token_logprobs`), so
                  that no step holds the float32 logits of a whole micro-batch; with logits
                  they already exist and `logprob_chunk` has nothing to save.
A value model (objective="value") returns one value per position [B, T] instead.

Padding rows (sample_weight 0) contribute exactly zero gradient as long as the model's
output for them is finite: pad with copies of a real row, not with all-masked rows, which
can make attention softmax NaN (and 0 * NaN is NaN in the backward pass).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import optax

from sqlm_jax.models.transformer import positions_from_mask  # noqa: F401 (re-exported)

ADVANTAGE_ESTIMATORS = ("grpo", "rloo", "drgrpo", "gae")
GROUP_ESTIMATORS = ("grpo", "rloo", "drgrpo")  # Advantages from the group alone, no critic.
KL_ESTIMATORS = ("k1", "k3", "low_var")
LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
LR_SCHEDULES = ("constant", "cosine")
BATCH_KEYS = ("tokens", "attention_mask", "loss_mask", "old_logprobs", "advantages",
              "sample_weight")


def default_config() -> ml_collections.ConfigDict:
  """RL hyper-parameters: the loss, the advantages, the optimizer and its schedule.

  "verl" below is the reference trainer's base file (a fork of verl, `ppo_trainer.yaml`, with
  the paper's `exps/*.yaml` on top); a default marked "ours" differs from it, and
  configs/arithmetic.py and configs/algebra.py set the reference's value instead. The
  README's fidelity table lists every difference. Any object with these attributes works in
  place of the ConfigDict; fields marked (optional) fall back to the default shown here.

  The schedule rule: the learning rate is a function of the self-play step, not of the number
  of optimizer steps. Every optimizer step taken during self-play step s (each PPO mini-batch
  and epoch, either role, the critic's) uses lr(s); warmup_steps and total_steps count
  self-play steps (configs set rl.total_steps to follow total_steps). So a role that skips
  steps (proposer_update_every) or takes several mini-batch steps is on the same schedule as
  every other, and a run's schedule does not depend on how many questions were valid. Without
  a step (`make_update_fn`'s update called with step=None) the optimizer's own step count is used.

  Fields:
    learning_rate: peak AdamW learning rate of the policy (the paper: 1e-6 on 3B models).
    warmup_steps: linear warm-up length; step s uses lr * min(1, (s + 1) / warmup_steps),
      so the first step already moves. 0 = no warm-up (verl: constant, no warm-up).
    lr_schedule (optional): after warm-up, "constant" (verl) or "cosine" (decays to
      final_lr_ratio * learning_rate at total_steps).
    total_steps (optional): where the cosine schedule ends.
    final_lr_ratio (optional): cosine floor as a fraction of learning_rate.
    weight_decay: decoupled AdamW decay. Ours 0; verl 0.01.
    weight_decay_mask (optional): which leaves decay: "matrices" (ndim >= 2, never norms and
      biases; ours) or "all" (verl: torch AdamW over every parameter).
    b1, b2, adam_eps (optional): Adam moments and epsilon (verl: 0.9, 0.999, 1e-8).
    max_grad_norm: global-norm gradient clip; 0 disables it (verl: 1.0). The update reports
      the norm before clipping.
    skip_nonfinite_updates (optional): an optimizer step whose gradient norm is not finite
      (NaN / inf) leaves the parameters and optimizer state as they were; the update reports
      skipped_updates = 1 for it. Ours: on.
    clip_eps_low, clip_eps_high: the PPO ratio is clipped to [1 - low, 1 + high]; a larger
      high side (DAPO's clip-higher) lets unlikely tokens with positive advantage grow.
      Ours 0.2 / 0.28; verl 0.2 / 0.2.
    dual_clip (optional): dual-clip PPO's c (Ye et al. 2020): for a negative advantage the
      clipped token loss is capped at -c * A, so a token whose ratio has grown far above 1
      cannot push the loss (and its gradient) without bound. 0 = off (ours); verl's
      clip_ratio_c is 3.0. Must be 0 or > 1.
    kl_coef: weight of the KL penalty (a loss term) to the frozen reference; 0 disables it
      (no ref_logprobs needed). verl: 0.001 in the paper's math runs, none in its coding run.
    kl_estimator: "k1" (logp - ref) or "k3" / "low_var" (exp(ref - logp) - (ref - logp) - 1,
      unbiased and never negative).
    kl_clamp: the per-token KL estimate is clipped to [-kl_clamp, kl_clamp] (no gradient
      outside); 0 = no clamp (ours). verl clamps its low-variance KL at 10.
    loss_agg: how token losses become one number (per optimizer step, i.e. per mini-batch):
      "token_mean": sum over every scored token / number of scored tokens (verl's
        "token-mean"; long answers weigh more);
      "seq_mean_token_mean": mean over each sequence's tokens, then over sequences (GRPO;
        ours);
      "seq_mean_token_sum_norm": each sequence's token sum / max_completion_length, then mean
        over sequences (Dr.GRPO: no length bias).
    max_completion_length (optional): the constant for "seq_mean_token_sum_norm".
    temperature: sampling temperature; log-probs are taken of logits / temperature so that
      they match the sampler's.
    logprob_chunk (optional): positions per chunk when log-probs (and the entropy) are taken
      from an apply_fn that returns (hidden, head) (see the module docstring): a micro-batch
      then holds one chunk's float32 logits [m, chunk, V] at a time, in the forward and the
      backward (which recomputes them), instead of [m, T, V] several times over. 0 = the whole
      sequence at once. Ours; at V = 152k a micro-batch's logits would otherwise dominate
      training memory. No effect with an apply_fn that returns logits.
    advantage_estimator: "grpo", "rloo", "drgrpo" (see `group_advantages`) or "gae" (PPO
      with a learned value model, see `gae_advantages`; verl's coding run).
    advantage_eps (optional): added to the group std in "grpo" (verl: 1e-6).
    std_ddof: the group std's delta degrees of freedom in "grpo": 0 = population std (ours),
      1 = unbiased (verl's torch.std).
    ppo_mini_batch_size: sequences per optimizer step; a role's batch of R sequences is cut
      into ceil(R / size) mini-batches of consecutive rows (a question's answers stay
      together), each one optimizer step. 0 = the whole batch in one step (ours). verl's
      small-batch setting: 32 prompts x n = 4 = 128. Must be a multiple of micro_batch_size.
    ppo_epochs: passes over the mini-batches per update (verl: 1); old log-probs (and, with
      "gae", old values and advantages) are computed once, before the first.
    critic_learning_rate: "gae" only: the value model's peak learning rate (verl's coding
      run: 1e-5), on the same schedule shape as the policy's.
    gae_gamma, gae_lambda: "gae" only: discount and GAE lambda (verl: 1.0, 1.0).
    value_clip: "gae" only: new values are clipped to old +- value_clip in the value loss
      (verl's cliprange_value, 0.5). The value loss is verl's: the clipped squared error,
      without a factor 1/2.
  """
  return ml_collections.ConfigDict(dict(
      learning_rate=1e-6,
      warmup_steps=0,
      lr_schedule="constant",
      total_steps=1000,
      final_lr_ratio=0.0,
      weight_decay=0.0,
      weight_decay_mask="matrices",
      b1=0.9,
      b2=0.999,
      adam_eps=1e-8,
      max_grad_norm=1.0,
      skip_nonfinite_updates=True,
      clip_eps_low=0.2,
      clip_eps_high=0.28,
      dual_clip=0.0,
      kl_coef=0.0,
      kl_estimator="low_var",
      kl_clamp=0.0,
      loss_agg="seq_mean_token_mean",
      max_completion_length=1024,
      temperature=1.0,
      logprob_chunk=512,
      advantage_estimator="grpo",
      advantage_eps=1e-6,
      std_ddof=0,
      ppo_mini_batch_size=0,
      ppo_epochs=1,
      critic_learning_rate=1e-5,
      gae_gamma=1.0,
      gae_lambda=1.0,
      value_clip=0.5,
  ))


_OPTIONAL_DEFAULTS = dict(lr_schedule="constant", total_steps=None, final_lr_ratio=0.0,
                          b1=0.9, b2=0.999, adam_eps=1e-8, max_completion_length=None,
                          advantage_eps=1e-6, std_ddof=0, kl_clamp=0.0, ppo_mini_batch_size=0,
                          ppo_epochs=1, value_clip=0.5, logprob_chunk=0, dual_clip=0.0,
                          weight_decay_mask="matrices", skip_nonfinite_updates=True)
WEIGHT_DECAY_MASKS = ("matrices", "all")


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


# ---------------------------------------------------------------------------------------------
# Log-probs


def _target_logprobs(logits, targets, temperature):
  """(logprobs, entropy), float32 [B, T]: of targets [B, T] under logits [B, T, V] / temperature,
  position by position (no shift)."""
  logits = logits.astype(jnp.float32) / temperature
  log_z = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
  target = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [B, T]
  probs = jnp.exp(logits - log_z[..., None])
  entropy = log_z - jnp.sum(probs * logits, axis=-1)  # -sum p log p
  return target - log_z, entropy


def token_logprobs(logits, tokens, temperature=1.0):
  """Log-prob and entropy of each target token under logits / temperature.

  Returns (logprobs, entropy), both float32 [B, T] aligned with `tokens`: entry t comes
  from the logits at t - 1. Entry 0 has no prediction and is 0.
  """
  logprobs, entropy = _target_logprobs(logits[:, :-1], tokens[:, 1:], temperature)
  pad = jnp.zeros((tokens.shape[0], 1), jnp.float32)
  return jnp.concatenate([pad, logprobs], axis=1), jnp.concatenate([pad, entropy], axis=1)


def _head_logits(hidden, head, layout=None):
  """float32 logits [B, T, V] of hidden [B, T, E] and head [E, V], as the model makes them
  (transformer._logits), so that (hidden, head) and logits give the same numbers."""
  logits = jnp.einsum("bte,ev->btv", hidden, head.astype(hidden.dtype),
                      preferred_element_type=jnp.float32)
  return logits if layout is None else layout.constrain(logits, ("batch", "seq", "vocab"))


def chunked_token_logprobs(hidden, head, tokens, temperature=1.0, chunk=512, layout=None):
  """`token_logprobs` of the logits hidden [B, T, E] @ head [E, V], `chunk` positions at a time.

  Chunks run one after another (lax.map) and each is rematerialised (jax.checkpoint): the
  forward keeps only the chunk's log-probs, and the backward recomputes the chunk's logits
  from hidden and head instead of storing them, so neither pass holds more than one chunk's
  float32 logits [B, chunk, V]. T need not be a multiple of chunk (the last chunk is padded).
  The head's gradient accumulates over chunks in the head's own dtype.
  """
  b, t, e = hidden.shape
  c = min(chunk, t)  # T <= chunk: one chunk of exactly T positions, the unchunked numbers.
  n = -(-t // c)
  # The target of position s is tokens[:, s + 1]; the last position's (0) is a dummy, dropped.
  targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, n * c - t + 1)))  # [B, n c]
  hidden = jnp.pad(hidden, ((0, 0), (0, n * c - t), (0, 0)))  # [B, n c, E]
  hidden = jnp.moveaxis(hidden.reshape(b, n, c, e), 1, 0)  # [n, B, c, E]
  targets = jnp.moveaxis(targets.reshape(b, n, c), 1, 0)  # [n, B, c]

  @functools.partial(jax.checkpoint, prevent_cse=False)  # In a loop, CSE cannot undo the remat.
  def one(h, y, head):
    return _target_logprobs(_head_logits(h, head, layout), y, temperature)  # [B, c] each

  out = jax.lax.map(lambda xs: one(*xs, head), (hidden, targets))  # [n, B, c] each
  pad = jnp.zeros((b, 1), jnp.float32)
  return tuple(jnp.concatenate([pad, jnp.moveaxis(x, 0, 1).reshape(b, n * c)[:, :t - 1]], axis=1)
               for x in out)


def _model_logprobs(out, tokens, temperature, chunk=0, layout=None):
  """(logprobs, entropy) [B, T] from apply_fn's output: logits, or (hidden, head)."""
  if not isinstance(out, tuple):
    return token_logprobs(out, tokens, temperature)
  hidden, head = out
  if chunk > 0:
    return chunked_token_logprobs(hidden, head, tokens, temperature, chunk, layout)
  return token_logprobs(_head_logits(hidden, head, layout), tokens, temperature)


def _logprob_chunk(value):
  if isinstance(value, bool) or int(value) != value or value < 0:
    raise ValueError(f"logprob_chunk={value!r} must be a whole number of positions >= 0 "
                     "(0 = unchunked); 512 is a good size.")
  return int(value)


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


# ---------------------------------------------------------------------------------------------
# Train step


VALUE_BATCH_KEYS = ("tokens", "attention_mask", "loss_mask", "old_values", "returns",
                    "sample_weight")
OBJECTIVES = ("policy", "value")


def _check_batch(batch, cfg, micro_batch_size, objective="policy"):
  keys = BATCH_KEYS if objective == "policy" else VALUE_BATCH_KEYS
  missing = [key for key in keys if key not in batch]
  if missing:
    raise KeyError(f"RL batch is missing {missing}; it needs {list(keys)}"
                   + (" (and ref_logprobs when kl_coef > 0)." if objective == "policy" else "."))
  if (objective == "policy" and float(_field(cfg, "kl_coef")) != 0
      and "ref_logprobs" not in batch):
    raise KeyError(f"kl_coef={_field(cfg, 'kl_coef')} needs batch['ref_logprobs']; add them, or "
                   "set kl_coef=0.")
  b, t = batch["tokens"].shape
  for key, value in batch.items():
    want = (b,) if key == "sample_weight" else (b, t)
    if key == "advantages" and value.ndim == 1:
      want = (b,)
    if key not in keys + ("ref_logprobs",):
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


def make_grad_fn(apply_fn, cfg, micro_batch_size, layout=None, objective="policy"):
  """(params, batch) -> (grads, metrics): the batch-loss gradient, accumulated over micro-batches.

  objective "policy": `policy_loss`, apply_fn gives logits [B, T, V] or (hidden, head) (see
  the module docstring; with the latter, cfg.logprob_chunk positions at a time). "value": the
  value model's clipped loss (`_value_sums`, always a token mean), apply_fn gives one value per
  position [B, T] (the value after reading that token); the batch holds old_values and returns
  instead of log-probs and advantages (VALUE_BATCH_KEYS).
  Peak memory is that of one micro-batch's forward and backward (float32 logits [m, T, V], or
  [m, logprob_chunk, V] when chunked); the result equals the full-batch gradient for every
  loss_agg, because each micro-batch loss is divided by the whole batch's `loss_normaliser`.
  Gradients accumulate in float32 and come back in the parameters' dtype. With a `sharding.Layout`, each micro-batch's rows stay
  split over the mesh's batch axes. Not jitted: `make_update_fn` jits it.
  """
  if micro_batch_size < 1:
    raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}.")
  if objective not in OBJECTIVES:
    raise ValueError(f"objective={objective!r} is not one of {', '.join(OBJECTIVES)}.")
  temperature = float(_field(cfg, "temperature"))
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0 for log-probs, got {temperature}.")
  loss_agg = _choice(cfg, "loss_agg", LOSS_AGGREGATIONS) if objective == "policy" else "token_mean"
  chunk = _logprob_chunk(_field(cfg, "logprob_chunk"))

  def micro_loss(params, mb, normaliser):
    if layout is not None:
      mb = {k: layout.constrain(v, ("batch",) + (None,) * (v.ndim - 1)) for k, v in mb.items()}
    positions = positions_from_mask(mb["attention_mask"])
    out = apply_fn(params, mb["tokens"], positions, mb["attention_mask"])
    if objective == "value":  # Target-aligned: the value before token t is read at t - 1.
      if isinstance(out, tuple):
        raise ValueError("objective='value' needs an apply_fn that returns values [B, T], not "
                         "a (hidden, head) pair; pass the value model's apply (sqlm_jax.critic).")
      values = jnp.pad(out[:, :-1], ((0, 0), (1, 0)))  # [m, T]
      objective_sum, sums = _value_sums(values, mb["old_values"], mb["returns"],
                                        mb["loss_mask"], mb["sample_weight"], cfg)
      return objective_sum / normaliser, sums
    logprobs, entropy = _model_logprobs(out, mb["tokens"], temperature, chunk, layout)  # [m, T]
    objective_sum, sums = _policy_sums(
        logprobs, mb["old_logprobs"], mb["advantages"], mb["loss_mask"], mb["sample_weight"],
        cfg, mb.get("ref_logprobs"), jax.lax.stop_gradient(entropy))
    return objective_sum / normaliser, sums

  grad_micro = jax.value_and_grad(micro_loss, has_aux=True)

  def grad_fn(params, batch):
    _check_batch(batch, cfg, micro_batch_size, objective)
    normaliser = loss_normaliser(batch["loss_mask"], batch["sample_weight"], loss_agg)
    micro = jax.tree.map(lambda x: _split_micro(x, micro_batch_size), batch)
    like = jax.eval_shape(grad_micro, params, jax.tree.map(lambda x: x[0], micro),
                          normaliser)[0][1]

    def accumulate(carry, mb):
      grads, loss, sums = carry
      (mb_loss, mb_sums), mb_grads = grad_micro(params, mb, normaliser)
      grads = jax.tree.map(lambda g, d: g + d.astype(jnp.float32), grads, mb_grads)
      return (grads, loss + mb_loss, _merge_sums(sums, mb_sums)), None

    init = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
            jnp.zeros((), jnp.float32), _empty_sums(like))
    (grads, loss, sums), _ = jax.lax.scan(accumulate, init, micro)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    metrics = _finish_metrics(sums)
    metrics["loss"] = loss
    return grads, metrics

  return grad_fn


def make_update_fn(apply_fn, optimizer, cfg, micro_batch_size, layout=None,
                   param_shardings=None, opt_shardings=None, objective="policy"):
  """Jitted `update(params, opt_state, batches, step=None) -> (params, opt_state, metrics)`.

  The one update, for the policy and (objective="value") the value model: one optimizer step.
  `batches` is one batch or a tuple of batches (one per role when proposer and solver share
  weights and their gradients are summed): one step on the sum of their losses' gradients,
  each accumulated over micro-batches (see `make_grad_fn`); metrics is a dict, or a tuple of
  dicts, with grad_norm (the global norm of the summed gradient, before clipping),
  learning_rate and skipped_updates (1 when a non-finite gradient left params and opt_state
  unchanged, see cfg.skip_nonfinite_updates) added to those of the loss. `optimizer` comes from `make_optimizer(cfg)`; the
  step's learning rate is `make_lr_schedule(cfg)(step)`, step being the self-play step (see
  `default_config`), or the optimizer's own count when step is None. PPO mini-batches and
  epochs are repeated calls (`mini_batches`). params and opt_state are donated, so the update
  holds one copy of each: do not reuse the arrays passed in. With shardings, they are the
  explicit in/out shardings of both (the parameters' and optimizer state's layouts never
  change); batches keep the layout they come with (`Layout.put_batch`). B must be divisible
  by micro_batch_size.
  """
  grad_fn = make_grad_fn(apply_fn, cfg, micro_batch_size, layout, objective)
  schedule = make_lr_schedule(cfg)
  skip_nonfinite = bool(_field(cfg, "skip_nonfinite_updates"))

  def update(params, opt_state, batches, step=None):
    single = isinstance(batches, dict)
    results = [grad_fn(params, batch) for batch in ((batches,) if single else batches)]
    grads = jax.tree.map(lambda *g: sum(g[1:], g[0]), *[g for g, _ in results])
    grad_norm = optax.tree.norm(grads)
    lr = schedule(opt_state.count if step is None else step)
    opt_state = opt_state._replace(hyperparams=dict(opt_state.hyperparams, learning_rate=lr))
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    skipped = jnp.zeros((), jnp.float32)
    if skip_nonfinite:  # One bad batch must not poison the weights, the moments or a checkpoint.
      finite = jnp.isfinite(grad_norm)
      new_params, new_opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                               (new_params, new_opt_state), (params, opt_state))
      skipped = 1.0 - finite.astype(jnp.float32)
    metrics = tuple(dict(m, grad_norm=grad_norm, learning_rate=lr, skipped_updates=skipped)
                    for _, m in results)
    return new_params, new_opt_state, metrics[0] if single else metrics

  if param_shardings is None:
    return jax.jit(update, donate_argnums=(0, 1))
  return jax.jit(update, donate_argnums=(0, 1),
                 in_shardings=(param_shardings, opt_shardings, None, None),
                 out_shardings=(param_shardings, opt_shardings, None))


def mini_batches(batch, rows, size):
  """A batch's PPO mini-batches: `size` consecutive rows each (0 = the whole batch in one).

  rows: how many leading rows are real (the rest is padding with sample_weight 0). The
  real rows make ceil(rows / size) mini-batches; the last one also takes the padding, so
  each mini-batch's row count stays a multiple of the micro-batch when `size` and the
  padded batch are. Slicing keeps every array on its devices.
  """
  total = batch["tokens"].shape[0]
  if size <= 0 or rows <= size:
    return [batch]
  cuts = [i * size for i in range(-(-rows // size))] + [total]
  return [jax.tree.map(lambda x, a=a, b=b: x[a:b], batch) for a, b in zip(cuts, cuts[1:])]


def make_logprob_fn(apply_fn, temperature, micro_batch_size, param_shardings=None,
                    logprob_chunk=0, layout=None):
  """Jitted `(params, tokens, attention_mask) -> logprobs [B, T]` of each target token.

  For the frozen reference's ref_logprobs, or to recompute old_logprobs with the training
  forward pass (sampler and trainer numerics can differ, e.g. bf16 KV cache). Entry t is
  log p(tokens[:, t] | tokens[:, :t]); multiply by loss_mask before use. Runs micro-batch by
  micro-batch to bound memory; with an apply_fn that returns (hidden, head) (see the module
  docstring), also `logprob_chunk` positions at a time (pass cfg.logprob_chunk; 0 = at once),
  with the logits pinned to `layout` as the model pins them.
  """
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0 for log-probs, got {temperature}.")
  chunk = _logprob_chunk(logprob_chunk)

  def one(params, tokens, attention_mask):
    positions = positions_from_mask(attention_mask)
    out = apply_fn(params, tokens, positions, attention_mask)
    return _model_logprobs(out, tokens, temperature, chunk, layout)[0]

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


def make_value_fn(apply_fn, micro_batch_size, param_shardings=None):
  """Jitted `(params, tokens, attention_mask) -> values [B, T]`, target-aligned like log-probs:
  entry t is the value model's estimate before tokens[:, t] (read at position t - 1); entry 0
  is 0. apply_fn gives one value per position (see sqlm_jax/critic.py). For GAE's old values."""

  def value_fn(params, tokens, attention_mask):
    b = tokens.shape[0]
    if b % micro_batch_size:
      raise ValueError(f"Batch size {b} is not divisible by micro_batch_size={micro_batch_size}.")
    micro = (_split_micro(tokens, micro_batch_size), _split_micro(attention_mask, micro_batch_size))
    out = jax.lax.map(lambda xs: apply_fn(params, xs[0], positions_from_mask(xs[1]), xs[1]),
                      micro)  # [B/m, m, T]
    out = jnp.swapaxes(out, 0, 1).reshape(tokens.shape).astype(jnp.float32)
    return jnp.pad(out[:, :-1], ((0, 0), (1, 0)))

  if param_shardings is None:
    return jax.jit(value_fn)
  return jax.jit(value_fn, in_shardings=(param_shardings, None, None))


# ---------------------------------------------------------------------------------------------
# Optimizer


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


def critic_config(cfg) -> ml_collections.ConfigDict:
  """The value model's optimizer settings: the policy's, at critic_learning_rate."""
  names = ("learning_rate", "warmup_steps", "lr_schedule", "total_steps", "final_lr_ratio",
           "weight_decay", "weight_decay_mask", "b1", "b2", "adam_eps", "max_grad_norm",
           "temperature", "value_clip", "skip_nonfinite_updates")
  values = {name: _field(cfg, name) for name in names}
  values["learning_rate"] = float(_field(cfg, "critic_learning_rate"))
  return ml_collections.ConfigDict(values)
