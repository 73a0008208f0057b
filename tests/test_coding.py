"""Coding topic: parsing proposals and programs, and pass matrices run in the real sandbox."""

import numpy as np
import pytest

from sqlm_jax import sandbox
from sqlm_jax.tasks import coding
from sqlm_jax.tasks.base import Proposal

SUM_PROPOSAL = """Problem: Given a line of integers, print their sum.
Test Cases:
1 2 3 ||| 6
-1 1 ||| 0
5 ||| 5
10 20 30 40 ||| 100
0 0 ||| 0
"""
SUM_TESTS = (("1 2 3\n", "6"), ("-1 1\n", "0"), ("5\n", "5"), ("10 20 30 40\n", "100"),
             ("0 0\n", "0"))

# Markdown header, a fence, numbered lines, extra spaces, and prose after the tests.
MAX_PROPOSAL = """Here is a problem.

Problem statement: Print the largest of the given integers.

**Test Cases:**
```
1.  3 9 2 |||  9
2. -5 -2 ||| -2
3. 7 ||| 7
4. 1 1 1 ||| 1
5. 4 8 ||| 8
```
These cover negative numbers and repeats.
"""
MAX_TESTS = (("3 9 2\n", "9"), ("-5 -2\n", "-2"), ("7\n", "7"), ("1 1 1\n", "1"),
             ("4 8\n", "8"))

SUM = "import sys\nprint(sum(map(int, sys.stdin.read().split())))\n"
MAX = "print(max(map(int, input().split())))\n"
CRASH = "1 / 0\n"


def test_good_proposals_parse_exactly():
  proposal = coding.parse_proposal(SUM_PROPOSAL)
  assert proposal == Proposal("Given a line of integers, print their sum.", SUM_TESTS)
  proposal = coding.parse_proposal(MAX_PROPOSAL)
  # Only a leading "Problem:" label is removed; text before it stays part of the question.
  assert proposal.question == ("Here is a problem.\n\n"
                               "Problem statement: Print the largest of the given integers.")
  assert proposal.tests == MAX_TESTS


@pytest.mark.parametrize("text", [
    SUM_PROPOSAL.replace("Test Cases:", "Examples:"),  # no header
    SUM_PROPOSAL.replace("-1 1 ||| 0", "-1 1 -> 0"),  # a line that is not a test
    SUM_PROPOSAL.replace("5 ||| 5", "five ||| 5"),  # input not integers
    SUM_PROPOSAL.replace("0 0 ||| 0", "0 0 ||| "),  # no expected output
    SUM_PROPOSAL.replace("5 ||| 5", "5 ||| 5 ||| 5"),  # two separators
    SUM_PROPOSAL.replace("0 0 ||| 0\n", ""),  # four tests
    SUM_PROPOSAL + "7 7 ||| 14\n",  # six tests
    SUM_PROPOSAL.replace("Problem: Given a line of integers, print their sum.", "Problem:"),
    "",
])
def test_malformed_proposals_are_invalid(text):
  assert coding.parse_proposal(text) == Proposal(question=None)


def test_extract_answer_takes_the_last_closed_python_block():
  assert coding.extract_answer(f"Idea first.\n```python\n{SUM}```\nDone.") == SUM
  two = f"```python\nprint(0)\n```\nBetter:\n```py\n{MAX}```"
  assert coding.extract_answer(two) == MAX
  assert coding.extract_answer(SUM) is None  # no fence
  assert coding.extract_answer(f"```\n{SUM}```") is None  # fence without python
  assert coding.extract_answer(f"```python\n{SUM}") is None  # cut off before the closing fence
  assert coding.extract_answer("```python\n\n```") is None


def test_solver_messages_carry_the_question_not_the_tests():
  proposal = coding.parse_proposal(SUM_PROPOSAL)
  (message,) = coding.solver_messages(proposal)
  assert proposal.question in message["content"] and "|||" not in message["content"]
  assert "```python" in message["content"]
  assert "|||" in coding.proposer_messages("")[0]["content"]
  assert coding.TASK.reward_kind == "tests" and coding.TASK.name == "coding"


class RecordingPool:
  """Judges jobs by pattern instead of running them, and records what it was asked to run."""

  def __init__(self):
    self.jobs = []

  def run(self, jobs):
    self.jobs += jobs
    results = []
    for program, stdin, expected in jobs:
      numbers = list(map(int, stdin.split()))
      value = {SUM: sum(numbers), MAX: max(numbers)}.get(program)
      status = "crashed" if value is None else ("passed" if str(value) == expected else "failed")
      results.append(sandbox.RunResult(status, 0, "", "", 0.0))
    return results


def test_pass_matrix_bookkeeping_padding_and_deduplication():
  proposals = [coding.parse_proposal(SUM_PROPOSAL), Proposal(None),
               Proposal("two tests", (("1 2\n", "3"), ("4\n", "4")))]
  programs = [[SUM, MAX, SUM, None], [SUM, SUM, SUM, SUM], [MAX, CRASH]]
  pool = RecordingPool()
  passes, mask = coding.pass_matrix(proposals, programs, pool, num_tests=6)
  assert passes.shape == (3, 4, 6) and passes.dtype == np.float32
  expected = np.zeros((3, 4, 6), np.float32)
  expected[0, 0, :5] = expected[0, 2, :5] = 1
  expected[0, 1, :5] = [0, 0, 1, 0, 1]  # max agrees with the sum only on "5" and "0 0"
  expected[2, 0, :2] = [0, 1]
  np.testing.assert_array_equal(passes, expected)
  np.testing.assert_array_equal(mask, [[1] * 5 + [0], [0] * 6, [1, 1, 0, 0, 0, 0]])
  # The duplicate SUM for question 0 runs once; the invalid proposal and None run nothing.
  assert len(pool.jobs) == 5 + 5 + 2 + 2


def test_pass_matrix_default_width_and_errors():
  proposals = [Proposal("q", (("1\n", "1"),) * 3), Proposal(None)]
  passes, mask = coding.pass_matrix(proposals, [[SUM], [SUM]], RecordingPool())
  assert passes.shape == (2, 1, 3) and mask.tolist() == [[True] * 3, [False] * 3]
  passes, mask = coding.pass_matrix([Proposal(None)], [[None]], RecordingPool())
  assert passes.shape == (1, 1, 1) and not mask.any()
  with pytest.raises(ValueError, match="num_tests=2"):
    coding.pass_matrix(proposals, [[SUM], [SUM]], RecordingPool(), num_tests=2)
  with pytest.raises(ValueError, match="1 questions"):
    coding.pass_matrix(proposals, [[SUM]], RecordingPool())


@pytest.mark.skipif(sandbox.isolation._bwrap_problem(sandbox.isolation.BWRAP_PATH) is not None,
                    reason="bubblewrap missing: apt-get install bubblewrap")
def test_pass_matrix_in_the_sandbox_from_completions():
  proposals = [coding.TASK.parse_proposal(SUM_PROPOSAL), coding.TASK.parse_proposal(MAX_PROPOSAL),
               coding.TASK.parse_proposal("Problem: no tests here")]
  completions = [
      [f"```python\n{SUM}```", f"```python\n{MAX}```", f"```python\n{CRASH}```", SUM],
      [f"```python\n{MAX}```", f"```python\n{SUM}```", "no code", f"```python\n{MAX}```"],
      [f"```python\n{SUM}```"] * 4,
  ]
  programs = [[coding.TASK.extract_answer(c) for c in row] for row in completions]
  with sandbox.SandboxPool(limits=sandbox.Limits(timeout_s=3)) as pool:
    passes, mask = coding.pass_matrix(proposals, programs, pool)
  expected = np.zeros((3, 4, 5), np.float32)
  expected[0, 0] = 1
  expected[0, 1] = [0, 0, 1, 0, 1]
  expected[1, 0] = expected[1, 3] = 1
  expected[1, 1] = [0, 0, 1, 0, 0]  # sum agrees with max only on "7"
  np.testing.assert_array_equal(passes, expected)
  np.testing.assert_array_equal(mask, [[True] * 5, [True] * 5, [False] * 5])


# ------------------------------------------------------------------- the reference's reward


def test_reference_program_takes_the_last_python_block_even_unclosed():
  assert coding.reference_program(f"```python\n{SUM}```\n```python\n{MAX}") == f"\n{MAX}"
  assert coding.reference_program(f"text ```python\n{MAX}``` more") == f"\n{MAX}"
  assert coding.reference_program(f"```py\n{MAX}```") == MAX  # a plain fence: language dropped
  assert coding.reference_program(SUM) is None  # no fence: the reference scores 0
  assert coding.reference_program("```python\n  \n```") is None
  # Ours refuses the unclosed (cut-off) block that the reference runs.
  assert coding.extract_answer(f"```python\n{MAX}") is None


def test_output_matches_newlines_strips_only_trailing_newlines():
  assert coding.output_matches("1 2\n\n", "1 2", "newlines")
  assert not coding.output_matches("1  2\n", "1 2", "newlines")  # inner spaces count
  assert not coding.output_matches("1 2 \n", "1 2", "newlines")  # so does a trailing space
  assert coding.output_matches("1  2 \n", "1 2", "tokens")


def test_malformed_test_count_rule_of_the_reference():
  seven = SUM_PROPOSAL + "7 ||| 7\n8 ||| 8\n"
  assert not coding.parse_proposal(seven).valid  # ours: exactly 5 tests
  assert len(coding.parse_proposal(seven, max_tests=10).tests) == 7
  assert len(coding.parse_proposal(seven, max_tests=6).tests) == 6  # the first max_tests
  one = "Problem: Print the number.\nTest Cases:\n4 ||| 4\n"
  assert coding.parse_proposal(one, max_tests=10).tests == (("4\n", "4"),)
  assert not coding.parse_proposal("Problem: no tests", max_tests=10).valid


class StdoutPool:
  """Runs nothing: every job exits cleanly printing the value of its program's expression."""

  def __init__(self):
    self.jobs = []

  def run(self, jobs):
    self.jobs += jobs
    return [sandbox.RunResult("passed" if expected is None else "failed", 0,
                              program.format(*stdin.split()), "", 0.0)
            for program, stdin, expected in jobs]


def test_pass_matrix_newlines_compares_stdout_itself():
  proposal = Proposal("echo", (("1\n", "1"), ("2\n", "2"), ("3\n", "3")))
  programs = [["{0}\n\n", "{0} \n", "x{0}"]]
  pool = StdoutPool()
  passes, _ = coding.pass_matrix([proposal], programs, pool, output_match="newlines")
  np.testing.assert_array_equal(passes[0], [[1, 1, 1], [0, 0, 0], [0, 0, 0]])
  assert all(expected is None for _, _, expected in pool.jobs)


REFERENCE_PROPOSAL = """Problem Description:
Given a list of integers, print the sum of the even ones.

Test Cases:
1 2 3 4 ||| 6
7 ||| 0
  -2 -2   |||   -4
This line has no separator.
a b ||| 0
"""


def test_reference_format_parses_like_the_reference():
  task = coding.make_task(max_tests=10, code_extraction="reference", proposal_format="reference")
  proposal = task.parse_proposal(REFERENCE_PROPOSAL)
  assert proposal.question == ("Problem Description:\nGiven a list of integers, print the sum of "
                               "the even ones.")
  # Every ||| line is a test, stripped, even after prose and with a non-integer input.
  assert proposal.tests == (("1 2 3 4\n", "6"), ("7\n", "0"), ("-2 -2\n", "-4"), ("a b\n", "0"))
  assert len(coding.make_task(max_tests=2, proposal_format="reference").parse_proposal(
      REFERENCE_PROPOSAL).tests) == 2
  # No header or no test line: malformed (the reference's dummy tests score 0).
  assert not task.parse_proposal("Problem Description:\nSum them.").valid
  assert not task.parse_proposal("Sum them.\nTest Cases:\nnone").valid
  system, user = task.solver_messages(proposal)
  assert system["role"] == "system" and "[ASSESS]" in system["content"]
  assert user["content"].startswith(proposal.question) and user["content"].endswith("```")
  assert "Test Cases:" in task.proposer_messages("")[0]["content"]
  assert task.extract_answer(f"```python\n{MAX}") == f"\n{MAX}"
