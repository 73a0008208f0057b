"""Addition, subtraction and multiplication by one digit in tiny addition's compact format.

A question is two operands zero-padded to WIDTH = 4 digits and written least-significant digit
first, joined by the operation: 1234 + 5678 is "4321+8765", 1234 - 56 is "4321-6500" and
1234 * 7 is "4321*7000". The answer is the result zero-padded to WIDTH + 1 digits, least
significant first (6912 is "21960"), as in tiny_addition, whose reasons for the format hold here.

A question is well-formed when its result fits that answer: a subtraction's first operand is at
least its second (no negative results), and one factor of a product has a single digit (a
4-digit number times one digit has at most 5). Either factor may be the small one.

The whole vocabulary is `CHARS` (15 characters; with <pad> and <eos>, 17 ids):
  proposer prompt    "?"                 -> completion "4321*7000" <eos>
  solver prompt      "4321*7000="        -> completion "83678" <eos>
The proposer chooses the operation and the operands' sizes (1 to 4 significant digits);
`difficulty` is the larger operand's digits and `operation` says which operation, both read
from the question for monitoring only.
"""

from __future__ import annotations

import random
import re
from typing import Optional

from sqlm_jax.tasks.base import Proposal, Task
# The compact format's markers, widths, prompts and answer reading are tiny addition's.
from sqlm_jax.tasks.tiny_addition import (  # noqa: F401 (re-exported for configs and tests)
    ANSWER_MARKER, MAX_ANSWER_TOKENS, MAX_QUESTION_TOKENS, PROPOSER_MARKER, WIDTH, _number,
    extract_answer, proposer_messages, solver_messages)

CHARS = "0123456789+-*=?"
OPERATIONS = "+-*"
HELDOUT = "arithmetic4"  # the held-out set in this format (sqlm_jax/evals/datasets.py)

DEFAULT_TOPIC = "Multi-digit addition, subtraction and multiplication by one digit"

_QUESTION = re.compile(rf"(\d{{{WIDTH}}})([-+*])(\d{{{WIDTH}}})")


def result(a: int, operation: str, b: int) -> int:
  return {"+": a + b, "-": a - b, "*": a * b}[operation]


def well_formed(a: int, operation: str, b: int) -> bool:
  """Operands of at most WIDTH digits whose result is a whole number of at most WIDTH + 1."""
  if operation not in OPERATIONS or not (0 <= a < 10**WIDTH and 0 <= b < 10**WIDTH):
    return False
  if operation == "*" and min(a, b) >= 10:
    return False
  return 0 <= result(a, operation, b) < 10 ** (WIDTH + 1)


def format_question(a: int, operation: str, b: int) -> str:
  """"a OP b" as a question: both operands padded to WIDTH digits, least significant first."""
  if not well_formed(a, operation, b):
    raise ValueError(f"{a} {operation} {b} is not a question of this topic: operands of at most "
                     f"{WIDTH} digits, an operation of {OPERATIONS!r}, a subtraction's first "
                     "operand at least its second, a product with a one-digit factor.")
  return f"{str(a).zfill(WIDTH)[::-1]}{operation}{str(b).zfill(WIDTH)[::-1]}"


def format_answer(value: int) -> str:
  """The solver's answer: WIDTH + 1 digits, least significant first."""
  if not 0 <= value < 10 ** (WIDTH + 1):
    raise ValueError(f"answer {value} must be a whole number of at most {WIDTH + 1} digits.")
  return str(value).zfill(WIDTH + 1)[::-1]


def parts(question: str) -> Optional[tuple[int, str, int]]:
  """(a, operation, b) of a well-formed question; None for anything else."""
  match = _QUESTION.fullmatch(question)
  if match is None:
    return None
  a, operation, b = int(match.group(1)[::-1]), match.group(2), int(match.group(3)[::-1])
  return (a, operation, b) if well_formed(a, operation, b) else None


def parse_proposal(text: str) -> Proposal:
  """The question if the completion is exactly one well-formed question, else question None."""
  question = text.strip()
  return Proposal(question=question if parts(question) is not None else None)


def _parts(proposal: Proposal) -> Optional[tuple[int, str, int]]:
  return parts(proposal.question) if proposal.question is not None else None


def true_answer(proposal: Proposal) -> Optional[str]:
  """The exact result, in extract_answer's form (pseudo-label monitor and held-out checks)."""
  parsed = _parts(proposal)
  return str(result(*parsed)) if parsed is not None else None


def difficulty(proposal: Proposal) -> Optional[float]:
  """Digits of the larger operand (1 to WIDTH)."""
  parsed = _parts(proposal)
  return float(len(str(max(parsed[0], parsed[2])))) if parsed is not None else None


def operation(proposal: Proposal) -> Optional[str]:
  """"+", "-" or "*"; None for a malformed proposal."""
  parsed = _parts(proposal)
  return parsed[1] if parsed is not None else None


def sample_question(rng: random.Random, digits: int, other_digits: int,
                    operation: Optional[str] = None) -> str:
  """A question whose operands have `digits` and `other_digits` digits (in either order).

  The operation is drawn uniformly unless given. A subtraction puts the larger number first;
  a product's smaller factor always has one digit, whatever `other_digits` says.
  """
  operation = operation or rng.choice(OPERATIONS)
  if operation == "*":
    other_digits = 1
  a, b = _number(rng, digits), _number(rng, other_digits)
  if operation == "-":
    a, b = max(a, b), min(a, b)
  elif rng.random() < 0.5:
    a, b = b, a
  return format_question(a, operation, b)


def generate_question(rng: random.Random) -> Proposal:
  """A question as the proposer would write it: the operation uniform, each operand's size
  uniform in 1 to WIDTH digits (a product's second factor one digit)."""
  return parse_proposal(sample_question(rng, rng.randint(1, WIDTH), rng.randint(1, WIDTH)))


def paraphrase(proposal: Proposal) -> Proposal:
  """The question in another form with the same answer, computed along another path.

  A sum has its operands swapped. A product by an even digit halves it and doubles the other
  factor, 1234 * 6 as 2468 * 3; one by 3 or 4 with an even partner goes the other way, 1234 * 3
  as 617 * 6; one by 0 or 1 is re-asked as its result plus 0; any other (an odd digit above 4
  with an odd partner, or a double that would not fit) has its factors swapped. A subtraction
  has both operands moved by the repunit as long as its first, so that every digit changes:
  1234 - 56 as 2345 - 1167, or (a - 1111) - (b - 1111) when a + 1111 has more than WIDTH
  digits; failing both, by one, (a + 1) - (b + 1) or (a - 1) - (b - 1); 9999 - 0, which fits
  none, is re-asked as 0 + 9999. A solver that is wrong the same way in both orders passes a
  swap, and one wrong in the high digits passes a move by one; re-asked with other digits, it
  has to compute again.
  """
  a, op, b = parts(proposal.question)
  if op == "*":
    digit_first = a < 10  # Which factor is the one-digit one; the re-asked product keeps it there.
    digit, other = (a, b) if digit_first else (b, a)
    if digit in (2, 4, 6, 8) and other > 1 and well_formed(2 * other, "*", digit // 2):
      digit, other = digit // 2, 2 * other
    elif 2 <= digit <= 4 and other % 2 == 0 and other > 1:
      digit, other = 2 * digit, other // 2
    elif digit <= 1:
      return parse_proposal(format_question(digit * other, "+", 0))
    else:
      return parse_proposal(format_question(b, op, a))
    return parse_proposal(format_question(digit, op, other) if digit_first
                          else format_question(other, op, digit))
  if op == "+":
    return parse_proposal(format_question(b, op, a))
  # 1111 for a 4-digit a, so that every digit of both operands moves; else by one.
  for shift in (int("1" * len(str(a))), 1):
    if a + shift < 10**WIDTH:
      return parse_proposal(format_question(a + shift, "-", b + shift))
    if b >= shift:
      return parse_proposal(format_question(a - shift, "-", b - shift))
  return parse_proposal(format_question(b, "+", a))


TASK = Task(
    name="tiny_arithmetic",
    reward_kind="vote",
    proposer_messages=proposer_messages,
    parse_proposal=parse_proposal,
    solver_messages=solver_messages,
    extract_answer=extract_answer,
    true_answer=true_answer,
    difficulty=difficulty,
    default_topic=DEFAULT_TOPIC,
    generate_question=generate_question,
    paraphrase=paraphrase,
)
