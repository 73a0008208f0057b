"""Batched sampling: one jitted prefill plus a jitted `lax.while_loop` decode over a KV cache.

What is static and what is traced is deliberate (as in gemma's sampler): the model config,
`max_new_tokens`, the number of samples per prompt and the padded shapes are static; the
temperature, top-k, top-p, stop ids, the PRNG key and the first row's global index are traced,
so changing them never recompiles. Prompts are left-padded to a few length buckets (and the
batch to a few sizes) so shapes repeat across calls. N samples of one prompt share one prefill:
the prompt's cache is computed once and repeated N times before decoding.

Decoding costs about what it writes: the cache is cut into blocks (`cache_blocks`), the
prompt's and a few equal ones for the answer; prefill attends over the prompt's block only, and
the decode program runs one loop per answer block, each step attending over the blocks up to
the one it writes, not over the whole cache.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.random import threefry2x32_p

from sqlm_jax.scale import sharding
from sqlm_jax.models import transformer
from sqlm_jax.models.config import ModelConfig
from sqlm_jax.scale.sharding import Layout


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


def sample_token(logits: jax.Array, key: jax.Array, temperature, top_k, top_p, first_row=0):
  """Samples from logits [B, V]; temperature 0 is greedy. Returns (token [B], logprob [B]).

  Row b draws the Gumbel noise of global row first_row + b (traced; see `gumbel_rows`), so a
  chunk of rows samples what the same rows of one big call would, and first_row 0 draws
  exactly `jax.random.categorical(key, logits / temperature)`.
  """
  greedy = temperature <= 0
  scaled = logits / jnp.where(greedy, 1.0, temperature)
  scaled = filter_logits(scaled, top_k, top_p)
  rows, vocab = scaled.shape

  def draw():
    noise = gumbel_rows(key, first_row, rows, vocab).astype(scaled.dtype)
    return jnp.argmax(scaled + noise, axis=-1).astype(jnp.int32)

  # A branch, not a select, so greedy decoding never draws [B, V] random numbers.
  token = jax.lax.cond(greedy, lambda: first_argmax(logits), draw)
  logp = jnp.take_along_axis(scaled, token[:, None], axis=-1)[:, 0]
  return token, logp - jax.nn.logsumexp(scaled, axis=-1)


def gumbel_rows(key: jax.Array, first_row, rows: int, vocab: int) -> jax.Array:
  """float32 Gumbel noise [rows, vocab]: rows first_row.. (traced) of
  `jax.random.gumbel(key, (R, vocab))` for any R >= first_row + rows, computed for those only.

  With threefry's partitionable bits (jax's default) the draw at (r, v) hashes its flat index
  r * vocab + v and nothing else. jax takes no offset, and drawing R rows to slice out a few
  makes XLA compute and hold all R x vocab (measured: 4 arrays of that size in the decode
  loop's temporaries), so this repeats jax's few steps from the index on: the 64-bit counter,
  the threefry hash, 32 bits -> a float32 uniform in [tiny, 1), -log(-log u).
  tests/test_sampling.py checks them against jax.random.gumbel and categorical.
  """
  if not jax.config.jax_threefry_partitionable or jax.config.jax_high_dynamic_range_gumbel:
    raise ValueError(
        "Sampling draws chunk-invariant noise from jax's partitionable threefry bits in the "
        f"default Gumbel mode; got jax_threefry_partitionable="
        f"{jax.config.jax_threefry_partitionable}, jax_high_dynamic_range_gumbel="
        f"{jax.config.jax_high_dynamic_range_gumbel}: set them back to True and False.")
  data = jax.random.key_data(key)
  if data.shape != (2,):
    raise ValueError(f"Sampling needs a threefry2x32 key (key data of shape (2,)); got key data "
                     f"of shape {data.shape}: make keys with jax.random.key(seed) under the "
                     "default jax_default_prng_impl='threefry2x32'.")
  row = jnp.asarray(first_row).astype(jnp.uint32) + jnp.arange(rows, dtype=jnp.uint32)[:, None]
  hi, lo = _times_wide(row, vocab)  # [rows, 1]: the 64-bit index of each row's first draw
  index_lo = lo + jnp.arange(vocab, dtype=jnp.uint32)[None, :]  # [rows, vocab]
  index_hi = hi + (index_lo < lo).astype(jnp.uint32)
  bits1, bits2 = threefry2x32_p.bind(data[0], data[1], index_hi, index_lo)
  bits = bits1 ^ bits2
  one = np.float32(1.0)
  uniform = jax.lax.bitcast_convert_type((bits >> 9) | one.view(np.uint32), jnp.float32) - one
  tiny = np.float32(np.finfo(np.float32).tiny)
  uniform = jnp.maximum(tiny, uniform * (one - tiny) + tiny)
  return -jnp.log(-jnp.log(uniform))


def _times_wide(a: jax.Array, b: int) -> tuple[jax.Array, jax.Array]:
  """(high, low) uint32 words of a * b as a 64-bit product; a uint32, b a Python int < 2**32."""
  a0, a1 = a & 0xFFFF, a >> 16
  b0, b1 = np.uint32(b & 0xFFFF), np.uint32(b >> 16)
  low, mid, top = a0 * b0, a0 * b1, a1 * b1
  mid_sum = mid + a1 * b0
  mid_carry = (mid_sum < mid).astype(jnp.uint32)  # The middle words' sum passed 2**32.
  new_low = low + (mid_sum << 16)
  high = top + (mid_sum >> 16) + (mid_carry << 16) + (new_low < low).astype(jnp.uint32)
  return high, new_low


def first_argmax(x: jax.Array) -> jax.Array:
  """jnp.argmax over the last axis (first index of the maximum), as two plain reductions.

  XLA's CPU argmax is a (value, index) pair reduction that does not vectorise: about 5x slower
  than a max followed by a min over the indices that attain it.
  """
  top = jnp.max(x, axis=-1, keepdims=True)
  iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  return jnp.min(jnp.where(x == top, iota, x.shape[-1]), axis=-1)


MIN_BLOCK = 64  # The fewest slots of an answer block (see `cache_blocks`).


def cache_blocks(prompt_length: int, max_new_tokens: int, segments: int) -> tuple[int, ...]:
  """The lengths of a call's cache blocks (see `transformer.Cache`): the answer's L =
  max_new_tokens slots in n = min(segments, L // MIN_BLOCK) blocks of L / n, the first of them
  after the prompt's P slots.

  The decode loop runs once per block, attending over the blocks up to the one it writes: a
  step attends over at most L / n slots more than have been written, and a row of L tokens
  over P + L (n + 1) / 2n slots per step on average, against P + L in one block (equal blocks
  waste the least for their number; each is one more compiled loop body, so none is shorter
  than MIN_BLOCK).
  """
  n = max(1, min(segments, max_new_tokens // MIN_BLOCK))
  size = max_new_tokens // n
  blocks = [size] * (n - 1) + [max_new_tokens - size * (n - 1)]
  blocks[0] += prompt_length
  return tuple(blocks)


def prefill(params, tokens, mask, blocks: tuple[int, ...], num_samples: int, *,
            config: ModelConfig, layout: Layout):
  """Runs left-padded prompts [B, P] into a cache of `blocks` (from `cache_blocks`), repeated for
  N samples each.

  With several blocks the prompt attends over its own P slots only, and its keys and values are
  then copied into the first block. With one, it is written into it and attends over all its
  P + L slots: a few more for short answers, and the rounding the sampler always had.
  Returns (last logits [B*N, V], cache with B*N rows, last positions [B*N]); the repeated rows
  are split over the mesh's batch axes.
  """
  batch, prompt_length = tokens.shape
  rows = batch * num_samples
  cache = transformer.init_cache(config, batch, blocks[0] if len(blocks) == 1 else prompt_length,
                                 layout=layout)
  positions = transformer.positions_from_mask(mask)
  logits, cache = transformer.forward_with_cache(params, config, tokens, positions, mask, cache,
                                                 last_only=True, layout=layout)
  def repeat(x, axes):
    x = jnp.repeat(x, num_samples, axis=0) if num_samples > 1 else x
    return layout.constrain(x, axes)

  empty = transformer.init_cache(config, rows, blocks, layout=layout)
  def first_block(prompt, block):  # The prompt's slots at the start of the empty first block.
    return layout.constrain(jax.lax.dynamic_update_slice_in_dim(
        block, repeat(prompt, transformer.CACHE_AXES), 0, 2), transformer.CACHE_AXES)

  cache = {"k": tuple((first_block(k, e[0]),) + e[1:] for (k,), e in zip(cache["k"], empty["k"])),
           "v": tuple((first_block(v, e[0]),) + e[1:] for (v,), e in zip(cache["v"], empty["v"])),
           "mask": layout.constrain(jax.lax.dynamic_update_slice_in_dim(
               empty["mask"], repeat(cache["mask"], ("batch", "cache_seq")), 0, 1),
               ("batch", "cache_seq")),
           "index": cache["index"]}
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
           stop_ids, pad_id, first_row, max_new_tokens: int, num_samples: int,
           *, config: ModelConfig, layout: Layout):
  """Samples up to max_new_tokens per row, each row stopping at a stop id.

  Rows are prompt-major (row = prompt * N + sample); last_position [rows] is the position of
  each prompt's last token; rows past num_prompts * N are batch padding; first_row is the global
  index of row 0 (see `sample_token`). The cache, from `prefill`, is donated (by `Sampler`)
  and updated in place; it is returned only so its buffer can be reused. One `while_loop` per
  block that answer slots are in, each attending over the blocks up to its own, so a step costs
  what has been written, not the whole cache; every loop stops as soon as every row is done
  (the later ones then run no step). The tokens, log-probs and lengths come back replicated,
  so every process can read them all.
  """
  rows = last_logits.shape[0]
  key = jax.random.wrap_key_data(key)  # Passed as host data: the same on every process.
  params = transformer.inference_params(params, config)  # Once, not per step.
  per_row = lambda x: layout.constrain(x, ("batch",) + (None,) * (x.ndim - 1))

  def choose(logits, step, done):
    token, logp = sample_token(logits, jax.random.fold_in(key, step), temperature, top_k, top_p,
                               first_row)
    token = jnp.where(done, pad_id, token)
    return token, jnp.where(done, 0.0, logp), done | jnp.isin(token, stop_ids)

  token, logp, done = choose(last_logits, 0, jnp.arange(rows) >= num_prompts * num_samples)
  state = SamplingState(
      step=jnp.ones((), jnp.int32),
      tokens=per_row(jnp.full((rows, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)),
      logprobs=per_row(jnp.zeros((rows, max_new_tokens), jnp.float32).at[:, 0].set(logp)),
      lengths=per_row(jnp.ones((rows,), jnp.int32)), done=done, cache=cache, last_token=token)

  def body(state: SamplingState, block: int):
    positions = (last_position + state.step)[:, None]
    logits, cache = transformer.forward_with_cache(
        params, config, state.last_token[:, None], positions, jnp.ones((rows, 1), bool),
        state.cache, layout=layout, block=block)
    token, logp, now_done = choose(logits[:, 0], state.step, state.done)
    return SamplingState(step=state.step + 1,
                         tokens=state.tokens.at[:, state.step].set(token),
                         logprobs=state.logprobs.at[:, state.step].set(logp),
                         lengths=state.lengths + (~state.done).astype(jnp.int32),
                         done=now_done, cache=cache, last_token=token)

  # One loop per block, while the next slot is in it.
  lengths = transformer.cache_blocks(cache)
  for block in range(len(lengths)):
    def cond(state: SamplingState, end=sum(lengths[:block + 1])):
      return ((state.step < max_new_tokens) & (state.cache["index"] < end)
              & ~jnp.all(state.done))
    state = jax.lax.while_loop(cond, functools.partial(body, block=block), state)
  whole = lambda x: jax.lax.with_sharding_constraint(x, layout.replicated)
  return whole(state.tokens), whole(state.logprobs), whole(state.lengths), state.cache


class Sampler:
  """Samples completions for lists of token-id prompts of different lengths.

  Compiled once per Sampler for its layout: the parameters' shardings are the jitted
  functions' explicit in_shardings (host parameters are placed on the way in), prompts are
  split over the batch axes, and the KV cache is donated from prefill to decode.

  decode_segments: the most answer blocks (decode loops) per call, see `cache_blocks`; 1 is one
  loop attending over the whole cache at every step (the least compile time).
  """

  def __init__(self, config: ModelConfig, pad_id: int, stop_ids: Sequence[int],
               min_prompt_bucket: int = 16, min_batch_bucket: int = 1,
               layout: Optional[Layout] = None, per_layer_params: bool = False,
               decode_segments: int = 4):
    if not stop_ids:
      raise ValueError("Sampler needs at least one stop id (the tokenizer's eos).")
    if decode_segments < 1:
      raise ValueError(f"decode_segments={decode_segments}: use 1 (one decode loop over the "
                       "whole cache) or more (loops over growing parts of it).")
    self.decode_segments = decode_segments
    self.config = config
    self.layout = layout or sharding.default_layout()
    # per_layer_params: the weights arrive split per layer (the decoding copy of
    # sqlm_jax/rollout/decoding.py), which every backend's decode loop reads in place.
    params = sharding.param_shardings(self.layout, config, per_layer=per_layer_params)
    self._prefill = jax.jit(
        functools.partial(prefill, config=config, layout=self.layout),
        static_argnums=(3, 4), in_shardings=(params, None, None))
    self._decode = jax.jit(
        functools.partial(decode, config=config, layout=self.layout),
        static_argnums=(12, 13), donate_argnums=(1,),
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
    the call is one chunk of a bigger one (sqlm_jax/rollout/decoding.py): its rows then sample exactly
    the tokens (and, up to float rounding of a different batch size, the log-probs) that those
    rows of the bigger call would. It is traced: changing it never recompiles.
    prompt_length: pad prompts to this length (every chunk of a bigger call alike)."""
    tokens, mask = self.pad_prompts(prompts, prompt_length)
    if tokens.shape[1] + max_new_tokens > self.config.max_position_embeddings:
      raise ValueError(f"Prompt bucket {tokens.shape[1]} + max_new_tokens {max_new_tokens} exceeds "
                       f"max_position_embeddings={self.config.max_position_embeddings}.")
    if not 0 <= first_row < 2 ** 31:
      raise ValueError(f"first_row={first_row}: the global index of the call's first row, "
                       "0 <= first_row < 2**31.")
    logits, cache, last_position = self._prefill(
        params, *self.layout.put_batch((tokens, mask)),
        cache_blocks(tokens.shape[1], max_new_tokens, self.decode_segments), num_samples)
    out, logprobs, lengths, _ = self._decode(
        params, cache, logits, last_position, np.int32(len(prompts)),
        np.asarray(jax.random.key_data(key)), np.float32(temperature), np.int32(top_k),
        np.float32(top_p), self.stop_ids, np.int32(self.pad_id), np.int32(first_row),
        max_new_tokens, num_samples)
    rows = len(prompts) * num_samples
    out, logprobs, lengths = (sharding.to_host(x) for x in (out, logprobs, lengths))
    return SampleOutput(tokens=out[:rows], logprobs=logprobs[:rows], lengths=lengths[:rows],
                        prompt_tokens=tokens[:len(prompts)], prompt_mask=mask[:len(prompts)])

  def lower(self, params, num_prompts: int, prompt_length: int, max_new_tokens: int,
            num_samples: int = 1) -> dict[str, "jax.stages.Lowered"]:
    """The programs a call of this size runs, lowered on abstract arguments (nothing runs or
    is allocated): {"prefill": ..., "decode": ...}; "decode" is one program holding every
    answer block's loop (see `decode`). params: a tree of jax.ShapeDtypeStruct with shardings
    (the memory plan's 3B-shaped weights); the other arguments are built from the sizes, rows
    split over the layout's batch axes as a call would place them."""
    batch = bucket(num_prompts, self.min_batch_bucket)
    length = bucket(prompt_length, self.min_prompt_bucket)
    row = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=self.layout.sharding(
        ("batch",) + (None,) * (len(shape) - 1), shape))
    prefill = self._prefill.lower(params, row((batch, length), jnp.int32),
                                  row((batch, length), jnp.bool_),
                                  cache_blocks(length, max_new_tokens, self.decode_segments),
                                  num_samples)
    logits, cache, last_position = prefill.out_info
    scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype)
    key = jax.ShapeDtypeStruct(jax.random.key_data(jax.random.key(0)).shape, jnp.uint32)
    decode = self._decode.lower(
        params, cache, logits, last_position, scalar(jnp.int32), key, scalar(jnp.float32),
        scalar(jnp.int32), scalar(jnp.float32), jax.ShapeDtypeStruct(self.stop_ids.shape, jnp.int32),
        scalar(jnp.int32), scalar(jnp.int32), max_new_tokens, num_samples)
    return {"prefill": prefill, "decode": decode}
