"""On 8 fake CPU devices: the self-play run on a mesh, split roles, several processes, the plan."""

import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from sqlm_jax.evals import evaluation
from sqlm_jax.loop import roles, selfplay
from sqlm_jax.scale import memory_plan, sharding
from sqlm_jax.config_base import load_config
from sqlm_jax.models import load_pretrained, read_config
from sqlm_jax.rollout.sampling import Sampler
from sqlm_jax.models.tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The tiny default, cut to two quick steps; the held-out set is 64 addition4 problems.
QUICK = ["--config.total_steps=2", "--config.rollout.prompts_per_step=4",
         "--config.eval.num_examples=64", "--config.eval.num_samples=1", "--config.eval.every=0",
         "--config.log.tensorboard=False", "--config.log.progress_bar=False"]
# Timings and throughputs differ between any two runs.
VOLATILE = ("time/", "train_tokens_per_s")


def _main(workdir, *args, devices=8, env=None, wait=True):
  env = dict(os.environ, **(env or {}))
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  command = [sys.executable, "-m", "sqlm_jax.main", "--config", "configs/tiny.py",
             f"--workdir={workdir}", *QUICK, *args]
  process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
  if not wait:
    return process
  out, err = process.communicate(timeout=900)
  assert process.returncode == 0, err[-4000:]
  return out


def _metrics(workdir):
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in records]


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("mesh_2x4")
  out = _main(workdir, "--config.mesh.data=2", "--config.mesh.fsdp=4")
  return workdir, out


def test_mesh_main_reports_the_base_accuracy_of_one_device(eight_devices):
  workdir, out = eight_devices
  plan = json.load(open(workdir / "memory_plan.json"))
  assert plan["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1} and plan["devices"] == 8
  assert "Memory plan per device" in out
  summary = json.load(open(workdir / "summary.json"))
  assert summary["steps"] == 2
  config = load_config(os.path.join(ROOT, "configs", "tiny.py"))
  config.eval.num_examples, config.eval.num_samples = 64, 1
  model_config, params = load_pretrained(config.model.path, dtype="float32")
  tokenizer = load_tokenizer(config.model.path)
  task, _ = roles.make_task(config)
  sampler = Sampler(model_config, tokenizer.pad_id, tokenizer.stop_ids,
                    layout=sharding.default_layout())  # One device.
  examples = evaluation.load_examples("addition4", 64)
  one = evaluation.run_heldout(config.eval, params, sampler, tokenizer, task, examples,
                               jax.random.key(0))
  assert summary["base_accuracy"] == one["heldout/greedy_accuracy"]
  assert 0 < summary["base_accuracy"] < 1


@pytest.mark.slow  # Two real processes, then one: CI's slow step.
def test_distributed_two_processes_log_what_one_process_logs(eight_devices, tmp_path):
  """Two processes of 4 fake devices each, joined by jax.distributed over gloo."""
  one_workdir, _ = eight_devices
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  processes = [_main(tmp_path, "--config.mesh.data=2", "--config.mesh.fsdp=4",
                     f"--config.mesh.coordinator=127.0.0.1:{port}",
                     "--config.mesh.num_processes=2", f"--config.mesh.process_id={i}",
                     devices=4, wait=False) for i in range(2)]
  results = [p.communicate(timeout=900) for p in processes]
  for p, (_, err) in zip(processes, results):
    assert p.returncode == 0, err[-4000:]
  assert "Memory plan" in results[0][0] and "Memory plan" not in results[1][0]  # Only process 0.
  two, one = _metrics(tmp_path), _metrics(one_workdir)
  assert [r["step"] for r in two] == [0, 1, 2]
  assert two[0] == one[0]  # The base evaluation.
  for a, b in zip(two[1:], one[1:]):
    assert a.keys() == b.keys()
    for key in a:
      if isinstance(a[key], float):
        assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
      else:
        assert a[key] == b[key], key


@pytest.mark.slow  # A self-play step on two role meshes: CI's slow step.
def test_mesh_role_split_puts_each_role_on_half_of_the_devices():
  config = load_config(os.path.join(ROOT, "configs", "tiny.py"))
  config.mesh.role_split = True
  config.rollout.prompts_per_step = 4
  config.eval.num_examples = 8
  s, state = selfplay.setup(config)
  devices = jax.devices()
  proposer = state.params["proposer"]["embed_tokens"].sharding.device_set
  solver = state.params["solver"]["embed_tokens"].sharding.device_set
  assert proposer == set(devices[:4]) and solver == set(devices[4:])
  assert s.roles["solver"].layout.mesh.shape["fsdp"] == 4
  before = np.asarray(state.params["solver"]["embed_tokens"])
  state, metrics, _ = selfplay.train_step(s, state, jax.random.key(3))
  assert np.isfinite(metrics["solver/loss"]) and np.isfinite(metrics["proposer/loss"])
  assert not np.array_equal(before, np.asarray(state.params["solver"]["embed_tokens"]))
  assert state.params["solver"]["embed_tokens"].sharding.device_set == set(devices[4:])


@pytest.mark.slow  # Two dry runs on two meshes: CI's slow step.
def test_mesh_dry_run_plan_divides_parameters_by_fsdp(qwen2_dir, tmp_path):
  folder = tmp_path / "no_weights"
  folder.mkdir()
  for name in os.listdir(qwen2_dir):
    if not name.endswith(".safetensors"):
      shutil.copy(os.path.join(qwen2_dir, name), folder / name)
  plans = {}
  for name, mesh in (("fsdp8", ["--config.mesh.fsdp=8"]),
                     ("data8", ["--config.mesh.data=8", "--config.mesh.fsdp=1"])):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    result = subprocess.run(
        [sys.executable, "-m", "sqlm_jax.main", "--config", "configs/arithmetic.py",
         f"--config.model.path={folder}", "--dry_run", f"--workdir={tmp_path / name}",
         "--config.rollout.max_proposal_tokens=32", "--config.rollout.max_answer_tokens=32",
         "--config.rl.micro_batch_size=8", *mesh],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    plans[name] = json.load(open(tmp_path / name / "memory_plan.json"))
  fsdp, data = plans["fsdp8"]["bytes_per_device"], plans["data8"]["bytes_per_device"]
  assert set(fsdp) == {"params", "optimizer", "reference", "rollout_copy", "kv_cache",
                       "activations", "total"}
  assert plans["fsdp8"]["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  whole = 4 * read_config(str(folder)).num_params()
  assert data["params"] == whole  # data=8: every device holds the whole model.
  assert fsdp["params"] < whole / 8 * 1.1  # fsdp=8: about an eighth (norms are replicated).
  assert fsdp["optimizer"] == pytest.approx(2 * fsdp["params"], rel=0.01)  # Adam's two moments.
  assert fsdp["reference"] == fsdp["params"]  # The arithmetic config has a KL term.
  assert plans["fsdp8"]["device_memory_bytes"] is None and plans["fsdp8"]["fits"] is None


def test_mesh_plan_refuses_a_run_that_cannot_fit():
  plan = {"fits": False, "device_memory_bytes": 2**30, "peak_bytes": 3 * 2**30,
          "phases": {"prefill": 2**30, "decode": 3 * 2**30, "train": 2**30}}
  with pytest.raises(memory_plan.PlanError, match="decode phase.*rows_per_call.*mesh.fsdp.*"
                     "micro_batch_size.*remat.*reference_dtype.*param_dtype"):
    memory_plan.check(plan)
