"""HumanEval scoring: the pass@k estimator, canonical / wrong / early-exit completions in the
sandbox, and the command line."""

import json
import math
import pathlib
import subprocess
import sys

import pytest

from sqlm_jax import humaneval, sandbox

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("n,c,k", [(10, 0, 1), (10, 3, 1), (10, 3, 5), (20, 19, 2), (5, 5, 5),
                                   (200, 7, 100)])
def test_pass_at_k_matches_the_binomial_formula(n, c, k):
  expected = 1 - math.comb(n - c, k) / math.comb(n, k)
  assert humaneval.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_rejects_k_above_the_sample_count():
  with pytest.raises(ValueError, match="pass@3 needs"):
    humaneval.pass_at_k(2, 1, 3)


def test_load_problems_in_task_order():
  problems = humaneval.load_problems(limit=12)
  assert [p["task_id"] for p in problems] == [f"HumanEval/{i}" for i in range(12)]
  assert len(humaneval.load_problems()) == 164


@pytest.mark.skipif(sandbox._bwrap_problem(sandbox.BWRAP_PATH) is not None,
                    reason="bubblewrap missing: apt-get install bubblewrap")
def test_canonical_solutions_score_one_and_wrong_ones_zero():
  problems = humaneval.load_problems(limit=10)
  wrong = "    return None\n"
  with sandbox.SandboxPool(limits=sandbox.Limits(timeout_s=3)) as pool:
    canonical = humaneval.score(problems, [[p["canonical_solution"]] for p in problems], pool)
    assert canonical == {"pass@1": 1.0, "num_problems": 10, "num_samples": 10}
    assert humaneval.score(problems, [[wrong]] * 10, pool)["pass@1"] == 0.0
    # Two samples each, one right: pass@1 = 1/2, pass@2 = 1; a missing sample counts as wrong.
    mixed = [[p["canonical_solution"], wrong] for p in problems[:4]]
    mixed[3][1] = None
    scores = humaneval.score(problems[:4], mixed, pool, ks=(1, 2))
    assert (scores["pass@1"], scores["pass@2"]) == (0.5, 1.0)


EARLY_EXITS = {
    "os._exit(0)": "    import os\n    os._exit(0)\n",
    "raise SystemExit": "    raise SystemExit\n",
    "sys.exit(0)": "    import sys\n    sys.exit(0)\n",
    "self-SIGKILL": "    import os, signal\n    os.kill(os.getpid(), signal.SIGKILL)\n",
}


@pytest.mark.skipif(sandbox._bwrap_problem(sandbox.BWRAP_PATH) is not None,
                    reason="bubblewrap missing: apt-get install bubblewrap")
def test_early_exits_fail_though_some_exit_with_status_zero():
  problem = humaneval.load_problems(limit=1)[0]
  with sandbox.SandboxPool(workers=2, limits=sandbox.Limits(timeout_s=3)) as pool:
    jobs = [humaneval.job(problem, body) for body in EARLY_EXITS.values()]
    assert not any(r.passed for r in pool.run(jobs))
    # Judged on exit status alone (no nonce required), the first three would pass: the nonce is
    # what catches them.
    by_status = pool.run([(program, stdin, None) for program, stdin, _ in jobs])
    assert [r.passed for r in by_status] == [True, True, True, False]
  program, stdin, nonce = humaneval.job(problem, problem["canonical_solution"])
  assert nonce not in program and stdin == nonce + "\n"
  assert humaneval.job(problem, "")[2] != nonce


def test_read_completions_rejects_unknown_tasks_and_missing_keys(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text(json.dumps({"task_id": "HumanEval/999", "completion": ""}) + "\n")
  with pytest.raises(ValueError, match="unknown task_id"):
    humaneval.read_completions(str(path))
  path.write_text(json.dumps({"task_id": "HumanEval/0"}) + "\n")
  with pytest.raises(ValueError, match="needs 'task_id' and 'completion'"):
    humaneval.read_completions(str(path))


@pytest.mark.skipif(sandbox._bwrap_problem(sandbox.BWRAP_PATH) is not None,
                    reason="bubblewrap missing: apt-get install bubblewrap")
def test_cli_scores_canonical_solutions_one_and_early_exits_zero(tmp_path):
  problems = humaneval.load_problems(limit=4)
  rows = [{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in problems]
  rows += [{"task_id": p["task_id"], "completion": "    return None\n"} for p in problems]
  (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  cheats = [{"task_id": p["task_id"], "completion": body}
            for p, body in zip(problems, EARLY_EXITS.values())]
  (tmp_path / "cheats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in cheats))

  def cli(name, *flags):
    out = subprocess.run([sys.executable, "-m", "sqlm_jax.humaneval", "--completions",
                          str(tmp_path / name), "--workers", "2", *flags],
                         capture_output=True, text=True, cwd=REPO, check=True).stdout
    return json.loads(out)

  # Two samples per task, one right: pass@1 = 1/2, pass@2 = 1; pass@10 needs 10 samples a task.
  assert cli("mixed.jsonl", "--k", "1,2,10") == {"pass@1": 0.5, "pass@2": 1.0, "num_problems": 4,
                                                "num_samples": 8}
  assert cli("cheats.jsonl") == {"pass@1": 0.0, "num_problems": 4, "num_samples": 4}
