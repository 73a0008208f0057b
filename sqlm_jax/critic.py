"""The value model for PPO with GAE (rl.advantage_estimator="gae"): a copy of the base with a
scalar head.

As in verl's critic, the trunk is the starting checkpoint without its vocabulary head, and a
linear head reads one value per position from the final hidden states. Its parameters are a
plain tree {"trunk": <the model's parameters without lm_head>, "value_head": [E],
"value_bias": []}, sharded like the policy's (the head along "embed"), and live in the run
state next to the policy's as params["critic"] / opt_state["critic"]. The head starts at zero,
so the first values are 0 (verl's starts random); the critic has its own AdamW at
rl.critic_learning_rate on the policy's schedule shape (`rl.critic_config`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from sqlm_jax import sharding
from sqlm_jax.models import forward


def init(policy_params: dict[str, Any], model_config) -> dict[str, Any]:
  """Critic parameters from (a copy of) the starting weights; the head at zero."""
  trunk = {name: value for name, value in policy_params.items() if name != "lm_head"}
  dtype = jax.tree.leaves(trunk)[0].dtype
  return {"trunk": trunk, "value_head": jnp.zeros((model_config.hidden_size,), dtype),
          "value_bias": jnp.zeros((), dtype)}


def param_shardings(layout: sharding.Layout, model_config) -> dict[str, Any]:
  """NamedShardings of the critic tree: the trunk like the policy's, the head over "embed"."""
  policy = sharding.param_shardings(layout, model_config)
  return {"trunk": {name: value for name, value in policy.items() if name != "lm_head"},
          "value_head": layout.sharding(("embed",), (model_config.hidden_size,)),
          "value_bias": layout.replicated}


def apply(params, tokens, positions, mask, *, config, layout=None) -> jax.Array:
  """float32 [B, T]: the value after reading each position's token (shifted to targets by
  rl.make_grad_fn / rl.make_value_fn)."""
  hidden = forward(params["trunk"], config, tokens, positions, mask, layout, hidden_only=True)
  head = params["value_head"].astype(hidden.dtype)
  return (jnp.einsum("bte,e->bt", hidden, head, preferred_element_type=jnp.float32)
          + params["value_bias"].astype(jnp.float32))
