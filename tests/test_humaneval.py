"""HumanEval scoring: the pass@k estimator, and canonical / wrong completions in the sandbox."""

import math

import pytest

from sqlm_jax import humaneval, sandbox


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
