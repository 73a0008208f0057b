"""On 8 fake CPU devices: every mesh computes what one device computes, with leaves really split."""

import functools

import jax
import numpy as np
import pytest

from sqlm_jax import rl
from sqlm_jax.scale import sharding
from sqlm_jax.models import forward, load_pretrained, read_config
from sqlm_jax.rollout.sampling import Sampler

# data alone, fsdp alone, fsdp x tensor, and all three axes together (2 x 2 x 2 also splits
# rows over data x fsdp, as 2 x 4 x 1 would).
# 2x2x2 shards every axis at once and 1x4x2 fsdp with tensor; the two single-axis meshes add
# little to them and run in CI's slow step.
MESHES = [pytest.param((8, 1, 1), marks=pytest.mark.slow),
          pytest.param((1, 8, 1), marks=pytest.mark.slow), (1, 4, 2), (2, 2, 2)]


def test_mesh_has_8_devices():
  assert jax.device_count() == 8


def _layout(shape):
  return sharding.Layout(sharding.make_mesh(*shape))


def _batch(rows=8, length=12, vocab=128, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(2, vocab, (rows, length)).astype(np.int32)
  mask = np.ones((rows, length), bool)
  mask[::3, :4] = False  # Left padding on some rows.
  loss_mask = np.zeros((rows, length), np.float32)
  loss_mask[:, 6:] = 1.0
  return {"tokens": tokens, "attention_mask": mask, "loss_mask": loss_mask,
          "old_logprobs": (-2.0 + 0.1 * rng.standard_normal((rows, length))).astype(np.float32)
          * loss_mask,
          "advantages": rng.standard_normal(rows).astype(np.float32),
          "sample_weight": np.ones(rows, np.float32)}


def _apply(config, layout):
  return lambda p, t, pos, m: forward(p, config, t, pos, m, layout)


def _rl_config():
  cfg = rl.default_config()
  cfg.learning_rate = 1e-2
  return cfg


@pytest.fixture(scope="module")
def one_device(qwen2_dir):
  """Logits, greedy tokens and one update on a single device: the reference."""
  config, params = load_pretrained(qwen2_dir, dtype="float32", param_dtype="float32")
  layout = sharding.default_layout()
  batch = _batch()
  positions = rl.positions_from_mask(batch["attention_mask"])
  logits = jax.jit(functools.partial(forward, config=config))(
      params, tokens=batch["tokens"], positions=positions, attention_mask=batch["attention_mask"])
  out = Sampler(config, 0, [1], layout=layout)(params, [[5, 6, 7], [9, 3]] * 4,
                                               jax.random.key(0), max_new_tokens=8,
                                               temperature=0.0)
  optimizer = rl.make_optimizer(_rl_config())
  update = rl.make_update_fn(_apply(config, None), optimizer, _rl_config(), 4)
  new_params, _, metrics = update(jax.tree.map(np.copy, params), optimizer.init(params), batch, 0)
  return dict(logits=np.asarray(logits), tokens=out.tokens,
              params=jax.tree.map(np.asarray, new_params), loss=float(metrics["loss"]))


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "mesh_%dx%dx%d" % s)
def test_mesh_sharded_forward_sampling_and_update_match_one_device(qwen2_dir, one_device, shape):
  layout = _layout(shape)
  config = read_config(qwen2_dir, "float32", "float32")
  shardings = sharding.param_shardings(layout, config)
  _, params = load_pretrained(qwen2_dir, dtype="float32", param_dtype="float32",
                              shardings=shardings)
  data, fsdp, tensor = shape
  # Leaves are really split: shard shapes, not only values.
  q = params["layers"]["self_attn"]["q_proj"]  # [L, E=32, H=4, D=8]
  assert q.sharding.shard_shape(q.shape) == (2, 32 // fsdp, 4 // tensor, 8)
  assert len(q.addressable_shards) == 8
  embed = params["embed_tokens"]  # [V=128, E=32]
  assert embed.addressable_shards[0].data.shape == (128 // tensor, 32 // fsdp)

  batch = _batch()
  placed = layout.put_batch(batch)
  assert placed["tokens"].addressable_shards[0].data.shape[0] == 8 // (data * fsdp)
  positions = layout.put_batch(np.asarray(rl.positions_from_mask(batch["attention_mask"])))
  logits = jax.jit(functools.partial(forward, config=config, layout=layout))(
      params, tokens=placed["tokens"], positions=positions,
      attention_mask=placed["attention_mask"])
  np.testing.assert_allclose(np.asarray(logits), one_device["logits"], atol=1e-5, rtol=1e-5)

  out = Sampler(config, 0, [1], layout=layout)(params, [[5, 6, 7], [9, 3]] * 4,
                                               jax.random.key(0), max_new_tokens=8,
                                               temperature=0.0)
  np.testing.assert_array_equal(out.tokens, one_device["tokens"])

  optimizer = rl.make_optimizer(_rl_config())
  opt_shapes = jax.eval_shape(optimizer.init, params)
  opt_shardings = sharding.like_params(optimizer, shardings, opt_shapes, layout.replicated)
  opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
  mu = next(leaf for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state)
            if "mu" in jax.tree_util.keystr(path) and "q_proj" in jax.tree_util.keystr(path))
  assert mu.sharding.shard_shape(mu.shape) == q.sharding.shard_shape(q.shape)
  update = rl.make_update_fn(_apply(config, layout), optimizer, _rl_config(), 4, layout,
                             shardings, opt_shardings)
  new_params, new_opt, metrics = update(params, opt_state, placed, 0)
  assert q.is_deleted()  # Donated: the update held one copy of the parameters.
  np.testing.assert_allclose(float(metrics["loss"]), one_device["loss"], rtol=1e-5, atol=1e-6)
  for got, want in zip(jax.tree.leaves(new_params), jax.tree.leaves(one_device["params"])):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
  new_q = new_params["layers"]["self_attn"]["q_proj"]
  assert new_q.sharding == shardings["layers"]["self_attn"]["q_proj"]


def test_mesh_non_dividing_dimensions_are_replicated(qwen2_dir, caplog):
  """Two KV heads over tensor=4, a vocabulary of 15: replicated, logged, never an error."""
  layout = _layout((1, 2, 4))
  config = read_config(qwen2_dir, "float32", "float32")
  shardings = sharding.param_shardings(layout, config)
  k_spec = shardings["layers"]["self_attn"]["k_proj"].spec  # [L, E, K=2, D]
  q_spec = shardings["layers"]["self_attn"]["q_proj"].spec  # [L, E, H=4, D]
  assert tuple(k_spec) == (None, "fsdp", None, None)
  assert tuple(q_spec) == (None, "fsdp", "tensor", None)
  assert tuple(layout.spec(("vocab", "embed"), (15, 32))) == (None, "fsdp")
  _, params = load_pretrained(qwen2_dir, dtype="float32", param_dtype="float32",
                              shardings=shardings)
  k = params["layers"]["self_attn"]["k_proj"]
  assert k.sharding.shard_shape(k.shape) == (2, 16, 2, 8)
