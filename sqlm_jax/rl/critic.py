"""The value model for PPO with GAE (rl.advantage_estimator="gae"): a copy of the base with a
scalar head.

As in verl's critic, the trunk is the starting checkpoint without its vocabulary head, and a
linear head reads one value per position from the final hidden states. Its parameters are a
plain tree {"trunk": <the model's parameters without lm_head>, "value_head": [E],
"value_bias": []}, sharded like the policy's (the head along "embed"), and live in the run
state next to the policy's as params["critic"] / opt_state["critic"]. critic.head_init chooses
the head's start: "zeros" (ours: the first values are 0) or "random" (verl's: transformers'
token-classification head, weights drawn from N(0, 0.02^2), bias 0). The critic has its own
AdamW at rl.critic_learning_rate on the policy's schedule shape (`rl.critic_config`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from sqlm_jax.scale import sharding
from sqlm_jax.models import forward


HEAD_INITS = ("zeros", "random")
HEAD_STD = 0.02  # transformers' initializer_range default, which verl's critic head is drawn with.


def init(policy_params: dict[str, Any], model_config, head_init: str = "zeros",
         key: jax.Array | None = None) -> dict[str, Any]:
  """Critic parameters from (a copy of) the starting weights; the head at zero or random (key)."""
  if head_init not in HEAD_INITS:
    raise ValueError(f"critic.head_init={head_init!r} is not one of {', '.join(HEAD_INITS)}.")
  trunk = {name: value for name, value in policy_params.items() if name != "lm_head"}
  dtype = jax.tree.leaves(trunk)[0].dtype
  head = jnp.zeros((model_config.hidden_size,), dtype)
  if head_init == "random":
    head = (HEAD_STD * jax.random.normal(key, head.shape, jnp.float32)).astype(dtype)
  return {"trunk": trunk, "value_head": head, "value_bias": jnp.zeros((), dtype)}


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
