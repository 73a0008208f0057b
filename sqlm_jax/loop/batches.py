"""Rollouts -> training batches: a role's sampled rows as the batch dict `rl.make_grad_fn` reads.

Shapes are bucketed so they repeat across steps; with a value model the batch also carries
per-token GAE advantages, old values and returns.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from sqlm_jax import rl
from sqlm_jax.loop.roles import Setup
from sqlm_jax.rollout.sampling import SampleOutput, bucket


def training_batch(s: Setup, role: str, out: SampleOutput, num_samples: int, rows: np.ndarray,
                   advantages: np.ndarray, weights: np.ndarray, params,
                   critic_params=None) -> dict[str, jax.Array]:
  """Prompt + completion rows of a SampleOutput as the batch dict rl.make_grad_fn expects.

  The completion part is trimmed to a length bucket and the rows padded (with copies of a real
  row at weight 0) to a bucketed multiple of the micro-batch, so shapes repeat across steps.
  Every process builds the same host batch; `put_batch` keeps each process's rows only.
  Reference and old log-probs come from the weights before any update. With a value model
  (critic_params), `advantages` are the sequences' rewards: they become per-token GAE
  advantages, and the batch also carries the old values and the returns the critic learns.
  """
  micro = s.config.rl.micro_batch_size
  prompt_rows = rows // num_samples
  lengths = out.lengths[rows]
  length = min(out.tokens.shape[1], bucket(int(lengths.max()), 16))
  completion_mask = np.arange(length)[None, :] < lengths[:, None]  # [R, L]
  prompt_mask = out.prompt_mask[prompt_rows]
  batch = {
      "tokens": np.concatenate([out.prompt_tokens[prompt_rows], out.tokens[rows, :length]], 1),
      "attention_mask": np.concatenate([prompt_mask, completion_mask], 1),
      "loss_mask": np.concatenate([np.zeros_like(prompt_mask), completion_mask], 1).astype(np.float32),
      "old_logprobs": np.concatenate([np.zeros(prompt_mask.shape, np.float32),
                                      out.logprobs[rows, :length] * completion_mask], 1),
      "advantages": advantages.astype(np.float32),
      "sample_weight": weights.astype(np.float32),
  }
  size = -(-bucket(len(rows), 1) // micro) * micro
  pad = size - len(rows)
  for name, value in batch.items():
    filler = np.repeat(value[:1], pad, axis=0)
    if name == "sample_weight":
      filler = np.zeros_like(filler)
    batch[name] = np.concatenate([value, filler], 0)
  batch = s.roles[role].layout.put_batch(batch)
  score_fn = s.roles[role].logprob_fn
  if role in s.reference:
    batch["ref_logprobs"] = score_fn(s.reference[role], batch["tokens"],
                                     batch["attention_mask"]) * batch["loss_mask"]
  if s.recompute_old_logprobs:  # Score the sampled tokens with the trainer's forward pass.
    batch["old_logprobs"] = score_fn(params, batch["tokens"],
                                     batch["attention_mask"]) * batch["loss_mask"]
  if critic_params is not None:
    batch.update(gae_batch(batch, s.value_fn(critic_params, batch["tokens"],
                                             batch["attention_mask"]),
                           gamma=s.config.rl.gae_gamma, lam=s.config.rl.gae_lambda))
  return batch


@functools.partial(jax.jit, static_argnames=("gamma", "lam"))
def gae_batch(batch, values, *, gamma, lam):
  """Per-token advantages, old values and returns of a batch whose `advantages` hold rewards."""
  mask = batch["loss_mask"] * (batch["sample_weight"] > 0)[:, None]  # [B, T]
  token_rewards = rl.last_token_rewards(batch["advantages"], mask)
  advantages, returns = rl.gae_advantages(token_rewards, values, mask, gamma, lam)
  return {"advantages": advantages, "old_values": values * mask, "returns": returns}
