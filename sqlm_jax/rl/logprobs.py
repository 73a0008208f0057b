"""Per-token log-probs (and entropy) of target tokens under a model, and the jitted passes that
take them, or a value model's values, micro-batch by micro-batch.

The model is any `apply_fn(params, tokens, positions, attention_mask)` returning either
  logits          float32 [B, T, V], or
  (hidden, head)  the final hidden states [B, T, E] (compute dtype) and the output head [E, V];
                  rl computes the logits as the model would (`_head_logits`: operands in the
                  hidden states' dtype, float32 accumulation). Only this form lets log-probs
                  be taken `logprob_chunk` positions at a time (`chunked_token_logprobs`), so
                  that no step holds the float32 logits of a whole micro-batch; with logits
                  they already exist and `logprob_chunk` has nothing to save.
A value model (objective="value") returns one value per position [B, T] instead.

Every result is target-aligned like the batch's masks (see `sqlm_jax.rl.batching`): entry t
is about tokens[:, t], predicted from position t - 1; entry 0 is 0.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sqlm_jax.models.transformer import positions_from_mask
from sqlm_jax.rl.batching import _split_micro


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
  is 0. apply_fn gives one value per position (see sqlm_jax/rl/critic.py). For GAE's old values."""

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
