"""The dashboard redraws from any run's metrics.jsonl."""

import json

from sqlm_jax import plot


def test_dashboard_from_logs(tmp_path):
  records = [{"step": 0, "heldout/greedy_accuracy": 0.3, "heldout/majority_accuracy": 0.4}]
  for step in range(1, 6):
    records.append({"step": step, "solver_reward": 0.5, "proposer_reward": 0.2,
                    "pseudo_label_accuracy": 0.7, "valid_proposal_rate": 0.9,
                    "proposal_duplicate_rate": 0.1, "k_histogram": [0, 1, 2, 3, 4],
                    "difficulty_histogram": {"2": step, "3": 5 - step}})
  records.append({"step": 5, "heldout/greedy_accuracy": 0.5})
  (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
  assert plot.main([str(tmp_path)]) == 0
  png = (tmp_path / "dashboard.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_missing_logs_are_a_clear_error(tmp_path, capsys):
  assert plot.main([str(tmp_path)]) == 2
  assert "metrics.jsonl not found" in capsys.readouterr().err
