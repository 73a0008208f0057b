"""Shared fixtures: tiny random checkpoints saved by transformers (nothing is downloaded)."""

import os
import shutil
import tempfile

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One XLA compilation cache for the whole test run, set before JAX loads: the tests compile the
# same tiny models' programs many times (in the two workers and in every subprocess they start,
# which inherit these variables), and a program compiled once is loaded after that. A run's own
# config.compile_cache_dir still takes precedence inside `sqlm_jax.main`.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="sqlm_jax_test_xla_")
  os.environ["SQLM_JAX_TEST_CACHE_OWNER"] = str(os.getpid())
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402

from tests import tiny  # noqa: E402


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: takes minutes; a run without -m leaves it out, "
                          "CI runs it as its own step (-m slow)")


def pytest_unconfigure(config):
  if os.environ.get("SQLM_JAX_TEST_CACHE_OWNER") == str(os.getpid()):  # The process that made it.
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def pytest_collection_modifyitems(config, items):
  """Without -m, slow tests are deselected (not skipped), so the README's command stays quick."""
  if config.getoption("markexpr"):
    return
  slow = [item for item in items if item.get_closest_marker("slow")]
  if slow:
    config.hook.pytest_deselected(items=slow)
    items[:] = [item for item in items if not item.get_closest_marker("slow")]


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory):
  return tiny.save_random_checkpoint(tmp_path_factory.mktemp("qwen2"), "qwen2")


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
  return tiny.save_random_checkpoint(tmp_path_factory.mktemp("llama"), "llama")
