"""Shared fixtures: tiny random checkpoints saved by transformers (nothing is downloaded)."""

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from tests import tiny  # noqa: E402


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: takes minutes (CI runs it; -m 'not slow' skips it)")


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory):
  return tiny.save_random_checkpoint(tmp_path_factory.mktemp("qwen2"), "qwen2")


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
  return tiny.save_random_checkpoint(tmp_path_factory.mktemp("llama"), "llama")
