"""One decoder-only transformer for the Llama / Qwen2 / Qwen3 families, in Flax.

Parameters are a plain nested dict whose leaves were created with logical axis names
(`embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, `vocab`, `layers`); `param_logical_axes`
returns them so a mesh can shard the tree by rules. Layers are scanned (`nn.scan`), so every
per-layer leaf has a leading `layers` axis and compile time does not grow with depth.

The same forward pass serves training (no cache), prefill and one-token decode (KV cache):
positions and the key mask are explicit, so left-padded batches are exact.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sqlm_jax.models.config import ModelConfig

Params = dict[str, Any]
Cache = dict[str, jax.Array]  # {"k", "v": [L, B, S, K, D], "mask": [B, S] bool, "index": []}
_NEG_INF = -1e30  # Finite, so fully masked rows (left padding) give uniform weights, not NaN.


def _param(module, name, shape, axes, init, dtype):
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


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

  @nn.compact
  def __call__(self, x, positions, key_mask, layer_cache, cache_index):
    """x [B, T, E]; key_mask [B, T, S]; layer_cache (k, v) [B, S, K, D] or None."""
    c = self.config
    dtype, pdtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    init = nn.initializers.normal(0.02)
    e, h, k, d = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    wq = _param(self, "q_proj", (e, h, d), ("embed", "heads", "head_dim"), init, pdtype)
    wk = _param(self, "k_proj", (e, k, d), ("embed", "kv_heads", "head_dim"), init, pdtype)
    wv = _param(self, "v_proj", (e, k, d), ("embed", "kv_heads", "head_dim"), init, pdtype)
    wo = _param(self, "o_proj", (h, d, e), ("heads", "head_dim", "embed"), init, pdtype)
    x = x.astype(dtype)
    q = jnp.einsum("bte,ehd->bthd", x, wq.astype(dtype))
    kk = jnp.einsum("bte,ekd->btkd", x, wk.astype(dtype))
    v = jnp.einsum("bte,ekd->btkd", x, wv.astype(dtype))
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

    if layer_cache is not None:  # Write the new keys/values at cache_index, attend to the cache.
      k_cache, v_cache = layer_cache
      kk = jax.lax.dynamic_update_slice_in_dim(k_cache, kk.astype(k_cache.dtype), cache_index, 1)
      v = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), cache_index, 1)
      layer_cache = (kk, v)

    b, t = q.shape[:2]
    q = q.reshape(b, t, k, h // k, d)  # Grouped-query attention: G = H / K queries per kv head.
    scores = jnp.einsum("btkgd,bskd->bkgts", q, kk.astype(dtype)).astype(jnp.float32)
    scores = scores / math.sqrt(d)
    scores = jnp.where(key_mask[:, None, None, :, :], scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(dtype)).reshape(b, t, h, d)
    out = jnp.einsum("bthd,hde->bte", out, wo.astype(dtype))
    if c.o_bias:
      out = out + _param(self, "o_bias", (e,), ("embed",), nn.initializers.zeros, pdtype).astype(dtype)
    return out, layer_cache


class MLP(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    dtype, pdtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    init = nn.initializers.normal(0.02)
    e, f = c.hidden_size, c.intermediate_size
    gate = x @ _param(self, "gate_proj", (e, f), ("embed", "mlp"), init, pdtype).astype(dtype)
    up = x @ _param(self, "up_proj", (e, f), ("embed", "mlp"), init, pdtype).astype(dtype)
    if c.mlp_bias:
      zeros = nn.initializers.zeros
      gate = gate + _param(self, "gate_bias", (f,), ("mlp",), zeros, pdtype).astype(dtype)
      up = up + _param(self, "up_bias", (f,), ("mlp",), zeros, pdtype).astype(dtype)
    out = (jax.nn.silu(gate) * up) @ _param(self, "down_proj", (f, e), ("mlp", "embed"), init,
                                            pdtype).astype(dtype)
    if c.mlp_bias:
      out = out + _param(self, "down_bias", (e,), ("embed",), nn.initializers.zeros,
                         pdtype).astype(dtype)
    return out


class DecoderLayer(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x, layer_cache, positions, key_mask, cache_index):
    c = self.config
    dtype, pdtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    h = RMSNorm(c.rms_norm_eps, "embed", dtype, pdtype, name="input_layernorm")(x)
    h, layer_cache = Attention(c, name="self_attn")(h, positions, key_mask, layer_cache, cache_index)
    x = x + h
    h = RMSNorm(c.rms_norm_eps, "embed", dtype, pdtype, name="post_attention_layernorm")(x)
    return x + MLP(c, name="mlp")(h), layer_cache


class Decoder(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, tokens, positions, key_mask, cache_kv=None, cache_index=0):
    c = self.config
    dtype, pdtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    embedding = _param(self, "embed_tokens", (c.vocab_size, c.hidden_size), ("vocab", "embed"),
                       nn.initializers.normal(0.02), pdtype)
    x = jnp.take(embedding, tokens, axis=0).astype(dtype)
    layer = DecoderLayer
    if c.remat:
      layer = nn.remat(layer, prevent_cse=False)
    layers = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                     in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=c.num_layers,
                     metadata_params={nn.PARTITION_NAME: "layers"})
    x, cache_kv = layers(c, name="layers")(x, cache_kv, positions, key_mask, cache_index)
    x = RMSNorm(c.rms_norm_eps, "embed", dtype, pdtype, name="norm")(x)
    if c.tie_word_embeddings:
      logits = jnp.einsum("bte,ve->btv", x, embedding.astype(dtype))
    else:
      lm_head = _param(self, "lm_head", (c.hidden_size, c.vocab_size), ("embed", "vocab"),
                       nn.initializers.normal(0.02), pdtype)
      logits = x @ lm_head.astype(dtype)
    return logits.astype(jnp.float32), cache_kv


# ---- Functional API over plain parameter dicts ----------------------------------------------------


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
  """Positions of a left-padded batch: 0 at each row's first real token."""
  return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def forward(params: Params, config: ModelConfig, tokens: jax.Array, positions: jax.Array,
            attention_mask: jax.Array) -> jax.Array:
  """Full causal forward without a cache: tokens [B, T] -> float32 logits [B, T, V]."""
  t = tokens.shape[1]
  causal = jnp.tril(jnp.ones((t, t), bool))
  key_mask = causal[None] & attention_mask.astype(bool)[:, None, :]  # [B, T, T]
  logits, _ = Decoder(config).apply({"params": params}, tokens, positions, key_mask)
  return logits


def init_cache(config: ModelConfig, batch: int, length: int, dtype=None) -> Cache:
  shape = (config.num_layers, batch, length, config.num_kv_heads, config.head_dim)
  dtype = jnp.dtype(dtype or config.dtype)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
          "mask": jnp.zeros((batch, length), bool), "index": jnp.zeros((), jnp.int32)}


def forward_with_cache(params: Params, config: ModelConfig, tokens: jax.Array,
                       positions: jax.Array, attention_mask: jax.Array,
                       cache: Cache) -> tuple[jax.Array, Cache]:
  """Runs T new tokens [B, T] through the cache (prefill when T > 1, decode when T == 1).

  The new keys go to slots [index, index + T); query i sees every valid slot up to its own.
  """
  t, s = tokens.shape[1], cache["mask"].shape[1]
  index = cache["index"]
  mask = jax.lax.dynamic_update_slice_in_dim(cache["mask"], attention_mask.astype(bool), index, 1)
  query_slots = index + jnp.arange(t)
  causal = jnp.arange(s)[None, :] <= query_slots[:, None]  # [T, S]
  key_mask = causal[None] & mask[:, None, :]  # [B, T, S]
  logits, (k, v) = Decoder(config).apply({"params": params}, tokens, positions, key_mask,
                                         (cache["k"], cache["v"]), index)
  return logits, {"k": k, "v": v, "mask": mask, "index": index + t}


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
