"""The value model's parameters: its head starts at zero (ours) or random (the reference)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sqlm_jax.models import ModelConfig, transformer
from sqlm_jax.rl import critic


def _policy():
  config = ModelConfig(hidden_size=256, intermediate_size=64, num_layers=1, head_dim=64)
  return transformer.init_params(config, jax.random.key(0)), config


def test_zeros_head_gives_zero_values():
  params, config = _policy()
  c = critic.init(params, config)
  assert "lm_head" not in c["trunk"]
  np.testing.assert_array_equal(c["value_head"], 0)
  tokens = jnp.array([[1, 2, 3]])
  values = critic.apply(c, tokens, jnp.arange(3)[None], jnp.ones((1, 3), bool), config=config)
  np.testing.assert_array_equal(values, 0)


def test_random_head_is_drawn_like_the_reference():
  params, config = _policy()
  c = critic.init(params, config, "random", jax.random.key(1))
  head = np.asarray(c["value_head"])
  assert head.shape == (256,) and float(c["value_bias"]) == 0
  assert 0.015 < head.std() < 0.025 and abs(head.mean()) < 0.005  # N(0, 0.02^2)
  again = critic.init(params, config, "random", jax.random.key(1))["value_head"]
  other = critic.init(params, config, "random", jax.random.key(2))["value_head"]
  np.testing.assert_array_equal(head, again)
  assert not np.array_equal(head, other)
  tokens = jnp.array([[1, 2, 3]])
  values = critic.apply(c, tokens, jnp.arange(3)[None], jnp.ones((1, 3), bool), config=config)
  assert np.all(values != 0)
  with pytest.raises(ValueError, match="critic.head_init='ones' is not one of zeros, random"):
    critic.init(params, config, "ones")
