"""Two real processes: SIGTERM to one stops both at the same step; workdirs that are not shared
end both within a minute with one message; a micro-batch the batch shards do not divide."""

import json
import signal
import time

import jax
import numpy as np
import pytest

from sqlm_jax.loop import batches, roles, selfplay
from sqlm_jax.scale import sharding
from tests.mesh import multihost
from tests.test_selfplay import permissive_task, tiny_config

# Two real processes killed or signalled and rerun, minutes on 2 cores: CI's slow step.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
  """A two-process run whose process 1 got SIGTERM once step 1 was logged."""
  workdir = tmp_path_factory.mktemp("multihost_stopped")
  processes = multihost.start_two([workdir, workdir], "--config.checkpoint.every=0")
  deadline = time.monotonic() + 900
  while not (workdir / "metrics.jsonl").exists() or \
      len((workdir / "metrics.jsonl").read_text().splitlines()) < 2:  # The base eval, step 1.
    assert time.monotonic() < deadline and all(p.poll() is None for p in processes)
    time.sleep(0.05)
  processes[1].send_signal(signal.SIGTERM)
  return workdir, multihost.finish(processes)


def test_multihost_sigterm_to_one_process_stops_both_at_one_saved_step(stopped):
  workdir, results = stopped
  for rc, _, err in results:
    assert rc == 0, err[-4000:]
  assert "SIGTERM" in results[1][2]
  saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert len(saved) == 1 and 1 <= saved[0] < 4, saved  # checkpoint.every=0: only the stop's.
  assert f"Stopped after step {saved[0]}" in results[0][1]
  steps = [json.loads(line)["step"] for line in open(workdir / "metrics.jsonl")]
  assert steps == list(range(saved[0] + 1))


def test_multihost_workdir_per_process_ends_both_within_a_minute(stopped, tmp_path):
  """Process 0's workdir holds a checkpoint, process 1's (its own local disk) nothing: without
  the check, process 0 would resume while process 1 starts over."""
  workdir, _ = stopped
  start = time.monotonic()
  results = multihost.finish(multihost.start_two([workdir, tmp_path / "local"]), timeout=60)
  assert time.monotonic() - start < 60
  for rc, _, err in results:
    assert rc == 2, err[-4000:]
    assert f"--workdir={workdir} is not shared by the run's 2 processes" in err
    assert "process 1 cannot read the marker" in err and "shared mount" in err
  assert f"was given --workdir={tmp_path / 'local'}" in results[1][2]


def test_multihost_another_package_version_on_one_process_ends_both(tmp_path):
  results = multihost.finish(multihost.start_two([tmp_path, tmp_path],
                                                 fault_in_process_1="software"), timeout=60)
  for rc, _, err in results:
    assert rc == 2, err[-4000:]
    assert "do not run the same software: process 1 differs from process 0" in err
  assert "tokenizers 0.0.1 (process 0: " in results[1][2]


def test_multihost_micro_batch_of_3_on_8_batch_shards_runs_padded(qwen2_dir, monkeypatch,
                                                                   capsys):
  monkeypatch.setattr(roles, "make_task", lambda config: (permissive_task(), "topic"))
  config = tiny_config(qwen2_dir, **{"mesh.data": 2, "mesh.fsdp": 4, "rl.micro_batch_size": 3})
  s, state = selfplay.setup(config)
  err = capsys.readouterr().err
  assert "rl.micro_batch_size=3 is not a multiple of the 8 batch shards" in err
  assert config.rl.micro_batch_size == 8
  batch = batches.training_batch(s, "solver", *_rollout(s, state))
  assert batch["tokens"].shape[0] % 8 == 0
  assert batch["tokens"].sharding.spec[0] == ("data", "fsdp")  # Split, never replicated.
  before = np.asarray(state.params["solver"]["embed_tokens"])
  params, _, metrics = s.roles["solver"].update(state.params["solver"],
                                                state.opt_state["solver"], batch, 0)
  assert np.isfinite(metrics["loss"]) and metrics["skipped_updates"] == 0
  assert 0 < metrics["sequences"] <= 20 < batch["tokens"].shape[0]  # Padding rows never count.
  assert not np.array_equal(before, np.asarray(params["embed_tokens"]))


def test_multihost_micro_batch_or_batch_rule_that_would_replicate_rows_is_refused(qwen2_dir):
  config = tiny_config(qwen2_dir, **{"mesh.data": 2, "mesh.fsdp": 4, "rl.micro_batch_size": 3,
                                     "rl.ppo_mini_batch_size": 12})
  with pytest.raises(sharding.MeshError, match=r"rl.micro_batch_size=3 .* 8 batch shards .*"
                     r"rl.ppo_mini_batch_size=12"):
    roles.fit_micro_batch(config, roles.role_layouts(config))
  config = tiny_config(qwen2_dir, **{"mesh.data": 2, "mesh.fsdp": 4, "mesh.rules.batch": "data"})
  with pytest.raises(sharding.MeshError, match=r"mesh.rules.batch='data' does not split batch "
                     r"rows over mesh axis fsdp \(size 4\).*rules.batch=data,fsdp"):
    roles.check_batch_rule(roles.role_layouts(config))


def _rollout(s, state):
  """A solver batch's inputs: 5 prompts x 4 answers, every row weight 1."""
  n = s.config.rollout.answers_per_question
  prompts = [[1, 2, 3]] * 5
  out = selfplay.decode(s, state, "solver", {}, prompts, jax.random.key(1), max_new_tokens=4,
                        num_samples=n)
  rows = np.arange(5 * n)
  return out, n, rows, np.linspace(-1, 1, 5 * n), np.ones(5 * n), state.params["solver"]
