"""On 8 fake CPU devices: decoding on its own layout (no weight gathers in the loop), the copy's
bytes as planned, chunked decoding over the mesh, and the plan against the compiled programs."""

import re

import jax
import numpy as np
import pytest

from sqlm_jax.loop import roles
from sqlm_jax.rollout import decoding
from sqlm_jax.scale import memory_plan, sharding
from sqlm_jax.models.tokenizer import load_tokenizer
from tests.test_selfplay import tiny_config

FSDP8 = {"mesh.data": 1, "mesh.fsdp": 8, "rollout.dtype": "bfloat16", "rl.micro_batch_size": 8,
         "rollout.prompts_per_step": 2, "rollout.proposals_per_prompt": 4}
# FSDP8 with a device limit (the plan then measures the compiled programs) and a KL term (a
# reference copy in the plan): neither changes the decoding copy or its programs.
PLANNED = {**FSDP8, "mesh.device_memory_gib": 4.0, "rl.kl_coef": 1e-3}


@pytest.fixture(scope="module")
def planned(qwen2_dir):
  """One setup on the PLANNED config for the tests that only read it (each setup traces and
  compiles both roles' programs on 8 devices)."""
  config = tiny_config(qwen2_dir, **PLANNED)
  s, state = roles.setup(config)
  return config, s, state


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _while_bodies(hlo: str) -> list[str]:
  """The text of every computation a while loop runs as its body."""
  names = set(re.findall(r"body=%?([\w.\-]+)", hlo))
  blocks = re.split(r"\n(?=\S)", hlo)
  return [b for b in blocks if any(re.match(rf"%?{re.escape(n)}\b", b) for n in names)]


def test_mesh_rollout_copy_is_replicated_bfloat16_and_sized_as_planned(planned):
  config, s, state = planned
  solver = s.roles["solver"]
  assert solver.layout.mesh.shape == {"data": 1, "fsdp": 8, "tensor": 1}
  assert solver.rollout_layout.mesh.shape == {"data": 8, "fsdp": 1, "tensor": 1}
  copy = decoding.weights(solver, state.params["solver"])
  device = jax.devices()[0]
  held = sum(shard.data.nbytes for leaf in jax.tree.leaves(copy)
             for shard in leaf.addressable_shards if shard.device == device)
  plan = memory_plan.memory_plan(config, s.model_config, roles.role_layouts(config),
                                 s.tokenizer, s.task, compile_programs=False)
  assert held == plan["bytes_per_device"]["rollout_copy"]
  assert held == 2 * s.model_config.num_params()  # Whole bfloat16 weights on every device.
  training = sum(shard.data.nbytes for leaf in jax.tree.leaves(state.params["solver"])
                 for shard in leaf.addressable_shards if shard.device == device)
  assert training < held  # FSDP: an eighth of the float32 weights (norms replicated).


def test_mesh_rollout_decode_loop_gathers_no_weights(planned):
  """With rollout.tensor=1 the decode loop's body holds no all-gather; on the training (FSDP)
  layout the same program gathers the weights (so the check can fail)."""
  _, s, state = planned
  solver = s.roles["solver"]
  copy = _abstract(decoding.weights(solver, state.params["solver"]))
  lowered = solver.sampler.lower(copy, 8, 16, 8, 4)
  decodes = [v for k, v in lowered.items() if k.startswith("decode")]
  assert decodes
  for program in decodes:
    bodies = _while_bodies(program.compile().as_text())
    assert bodies and not any("all-gather" in body for body in bodies)
  # The same sampler on the FSDP layout: the weights are gathered (hoisted or not).
  from sqlm_jax.rollout.sampling import Sampler
  fsdp = Sampler(s.model_config, s.tokenizer.pad_id, s.tokenizer.stop_ids, layout=solver.layout)
  text = "".join(p.compile().as_text() for k, p in fsdp.lower(
      _abstract(state.params["solver"]), 8, 16, 8, 4).items() if k.startswith("decode"))
  assert "all-gather" in text


def test_mesh_rollout_chunked_over_the_mesh_gives_the_unchunked_tokens(qwen2_dir):
  config = tiny_config(qwen2_dir, **{**FSDP8, "rollout.dtype": "float32"})
  s, state = roles.setup(config)
  solver = s.roles["solver"]
  copy = decoding.weights(solver, state.params["solver"])
  prompts = [[5, 6, 7], [9, 3], [4], [8, 8, 8, 8], [2, 3], [7, 7], [6], [5, 5]]
  kwargs = dict(max_new_tokens=6, num_samples=4, temperature=1.0)
  whole = decoding.sample(solver.sampler, copy, prompts, jax.random.key(2), **kwargs)
  chunked = decoding.sample(solver.sampler, copy, prompts, jax.random.key(2), rows_per_call=8,
                           **kwargs)
  np.testing.assert_array_equal(whole.tokens, chunked.tokens)


def test_mesh_memory_plan_phases_are_the_compiled_programs(qwen2_dir, planned):
  """The plan's phases: resident state + the run's own compiled prefill, decode and update."""
  config, s, state = planned
  plan = s.memory_plan
  assert plan["fits"] is True and plan["activations_measured"] == "compiled"
  b = plan["bytes_per_device"]
  resident = b["params"] + b["optimizer"] + b["reference"]
  solver = s.roles["solver"]
  copy = _abstract(decoding.weights(solver, state.params["solver"]))
  tokenizer = load_tokenizer(qwen2_dir)
  sampled = memory_plan.rollouts(config, tokenizer, s.task)
  programs = {}
  for role, (prompts, samples, length, new) in sampled.items():
    for name, lowered in solver.sampler.lower(copy, prompts, length, new, samples).items():
      phase = "prefill" if name.startswith("prefill") else "decode"
      programs[phase] = max(programs.get(phase, 0),
                            memory_plan.program_bytes(lowered.compile()))
  assert plan["phases"]["prefill"] == resident + programs["prefill"]
  assert plan["phases"]["decode"] == resident + programs["decode"]
  assert plan["phases"]["decode"] >= resident + b["rollout_copy"] + b["kv_cache"]
  assert plan["phases"]["train"] > resident
  assert plan["peak_bytes"] == max(plan["phases"].values()) == b["total"]
  assert sharding.bytes_per_device(
      jax.eval_shape(lambda: state.params["solver"]),
      jax.tree.map(lambda x: x.sharding, state.params["solver"])) == b["params"] // 2
