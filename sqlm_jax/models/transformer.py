"""One decoder-only transformer for the Llama / Qwen2 / Qwen3 families, in Flax.

Parameters are a plain nested dict whose leaves were created with logical axis names
(`embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, `vocab`, `layers`); `param_logical_axes`
returns them so a mesh can shard the tree by rules. Layers are scanned (`nn.scan`), so every
per-layer leaf has a leading `layers` axis and compile time does not grow with depth.

The same layers serve training (`forward`, scanned, no cache), prefill and one-token decode
(`forward_with_cache`, unrolled over the layers and a per-layer KV cache, so that a decode
step copies no cache; its compile time does grow with depth): positions and the key mask are
explicit, so left-padded batches are exact. The cache may come in blocks (`Cache`), so that a
step attends over the blocks written so far rather than over every slot.

Given a `sharding.Layout`, activations and caches are pinned to it at layer boundaries (batch
over the data and fsdp axes, heads and MLP width over the tensor axis), so XLA gathers the
FSDP-sharded weights per layer instead of guessing a layout.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sqlm_jax.models.config import ModelConfig

Layout = Any  # sqlm_jax.scale.sharding.Layout (not imported: the model does not depend on it)

Params = dict[str, Any]
# {"k", "v": L tuples (one per layer) of blocks [B, K, S_b, D], "mask": [B, S] bool, "index": []},
# S = the blocks' S_b summed; slot s of the cache is slot s - (earlier blocks' S_b) of its block.
# One buffer per layer and block, so a decode step writes its new slot in place instead of
# slicing a stacked cache, and a step attends over the blocks up to the one it writes, not over
# slots nobody has written yet (a static slice of one long buffer would be copied, on XLA:CPU
# every step). Slots on the second-last axis, so attention reads each (row, kv head) of a block
# as one [S_b, D] matrix, untransposed.
Cache = dict[str, Any]
_NEG_INF = -1e30  # Finite, so fully masked rows (left padding) give uniform weights, not NaN.
ACTIVATION_AXES = ("batch", "seq", None)  # The residual stream [B, T, E]: whole rows per device.
CACHE_AXES = ("batch", "kv_heads", "cache_seq", None)  # Each layer's K or V [B, K, S, D].


def _param(module, name, shape, axes, init, dtype):
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def _constrain(layout: Optional[Layout], x: jax.Array, axes: tuple) -> jax.Array:
  return x if layout is None else layout.constrain(x, axes)


def _einsum(spec: str, a: jax.Array, b: jax.Array, dtype) -> jax.Array:
  """einsum that accumulates in float32 and returns dtype.

  Asking for a float32 product is also what lets XLA's CPU backend multiply bfloat16 operands
  natively; for a bfloat16 product it first widens both operands to float32 (about 1.7x
  slower, and in a decode loop it widens the whole KV cache at every step).
  """
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(dtype)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
  """Inverse RoPE frequencies [D/2], with Llama-3 / linear scaling as in the checkpoint's config."""
  d = config.head_dim
  inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / d))
  scaling = dict(config.rope_scaling)
  if config.rope_type == "linear":
    inv_freq = inv_freq / scaling["factor"]
  elif config.rope_type == "llama3":
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    inv_freq = np.where(is_medium, smoothed, scaled)
  return inv_freq.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotates x [B, T, H, D] by positions [B, T] (the rotate-half convention of Hugging Face)."""
  angles = positions[:, :, None].astype(jnp.float32) * inv_freq[None, None, :]  # [B, T, D/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, D]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x.astype(jnp.float32) * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


class RMSNorm(nn.Module):
  eps: float
  axis_name: str
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x):
    scale = _param(self, "scale", (x.shape[-1],), (self.axis_name,), nn.initializers.ones,
                   self.param_dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype) * x32.astype(self.dtype)


class Attention(nn.Module):
  config: ModelConfig
  layout: Optional[Layout] = None

  @nn.compact
  def __call__(self, x, positions, key_mask, layer_cache, cache_index):
    """x [B, T, E]; layer_cache None, or (k, v) tuples of the blocks [B, K, S_b, D] attended
    over, the new keys written into the last at cache_index; key_mask [B, T, S], S = the
    attended slots (the new tokens' own T without a cache)."""
    c = self.config
    dtype, pdtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    init = nn.initializers.normal(0.02)
    e, h, k, d = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    wq = _param(self, "q_proj", (e, h, d), ("embed", "heads", "head_dim"), init, pdtype)
    wk = _param(self, "k_proj", (e, k, d), ("embed", "kv_heads", "head_dim"), init, pdtype)
    wv = _param(self, "v_proj", (e, k, d), ("embed", "kv_heads", "head_dim"), init, pdtype)
    wo = _param(self, "o_proj", (h, d, e), ("heads", "head_dim", "embed"), init, pdtype)
    x = x.astype(dtype)
    q = _einsum("bte,ehd->bthd", x, wq.astype(dtype), dtype)
    kk = _einsum("bte,ekd->btkd", x, wk.astype(dtype), dtype)
    v = _einsum("bte,ekd->btkd", x, wv.astype(dtype), dtype)
    if c.qkv_bias:
      zeros = nn.initializers.zeros
      q = q + _param(self, "q_bias", (h, d), ("heads", "head_dim"), zeros, pdtype).astype(dtype)
      kk = kk + _param(self, "k_bias", (k, d), ("kv_heads", "head_dim"), zeros, pdtype).astype(dtype)
      v = v + _param(self, "v_bias", (k, d), ("kv_heads", "head_dim"), zeros, pdtype).astype(dtype)
    if c.qk_norm:
      q = RMSNorm(c.rms_norm_eps, "head_dim", dtype, pdtype, name="q_norm")(q)
      kk = RMSNorm(c.rms_norm_eps, "head_dim", dtype, pdtype, name="k_norm")(kk)
    inv_freq = rope_inv_freq(c)
    q, kk = apply_rope(q, positions, inv_freq), apply_rope(kk, positions, inv_freq)
    q = _constrain(self.layout, q, ("batch", "seq", "heads", None))

    kk, v = kk.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, D]
    if layer_cache is None:
      keys, values = (kk,), (v,)
    else:  # Write the new keys/values into the last block at cache_index, attend to the blocks.
      write = lambda blocks, new: blocks[:-1] + (
          _constrain(self.layout, _write_slots(blocks[-1], new, cache_index), CACHE_AXES),)
      keys, values = layer_cache = (write(layer_cache[0], kk), write(layer_cache[1], v))

    b, t = q.shape[:2]
    q = q.reshape(b, t, k, h // k, d)  # Grouped-query attention: G = H / K queries per kv head.
    out = _attend(q, keys, values, key_mask, dtype)  # [B, K, G, T, D]
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, h * d)
    # Heads and head_dim flattened first: contracting over (h, d) as two axes, XLA's CPU backend
    # transposed this activation (and in float32 the weight too) to (d, h) at every decode step.
    out = _einsum("btf,fe->bte", out, wo.astype(dtype).reshape(h * d, e), dtype)
    if c.o_bias:
      out = out + _param(self, "o_bias", (e,), ("embed",), nn.initializers.zeros, pdtype).astype(dtype)
    return out, layer_cache


def _attend(q: jax.Array, keys: tuple, values: tuple, key_mask: jax.Array, dtype) -> jax.Array:
  """Attention of q [B, T, K, G, D] over blocks of keys and values [B, K, S_b, D] taken as one
  sequence of S slots; key_mask [B, T, S]. Returns [B, K, G, T, D] in dtype.

  The scores of all blocks form one softmax; each block's values are then weighted by its
  part of it and the parts summed in float32. One block is the plain attention of one buffer.
  """
  d = q.shape[-1]
  scores = [_einsum("btkgd,bksd->bkgts", q, kb.astype(dtype), jnp.float32) for kb in keys]
  scores = scores[0] if len(scores) == 1 else jnp.concatenate(scores, axis=-1)  # [B, K, G, T, S]
  scores = scores / math.sqrt(d)
  scores = jnp.where(key_mask[:, None, None, :, :], scores, _NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
  # [B, K, G, T, D], transposed after: XLA's CPU backend rejects this bfloat16 product with a
  # float32 result if asked to write it transposed ("Unsupported element type for DotThunk").
  out, start = None, 0
  for vb in values:
    part = jnp.einsum("bkgts,bksd->bkgtd", probs[..., start:start + vb.shape[2]],
                      vb.astype(dtype), preferred_element_type=jnp.float32)
    out, start = part if out is None else out + part, start + vb.shape[2]
  return out.astype(dtype)


def _write_slots(cache: jax.Array, new: jax.Array, index) -> jax.Array:
  """Writes new [B, K, T, D] into cache [B, K, S, D] at slots [index, index + T), in place.

  A 16-bit float cache is updated through its bit pattern: XLA's CPU backend widens a
  bfloat16 dynamic_update_slice to float32 and back, which copies the whole cache each step.
  """
  new = new.astype(cache.dtype)
  if cache.dtype.itemsize != 2:
    return jax.lax.dynamic_update_slice_in_dim(cache, new, index, 2)
  bits = lambda a, t: jax.lax.bitcast_convert_type(a, t)
  updated = jax.lax.dynamic_update_slice_in_dim(bits(cache, jnp.uint16), bits(new, jnp.uint16),
                                                index, 2)
  return bits(updated, cache.dtype)


class MLP(nn.Module):
  config: ModelConfig
  layout: Optional[Layout] = None

  @nn.compact
  def __call__(self, x):
    c = self.config
    dtype, pdtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    init = nn.initializers.normal(0.02)
    e, f = c.hidden_size, c.intermediate_size
    w_gate = _param(self, "gate_proj", (e, f), ("embed", "mlp"), init, pdtype).astype(dtype)
    w_up = _param(self, "up_proj", (e, f), ("embed", "mlp"), init, pdtype).astype(dtype)
    gate = _einsum("bte,ef->btf", x, w_gate, dtype)
    up = _einsum("bte,ef->btf", x, w_up, dtype)
    if c.mlp_bias:
      zeros = nn.initializers.zeros
      gate = gate + _param(self, "gate_bias", (f,), ("mlp",), zeros, pdtype).astype(dtype)
      up = up + _param(self, "up_bias", (f,), ("mlp",), zeros, pdtype).astype(dtype)
    w_down = _param(self, "down_proj", (f, e), ("mlp", "embed"), init, pdtype).astype(dtype)
    hidden = _constrain(self.layout, jax.nn.silu(gate) * up, ("batch", "seq", "mlp"))
    out = _einsum("btf,fe->bte", hidden, w_down, dtype)
    if c.mlp_bias:
      out = out + _param(self, "down_bias", (e,), ("embed",), nn.initializers.zeros,
                         pdtype).astype(dtype)
    return out


class DecoderLayer(nn.Module):
  config: ModelConfig
  layout: Optional[Layout] = None

  @nn.compact
  def __call__(self, x, positions, key_mask, layer_cache=None, cache_index=0):
    c = self.config
    dtype, pdtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    h = RMSNorm(c.rms_norm_eps, "embed", dtype, pdtype, name="input_layernorm")(x)
    h, layer_cache = Attention(c, self.layout, name="self_attn")(h, positions, key_mask,
                                                                 layer_cache, cache_index)
    x = x + h
    h = RMSNorm(c.rms_norm_eps, "embed", dtype, pdtype, name="post_attention_layernorm")(x)
    x = x + MLP(c, self.layout, name="mlp")(h)
    return _constrain(self.layout, x, ACTIVATION_AXES), layer_cache


class Decoder(nn.Module):
  """The whole model without a cache (training, init); `forward_with_cache` reuses its parts.

  hidden_only: return the final normed hidden states [B, T, E] instead of logits (a value
  model's trunk), so the vocabulary head is neither needed nor computed.
  """
  config: ModelConfig
  layout: Optional[Layout] = None
  hidden_only: bool = False

  @nn.compact
  def __call__(self, tokens, positions, key_mask):
    c = self.config
    dtype, pdtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    embedding = _param(self, "embed_tokens", (c.vocab_size, c.hidden_size), ("vocab", "embed"),
                       nn.initializers.normal(0.02), pdtype)
    x = _constrain(self.layout, jnp.take(embedding, tokens, axis=0).astype(dtype), ACTIVATION_AXES)
    layer = DecoderLayer
    if c.remat:
      layer = nn.remat(layer, prevent_cse=False)
    layers = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                     in_axes=(nn.broadcast, nn.broadcast), length=c.num_layers,
                     metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = layers(c, self.layout, name="layers")(x, positions, key_mask)
    x = RMSNorm(c.rms_norm_eps, "embed", dtype, pdtype, name="norm")(x)
    if self.hidden_only:
      return x
    if c.tie_word_embeddings:
      return _logits(x, embedding.T, dtype, self.layout)
    lm_head = _param(self, "lm_head", (c.hidden_size, c.vocab_size), ("embed", "vocab"),
                     nn.initializers.normal(0.02), pdtype)
    return _logits(x, lm_head, dtype, self.layout)


def _logits(x, head, dtype, layout=None):
  """float32 logits [B, T, V] from final hidden states [B, T, E] and the head [E, V]."""
  return _constrain(layout, _einsum("bte,ev->btv", x, head.astype(dtype), jnp.float32),
                    ("batch", "seq", "vocab"))


# ---- Functional API over plain parameter dicts ----------------------------------------------------


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
  """Positions of a left-padded batch: 0 at each row's first real token."""
  return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def forward(params: Params, config: ModelConfig, tokens: jax.Array, positions: jax.Array,
            attention_mask: jax.Array, layout: Optional[Layout] = None,
            hidden_only: bool = False) -> jax.Array:
  """Full causal forward without a cache: tokens [B, T] -> float32 logits [B, T, V] (or, with
  hidden_only, the final hidden states [B, T, E] in the compute dtype)."""
  t = tokens.shape[1]
  causal = jnp.tril(jnp.ones((t, t), bool))
  key_mask = causal[None] & attention_mask.astype(bool)[:, None, :]  # [B, T, T]
  return Decoder(config, layout, hidden_only).apply({"params": params}, tokens, positions,
                                                    key_mask)


def init_cache(config: ModelConfig, batch: int, length: Union[int, Sequence[int]], dtype=None,
               layout: Optional[Layout] = None) -> Cache:
  """An empty cache of `length` slots per row, or of blocks of those lengths (see `Cache`)."""
  lengths = (length,) if isinstance(length, int) else tuple(length)
  dtype = jnp.dtype(dtype or config.dtype)
  # Zeros, not uninitialised memory: an unwritten slot's weight is exactly 0, and 0 * NaN is not.
  zeros = lambda n: _constrain(layout, jnp.zeros((batch, config.num_kv_heads, n, config.head_dim),
                                                 dtype), CACHE_AXES)
  blocks = tuple(tuple(zeros(n) for n in lengths) for _ in range(config.num_layers))
  return {"k": blocks, "v": blocks,
          "mask": _constrain(layout, jnp.zeros((batch, sum(lengths)), bool),
                             ("batch", "cache_seq")),
          "index": jnp.zeros((), jnp.int32)}


def cache_blocks(cache: Cache) -> tuple[int, ...]:
  """The lengths S_b of the cache's blocks."""
  return tuple(k.shape[2] for k in cache["k"][0])


def inference_params(params: Params, config: ModelConfig,
                     per_layer: Optional[bool] = None) -> Params:
  """The parameters as `forward_with_cache` uses them in a decode loop.

  Call it once, outside the loop. On CPU (per_layer defaults to True there) it returns one
  tree per layer in the compute dtype: XLA on CPU copies every weight it slices out of a
  stacked [L, ...] array (static slices too) and does not hoist those copies out of a loop, so
  stacked parameters would cost a full copy of the model per generated token; the price is one
  extra copy of the weights while they are in use. On accelerators, whose XLA reads a layer's
  slice in place, that copy would only take memory from the KV cache: the stacked parameters
  are returned as they are, and each layer is sliced (and cast) inside the step.
  """
  if isinstance(params["layers"], (tuple, list)):
    return params  # Already per layer.
  if not (jax.default_backend() == "cpu" if per_layer is None else per_layer):
    return params
  cast = lambda tree: jax.tree.map(lambda p: p.astype(config.dtype), tree)
  layers = tuple(cast(jax.tree.map(lambda p: p[i], params["layers"]))
                 for i in range(config.num_layers))
  return {**cast({k: v for k, v in params.items() if k != "layers"}), "layers": layers}


def split_layers(params: Params, num_layers: int, dtype=None) -> Params:
  """The parameters with the stacked [L, ...] layers as a tuple of L per-layer trees (what
  `forward_with_cache` reads without slicing), every leaf cast to dtype if given."""
  cast = (lambda tree: tree) if dtype is None else (
      lambda tree: jax.tree.map(lambda p: p.astype(dtype), tree))
  layers = tuple(cast(jax.tree.map(lambda p: p[i], params["layers"])) for i in range(num_layers))
  return {**cast({k: v for k, v in params.items() if k != "layers"}), "layers": layers}


def forward_with_cache(params: Params, config: ModelConfig, tokens: jax.Array,
                       positions: jax.Array, attention_mask: jax.Array, cache: Cache,
                       last_only: bool = False, layout: Optional[Layout] = None,
                       block: Optional[int] = None) -> tuple[jax.Array, Cache]:
  """Runs T new tokens [B, T] through the cache (prefill when T > 1, decode when T == 1).

  The new keys go to slots [index, index + T), which must lie in cache block `block` (static;
  the last by default); query i sees every valid slot up to its own. Attention reads blocks
  0..block only, so its cost is that of the slots up to that block's end, whatever follows.
  params: stacked or from `inference_params` (faster in a loop). Returns float32 logits
  [B, T, V], or only the last position's [B, 1, V] with last_only (what prefill needs).
  """
  lengths = cache_blocks(cache)
  block = len(lengths) - 1 if block is None else block
  start, end = sum(lengths[:block]), sum(lengths[:block + 1])  # The attended slots: [0, end).
  t = tokens.shape[1]
  index = cache["index"]
  mask = jax.lax.dynamic_update_slice_in_dim(cache["mask"], attention_mask.astype(bool), index, 1)
  query_slots = index + jnp.arange(t)
  causal = jnp.arange(end)[None, :] <= query_slots[:, None]  # [T, end]
  key_mask = causal[None] & mask[:, None, :end]  # [B, T, end]
  x = jnp.take(params["embed_tokens"], tokens, axis=0).astype(config.dtype)
  x = _constrain(layout, x, ACTIVATION_AXES)
  layer = DecoderLayer(config, layout)
  per_layer = params["layers"]
  if not isinstance(per_layer, (tuple, list)):  # Stacked [L, ...]: slice each layer here.
    per_layer = [jax.tree.map(lambda p, i=i: p[i], per_layer) for i in range(config.num_layers)]
  ks, vs = [], []
  for layer_params, k, v in zip(per_layer, cache["k"], cache["v"]):
    x, (new_k, new_v) = layer.apply({"params": layer_params}, x, positions, key_mask,
                                    (k[:block + 1], v[:block + 1]), index - start)
    ks.append(new_k + k[block + 1:])
    vs.append(new_v + v[block + 1:])
  if last_only:
    x = x[:, -1:]
  x = RMSNorm(config.rms_norm_eps, "embed", config.dtype, config.param_dtype).apply(
      {"params": params["norm"]}, x)
  head = params["embed_tokens"].T if config.tie_word_embeddings else params["lm_head"]
  return _logits(x, head, config.dtype, layout), {"k": tuple(ks), "v": tuple(vs), "mask": mask,
                                                  "index": index + t}


def init_params(config: ModelConfig, key: jax.Array) -> Params:
  """Random parameters (plain arrays); see `param_logical_axes` for their axis names."""
  return nn.unbox(_boxed_init(config, key))


def _boxed_init(config: ModelConfig, key):
  tokens = jnp.zeros((1, 1), jnp.int32)
  return Decoder(config).init(key, tokens, tokens, jnp.ones((1, 1, 1), bool))["params"]


def param_logical_axes(config: ModelConfig) -> Params:
  """The logical axis names of every parameter leaf, as a tree of PartitionSpecs."""
  boxed = jax.eval_shape(functools.partial(_boxed_init, config), jax.random.key(0))
  return nn.get_partition_spec(boxed)


def output_head(params: Params, config: ModelConfig) -> jax.Array:
  """The vocabulary head [E, V] as `forward` applies it (the embedding, transposed, if tied)."""
  return params["embed_tokens"].T if config.tie_word_embeddings else params["lm_head"]


def hidden_and_head(params: Params, config: ModelConfig, tokens: jax.Array, positions: jax.Array,
                    attention_mask: jax.Array, layout: Optional[Layout] = None):
  """`forward` without its last matmul: (final hidden states [B, T, E], head [E, V]), so that a
  caller can make the float32 logits a chunk of positions at a time (rl.chunked_token_logprobs)."""
  hidden = forward(params, config, tokens, positions, attention_mask, layout, hidden_only=True)
  return hidden, output_head(params, config)
