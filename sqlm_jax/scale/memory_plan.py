"""Per-device memory of a run, by phase, before anything loads: `main --dry_run` and every run's start.

A step has three phases that never overlap: prefill and decode (each role's rollouts, on the
rollout layout) and train (the donated update, on the training layout). Each phase's bytes per
device are the resident state (parameters, optimizer states, the frozen reference, the value
model's, exact from their shapes and shardings) plus what that phase's own program holds: its
arguments, outputs and temporaries from the compiled program's `memory_analysis()` (prefill
and decode also hold the rollout copy of the weights, one of their arguments). The plan lowers
and compiles the real programs on abstract shapes (nothing is allocated; only the checkpoint's
config.json and tokenizer are read), and the peak is the largest phase, not their sum.

rollout.rows_per_call = 0 lets the plan choose: the largest power of two whose phases fit the
device memory (mesh.device_memory_gib, or what the device reports). Without a limit to meet
(a CPU run) nothing is compiled: the phases are estimated (marked as such) and every row is
decoded in one call. Planned on a CPU for an accelerator, the figures are XLA:CPU's: it
converts bfloat16 weights to float32 for some products (the tied output head, thin decode
matrices), which an accelerator does not, so decode and prefill are upper bounds there.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from sqlm_jax import rl
from sqlm_jax.rollout import decoding
from sqlm_jax.scale import sharding
from sqlm_jax.models import transformer
from sqlm_jax.rollout.sampling import Sampler, bucket
from sqlm_jax.tasks.base import Proposal

KEYS = ("params", "optimizer", "reference", "rollout_copy", "kv_cache", "activations")
PHASES = ("prefill", "decode", "train")
# What makes a run that does not fit smaller, in the order worth trying.
KNOBS = ("rollout.rows_per_call (decode fewer rows per call: a smaller KV cache)",
         "mesh.fsdp (shard parameters and optimizer states over more devices)",
         "rl.micro_batch_size (fewer rows per forward/backward)",
         "model.remat=True (recompute activations in the backward pass)",
         "rl.reference_dtype=bfloat16 (half the frozen reference's bytes)",
         "model.param_dtype=bfloat16 (half the parameter and optimizer bytes)")


def _shapes(model_config):
  return jax.eval_shape(lambda: transformer.init_params(model_config, jax.random.key(0)))


def _abstract(shapes, shardings):
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)


def device_memory_bytes(config=None) -> Optional[int]:
  """What one device holds: mesh.device_memory_gib if set, else what the backend reports
  (TPU, GPU); None on CPU."""
  gib = float(config.mesh.get("device_memory_gib", 0)) if config is not None else 0.0
  if gib > 0:
    return int(gib * 2**30)
  try:
    stats = jax.local_devices()[0].memory_stats() or {}
  except Exception:
    return None
  return stats.get("bytes_limit")


def prompt_lengths(config, tokenizer, task) -> tuple[int, int]:
  """Bucketed prompt lengths of the proposer and (for the longest question) the solver."""
  from sqlm_jax.models.tokenizer import encode_chat
  proposer = len(encode_chat(tokenizer, task.proposer_messages(config.task.topic or "topic")))
  solver = len(encode_chat(tokenizer, task.solver_messages(Proposal("?")))) - 1
  solver += config.rollout.max_proposal_tokens
  if config.rollout.max_solver_prompt_tokens:
    solver = min(solver, config.rollout.max_solver_prompt_tokens)
  return bucket(proposer), bucket(solver)


def rollouts(config, tokenizer, task) -> dict[str, tuple[int, int, int, int]]:
  """Each role's sampling per step: (prompts, samples per prompt, prompt length, new tokens)."""
  proposer_len, solver_len = prompt_lengths(config, tokenizer, task)
  r = config.rollout
  questions = r.prompts_per_step * r.proposals_per_prompt
  solver_prompts = questions * (2 if config.rewards.paraphrase_guard != "off" else 1)
  out = {"solver": (solver_prompts, r.answers_per_question, solver_len, r.max_answer_tokens)}
  if config.task.question_source != "fixed":
    out["proposer"] = (1, questions, proposer_len, r.max_proposal_tokens)
  return out


def kv_cache_bytes(layout, model_config, rows: int, length: int) -> int:
  """Per-device bytes of a decode's KV cache of `rows` rows and `length` slots."""
  c = model_config
  shape = (rows, c.num_kv_heads, length, c.head_dim)
  shard = layout.sharding(transformer.CACHE_AXES, shape).shard_shape(shape)
  per_layer = 2 * math.prod(shard) * np.dtype(jnp.dtype(c.dtype)).itemsize
  mask = layout.sharding(("batch", "cache_seq"), (rows, length)).shard_shape((rows, length))
  return c.num_layers * per_layer + math.prod(mask)


def program_bytes(compiled) -> Optional[int]:
  """Arguments + outputs not aliased to donated arguments + temporaries, per device."""
  a = compiled.memory_analysis()
  if a is None:
    return None
  return int(a.argument_size_in_bytes + a.output_size_in_bytes - a.alias_size_in_bytes
             + a.temp_size_in_bytes)


# ---- The programs of a step, lowered on abstract shapes ---------------------------------------


def rollout_bytes(sampler: Sampler, copy_shapes, num_prompts: int, samples: int,
                  prompt_length: int, new_tokens: int, rows_per_call: int) -> dict[str, int]:
  """{"prefill", "decode"}: the largest call's compiled program bytes (the copy included)."""
  if rows_per_call and num_prompts * samples > rows_per_call:
    if samples > rows_per_call:
      num_prompts, samples = 1, rows_per_call
    else:
      num_prompts = rows_per_call // samples
  lowered = sampler.lower(copy_shapes, num_prompts, prompt_length, new_tokens, samples)
  sizes = {name: program_bytes(program.compile()) for name, program in lowered.items()}
  return {"prefill": max(v for k, v in sizes.items() if k.startswith("prefill")),
          "decode": max(v for k, v in sizes.items() if k.startswith("decode"))}


def train_batch_shapes(config, layout, rows: int, length: int) -> dict[str, Any]:
  """An abstract mini-batch as `batches.training_batch` builds it, rows split over the mesh."""
  gae = config.rl.advantage_estimator == "gae"
  spec = {"tokens": ((rows, length), np.int32), "attention_mask": ((rows, length), np.bool_),
          "loss_mask": ((rows, length), np.float32),
          "old_logprobs": ((rows, length), np.float32),
          "advantages": ((rows, length) if gae else (rows,), np.float32),
          "sample_weight": ((rows,), np.float32)}
  if config.rl.kl_coef > 0:
    spec["ref_logprobs"] = ((rows, length), np.float32)
  row = lambda shape: layout.sharding(("batch",) + (None,) * (len(shape) - 1), shape)
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=row(shape))
          for k, (shape, dtype) in spec.items()}


def train_rows_and_length(config, sampled: dict, role: str) -> tuple[int, int]:
  """Rows of one optimizer step's mini-batch and its row length (prompt + completion)."""
  prompts, samples, prompt_len, new_tokens = sampled[role]
  rows = (prompts // (2 if role == "solver" and config.rewards.paraphrase_guard != "off" else 1)
          * samples)
  micro = config.rl.micro_batch_size
  padded = -(-bucket(rows, 1) // micro) * micro
  mini = config.rl.ppo_mini_batch_size
  return (min(mini, padded) if mini > 0 else padded), prompt_len + new_tokens


def update_bytes(config, model_config, layout, optimizer, sampled: dict) -> int:
  """The donated update's compiled program bytes (params and optimizer state included)."""
  from sqlm_jax.loop.roles import apply_fn
  shardings = sharding.param_shardings(layout, model_config)
  shapes = _shapes(model_config)
  opt_shapes = jax.eval_shape(optimizer.init, shapes)
  opt_shardings = sharding.like_params(optimizer, shardings, opt_shapes, layout.replicated)
  update = rl.make_update_fn(apply_fn(model_config, layout, config.rl.logprob_chunk), optimizer,
                             config.rl, config.rl.micro_batch_size, layout, shardings,
                             opt_shardings)
  batches = tuple(train_batch_shapes(config, layout, *train_rows_and_length(config, sampled, r))
                  for r in ("solver", "proposer") if r in sampled)
  summed = config.shared_weights and config.shared_weights_update == "summed"
  if not summed:  # One role's mini-batch per step: the larger.
    batches = max(batches, key=lambda b: math.prod(b["tokens"].shape))
  compiled = update.lower(_abstract(shapes, shardings), _abstract(opt_shapes, opt_shardings),
                          batches, jax.ShapeDtypeStruct((), jnp.int32)).compile()
  return program_bytes(compiled)


# ---- Estimates (no compilation) -------------------------------------------------------------


def estimate_rollout(model_config, rollout_layout, copy_bytes: int, rows: int, samples: int,
                     length: int, prompt_length: int) -> dict[str, int]:
  """Analytic prefill / decode bytes of one call of `rows` rows (samples per prompt): the copy,
  the KV cache, the float32 logits the sampler holds (a few [rows, V] arrays) and a prefill's
  activations (one row per prompt)."""
  c = model_config
  here = math.ceil(rows / rollout_layout.batch_shards)
  prompts_here = math.ceil(max(1, rows // samples) / rollout_layout.batch_shards)
  kv = kv_cache_bytes(rollout_layout, c, rows, length)
  logits = 4 * here * c.vocab_size * 4
  width = np.dtype(jnp.dtype(c.dtype)).itemsize
  prefill_acts = prompts_here * prompt_length * (4 * c.hidden_size + 3 * c.intermediate_size)
  prefill_acts = prefill_acts * width + prompts_here * c.num_heads * prompt_length ** 2 * 4
  return {"prefill": copy_bytes + kv + logits + prefill_acts, "decode": copy_bytes + kv + logits}


def estimate_train(config, layout, model_config, rows: int, length: int) -> int:
  """Analytic bytes an update holds beyond the parameters and optimizer state: float32
  gradients and their accumulator, a micro-batch's activations and (chunked) float32 logits,
  and the mini-batch itself."""
  c = model_config
  count = sum(math.prod(sh.shard_shape(s.shape)) for s, sh in zip(
      jax.tree.leaves(_shapes(c)), jax.tree.leaves(sharding.param_shardings(layout, c))))
  width = np.dtype(jnp.dtype(c.dtype)).itemsize
  here = math.ceil(config.rl.micro_batch_size / layout.batch_shards)
  per_layer = length * (6 * c.hidden_size + 3 * c.intermediate_size) * width
  saved = per_layer * (1 if c.remat else 4)
  chunk = int(config.rl.get("logprob_chunk", 0)) or length
  logits = 3 * min(chunk, length) * c.vocab_size * 4
  batch = math.ceil(rows / layout.batch_shards) * length * 17
  return int(2 * 4 * count + here * (c.num_layers * saved + logits) + batch)


# ---- The plan ------------------------------------------------------------------------------


def memory_plan(config, model_config, layouts: dict, tokenizer, task,
                compile_programs: bool = True) -> dict[str, Any]:
  """The plan as written to memory_plan.json (see the module docstring)."""
  from sqlm_jax.loop.roles import ROLES, role_key
  limit = device_memory_bytes(config)
  optimizer = rl.make_optimizer(config.rl)
  shapes = _shapes(model_config)
  copy_config = decoding.model_config(config, model_config)
  reference_dtype = decoding.resolve_dtype(config.rl.reference_dtype, config)
  sampled = rollouts(config, tokenizer, task)
  total_rows = max(p * n for p, n, _, _ in sampled.values())

  # Resident state per training layout (role_split: one layout per role).
  per_layout: dict[sharding.Layout, dict[str, Any]] = {}
  for role in ROLES:
    layout = layouts[role]
    entry = per_layout.setdefault(layout, {"roles": [], "sets": set(), "params": 0,
                                           "optimizer": 0, "reference": 0})
    entry["roles"].append(role)
    shardings = sharding.param_shardings(layout, model_config)
    if role_key(config, role) not in entry["sets"]:
      entry["sets"].add(role_key(config, role))
      opt_shapes = jax.eval_shape(optimizer.init, shapes)
      entry["params"] += sharding.bytes_per_device(shapes, shardings)
      entry["optimizer"] += sharding.bytes_per_device(
          opt_shapes, sharding.like_params(optimizer, shardings, opt_shapes, layout.replicated))
    if config.rl.kl_coef > 0 and not entry["reference"]:
      ref_config = model_config.replace(param_dtype=reference_dtype)
      entry["reference"] = sharding.bytes_per_device(
          _shapes(ref_config), sharding.param_shardings(layout, ref_config))
  if config.rl.advantage_estimator == "gae":  # The value model, on the solver's devices.
    from sqlm_jax.rl import critic
    entry = per_layout[layouts["solver"]]
    critic_shapes = jax.eval_shape(lambda p: critic.init(p, model_config), shapes)
    critic_shardings = critic.param_shardings(layouts["solver"], model_config)
    critic_optimizer = rl.make_optimizer(rl.critic_config(config.rl))
    opt_shapes = jax.eval_shape(critic_optimizer.init, critic_shapes)
    entry["params"] += sharding.bytes_per_device(critic_shapes, critic_shardings)
    entry["optimizer"] += sharding.bytes_per_device(opt_shapes, sharding.like_params(
        critic_optimizer, critic_shardings, opt_shapes, layouts["solver"].replicated))

  def phases_at(rows_per_call: int, compiled: bool) -> tuple[list[dict], str]:
    """Each layout's breakdown and phases at this rows_per_call."""
    out, how = [], "compiled" if compiled else "estimated"
    for layout, entry in per_layout.items():
      resident = entry["params"] + entry["optimizer"] + entry["reference"]
      decode_layout = decoding.layout(layout, config.rollout.tensor)
      copy_shardings = sharding.param_shardings(decode_layout, copy_config, per_layer=True)
      copy_shapes = decoding.copy_shapes(copy_config)
      copy_bytes = sharding.bytes_per_device(copy_shapes, copy_shardings)
      sampler = Sampler(copy_config, pad_id=tokenizer.pad_id, stop_ids=tokenizer.stop_ids,
                        layout=decode_layout, per_layer_params=True)
      prefill = decode = kv = 0
      for role in entry["roles"]:
        if role not in sampled:
          continue
        prompts, samples, prompt_len, new = sampled[role]
        rows = decoding.rows_in_call(prompts, samples, rows_per_call)
        kv = max(kv, kv_cache_bytes(decode_layout, copy_config, rows, prompt_len + new))
        if compiled:
          got = rollout_bytes(sampler, _abstract(copy_shapes, copy_shardings), prompts, samples,
                              prompt_len, new, rows_per_call)  # The copy is an argument.
        else:
          got = estimate_rollout(copy_config, decode_layout, copy_bytes, rows, samples,
                                 prompt_len + new, prompt_len)
        prefill, decode = max(prefill, got["prefill"]), max(decode, got["decode"])
      train_roles = {r: sampled[r] for r in entry["roles"] if r in sampled}
      if compiled:
        # The update's arguments hold one parameter set and its optimizer state.
        one_set = (entry["params"] + entry["optimizer"]) // len(entry["sets"])
        train = update_bytes(config, model_config, layout, optimizer, train_roles) - one_set
      else:
        rows, length = max((train_rows_and_length(config, train_roles, r) for r in train_roles),
                           key=lambda x: x[0] * x[1])
        train = estimate_train(config, layout, model_config, rows, length)
      phases = {"prefill": resident + prefill, "decode": resident + decode,
                "train": resident + max(train, 0)}
      out.append({"params": entry["params"], "optimizer": entry["optimizer"],
                  "reference": entry["reference"], "rollout_copy": copy_bytes, "kv_cache": kv,
                  "activations": max(train, 0), "phases": phases,
                  "total": max(phases.values())})
    return out, how

  def rollout_peak(layouts_plan) -> int:  # What rows_per_call changes: prefill and decode.
    return max(max(t["phases"]["prefill"], t["phases"]["decode"]) for t in layouts_plan)

  # rows_per_call: the config's, all rows without a limit, else the largest power of two whose
  # estimate fits (then checked on the compiled programs, halving while it does not), but never
  # fewer than 8 rows per device: smaller calls starve the chip (and XLA:CPU, which compiles
  # the plan, turns such thin matrix products into float32 copies of the weights).
  rows_per_call = int(config.rollout.rows_per_call)
  chosen = rows_per_call == 0 and limit is not None
  if chosen:
    floor = 8 * max(decoding.layout(layout, config.rollout.tensor).batch_shards
                    for layout in per_layout)
    rows_per_call = 1 << (max(1, total_rows) - 1).bit_length()
    while rows_per_call > floor and rollout_peak(phases_at(rows_per_call, False)[0]) > limit:
      rows_per_call //= 2
  while True:
    layouts_plan, how = phases_at(rows_per_call, compile_programs)
    worst = max(layouts_plan, key=lambda t: t["total"])
    if not (chosen and rollout_peak(layouts_plan) > limit and rows_per_call > floor):
      break
    rows_per_call //= 2
  if rows_per_call >= total_rows:
    rows_per_call = 0  # One call holds every row.
  mesh = layouts["solver"].mesh
  plan = {
      "mesh": {name: int(size) for name, size in mesh.shape.items()},
      "role_split": len(per_layout) > 1,
      "devices": jax.device_count(),
      "bytes_per_device": {k: int(worst[k]) for k in KEYS + ("total",)},
      "phases": {k: int(worst["phases"][k]) for k in PHASES},
      "peak_bytes": int(worst["total"]),
      "rows_per_call": rows_per_call,
      "activations_measured": how,
      "device_memory_bytes": limit,
      "fits": None if limit is None else bool(worst["total"] <= limit),
  }
  if plan["fits"] is False:
    plan["advice"] = advice(plan)
  return plan


def format_plan(plan: dict) -> str:
  """The plan as a small table for the console."""
  gib = lambda b: f"{b / 2**30:8.2f} GiB"
  mesh = " x ".join(f"{k}={v}" for k, v in plan["mesh"].items())
  lines = [f"Memory plan per device ({plan['devices']} devices, mesh {mesh}"
           + (", roles split" if plan["role_split"] else "") + f", {plan['activations_measured']}"
           + f", rows_per_call={plan['rows_per_call'] or 'all'}):"]
  for key in KEYS:
    lines.append(f"  {key:<13}{gib(plan['bytes_per_device'][key])}")
  for phase in PHASES:
    lines.append(f"  {'phase ' + phase:<13}{gib(plan['phases'][phase])}")
  limit = plan["device_memory_bytes"]
  lines.append(f"  {'peak':<13}{gib(plan['peak_bytes'])}")
  lines.append(f"  {'device':<13}" + (gib(limit) if limit else "    (not reported)")
               + ("" if plan["fits"] is None else "  fits" if plan["fits"] else "  DOES NOT FIT"))
  if plan.get("advice"):
    lines.append("  " + plan["advice"])
  return "\n".join(lines)


def write_plan(plan: dict, workdir: str) -> str:
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "memory_plan.json")
  with open(path, "w") as f:
    json.dump(plan, f, indent=2)
  return path


class PlanError(ValueError):
  """A run that cannot fit in device memory; the message names the knobs that would help."""


def advice(plan: dict) -> str:
  """Why a plan does not fit and the knobs to try, in order."""
  need, have = plan["peak_bytes"], plan["device_memory_bytes"]
  phase = max(plan["phases"], key=plan["phases"].get)
  return (f"the run needs {need / 2**30:.1f} GiB per device (its {phase} phase) but a device "
          f"holds {have / 2**30:.1f} GiB. Lower it with, in order: " + "; ".join(KNOBS) + ".")


def check(plan: dict) -> None:
  """Raises PlanError for a run which cannot fit."""
  if plan["fits"] is False:
    raise PlanError(advice(plan))
