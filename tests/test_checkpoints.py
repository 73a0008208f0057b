"""Whole-run checkpoints: a killed or stopped run resumes to the same bytes, logs every step once,
skips a damaged checkpoint, and refuses a workdir or config that would mix two runs."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sqlm_jax.loop import checkpoints, metrics
from sqlm_jax.config_base import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tiny default cut to six quick steps, checkpoints every 2 (the done-when command).
RUN = ["--config", "configs/tiny.py", "--config.total_steps=6", "--config.checkpoint.every=2",
       "--config.seed=7", "--config.rollout.prompts_per_step=4", "--config.eval.num_examples=32",
       "--config.eval.num_samples=1", "--config.eval.every=0", "--config.log.progress_bar=False"]
VOLATILE = ("time/", "train_tokens_per_s")  # Timings differ between any two runs.


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """A compilation cache shared by the module's runs: only the first one compiles."""
  return dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _start(workdir, env, *extra):
  return subprocess.Popen([sys.executable, "-m", "sqlm_jax.main", *RUN, f"--workdir={workdir}",
                           *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _run(workdir, env, *extra, rc=0):
  process = _start(workdir, env, *extra)
  out, err = process.communicate(timeout=900)
  assert process.returncode == rc, err[-4000:]
  return out, err


def _interrupt_after_step(workdir, env, step, signum):
  """Starts the run, sends `signum` once metrics.jsonl holds `step`; (returncode, seconds, out)."""
  process = _start(workdir, env)
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 600
  while time.time() < deadline:
    if os.path.isfile(path) and any(json.loads(line)["step"] == step
                                    for line in open(path) if line.endswith("\n")):
      break
    assert process.poll() is None, process.stderr.read()[-4000:]
    time.sleep(0.05)
  sent = time.time()
  process.send_signal(signum)
  out, err = process.communicate(timeout=300)
  return process.returncode, time.time() - sent, out + err


def _metrics(workdir):
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in records]


def _export(workdir, out):
  result = subprocess.run([sys.executable, "-m", "sqlm_jax.export", f"--workdir={workdir}",
                           "--role=solver", f"--out={out}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return open(os.path.join(out, "model.safetensors"), "rb").read()


def _event_steps(workdir):
  tb = os.path.join(workdir, "tensorboard")
  return sorted(e.step for name in os.listdir(tb)
                for e in metrics.read_events(os.path.join(tb, name))
                if e.summary.value and e.summary.value[0].tag == "solver_reward")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, env):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  _run(workdir, env)
  return workdir


@pytest.fixture(scope="module")
def killed(tmp_path_factory, env, uninterrupted):
  """SIGKILL after the third step's record, then the same command again."""
  workdir = tmp_path_factory.mktemp("killed")
  returncode, _, _ = _interrupt_after_step(workdir, env, 3, signal.SIGKILL)
  assert returncode == -signal.SIGKILL
  before = sorted(os.listdir(workdir / "checkpoints"))
  out, _ = _run(workdir, env)
  return workdir, before, out


@pytest.mark.slow  # Two more whole runs (killed, then resumed): CI's slow step.
def test_killed_run_resumes_to_the_same_bytes_and_metrics(uninterrupted, killed, tmp_path):
  workdir, before, out = killed
  assert "2" in before and "Resumed from" in out
  assert _export(workdir, tmp_path / "a") == _export(uninterrupted, tmp_path / "b")
  # The export of the newest checkpoint is the run's own end-of-run export.
  assert (tmp_path / "a" / "model.safetensors").read_bytes() == \
      (uninterrupted / "solver" / "model.safetensors").read_bytes()
  resumed, whole = _metrics(workdir), _metrics(uninterrupted)
  assert [r["step"] for r in resumed] == list(range(7))
  assert resumed == whole
  samples = [json.loads(line) for line in open(workdir / "samples.jsonl")]
  assert samples == [json.loads(line) for line in open(uninterrupted / "samples.jsonl")]
  assert _event_steps(workdir) == [1, 2, 3, 4, 5, 6]  # TensorBoard: each step once.
  raw = [json.loads(line) for line in open(workdir / "metrics.jsonl")][1:]
  assert all(r["time/checkpoint"] >= 0 for r in raw)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["4", "6"]  # checkpoint.keep=2


@pytest.mark.slow  # Reads the killed-and-resumed run above.
def test_export_loads_in_transformers_and_passes_check_parity(killed, tmp_path):
  from sqlm_jax import check_parity
  workdir, _, _ = killed
  out = tmp_path / "solver_step4"
  result = subprocess.run([sys.executable, "-m", "sqlm_jax.export", f"--workdir={workdir}",
                           "--role=solver", f"--out={out}", "--step=4"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0 and "solver of step 4" in result.stdout, result.stderr[-3000:]
  assert {"config.json", "model.safetensors", "char_tokenizer.json"} <= set(os.listdir(out))
  # Float32 logits of magnitude ~18 differ between the two frameworks by up to ~1e-4 (the
  # untrained tiny model alone: 7e-5); a wrong weight mapping differs by whole units.
  assert check_parity.main([str(out), "--tolerance=3e-4"]) == 0
  missing = subprocess.run([sys.executable, "-m", "sqlm_jax.export", f"--workdir={workdir}",
                            "--role=solver", f"--out={out}", "--step=3"], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
  assert missing.returncode == 2 and "saved steps: 4, 6" in missing.stderr


@pytest.mark.slow  # A signalled run and its rerun: CI's slow step.
def test_sigterm_stops_cleanly_and_the_rerun_continues(uninterrupted, env, tmp_path):
  workdir = tmp_path / "stopped"
  returncode, seconds, output = _interrupt_after_step(workdir, env, 3, signal.SIGTERM)
  assert returncode == 0, output[-3000:]
  assert seconds < 60
  assert "Stopped after step" in output and "Rerun the same command" in output
  stopped_at = max(r["step"] for r in _metrics(workdir))
  assert str(stopped_at) in os.listdir(workdir / "checkpoints")  # Saved at the step it stopped.
  assert not (workdir / "summary.json").exists()
  # Harmless differences are allowed on resume: checkpoint cadence, logging.
  out, _ = _run(workdir, env, "--config.checkpoint.every=5", "--config.log.samples_per_step=2")
  assert f"at step {stopped_at}" in out
  assert _metrics(workdir) == _metrics(uninterrupted)


def test_a_finished_run_rerun_prints_its_summary(uninterrupted, env):
  before = (uninterrupted / "metrics.jsonl").read_text()
  out, _ = _run(uninterrupted, env)
  assert "finished all 6 steps already" in out and "greedy accuracy" in out
  assert "Memory plan" not in out  # Nothing was loaded.
  assert (uninterrupted / "metrics.jsonl").read_text() == before


def test_meaning_changing_config_is_refused_naming_the_keys(uninterrupted, env):
  _, err = _run(uninterrupted, env, "--config.seed=8", "--config.rollout.answers_per_question=4",
                rc=2)
  line = err.strip().splitlines()[-1]
  assert "rollout.answers_per_question, seed" in line and "checkpoints/6" in line
  assert "--config.overwrite=True" in line


def test_workdir_with_another_runs_logs_is_refused(uninterrupted, env, tmp_path):
  workdir = tmp_path / "other"
  workdir.mkdir()
  for name in ("metrics.jsonl", "config.json"):
    shutil.copy(uninterrupted / name, workdir / name)
  _, err = _run(workdir, env, "--config.seed=8", rc=2)
  line = err.strip().splitlines()[-1]
  assert str(workdir) in line and "seed" in line and "--config.overwrite=True" in line
  assert (workdir / "metrics.jsonl").read_text() == (uninterrupted / "metrics.jsonl").read_text()


# ---- In-process: the pieces ----------------------------------------------------------------------


def _config(**overrides):
  config = load_config(os.path.join(ROOT, "configs", "tiny.py"))
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return checkpoints.flat_config(config)


def test_meaning_differences_allow_what_only_changes_reporting_or_layout():
  base = _config()
  harmless = _config(**{"total_steps": 300, "eval.every": 5, "log.tensorboard": False,
                        "checkpoint.every": 7, "checkpoint.keep": 1, "mesh.data": 2,
                        "mesh.fsdp": 4, "mesh.rules.embed": "", "rl.micro_batch_size": 32,
                        "model.remat": True, "overwrite": True})
  assert checkpoints.meaning_differences(base, harmless) == []
  changed = _config(**{"seed": 1, "model.dtype": "bfloat16", "task.topic": "x",
                       "shared_weights": True, "rollout.answers_per_question": 4,
                       "rewards.min_votes": 1, "rl.learning_rate": 1e-5,
                       "rl.total_steps": 999, "proposer_update_every": 3})
  assert checkpoints.meaning_differences(base, changed) == [
      "model.dtype", "proposer_update_every", "rewards.min_votes", "rl.learning_rate",
      "rl.total_steps", "rollout.answers_per_question", "seed", "shared_weights", "task.topic"]


def _save_two_steps(tmp_path):
  mngr = checkpoints.manager(str(tmp_path), keep=3)
  trees = {}
  for step in (1, 2):
    trees[step] = {"params": {"w": jnp.full((4, 3), float(step))},
                   "opt_state": {"count": jnp.array(step, jnp.int32)}}
    checkpoints.save(mngr, step, trees[step], {"step": step})
  mngr.wait_until_finished()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          trees[1])
  return mngr, abstract


def test_a_truncated_checkpoint_is_skipped_with_a_warning_naming_it(tmp_path, capsys):
  mngr, abstract = _save_two_steps(tmp_path)
  damaged = tmp_path / "checkpoints" / "2"
  for root, _, files in os.walk(damaged / "state"):
    for name in files:
      with open(os.path.join(root, name), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(root, name)) // 2)
  step, arrays, host = checkpoints.restore(mngr, abstract, newest=2)
  assert step == 1 and host == {"step": 1}
  np.testing.assert_array_equal(arrays["params"]["w"], np.full((4, 3), 1.0))
  assert f"skipping damaged checkpoint {damaged}" in capsys.readouterr().err
  # The run passes step 2 again: its save replaces the damaged folder.
  checkpoints.save(mngr, 2, {"params": {"w": jnp.full((4, 3), 5.0)},
                             "opt_state": {"count": jnp.array(2, jnp.int32)}}, {"step": 2})
  mngr.wait_until_finished()
  step, arrays, _ = checkpoints.restore(mngr, abstract, newest=2)
  assert step == 2 and float(arrays["params"]["w"][0, 0]) == 5.0
  mngr.close()


def test_a_folder_cut_off_mid_write_is_not_a_checkpoint(tmp_path):
  """What kill -9 during a save leaves: orbax's temporary folder, never listed as a step."""
  mngr, abstract = _save_two_steps(tmp_path)
  mngr.close()
  partial = tmp_path / "checkpoints" / f"3{'.orbax-checkpoint-tmp'}-1234"
  shutil.copytree(tmp_path / "checkpoints" / "2", partial)
  mngr = checkpoints.manager(str(tmp_path), read_only=True)
  assert sorted(mngr.all_steps()) == [1, 2]
  assert checkpoints.restore(mngr, abstract, newest=10)[0] == 2


def test_log_truncation_keeps_each_step_once(tmp_path):
  writer = metrics.MetricsWriter(str(tmp_path))
  for step in range(5):
    writer.write(step, {"loss": float(step)})
    writer.write_samples(step, [{"text": str(step)}])
  writer.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 5, "lo')  # Cut off mid-write.
  writer = metrics.MetricsWriter(str(tmp_path), resume_from=2)
  writer.write(3, {"loss": 30.0})
  writer.close()
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [(r["step"], r["loss"]) for r in records] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 30.0)]
  assert [json.loads(line)["step"] for line in open(tmp_path / "samples.jsonl")] == [0, 1, 2]
  tb = tmp_path / "tensorboard"
  scalars = sorted((e.step, e.summary.value[0].simple_value) for name in os.listdir(tb)
                   for e in metrics.read_events(str(tb / name)) if e.summary.value)
  assert scalars == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 30.0)]


def test_workdir_check_and_overwrite(tmp_path):
  config = load_config(os.path.join(ROOT, "configs", "tiny.py"))
  checkpoints.check_workdir(str(tmp_path), config)  # Empty: nothing to refuse.
  (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n')
  with pytest.raises(checkpoints.ResumeError, match="no config.json"):
    checkpoints.check_workdir(str(tmp_path), config)
  (tmp_path / "config.json").write_text(config.to_json_best_effort())
  checkpoints.check_workdir(str(tmp_path), config)  # The same run, stopped before a checkpoint:
  assert not (tmp_path / "metrics.jsonl").exists()  # it starts over.
  (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n')
  (tmp_path / "checkpoints" / "4").mkdir(parents=True)
  (tmp_path / "notes.txt").write_text("mine")
  checkpoints.clear(str(tmp_path))  # --config.overwrite=True
  assert sorted(os.listdir(tmp_path)) == ["notes.txt"]
