"""Rollouts on one device: chunked decoding gives the unchunked tokens, the decoding copy, the
compilation cache, and the memory plan's choice of rows per call."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from sqlm_jax.loop import roles
from sqlm_jax.rollout import decoding
from sqlm_jax.scale import memory_plan
from sqlm_jax.models import load_pretrained
from sqlm_jax.rollout.sampling import Sampler
from tests.test_selfplay import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18], [20], [3, 4, 5], [30, 31]]


# Other divisors of the rows are CI's slow step.
@pytest.mark.parametrize("rows_per_call", [4, pytest.param(8, marks=pytest.mark.slow),
                                           pytest.param(2, marks=pytest.mark.slow)])
def test_rollout_chunked_sampling_gives_the_unchunked_tokens(qwen2_dir, rows_per_call):
  """Prompt groups (rows_per_call >= N) and one prompt's samples split (rows_per_call < N)."""
  config, params = load_pretrained(qwen2_dir)
  sampler = Sampler(config, pad_id=0, stop_ids=[1])
  kwargs = dict(max_new_tokens=9, num_samples=4, temperature=1.0)
  whole = decoding.sample(sampler, params, PROMPTS, jax.random.key(4), rows_per_call=0, **kwargs)
  chunked = decoding.sample(sampler, params, PROMPTS, jax.random.key(4),
                           rows_per_call=rows_per_call, **kwargs)
  np.testing.assert_array_equal(whole.tokens, chunked.tokens)
  np.testing.assert_array_equal(whole.lengths, chunked.lengths)
  np.testing.assert_allclose(whole.logprobs, chunked.logprobs, rtol=1e-5)  # Batch-size rounding.
  np.testing.assert_array_equal(whole.prompt_tokens, chunked.prompt_tokens)
  np.testing.assert_array_equal(whole.prompt_mask, chunked.prompt_mask)
  other = decoding.sample(sampler, params, PROMPTS, jax.random.key(5),
                         rows_per_call=rows_per_call, **kwargs)
  assert not np.array_equal(other.tokens, chunked.tokens)  # The key still matters.


def test_rollout_copy_is_per_layer_in_rollout_dtype_and_freed(qwen2_dir):
  s, state = roles.setup(tiny_config(qwen2_dir))
  copy = decoding.weights(s.roles["solver"], state.params["solver"])  # float32 on CPU
  assert len(copy["layers"]) == s.model_config.num_layers
  for i, layer in enumerate(copy["layers"]):
    for a, b in zip(jax.tree.leaves(layer), jax.tree.leaves(state.params["solver"]["layers"])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b)[i])
  s, state = roles.setup(tiny_config(qwen2_dir, **{"rollout.dtype": "bfloat16"}))
  copy = decoding.weights(s.roles["solver"], state.params["solver"])
  assert {x.dtype for x in jax.tree.leaves(copy)} == {np.dtype("bfloat16")}
  assert {x.dtype for x in jax.tree.leaves(state.params["solver"])} == {np.dtype("float32")}
  assert s.recompute_old_logprobs  # The sampler's numerics are no longer the trainer's.
  decoding.free(copy)
  assert all(x.is_deleted() for x in jax.tree.leaves(copy))
  assert not any(x.is_deleted() for x in jax.tree.leaves(state.params["solver"]))


def test_rollout_reference_dtype(qwen2_dir):
  s, _ = roles.setup(tiny_config(qwen2_dir, **{"rl.kl_coef": 1e-3,
                                               "rl.reference_dtype": "bfloat16"}))
  assert {x.dtype for x in jax.tree.leaves(s.reference["solver"])} == {np.dtype("bfloat16")}


def _dry_run(folder, workdir, *args):
  result = subprocess.run(
      [sys.executable, "-m", "sqlm_jax.main", "--config", "configs/tiny.py", "--dry_run",
       f"--config.model.path={folder}", f"--workdir={workdir}", "--config.compile_cache_dir=",
       *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.load(open(os.path.join(workdir, "memory_plan.json"))), result.stdout


def test_memory_plan_below_the_resident_state_names_the_knobs_in_order(qwen2_dir, tmp_path):
  """Below the resident state nothing fits: the dry run says so and names the knobs in order."""
  small, out = _dry_run(qwen2_dir, tmp_path / "small", "--config.mesh.device_memory_gib=0.0001")
  assert small["fits"] is False
  assert ("rollout.rows_per_call" in small["advice"]
          and small["advice"].index("rollout.rows_per_call") < small["advice"].index("mesh.fsdp")
          < small["advice"].index("model.param_dtype"))
  assert "DOES NOT FIT" in out


@pytest.mark.slow  # Two dry runs that compile every phase, the second several times: CI's slow step.
def test_memory_plan_chooses_rows_per_call(qwen2_dir, tmp_path):
  """With a device memory to meet, the plan compiles the phases and halves the rows per call
  until they fit."""
  roomy, _ = _dry_run(qwen2_dir, tmp_path / "roomy", "--config.mesh.device_memory_gib=8")
  assert roomy["fits"] is True and roomy["rows_per_call"] == 0  # Every row in one call.
  assert roomy["activations_measured"] == "compiled"
  assert roomy["peak_bytes"] == max(roomy["phases"].values())
  assert set(roomy["phases"]) == {"prefill", "decode", "train"}
  # A budget between the resident state and the one-call decode: fewer rows per call.
  decode = roomy["phases"]["decode"]
  resident = decode - roomy["bytes_per_device"]["kv_cache"]
  budget = (resident + decode) / 2 / 2**30
  tight, _ = _dry_run(qwen2_dir, tmp_path / "tight", f"--config.mesh.device_memory_gib={budget}")
  assert tight["rows_per_call"] > 0 and tight["rows_per_call"] & (tight["rows_per_call"] - 1) == 0
  assert tight["phases"]["decode"] < decode


@pytest.mark.slow  # Two whole runs: CI's slow step.
def test_rollout_compile_cache_serves_a_second_run(qwen2_dir, tmp_path):
  """Two processes run the same step with one cache folder: the second compiles nothing new."""
  script = f"""
import jax, json, sys
hits = []
jax.monitoring.register_event_listener(
    lambda name, **kw: hits.append(name) if name == '/jax/compilation_cache/cache_hits' else None)
from sqlm_jax.loop import selfplay
from tests.test_selfplay import tiny_config
config = tiny_config({str(qwen2_dir)!r}, **{{"total_steps": 1, "eval.num_examples": 2,
                     "compile_cache_dir": {str(tmp_path / 'cache')!r}}})
selfplay.train(config, sys.argv[1])
print(json.dumps(len(hits)))
"""
  counts = []
  for run in ("first", "second"):
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / run)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    counts.append(json.loads(result.stdout.strip().splitlines()[-1]))
  assert counts[0] == 0 and counts[1] > 10, counts
  assert len(os.listdir(tmp_path / "cache")) > 10


def test_memory_plan_estimate_without_a_limit_keeps_one_call(qwen2_dir):
  config = tiny_config(qwen2_dir)
  model_config, _ = roles.model_configs(config)
  from sqlm_jax.models.tokenizer import load_tokenizer
  plan = memory_plan.memory_plan(config, model_config, roles.role_layouts(config),
                                 load_tokenizer(qwen2_dir), roles.make_task(config)[0],
                                 compile_programs=False)
  assert plan["fits"] is None and plan["rows_per_call"] == 0
  assert plan["activations_measured"] == "estimated"
  assert plan["bytes_per_device"]["rollout_copy"] == 4 * model_config.num_params()
