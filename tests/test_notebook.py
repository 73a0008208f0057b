"""The Colab quickstart executes top to bottom (shortened through its parameters cell)."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The second topic's notebook run is CI's slow step.
@pytest.mark.parametrize("config", ["tiny", pytest.param("tiny_arithmetic", marks=pytest.mark.slow)])
def test_quickstart_notebook_runs(tmp_path, config):
  notebook = nbformat.read(os.path.join(ROOT, "notebooks", "quickstart.ipynb"), as_version=4)
  params = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(params) == 1
  params[0].source += (
      f"\nCONFIG = {config!r}\nSTEPS = 2\nWORKDIR = {str(tmp_path / 'run')!r}\nINSTALL = False\n"
      "OVERRIDES = {'eval.num_examples': 16, 'rollout.prompts_per_step': 4}\n")
  client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": ROOT}})
  client.execute()
  assert (tmp_path / "run" / "dashboard.png").is_file()
  outputs = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code"
                    for o in c.get("outputs", []))
  assert "proposal" in outputs and "question" in outputs
