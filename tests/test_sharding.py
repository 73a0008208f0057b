"""The mesh and its rules, on the one device a plain test run has; the 8-device suite in
tests/mesh/ runs from here in a subprocess with 8 fake CPU devices."""

import os
import subprocess
import sys

import pytest
from jax.sharding import AbstractMesh

from sqlm_jax.scale import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("sizes,devices,expected", [
    ((1, -1, 1), 1, (1, 1, 1)), ((1, -1, 1), 8, (1, 8, 1)), ((2, -1, 1), 8, (2, 4, 1)),
    ((-1, 2, 2), 8, (2, 2, 2)), ((8, 1, 1), 8, (8, 1, 1))])
def test_mesh_shape_fills_the_minus_one(sizes, devices, expected):
  assert sharding.mesh_shape(*sizes, devices) == expected


@pytest.mark.parametrize("sizes,devices", [((2, 2, 1), 8), ((3, -1, 1), 8), ((-1, -1, 1), 8),
                                            ((0, 8, 1), 8)])
def test_mesh_shape_errors_name_the_three_values_and_the_device_count(sizes, devices):
  with pytest.raises(sharding.MeshError) as error:
    sharding.mesh_shape(*sizes, devices)
  message = str(error.value)
  assert f"mesh.data={sizes[0]}, mesh.fsdp={sizes[1]}, mesh.tensor={sizes[2]}" in message
  assert f"{devices} devices" in message and "\n" not in message


def test_rules_map_logical_axes_and_replicate_what_does_not_divide():
  layout = sharding.Layout(AbstractMesh((2, 4, 2), sharding.MESH_AXES))
  assert tuple(layout.spec(("batch", "seq", None), (16, 5, 32))) == (("data", "fsdp"), None, None)
  assert tuple(layout.spec(("layers", "embed", "heads", "head_dim"), (2, 32, 4, 8))) == (
      None, "fsdp", "tensor", None)
  assert tuple(layout.spec(("vocab", "embed"), (15, 32))) == (None, "fsdp")  # 15 % 2 != 0
  assert tuple(layout.spec(("batch",), (4,))) == (None,)  # 4 rows over 8 batch shards
  assert layout.batch_shards == 8


def test_rules_overrides_from_the_config():
  rules = dict(sharding.rules_from_config({"embed": "", "mlp": "fsdp,tensor"}))
  assert rules["embed"] is None and rules["mlp"] == ("fsdp", "tensor")
  with pytest.raises(sharding.MeshError, match="mesh.rules.embed='model'"):
    sharding.rules_from_config({"embed": "model"})


MESH_FILES = sorted(f for f in os.listdir(os.path.join(ROOT, "tests", "mesh"))
                    if f.startswith("test_") and f.endswith(".py"))


def _mesh_runs():
  """One subprocess per file and marker: the file's fast tests in the default run, its tests
  marked slow (two-process runs, kill-and-resume, extra meshes) in CI's slow step."""
  for name in MESH_FILES:
    text = open(os.path.join(ROOT, "tests", "mesh", name)).read()
    whole_file_slow = "pytestmark = pytest.mark.slow" in text
    if not whole_file_slow:
      yield pytest.param(name, "not slow", id=name)
    if whole_file_slow or "pytest.mark.slow" in text:
      yield pytest.param(name, "slow", id=f"{name}-slow", marks=pytest.mark.slow)


@pytest.mark.parametrize("name,markers", list(_mesh_runs()))
def test_mesh_suite_on_8_fake_devices(name, markers):
  """tests/mesh/: forward, sampling and updates on meshes of 8 devices, split roles, two processes.

  One subprocess per file, so that `pytest -n` runs them side by side."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-m", markers, os.path.join("tests", "mesh", name)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=1500)
  assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
  assert " passed" in result.stdout and "skipped" not in result.stdout
