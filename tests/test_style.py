"""The lint rules of ruff.toml hold for the whole repository (`ruff check .`)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_check_passes():
  result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, f"ruff check . found problems:\n{result.stdout[-4000:]}"


def test_ruff_check_can_fail(tmp_path):
  """The rules are live: an unused import in a file under the same config is reported."""
  (tmp_path / "ruff.toml").write_text(open(os.path.join(ROOT, "ruff.toml")).read())
  (tmp_path / "bad.py").write_text("import os\n")
  result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1 and "F401" in result.stdout, result.stdout
