"""The batch an update takes, its checks, and its cut into PPO mini-batches and micro-batches.

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
shift happens in `logprobs.token_logprobs`. A sample_weight other than 0 / 1 weighs a sequence
inside a weighted mean (the loss divides by the summed weights, see `losses.loss_normaliser`).

Padding rows (sample_weight 0) contribute exactly zero gradient as long as the model's
output for them is finite: pad with copies of a real row, not with all-masked rows, which
can make attention softmax NaN (and 0 * NaN is NaN in the backward pass).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sqlm_jax.rl.config import _field

BATCH_KEYS = ("tokens", "attention_mask", "loss_mask", "old_logprobs", "advantages",
              "sample_weight")
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
