"""Rollouts: a role's weights on their own decoding layout and dtype, its rows decoded in chunks.

Training wants FSDP (parameters split over devices); decoding wants weights that stay put. On
the training layout XLA hoists every weight all-gather out of the decode loop, so each device
would silently hold a whole float32 copy while decoding. Instead, once per step each role's
weights are cast to `rollout.dtype`, split into one tree per layer and resharded by one jitted
function into the rollout layout: the role's own devices as a (data, 1, tensor) mesh,
`rollout.tensor` ways of tensor parallelism and the rest splitting the rows. Decoding then runs
no parameter collectives and reads each layer's weights in place; the copy lives only while
the role samples and is freed before the update.

A role's rows (prompts x samples) are decoded in calls of at most `rows_per_call` rows (the
memory plan chooses it), each chunk of prompts sharing its prefill. The sampler's random draws
depend only on a row's global index, so the tokens do not depend on the chunking.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sqlm_jax.scale import sharding
from sqlm_jax.models import ModelConfig, transformer
from sqlm_jax.rollout.sampling import SampleOutput, Sampler, bucket
from sqlm_jax.scale.sharding import Layout


def on_accelerator(config) -> bool:
  """Whether the run is on (or, with mesh.device_memory_gib, planned for) an accelerator."""
  return jax.default_backend() != "cpu" or config.mesh.get("device_memory_gib", 0) > 0


def resolve_dtype(value: str, config) -> str:
  """An "auto" dtype knob: bfloat16 on accelerators (or in a plan for one), float32 on CPU."""
  if value == "auto":
    return "bfloat16" if on_accelerator(config) else "float32"
  return value


def model_config(config, train_model_config: ModelConfig) -> ModelConfig:
  """The decoding copy's model config: the weights in rollout.dtype, the compute dtype kept."""
  return train_model_config.replace(param_dtype=resolve_dtype(config.rollout.dtype, config))


def layout(train_layout: Layout, tensor: int) -> Layout:
  """The rollout layout over the training layout's devices: (data=rest, fsdp=1, tensor)."""
  devices = list(train_layout.mesh.devices.flat)
  if tensor < 1 or len(devices) % tensor:
    raise sharding.MeshError(
        f"rollout.tensor={tensor} must be a positive divisor of the {len(devices)} devices a role "
        "decodes on; use 1 (rows split over every device) or a divisor of that count.")
  return Layout(sharding.make_mesh(-1, 1, tensor, devices=devices), train_layout.rules)


def make_resharder(train_layout: Layout, rollout_layout: Layout, train_config: ModelConfig,
                   rollout_config: ModelConfig):
  """params (training layout) -> the decoding copy, one jitted call: cast to rollout.dtype, split
  into one tree per layer (which a decode loop reads in place, on every backend, instead of
  slicing a stacked array each step) and laid out on the rollout layout."""
  dtype = jnp.dtype(rollout_config.param_dtype)
  return jax.jit(functools.partial(transformer.split_layers,
                                   num_layers=train_config.num_layers, dtype=dtype),
                 in_shardings=(sharding.param_shardings(train_layout, train_config),),
                 out_shardings=sharding.param_shardings(rollout_layout, rollout_config,
                                                        per_layer=True))


def copy_shapes(rollout_config: ModelConfig):
  """The decoding copy's abstract tree (per-layer, rollout.dtype)."""
  return jax.eval_shape(lambda: transformer.split_layers(
      transformer.init_params(rollout_config, jax.random.key(0)), rollout_config.num_layers))


def free(copy) -> None:
  """Deletes a decoding copy, so the update has its memory."""
  jax.tree.map(lambda x: x.delete(), copy)


def sample(sampler: Sampler, params, prompts: Sequence[Sequence[int]], key: jax.Array, *,
           num_samples: int, rows_per_call: int = 0, **kwargs) -> SampleOutput:
  """`sampler(...)` over prompts x num_samples rows, in calls of at most rows_per_call rows.

  rows_per_call 0 (or at least every row) is one call. Otherwise whole prompts are grouped
  (rows_per_call // num_samples per call), or, when one prompt has more samples than that, its
  samples are split. Every call pads its prompts to the same length, so each row's tokens are
  those of the unchunked call.
  """
  rows = len(prompts) * num_samples
  if rows_per_call <= 0 or rows <= rows_per_call:
    return sampler(params, prompts, key, num_samples=num_samples, **kwargs)
  length = bucket(max(len(p) for p in prompts), sampler.min_prompt_bucket)
  calls = []  # (prompts, samples per prompt, global index of the first row)
  if num_samples <= rows_per_call:
    per = rows_per_call // num_samples
    calls = [(prompts[i:i + per], num_samples, i * num_samples)
             for i in range(0, len(prompts), per)]
  else:
    calls = [([prompt], min(rows_per_call, num_samples - s), p * num_samples + s)
             for p, prompt in enumerate(prompts) for s in range(0, num_samples, rows_per_call)]
  outs = [sampler(params, chunk, key, num_samples=n, first_row=first, prompt_length=length,
                  **kwargs) for chunk, n, first in calls]
  # Each prompt once: a prompt whose samples were split is in several calls, kept from its first.
  firsts = [o for o, (_, _, first) in zip(outs, calls) if first % num_samples == 0]
  return SampleOutput(
      tokens=np.concatenate([o.tokens for o in outs]),
      logprobs=np.concatenate([o.logprobs for o in outs]),
      lengths=np.concatenate([o.lengths for o in outs]),
      prompt_tokens=np.concatenate([o.prompt_tokens for o in firsts]),
      prompt_mask=np.concatenate([o.prompt_mask for o in firsts]))


def rows_in_call(num_prompts: int, num_samples: int, rows_per_call: int) -> int:
  """The most rows one sampler call decodes (padded to the sampler's batch bucket)."""
  rows = num_prompts * num_samples
  if rows_per_call <= 0 or rows <= rows_per_call:
    return bucket(num_prompts, 1) * num_samples
  if num_samples <= rows_per_call:
    return bucket(rows_per_call // num_samples, 1) * num_samples
  return rows_per_call


def weights(role, params):
  """A role's decoding copy of its training weights `params`."""
  return role.to_rollout(params)
