"""Starting the tiny default as two real processes (gloo, 4 fake CPU devices each) or one."""

import json
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The tiny default cut to four quick steps, a checkpoint after each; 64 held-out problems.
QUICK = ["--config.total_steps=4", "--config.rollout.prompts_per_step=4",
         "--config.eval.num_examples=64", "--config.eval.num_samples=1", "--config.eval.every=0",
         "--config.log.tensorboard=False", "--config.log.progress_bar=False",
         "--config.checkpoint.every=1", "--config.mesh.data=2", "--config.mesh.fsdp=4"]
VOLATILE = ("time/", "train_tokens_per_s")  # Differ between any two runs.
# Faults injected into one process before it starts the run's main.
FAULTS = {
    # Its tasks extract a wrong answer from every text: host results that differ between
    # processes (as a code sandbox's timeouts can). The run must follow process 0's.
    "answers": """
import dataclasses
from sqlm_jax.loop import roles
make_task = roles.make_task
def falsified(config):
  task, topic = make_task(config)
  return dataclasses.replace(task, extract_answer=lambda text: "12345"), topic
roles.make_task = falsified
""",
    # It reports another tokenizers version, as a worker installed on another day would.
    "software": """
from sqlm_jax.scale import multihost
software = multihost.software
multihost.software = lambda: dict(software(), tokenizers="0.0.1")
""",
}
MAIN = """
from absl import app
from sqlm_jax import main
app.run(main.main, flags_parser=main.parse_flags)
"""


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start(workdir, *args, process_id=None, port=None, fault=None, devices=4):
  """One process of the run (process_id None: a single process with `devices` devices), with
  one of FAULTS injected."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  head = ["-c", FAULTS[fault] + MAIN] if fault else ["-m", "sqlm_jax.main"]
  cluster = [] if process_id is None else [
      f"--config.mesh.coordinator=127.0.0.1:{port}", "--config.mesh.num_processes=2",
      f"--config.mesh.process_id={process_id}"]
  command = [sys.executable, *head, "--config", "configs/tiny.py", f"--workdir={workdir}",
             *QUICK, *cluster, *args]
  return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def start_two(workdirs, *args, fault_in_process_1=None):
  port = free_port()
  return [start(workdirs[i], *args, process_id=i, port=port,
                fault=fault_in_process_1 if i == 1 else None) for i in range(2)]


def finish(processes, timeout=900):
  """[(returncode, stdout, stderr)] of each process."""
  outputs = [p.communicate(timeout=timeout) for p in processes]
  return [(p.returncode, out, err) for p, (out, err) in zip(processes, outputs)]


def wait_for(path, processes, timeout=900):
  """Waits until `path` exists; fails if a process ends first."""
  deadline = time.monotonic() + timeout
  while not os.path.exists(path):
    for p in processes:
      if p.poll() is not None:
        raise AssertionError(f"a process ended (rc {p.returncode}) before {path} appeared: "
                             f"{p.stderr.read()[-3000:]}")
    if time.monotonic() > deadline:
      raise AssertionError(f"{path} did not appear within {timeout} s")
    time.sleep(0.05)


def metrics(workdir):
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in records]
