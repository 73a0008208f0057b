"""launch/*.sh: shellcheck-clean, and --dry-run prints the commands without running them."""

import glob
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "launch", "*.sh")))


def test_launch_scripts_pass_shellcheck():
  if shutil.which("shellcheck") is None:
    # CI installs shellcheck (.ci/run), so there a missing one is a broken setup, not a skip.
    if os.environ.get("CI") == "true":
      pytest.fail("shellcheck is not installed, and CI=true: .ci/run installs it")
    pytest.skip("shellcheck is not installed (apt-get install shellcheck); CI runs this check")
  result = subprocess.run(["shellcheck", "-S", "warning", "-x", *SCRIPTS,
                           os.path.join(ROOT, ".ci", "run")],
                          cwd=ROOT, capture_output=True, text=True)
  assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("script,args,expected", [
    ("gpu.sh", ["/ckpt/q", "configs/arithmetic.py", "--config.mesh.fsdp=8"],
     ["sqlm_jax.main --config configs/arithmetic.py --config.model.path=/ckpt/q --dry_run",
      "--config.mesh.fsdp=8"]),
    ("tpu_vm.sh", ["/ckpt/q", "configs/algebra.py"], ["jax\\[tpu\\]", "--dry_run"]),
    ("gpu.sh", ["--workdir=/mnt/run", "/ckpt/q", "configs/arithmetic.py"],
     ["--workdir /mnt/run"]),
    ("gpu_multi.sh", ["--workdir=/mnt/shared/run", "10.0.0.1:1234", "2", "1", "/ckpt/q",
                      "configs/arithmetic.py"],
     ["--workdir /mnt/shared/run", "--config.mesh.coordinator=10.0.0.1:1234 "
      "--config.mesh.num_processes=2 --config.mesh.process_id=1"]),
    ("tpu_pod.sh", ["pod", "us-central2-b", "--workdir=/mnt/shared/run", "/ckpt/q",
                    "configs/arithmetic.py", "--config.seed=2"],
     ["gcloud compute tpus tpu-vm scp", "--worker=all", "gcloud compute tpus tpu-vm ssh pod",
      "--config.mesh.distributed=on\\ --workdir\\ /mnt/shared/run", "--config.seed=2"]),
])
def test_launch_dry_run_prints_and_runs_nothing(tmp_path, script, args, expected):
  # A PATH where python and gcloud would record being called: a dry run calls neither.
  for name in ("python", "gcloud"):
    fake = tmp_path / name
    fake.write_text(f"#!/bin/sh\necho called > {tmp_path}/{name}.called\n")
    fake.chmod(0o755)
  env = dict(os.environ, PATH=f"{tmp_path}:/usr/bin:/bin")
  result = subprocess.run(["bash", os.path.join(ROOT, "launch", script), "--dry-run", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  for text in expected:
    assert text in result.stdout, (text, result.stdout)
  assert not list(tmp_path.glob("*.called"))


def test_launch_script_without_arguments_says_how_to_call_it():
  result = subprocess.run(["bash", os.path.join(ROOT, "launch", "gpu.sh")], cwd=ROOT,
                          capture_output=True, text=True)
  assert result.returncode != 0 and "usage: launch/gpu.sh" in result.stderr


@pytest.mark.parametrize("script,args", [
    ("tpu_pod.sh", ["pod", "us-central2-b", "/ckpt/q", "configs/arithmetic.py"]),
    ("gpu_multi.sh", ["10.0.0.1:1234", "2", "1", "/ckpt/q", "configs/arithmetic.py"]),
])
def test_multi_host_scripts_need_a_shared_workdir(script, args):
  result = subprocess.run(["bash", os.path.join(ROOT, "launch", script), "--dry-run", *args],
                          cwd=ROOT, capture_output=True, text=True)
  assert result.returncode == 2 and not result.stdout
  assert "--workdir=DIR is required" in result.stderr and "shared" in result.stderr
