"""Batched sampling: one jitted prefill plus a jitted `lax.while_loop` decode over a KV cache.

What is static and what is traced is deliberate (as in gemma's sampler): the model config,
`max_new_tokens`, the number of samples per prompt and the padded shapes are static; the
temperature, top-k, top-p, stop ids and the PRNG key are traced, so changing them never
recompiles. Prompts are left-padded to a few length buckets (and the batch to a few sizes) so
shapes repeat across calls. N samples of one prompt share one prefill: the prompt's cache is
computed once and repeated N times before decoding.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sqlm_jax import sharding
from sqlm_jax.models import transformer
from sqlm_jax.models.config import ModelConfig
from sqlm_jax.sharding import Layout


@dataclasses.dataclass
class SampleOutput:
  """Completions of B prompts x N samples, row r = prompt r // N (numpy, on the host)."""

  tokens: np.ndarray  # [B*N, max_new_tokens], pad after the stop token (the stop token is kept).
  logprobs: np.ndarray  # [B*N, max_new_tokens] log-prob of each token under the sampling distribution.
  lengths: np.ndarray  # [B*N] completion lengths, stop token included.
  prompt_tokens: np.ndarray  # [B, P] the left-padded prompts.
  prompt_mask: np.ndarray  # [B, P]


def bucket(n: int, minimum: int = 16) -> int:
  """Rounds n up to a power of two (>= minimum) so few distinct shapes get compiled."""
  return max(minimum, 1 << max(0, (n - 1).bit_length()))


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """Masks logits [B, V] outside top-k (0 = off) and the top-p nucleus (1.0 = off); both traced."""

  def apply(logits):
    vocab = logits.shape[-1]
    ordered = -jnp.sort(-logits, axis=-1)  # [B, V] descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jax.lax.dynamic_slice_in_dim(ordered, k - 1, 1, axis=-1)  # [B, 1]
    ordered = jnp.where(ordered < kth, -jnp.inf, ordered)
    probs = jax.nn.softmax(ordered, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    return jnp.where((logits < kth) | (logits < threshold), -jnp.inf, logits)

  return jax.lax.cond((top_k > 0) | (top_p < 1.0), apply, lambda x: x, logits)


def sample_token(logits: jax.Array, key: jax.Array, temperature, top_k, top_p, first_row=0,
                 noise_rows: Optional[int] = None):
  """Samples from logits [B, V]; temperature 0 is greedy. Returns (token [B], logprob [B]).

  Row b draws the Gumbel noise of global row first_row + b out of noise_rows (static, at least
  first_row + B): with threefry's partitionable bits a draw depends only on its index, so a
  chunk of rows samples what the same rows of one big call would (`jax.random.categorical`'s
  draws exactly when first_row is 0).
  """
  greedy = temperature <= 0
  scaled = logits / jnp.where(greedy, 1.0, temperature)
  scaled = filter_logits(scaled, top_k, top_p)
  rows, vocab = scaled.shape

  def draw():
    noise = jax.random.gumbel(key, (noise_rows or rows, vocab), scaled.dtype)
    noise = jax.lax.dynamic_slice_in_dim(noise, first_row, rows, axis=0)
    return jnp.argmax(scaled + noise, axis=-1).astype(jnp.int32)

  # A branch, not a select, so greedy decoding never draws [B, V] random numbers.
  token = jax.lax.cond(greedy, lambda: first_argmax(logits), draw)
  logp = jnp.take_along_axis(scaled, token[:, None], axis=-1)[:, 0]
  return token, logp - jax.nn.logsumexp(scaled, axis=-1)


def first_argmax(x: jax.Array) -> jax.Array:
  """jnp.argmax over the last axis (first index of the maximum), as two plain reductions.

  XLA's CPU argmax is a (value, index) pair reduction that does not vectorise: about 5x slower
  than a max followed by a min over the indices that attain it.
  """
  top = jnp.max(x, axis=-1, keepdims=True)
  iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  return jnp.min(jnp.where(x == top, iota, x.shape[-1]), axis=-1)


def prefill(params, tokens, mask, cache_length: int, num_samples: int, *, config: ModelConfig,
            layout: Layout):
  """Runs left-padded prompts [B, P] into a fresh cache, then repeats it for N samples each.

  Returns (last logits [B*N, V], cache with B*N rows, last positions [B*N]); the repeated rows
  are split over the mesh's batch axes.
  """
  cache = transformer.init_cache(config, tokens.shape[0], cache_length, layout=layout)
  positions = transformer.positions_from_mask(mask)
  logits, cache = transformer.forward_with_cache(params, config, tokens, positions, mask, cache,
                                                 last_only=True, layout=layout)
  def repeat(x, axes):
    x = jnp.repeat(x, num_samples, axis=0) if num_samples > 1 else x
    return layout.constrain(x, axes)

  cache = {"k": tuple(repeat(k, transformer.CACHE_AXES) for k in cache["k"]),
           "v": tuple(repeat(v, transformer.CACHE_AXES) for v in cache["v"]),
           "mask": repeat(cache["mask"], ("batch", "cache_seq")), "index": cache["index"]}
  return (repeat(logits[:, -1], ("batch", "vocab")), cache,
          repeat(positions[:, -1], ("batch",)))


class SamplingState(NamedTuple):
  """The decode loop's carry; R = rows (prompts x samples), L = max_new_tokens."""

  step: jax.Array  # [] next column of `tokens` to write
  tokens: jax.Array  # [R, L] int32, pad after the stop token
  logprobs: jax.Array  # [R, L] float32
  lengths: jax.Array  # [R] int32, stop token included
  done: jax.Array  # [R] bool
  cache: transformer.Cache
  last_token: jax.Array  # [R] int32, the token the next step feeds


def decode(params, cache, last_logits, last_position, num_prompts, key, temperature, top_k, top_p,
           stop_ids, pad_id, first_row, max_new_tokens: int, num_samples: int, noise_rows: int,
           *, config: ModelConfig, layout: Layout):
  """Samples up to max_new_tokens per row, each row stopping at a stop id.

  Rows are prompt-major (row = prompt * N + sample); last_position [rows] is the position of
  each prompt's last token; rows past num_prompts * N are batch padding; first_row is the global
  index of row 0 (see `sample_token`). The cache is donated (by `Sampler`) and updated in
  place; it is returned only so its buffer can be reused. The tokens, log-probs and lengths
  come back replicated, so every process can read them all.
  """
  rows = last_logits.shape[0]
  key = jax.random.wrap_key_data(key)  # Passed as host data: the same on every process.
  params = transformer.inference_params(params, config)  # Once, not per step.

  def choose(logits, step, done):
    token, logp = sample_token(logits, jax.random.fold_in(key, step), temperature, top_k, top_p,
                               first_row, noise_rows)
    token = jnp.where(done, pad_id, token)
    return token, jnp.where(done, 0.0, logp), done | jnp.isin(token, stop_ids)

  token, logp, done = choose(last_logits, 0, jnp.arange(rows) >= num_prompts * num_samples)
  start = SamplingState(
      step=jnp.ones((), jnp.int32),
      tokens=jnp.full((rows, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token),
      logprobs=jnp.zeros((rows, max_new_tokens), jnp.float32).at[:, 0].set(logp),
      lengths=jnp.ones((rows,), jnp.int32), done=done, cache=cache, last_token=token)

  def cond(state: SamplingState):
    return (state.step < max_new_tokens) & ~jnp.all(state.done)

  def body(state: SamplingState):
    positions = (last_position + state.step)[:, None]
    logits, cache = transformer.forward_with_cache(
        params, config, state.last_token[:, None], positions, jnp.ones((rows, 1), bool),
        state.cache, layout=layout)
    token, logp, now_done = choose(logits[:, 0], state.step, state.done)
    return SamplingState(step=state.step + 1,
                         tokens=state.tokens.at[:, state.step].set(token),
                         logprobs=state.logprobs.at[:, state.step].set(logp),
                         lengths=state.lengths + (~state.done).astype(jnp.int32),
                         done=now_done, cache=cache, last_token=token)

  end = jax.lax.while_loop(cond, body, start)
  whole = lambda x: jax.lax.with_sharding_constraint(x, layout.replicated)
  return whole(end.tokens), whole(end.logprobs), whole(end.lengths), end.cache


class Sampler:
  """Samples completions for lists of token-id prompts of different lengths.

  Compiled once per Sampler for its layout: the parameters' shardings are the jitted
  functions' explicit in_shardings (host parameters are placed on the way in), prompts are
  split over the batch axes, and the KV cache is donated from prefill to decode.
  """

  def __init__(self, config: ModelConfig, pad_id: int, stop_ids: Sequence[int],
               min_prompt_bucket: int = 16, min_batch_bucket: int = 1,
               layout: Optional[Layout] = None, per_layer_params: bool = False):
    if not stop_ids:
      raise ValueError("Sampler needs at least one stop id (the tokenizer's eos).")
    self.config = config
    self.layout = layout or sharding.default_layout()
    # per_layer_params: the weights arrive split per layer (the decoding copy of
    # sqlm_jax/rollout.py), which every backend's decode loop reads in place.
    params = sharding.param_shardings(self.layout, config, per_layer=per_layer_params)
    self._prefill = jax.jit(
        functools.partial(prefill, config=config, layout=self.layout),
        static_argnums=(3, 4), in_shardings=(params, None, None))
    self._decode = jax.jit(
        functools.partial(decode, config=config, layout=self.layout),
        static_argnums=(12, 13, 14), donate_argnums=(1,),
        in_shardings=(params,) + (None,) * 11)
    self.pad_id = int(pad_id)
    self.stop_ids = np.asarray(sorted(set(int(i) for i in stop_ids)), np.int32)
    self.min_prompt_bucket = min_prompt_bucket
    self.min_batch_bucket = min_batch_bucket

  def pad_prompts(self, prompts: Sequence[Sequence[int]], length: Optional[int] = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads prompts to a length bucket (or `length`) and the batch to a size bucket (dummy
    rows masked)."""
    if not prompts or any(len(p) == 0 for p in prompts):
      raise ValueError("Every prompt needs at least one token.")
    longest = max(len(p) for p in prompts)
    if length is not None and length < longest:
      raise ValueError(f"prompt_length={length} is shorter than the longest prompt ({longest}).")
    length = length or bucket(longest, self.min_prompt_bucket)
    batch = bucket(len(prompts), self.min_batch_bucket)
    tokens = np.full((batch, length), self.pad_id, np.int32)
    mask = np.zeros((batch, length), bool)
    for row, prompt in enumerate(prompts):
      tokens[row, length - len(prompt):] = prompt
      mask[row, length - len(prompt):] = True
    mask[len(prompts):, -1] = True  # Dummy rows: one real token so their softmax is well defined.
    return tokens, mask

  def __call__(self, params, prompts: Sequence[Sequence[int]], key: jax.Array, *,
               max_new_tokens: int, num_samples: int = 1, temperature: float = 1.0,
               top_k: int = 0, top_p: float = 1.0, first_row: int = 0,
               prompt_length: Optional[int] = None) -> SampleOutput:
    """first_row: the global index of this call's first row (row = prompt * N + sample), when
    the call is one chunk of a bigger one (sqlm_jax/rollout.py): its rows then sample exactly
    what those rows of the bigger call would. prompt_length: pad prompts to this length."""
    tokens, mask = self.pad_prompts(prompts, prompt_length)
    cache_length = tokens.shape[1] + max_new_tokens
    if cache_length > self.config.max_position_embeddings:
      raise ValueError(f"Prompt bucket {tokens.shape[1]} + max_new_tokens {max_new_tokens} exceeds "
                       f"max_position_embeddings={self.config.max_position_embeddings}.")
    logits, cache, last_position = self._prefill(
        params, *self.layout.put_batch((tokens, mask)), cache_length, num_samples)
    out, logprobs, lengths, _ = self._decode(
        params, cache, logits, last_position, np.int32(len(prompts)),
        np.asarray(jax.random.key_data(key)), np.float32(temperature), np.int32(top_k),
        np.float32(top_p), self.stop_ids, np.int32(self.pad_id), np.int32(first_row),
        max_new_tokens, num_samples, bucket(first_row + tokens.shape[0] * num_samples, 1))
    rows = len(prompts) * num_samples
    out, logprobs, lengths = (sharding.to_host(x) for x in (out, logprobs, lengths))
    return SampleOutput(tokens=out[:rows], logprobs=logprobs[:rows], lengths=lengths[:rows],
                        prompt_tokens=tokens[:len(prompts)], prompt_mask=mask[:len(prompts)])

  def lower(self, params, num_prompts: int, prompt_length: int, max_new_tokens: int,
            num_samples: int = 1) -> dict[str, "jax.stages.Lowered"]:
    """The programs a call of this size runs, lowered on abstract arguments (nothing runs or
    is allocated): {"prefill": ..., "decode": ...}. params: a tree of jax.ShapeDtypeStruct
    with shardings (the memory plan's 3B-shaped weights)."""
    batch = bucket(num_prompts, self.min_batch_bucket)
    length = bucket(prompt_length, self.min_prompt_bucket)
    row = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=self.layout.sharding(
        ("batch",) + (None,) * (len(shape) - 1), shape))
    prefill = self._prefill.lower(params, row((batch, length), jnp.int32),
                                  row((batch, length), jnp.bool_), length + max_new_tokens,
                                  num_samples)
    logits, cache, last_position = prefill.out_info
    scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype)
    key = jax.ShapeDtypeStruct(jax.random.key_data(jax.random.key(0)).shape, jnp.uint32)
    decode = self._decode.lower(
        params, cache, logits, last_position, scalar(jnp.int32), key, scalar(jnp.float32),
        scalar(jnp.int32), scalar(jnp.float32), jax.ShapeDtypeStruct(self.stop_ids.shape, jnp.int32),
        scalar(jnp.int32), scalar(jnp.int32), max_new_tokens, num_samples, batch * num_samples)
    return {"prefill": prefill, "decode": decode}
