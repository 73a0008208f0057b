"""These tests need 8 devices: `tests/test_sharding.py` runs them in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (8 fake CPU devices); a plain pytest run
without that flag skips collecting them here, so they never run on the wrong device count."""

import os

FLAG = "--xla_force_host_platform_device_count=8"

if FLAG not in os.environ.get("XLA_FLAGS", ""):
  collect_ignore_glob = ["test_*.py"]
else:
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  import pytest  # noqa: E402

  from tests import tiny  # noqa: E402

  @pytest.fixture(scope="session")
  def qwen2_dir(tmp_path_factory):
    return tiny.save_random_checkpoint(tmp_path_factory.mktemp("qwen2"), "qwen2")
