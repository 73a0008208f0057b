"""Per-device memory of a run, computed before anything loads: `main --dry_run` and every run's start.

Parameters and optimizer states (the value model's too, with rl.advantage_estimator="gae") and
the frozen reference are measured exactly from their shapes (`jax.eval_shape`) and shardings; the KV cache from the rollout sizes (the larger of the
proposer's and the solver's sampling); a training micro-batch's activations from the compiled
gradient function's own memory analysis where the backend reports it (else an estimate,
marked as such). Only the checkpoint's config.json and tokenizer are read.
"""

from __future__ import annotations

import functools
import json
import math
import os
from typing import Any, Optional

import jax
import numpy as np

from sqlm_jax import rl, sharding
from sqlm_jax.models import transformer
from sqlm_jax.sampling import bucket
from sqlm_jax.tasks.base import Proposal

KEYS = ("params", "optimizer", "reference", "kv_cache", "activations")
# What makes a run that does not fit smaller, in the order worth trying.
KNOBS = ("mesh.fsdp (shard parameters and optimizer states over more devices)",
         "rl.micro_batch_size (fewer rows per forward/backward)",
         "model.remat=True (recompute activations in the backward pass)",
         "model.param_dtype=bfloat16 (half the parameter and optimizer bytes)")


def _shapes(model_config):
  return jax.eval_shape(lambda: transformer.init_params(model_config, jax.random.key(0)))


def _prompt_lengths(config, tokenizer, task) -> tuple[int, int]:
  """Bucketed prompt lengths of the proposer and (for the longest question) the solver."""
  from sqlm_jax.tokenizer import encode_chat
  proposer = len(encode_chat(tokenizer, task.proposer_messages(config.task.topic or "topic")))
  solver = len(encode_chat(tokenizer, task.solver_messages(Proposal("?")))) - 1
  solver += config.rollout.max_proposal_tokens
  return bucket(proposer), bucket(solver)


def kv_cache_bytes(layout, model_config, rows: int, length: int) -> int:
  """Per-device bytes of a decode's KV cache of `rows` rows and `length` slots."""
  c = model_config
  shape = (rows, c.num_kv_heads, length, c.head_dim)
  shard = layout.sharding(transformer.CACHE_AXES, shape).shard_shape(shape)
  per_layer = 2 * math.prod(shard) * np.dtype(jax.numpy.dtype(c.dtype)).itemsize
  mask = layout.sharding(("batch", "cache_seq"), (rows, length)).shard_shape((rows, length))
  return c.num_layers * per_layer + math.prod(mask)


def activation_bytes(config, layout, model_config, shardings, length: int,
                     compile_: bool = True) -> tuple[int, str]:
  """(per-device bytes, how measured) of one training micro-batch's forward and backward."""
  m = rows = config.rl.micro_batch_size
  if compile_:
    try:
      apply_fn = functools.partial(_apply, config=model_config, layout=layout)
      grad_fn = rl.make_grad_fn(apply_fn, config.rl, rows, layout)
      params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            _shapes(model_config), shardings)
      row_sharding = lambda shape: layout.sharding(("batch",) + (None,) * (len(shape) - 1), shape)
      spec = {"tokens": ((rows, length), np.int32), "attention_mask": ((rows, length), np.bool_),
              "loss_mask": ((rows, length), np.float32),
              "old_logprobs": ((rows, length), np.float32), "advantages": ((rows,), np.float32),
              "sample_weight": ((rows,), np.float32)}
      if config.rl.kl_coef > 0:
        spec["ref_logprobs"] = ((rows, length), np.float32)
      batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=row_sharding(shape))
               for k, (shape, dtype) in spec.items()}
      analysis = jax.jit(grad_fn).lower(params, batch).compile().memory_analysis()
      if analysis is not None and getattr(analysis, "temp_size_in_bytes", None):
        return int(analysis.temp_size_in_bytes), "compiled"
    except Exception as error:  # Some backends cannot compile or analyse ahead of time.
      from absl import logging
      logging.warning("Memory plan: the train step's memory analysis failed (%s); estimating.",
                      error)
  c = model_config
  dtype = np.dtype(jax.numpy.dtype(c.dtype)).itemsize
  rows_here = math.ceil(m / layout.batch_shards)
  per_layer = length * (6 * c.hidden_size + 3 * c.intermediate_size) * dtype
  saved = per_layer * (1 if c.remat else 4)
  logits = 3 * length * c.vocab_size * 4
  grads = sum(math.prod(sh.shard_shape(s.shape)) * 4
              for s, sh in zip(jax.tree.leaves(_shapes(c)), jax.tree.leaves(shardings)))
  return int(rows_here * (c.num_layers * saved + logits) + grads), "estimated"


def _apply(params, tokens, positions, mask, *, config, layout):
  return transformer.forward(params, config, tokens, positions, mask, layout)


def device_memory_bytes() -> Optional[int]:
  """What one device holds, where the backend reports it (TPU, GPU); None on CPU."""
  try:
    stats = jax.local_devices()[0].memory_stats() or {}
  except Exception:
    return None
  return stats.get("bytes_limit")


def memory_plan(config, model_config, layouts: dict, tokenizer, task,
                compile_activations: bool = True) -> dict[str, Any]:
  """The plan as written to memory_plan.json (see the module docstring)."""
  optimizer = rl.make_optimizer(config.rl)
  shapes = _shapes(model_config)
  proposer_len, solver_len = _prompt_lengths(config, tokenizer, task)
  questions = config.rollout.prompts_per_step * config.rollout.proposals_per_prompt
  caches = {"proposer": (questions, proposer_len + config.rollout.max_proposal_tokens),
            "solver": (bucket(questions, 1) * config.rollout.answers_per_question,
                       solver_len + config.rollout.max_answer_tokens)}
  sets = ("policy",) if config.shared_weights else ("solver", "proposer")
  per_layout: dict[int, dict[str, int]] = {}
  how = "estimated"
  for key in sets:
    roles = ("solver", "proposer") if key == "policy" else (key,)
    layout = layouts[roles[0]]
    totals = per_layout.setdefault(id(layout), dict.fromkeys(KEYS, 0))
    shardings = sharding.param_shardings(layout, model_config)
    opt_shapes = jax.eval_shape(optimizer.init, shapes)
    opt_shardings = sharding.like_params(optimizer, shardings, opt_shapes, layout.replicated)
    totals["params"] += sharding.bytes_per_device(shapes, shardings)
    totals["optimizer"] += sharding.bytes_per_device(opt_shapes, opt_shardings)
  if config.rl.advantage_estimator == "gae":  # The value model, on the solver's devices.
    from sqlm_jax import critic
    layout = layouts["solver"]
    totals = per_layout.setdefault(id(layout), dict.fromkeys(KEYS, 0))
    critic_shapes = jax.eval_shape(lambda p: critic.init(p, model_config), shapes)
    critic_shardings = critic.param_shardings(layout, model_config)
    critic_optimizer = rl.make_optimizer(rl.critic_config(config.rl))
    opt_shapes = jax.eval_shape(critic_optimizer.init, critic_shapes)
    opt_shardings = sharding.like_params(critic_optimizer, critic_shardings, opt_shapes,
                                         layout.replicated)
    totals["params"] += sharding.bytes_per_device(critic_shapes, critic_shardings)
    totals["optimizer"] += sharding.bytes_per_device(opt_shapes, opt_shardings)
  for role in ("solver", "proposer"):
    layout = layouts[role]
    totals = per_layout.setdefault(id(layout), dict.fromkeys(KEYS, 0))
    shardings = sharding.param_shardings(layout, model_config)
    if config.rl.kl_coef > 0 and not totals["reference"]:
      totals["reference"] = sharding.bytes_per_device(shapes, shardings)
    totals["kv_cache"] = max(totals["kv_cache"], kv_cache_bytes(layout, model_config,
                                                                *caches[role]))
    length = caches[role][1]
    if not totals["activations"] or role == "solver":
      totals["activations"], how = activation_bytes(config, layout, model_config, shardings,
                                                    bucket(length), compile_activations)
  for totals in per_layout.values():
    totals["total"] = sum(totals[k] for k in KEYS)
  worst = max(per_layout.values(), key=lambda t: t["total"])
  mesh = layouts["solver"].mesh
  limit = device_memory_bytes()
  return {
      "mesh": {name: int(size) for name, size in mesh.shape.items()},
      "role_split": len(per_layout) > 1,
      "devices": jax.device_count(),
      "bytes_per_device": worst,
      "activations_measured": how,
      "device_memory_bytes": limit,
      "fits": None if limit is None else bool(worst["total"] <= limit),
  }


def format_plan(plan: dict) -> str:
  """The plan as a small table for the console."""
  gib = lambda b: f"{b / 2**30:8.2f} GiB"
  mesh = " x ".join(f"{k}={v}" for k, v in plan["mesh"].items())
  lines = [f"Memory plan per device ({plan['devices']} devices, mesh {mesh}"
           + (", roles split" if plan["role_split"] else "") + "):"]
  for key in KEYS + ("total",):
    note = f"  ({plan['activations_measured']})" if key == "activations" else ""
    lines.append(f"  {key:<12}{gib(plan['bytes_per_device'][key])}{note}")
  limit = plan["device_memory_bytes"]
  lines.append(f"  {'device':<12}" + (gib(limit) if limit else "    (not reported)")
               + ("" if plan["fits"] is None else "  fits" if plan["fits"] else "  DOES NOT FIT"))
  return "\n".join(lines)


def write_plan(plan: dict, workdir: str) -> str:
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "memory_plan.json")
  with open(path, "w") as f:
    json.dump(plan, f, indent=2)
  return path


class PlanError(ValueError):
  """A run that cannot fit in device memory; the message names the knobs that would help."""


def check(plan: dict) -> None:
  """Raises PlanError for a run which cannot fit."""
  if plan["fits"] is not False:
    return
  need, have = plan["bytes_per_device"]["total"], plan["device_memory_bytes"]
  raise PlanError(f"the run needs {need / 2**30:.1f} GiB per device but a device holds "
          f"{have / 2**30:.1f} GiB. Lower it with: " + "; ".join(KNOBS) + ".")
