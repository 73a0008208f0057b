"""The RL config: `default_config` (every field documented), the allowed values of its choices,
and how the code reads a field: `_field` (an optional field falls back to its default, a missing
one names itself) and `_choice` (one of a tuple). `critic_config` derives the value model's
optimizer settings from the policy's.
"""

from __future__ import annotations

import ml_collections

ADVANTAGE_ESTIMATORS = ("grpo", "rloo", "drgrpo", "gae")
GROUP_ESTIMATORS = ("grpo", "rloo", "drgrpo")  # Advantages from the group alone, no critic.
KL_ESTIMATORS = ("k1", "k3", "low_var")
LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
LR_SCHEDULES = ("constant", "cosine")


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
      from an apply_fn that returns (hidden, head) (see `sqlm_jax.rl.logprobs`): a micro-batch
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


def critic_config(cfg) -> ml_collections.ConfigDict:
  """The value model's optimizer settings: the policy's, at critic_learning_rate."""
  names = ("learning_rate", "warmup_steps", "lr_schedule", "total_steps", "final_lr_ratio",
           "weight_decay", "weight_decay_mask", "b1", "b2", "adam_eps", "max_grad_norm",
           "temperature", "value_clip", "skip_nonfinite_updates")
  values = {name: _field(cfg, name) for name in names}
  values["learning_rate"] = float(_field(cfg, "critic_learning_rate"))
  return ml_collections.ConfigDict(values)
