"""Addition of up to 4-digit numbers in a compact character format, for the tiny CPU models.

A question is two operands zero-padded to WIDTH = 4 digits and written least-significant digit
first, joined by "+": 1234 + 5678 is "4321+8765", and 12 + 7 is "2100+7000". The answer is
the sum zero-padded to 5 digits, also least-significant digit first: 6912 is "21960". With
fixed widths every digit sits at the same place in every problem, and reversed digits let a
decoder write each answer digit right after the operand digits and carry it depends on; in
either's absence a 4-layer model learns multi-digit addition far more slowly.

The whole vocabulary is `CHARS` (13 characters; with <pad> and <eos>, 15 ids):
  proposer prompt    "?"                 -> completion "4321+8765" <eos>
  solver prompt      "4321+8765="        -> completion "21960" <eos>
The proposer moves difficulty with the size of the numbers it writes (1 to 4 significant
digits, `difficulty`). A tiny model knows only this one topic, so the topic text is not part
of the prompt.
"""

from __future__ import annotations

import random
import re
from typing import Optional

from sqlm_jax.tasks.base import Proposal, Task

CHARS = "0123456789+=?"
PROPOSER_MARKER = "?"
ANSWER_MARKER = "="
WIDTH = 4
# Well-formed completions' lengths, eos included: what a config's max_new_tokens needs.
MAX_QUESTION_TOKENS = 2 * WIDTH + 2
MAX_ANSWER_TOKENS = WIDTH + 2
HELDOUT = "addition4"  # the held-out set in this format (sqlm_jax/evals/datasets.py)

DEFAULT_TOPIC = "Multi-digit addition"

_QUESTION = re.compile(rf"(\d{{{WIDTH}}})\+(\d{{{WIDTH}}})")
_ANSWER = re.compile(rf"\d{{1,{WIDTH + 1}}}")


def format_question(a: int, b: int) -> str:
  """a + b as a question: both operands padded to WIDTH digits, least significant first."""
  if not (0 <= a < 10**WIDTH and 0 <= b < 10**WIDTH):
    raise ValueError(f"operands {a} and {b} must be whole numbers of at most {WIDTH} digits.")
  return f"{str(a).zfill(WIDTH)[::-1]}+{str(b).zfill(WIDTH)[::-1]}"


def format_answer(total: int) -> str:
  """The solver's answer: WIDTH + 1 digits, least significant first."""
  if not 0 <= total < 10 ** (WIDTH + 1):
    raise ValueError(f"sum {total} must be a whole number of at most {WIDTH + 1} digits.")
  return str(total).zfill(WIDTH + 1)[::-1]


def operands(question: str) -> Optional[tuple[int, int]]:
  """(a, b) of a well-formed question; None for anything else."""
  match = _QUESTION.fullmatch(question)
  return None if match is None else (int(match.group(1)[::-1]), int(match.group(2)[::-1]))


def proposer_messages(topic: str) -> list[dict]:
  del topic  # A tiny model is pretrained on one topic; the marker alone asks for a question.
  return [{"role": "user", "content": PROPOSER_MARKER}]


def parse_proposal(text: str) -> Proposal:
  """The question if the completion is exactly one well-formed question, else question None.

  Operands not of exactly WIDTH digits are malformed: the solver never saw such a format,
  so its votes on them would say nothing.
  """
  question = text.strip()
  return Proposal(question=question if operands(question) is not None else None)


def solver_messages(proposal: Proposal) -> list[dict]:
  return [{"role": "user", "content": proposal.question + ANSWER_MARKER}]


def extract_answer(text: str) -> Optional[str]:
  """The answer's value in ordinary decimal ("21960" -> "6912"); None unless digits only.

  Leading zeros of the padded form do not make a different answer, so votes count values.
  """
  text = text.strip()
  if not _ANSWER.fullmatch(text):
    return None
  return str(int(text[::-1]))


def true_answer(proposal: Proposal) -> Optional[str]:
  """The exact sum, in extract_answer's form (pseudo-label monitor and held-out checks)."""
  parsed = operands(proposal.question) if proposal.question is not None else None
  return str(parsed[0] + parsed[1]) if parsed is not None else None


def difficulty(proposal: Proposal) -> Optional[float]:
  """Digits of the larger operand (1 to WIDTH): the digits and carries to get right."""
  parsed = operands(proposal.question) if proposal.question is not None else None
  return float(len(str(max(parsed)))) if parsed is not None else None


def _number(rng: random.Random, digits: int) -> int:
  """A number of exactly `digits` digits (0 counts as one digit)."""
  return rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10**digits)


def sample_question(rng: random.Random, digits: int, other_digits: int) -> str:
  """A question whose operands have `digits` and `other_digits` digits, in either order."""
  pair = (_number(rng, digits), _number(rng, other_digits))
  return format_question(*(pair if rng.random() < 0.5 else pair[::-1]))


def generate_question(rng: random.Random) -> Proposal:
  """A question as the proposer would write it: each operand's size uniform in 1 to WIDTH digits.

  A 4 + 4-digit question has 1 chance in WIDTH**2; one that is also in addition4 (1,000 of
  81 million 4 + 4-digit pairs) is too rare to exclude.
  """
  a, b = (rng.randrange(10 ** (d - 1) if d > 1 else 0, 10**d)
          for d in (rng.randint(1, WIDTH), rng.randint(1, WIDTH)))
  return parse_proposal(format_question(a, b))


def paraphrase(proposal: Proposal) -> Proposal:
  """The question with its operands swapped: "b+a" has the answer of "a+b"."""
  a, b = operands(proposal.question)
  return parse_proposal(format_question(b, a))


TASK = Task(
    name="tiny_addition",
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
