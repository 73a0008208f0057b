"""Coding topic: the proposer writes an easy stdin/stdout problem plus its unit tests.

Input is one line of integers, so a test is one line: `INPUT ||| OUTPUT`. There is no ground
truth; the solver's reward is the fraction of the proposer's tests its program passes in the
sandbox (`pass_matrix`), and the proposer's reward comes from how that rate spreads.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Optional, Sequence

import numpy as np

from sqlm_jax.tasks.base import Proposal, Task

DEFAULT_TOPIC = "Easy coding problems whose input is a single line of integers"
NUM_TESTS = 5
MAX_QUESTION_CHARS = 3000
MAX_TEST_CHARS = 300  # per side of a test line; long tests are more likely made up than computed

PROPOSER_PROMPT = """Topic: {topic}

Invent one new programming problem on this topic, about as hard as an easy LeetCode problem. \
The program reads its whole input from standard input: a single line of integers separated by \
spaces. It prints its answer to standard output. State the problem completely, including what \
the input means and exactly what to print.

Then give exactly {num_tests} test cases, one per line, each written as the input line, then \
|||, then the exact expected output. Work every expected output out carefully. Do not write a \
solution.

Use this format:
Problem: <problem statement>
Test Cases:
3 1 2 ||| 6
<four more test lines>"""

SOLVER_PROMPT = """Solve this programming problem in Python 3. Your program must read the input \
from standard input and print the answer to standard output, nothing else.

{question}

Reply with the complete program in a single ```python code block."""


def proposer_messages(topic: str) -> list[dict]:
  prompt = PROPOSER_PROMPT.format(topic=topic or DEFAULT_TOPIC, num_tests=NUM_TESTS)
  return [{"role": "user", "content": prompt}]


# "Test Cases:" possibly in markdown ("**Test cases:**", "### Test Cases").
_HEADER = re.compile(r"^[#*_\s]*test\s*cases?[*_\s]*:?[*_\s]*$", re.IGNORECASE | re.MULTILINE)
_PROBLEM_LABEL = re.compile(r"^[#*_\s]*problem(?:\s+statement)?[*_\s]*:[*_\s]*", re.IGNORECASE)
_LIST_MARKER = re.compile(r"^(?:[-*]|\d+[.)])\s+")  # "- 1 2 ||| 3", "1. 1 2 ||| 3"
_INTEGERS = re.compile(r"[-+]?\d+(?:\s+[-+]?\d+)*")


def parse_proposal(text: str, max_tests: int = 0) -> Proposal:
  """Problem statement and tests; question None unless there are exactly NUM_TESTS valid tests
  (max_tests = 0, ours) or, with max_tests > 0 (the reference), at least one, of which the
  first max_tests are kept: the reference scores the first min(#tests, 10).

  The tests are the test lines right after the last "Test Cases:" header (fence lines skipped);
  a line that is not `INTEGERS ||| OUTPUT` ends them.
  """
  headers = list(_HEADER.finditer(text))
  if not headers:
    return Proposal(question=None)
  question = _PROBLEM_LABEL.sub("", text[:headers[-1].start()].strip(), count=1).strip()
  if not question or len(question) > MAX_QUESTION_CHARS:
    return Proposal(question=None)
  tests = []
  for line in text[headers[-1].end():].splitlines():
    line = _LIST_MARKER.sub("", line.strip().strip("`").strip())
    if not line:
      continue
    test = _parse_test(line)
    if test is None:
      break
    tests.append(test)
  if (len(tests) != NUM_TESTS) if not max_tests else not tests:
    return Proposal(question=None)
  return Proposal(question=question, tests=tuple(tests[:max_tests or NUM_TESTS]))


def _parse_test(line: str) -> Optional[tuple[str, str]]:
  """(stdin, expected stdout) from `1 2 3 ||| 6`; None unless the input is a line of integers."""
  parts = line.split("|||")
  if len(parts) != 2:
    return None
  given, expected = (" ".join(part.split()) for part in parts)
  if not _INTEGERS.fullmatch(given) or not expected:
    return None
  if len(given) > MAX_TEST_CHARS or len(expected) > MAX_TEST_CHARS:
    return None
  return given + "\n", expected


def solver_messages(proposal: Proposal) -> list[dict]:
  return [{"role": "user", "content": SOLVER_PROMPT.format(question=proposal.question)}]


# An opening fence naming Python, the body, and a closing fence on its own line.
_PYTHON_BLOCK = re.compile(r"^[ \t]*```[ \t]*(?:python3?|py)[ \t]*\n(.*?)^[ \t]*```",
                           re.IGNORECASE | re.DOTALL | re.MULTILINE)


def extract_answer(completion: str) -> Optional[str]:
  """The program in the last closed ```python block; None if there is none or it is empty.

  An unclosed block (generation cut off by the length limit) does not count: it is a truncated
  program.
  """
  blocks = _PYTHON_BLOCK.findall(completion)
  if not blocks or not blocks[-1].strip():
    return None
  return blocks[-1].strip("\n") + "\n"


def reference_program(completion: str) -> Optional[str]:
  """The program as the reference's sandbox reward takes it: the text after the last
  ```python up to the next fence or the end (an unclosed block counts), else the first plain
  ``` block without its language line; None without a fence or when it is empty."""
  if "```python" in completion:
    program = completion.split("```python")[-1].split("```")[0]
  elif "```" in completion:
    program = completion.split("```")[1]
    first, _, rest = program.partition("\n")
    if rest and first.strip().isalpha():
      program = rest
  else:
    return None
  return program if program.strip() else None


OUTPUT_MATCHES = ("tokens", "newlines")


def output_matches(stdout: str, expected: str, mode: str) -> bool:
  """"tokens" (ours, the sandbox's judge): equal whitespace-separated tokens; "newlines" (the
  reference's): equal after stripping trailing newlines only."""
  if mode == "newlines":
    return stdout.rstrip("\n") == expected.rstrip("\n")
  return stdout.split() == expected.split()


def pass_matrix(proposals: Sequence[Proposal], programs: Sequence[Sequence[Optional[str]]],
                pool, num_tests: Optional[int] = None,
                output_match: str = "tokens") -> tuple[np.ndarray, np.ndarray]:
  """Runs every program against every test of its question in the sandbox pool.

  proposals: [Q] parsed proposals; invalid ones get no runs.
  programs: [Q][N] extracted programs; None (no program) gets no runs.
  pool: a sandbox.SandboxPool.
  num_tests: T, the padded test count (fixed shapes across steps); default max over proposals.
  output_match: how a program's stdout is compared with a test's (`output_matches`).
  Returns passes [Q, N, T] float32 (1.0 = that test passed; 0 for padding, invalid proposals and
  missing programs) and test_mask [Q, T] bool (True = a real test). An answer's pass rate is
  passes.sum(-1) / test_mask.sum(-1)[:, None].
  """
  if len(programs) != len(proposals):
    raise ValueError(f"pass_matrix got {len(proposals)} proposals but programs for "
                     f"{len(programs)} questions; pass one list of N programs per proposal.")
  most = max((len(p.tests) for p in proposals if p.valid), default=0)
  if num_tests is None:
    num_tests = max(most, 1)
  elif most > num_tests:
    raise ValueError(f"a proposal has {most} tests but num_tests={num_tests}; raise num_tests "
                     f"to at least {most} or leave it None.")
  num_answers = max((len(row) for row in programs), default=0)
  passes = np.zeros((len(proposals), num_answers, num_tests), np.float32)
  test_mask = np.zeros((len(proposals), num_tests), bool)

  # Identical samples are common (low temperature, short programs): run each distinct
  # (program, test) once.
  job_index: dict[tuple[str, str, str], int] = {}
  cells = []  # (q, n, t, job, expected)
  for q, (proposal, row) in enumerate(zip(proposals, programs)):
    if not proposal.valid:
      continue
    test_mask[q, :len(proposal.tests)] = True
    for n, program in enumerate(row):
      if program is None:
        continue
      for t, (stdin, expected) in enumerate(proposal.tests):
        # The sandbox judges tokens itself; other comparisons run without an expected output
        # and compare the stdout of a clean exit here.
        job = (program, stdin, expected if output_match == "tokens" else None)
        cells.append((q, n, t, job_index.setdefault(job, len(job_index)), expected))
  results = pool.run(list(job_index)) if job_index else []
  for q, n, t, job, expected in cells:
    result = results[job]
    passes[q, n, t] = float(result.passed and (
        output_match == "tokens" or output_matches(result.stdout, expected, output_match)))
  return passes, test_mask


TASK = Task(
    name="coding",
    reward_kind="tests",
    proposer_messages=proposer_messages,
    parse_proposal=parse_proposal,
    solver_messages=solver_messages,
    extract_answer=extract_answer,
    default_topic=DEFAULT_TOPIC,
)


# The reference's format (task.proposal_format="reference"), in our words: its proposer prompt
# with a worked example of the layout, and its solver prompt: a system message listing
# reasoning actions, then the problem and an instruction to end with one python block.
REFERENCE_PROPOSER_PROMPT = """Write a new programming problem like an easy LeetCode problem, on \
this topic: {topic}.

Requirements:
- The input is one line of integers separated by spaces; the output is one integer or a line \
of integers separated by spaces.
- Give 5 test cases, each on its own line as INPUT_STRING ||| OUTPUT_STRING, with nothing else \
on the line.

Layout to follow:
Problem Description:
Given a list of integers, read it and print <what to print>.

Input:
One line of space-separated integers a_1, a_2, ..., a_n (-1000 <= a_i <= 1000).

Output:
One integer: <what to print>.

Test Cases:
3 -1 4 ||| 6
7 ||| 7
-2 -2 ||| -4
0 5 -5 ||| 0
1 2 3 4 ||| 10
"""

REFERENCE_SOLVER_SYSTEM = """You may use these actions while you reason, in any order and as \
often as you need:

[ASSESS]

[ADVANCE]

[VERIFY]

[SIMPLIFY]

[SYNTHESIZE]

[PIVOT]

[OUTPUT]

Write every action in this layout:

[ACTION NAME]

# first step of the action

# second step of the action

...

Next action: [NEXT ACTION NAME]
"""

REFERENCE_SOLVER_INSTRUCTION = """Solve the problem with a Python program. End your reply with \
the program in
```python
the program
```"""


def reference_proposer_messages(topic: str) -> list[dict]:
  prompt = REFERENCE_PROPOSER_PROMPT.format(topic=topic or DEFAULT_TOPIC)
  return [{"role": "user", "content": prompt}]


def reference_parse_proposal(text: str, max_tests: int = 0) -> Proposal:
  """The reference's coding parser: the problem is the text before the first "Test Cases:",
  every later line holding ||| is a test (input and output stripped); malformed without the
  header or a test. The first max_tests (0 = NUM_TESTS) are kept."""
  if "Test Cases:" not in text:
    return Proposal(question=None)
  problem, tests_text = text.split("Test Cases:", 1)
  tests = []
  for line in tests_text.splitlines():
    if "|||" in line:
      given, expected = line.split("|||", 1)
      tests.append((given.strip() + "\n", expected.strip()))
  if not problem.strip() or not tests:
    return Proposal(question=None)
  return Proposal(question=problem.strip(), tests=tuple(tests[:max_tests or NUM_TESTS]))


def reference_solver_messages(proposal: Proposal) -> list[dict]:
  return [{"role": "system", "content": REFERENCE_SOLVER_SYSTEM},
          {"role": "user", "content": f"{proposal.question}\n\n{REFERENCE_SOLVER_INSTRUCTION}"}]


CODE_EXTRACTIONS = ("closed", "reference")


def make_task(max_tests: int = 0, code_extraction: str = "closed",
              proposal_format: str = "tagged") -> Task:
  """The coding Task with the proposal's test count rule (`parse_proposal`'s max_tests), the
  program extraction ("closed", ours, `extract_answer`; "reference", `reference_program`) and
  the prompts and parser ("tagged", ours; "reference", the reference's)."""
  if code_extraction not in CODE_EXTRACTIONS:
    raise ValueError(f"code extraction {code_extraction!r} is not one of "
                     f"{', '.join(CODE_EXTRACTIONS)}")
  extract = reference_program if code_extraction == "reference" else extract_answer
  if proposal_format == "reference":
    return dataclasses.replace(
        TASK, proposer_messages=reference_proposer_messages,
        parse_proposal=functools.partial(reference_parse_proposal, max_tests=max_tests),
        solver_messages=reference_solver_messages, extract_answer=extract)
  return dataclasses.replace(
      TASK, parse_proposal=functools.partial(parse_proposal, max_tests=max_tests),
      extract_answer=extract)
