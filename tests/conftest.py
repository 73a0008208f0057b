"""Shared fixtures: tiny random checkpoints saved by transformers (nothing is downloaded)."""

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from tests import tiny  # noqa: E402


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: takes minutes; a run without -m leaves it out, "
                          "CI runs it as its own step (-m slow)")


# The default run's longest tests (a minute or more each on 2 cores). Started first, they share
# the two workers with the short ones instead of running alone at the end; each is independent
# of the tests around it (no module fixtures), so moving it changes nothing it checks.
LONG_FIRST = ("tests/test_sharding.py::test_mesh_suite_on_8_fake_devices",
              "tests/test_selfplay.py::test_selfplay_steps_end_to_end")


def pytest_collection_modifyitems(config, items):
  """Without -m, slow tests are deselected (not skipped), so the README's command stays quick;
  the longest of the rest go first."""
  if not config.getoption("markexpr"):
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
      config.hook.pytest_deselected(items=slow)
      items[:] = [item for item in items if not item.get_closest_marker("slow")]
  items.sort(key=lambda item: not item.nodeid.startswith(LONG_FIRST))  # Stable: order kept.


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory):
  return tiny.save_random_checkpoint(tmp_path_factory.mktemp("qwen2"), "qwen2")


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
  return tiny.save_random_checkpoint(tmp_path_factory.mktemp("llama"), "llama")
