"""Answer handling shared by the math topics: find the final answer, put it in canonical form.

The majority vote compares answers as strings, so everything that means the same number must
become the same string: "0.5", "1/2", "\\frac{1}{2}", "2/4" and "x = 1/2" all become "1/2".
Rationals are kept exact (fractions.Fraction); a float would make "1/3" and "0.333..." differ
by rounding noise instead of by meaning.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Optional, Sequence

import numpy as np

# Appended to every math question; the solver's reasoning stays out of the answer tags, so
# the vote compares final answers only.
SOLVER_FORMAT = (
    "Think it through step by step inside <think></think>. Then write only the final answer "
    "inside <answer></answer>, with no words or units, for example <answer>42</answer>. "
    "If there are several unknowns, write each one, for example <answer>x=2, y=-1/3</answer>."
)

# The reference's solver format (task.proposal_format="reference"), in our words: the
# instruction comes first and the question after it, as the reference trainer builds it.
REFERENCE_SOLVER_FORMAT = (
    "Reason step by step, with the reasoning inside <think> </think> and the final answer "
    "inside <answer> </answer>, that is: <think> your reasoning </think> <answer> the number "
    "</answer>."
)

# Longer numbers are not answers to anything a topic asks; the bound keeps int() cheap.
MAX_NUMBER_CHARS = 60
MAX_EXPONENT = 40


def solver_messages(question: str) -> list[dict]:
  """Chat messages asking the solver to answer `question` in the think/answer format."""
  return [{"role": "user", "content": f"{question}\n\n{SOLVER_FORMAT}"}]


def reference_solver_messages(question: str) -> list[dict]:
  """The solver's prompt in the reference's format: the think/answer instruction, then the
  question."""
  return [{"role": "user", "content": f"{REFERENCE_SOLVER_FORMAT} {question}"}]


def last_tagged(text: str, tag: str) -> Optional[str]:
  """Stripped content of the last closed <tag>...</tag> in `text`; None if absent or empty.

  A tag left open (generation cut off by the length limit) does not count: its content may be
  a truncated number that would vote as if it were an answer.
  """
  matches = re.findall(rf"<{tag}>(.*?)</{tag}>", text, flags=re.DOTALL | re.IGNORECASE)
  if not matches:
    return None
  content = matches[-1].strip()
  return content or None


def _braced(text: str, start: int) -> Optional[str]:
  """Content of the balanced {...} whose "{" is at `start`; None if it never closes."""
  depth = 0
  for i in range(start, len(text)):
    if text[i] == "{":
      depth += 1
    elif text[i] == "}":
      depth -= 1
      if depth == 0:
        return text[start + 1:i]
  return None


def last_boxed(text: str) -> Optional[str]:
  """Content of the last \\boxed{...} (braces balanced); None if absent or cut off."""
  start = text.rfind("\\boxed{")
  if start < 0:
    return None
  content = _braced(text, start + len("\\boxed"))
  if content is None:
    return None
  return content.strip() or None


def extract_answer(text: str) -> Optional[str]:
  """Raw final answer of a solver completion: the last <answer>, else the last \\boxed{}."""
  answer = last_tagged(text, "answer")
  return answer if answer is not None else last_boxed(text)


def format_number(value: Fraction) -> str:
  """Canonical text of a rational: "3", "-1/2" (lowest terms, sign on the numerator)."""
  if value.denominator == 1:
    return str(value.numerator)
  return f"{value.numerator}/{value.denominator}"


_DECIMAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)(e[+-]?\d+)?")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(,\d{3})+(\.\d*)?")
_FRAC = re.compile(r"([+-]?)\\frac\{([^{}]+)\}\{([^{}]+)\}")
_FRAC_SHORT = re.compile(r"([+-]?)\\frac(\d)(\d)")


def parse_number(s: str) -> Optional[Fraction]:
  """Exact value of a written number ("1,000", "-0.50", "3/4", "\\frac{1}{2}", "(5)"), else None."""
  s = s.replace(" ", "").lower()
  if len(s) > MAX_NUMBER_CHARS:
    return None
  s = _unwrap_parens(s)
  if _THOUSANDS.fullmatch(s):
    s = s.replace(",", "")
  if _DECIMAL.fullmatch(s):
    exponent = _DECIMAL.fullmatch(s).group(2)
    if exponent and abs(int(exponent[1:])) > MAX_EXPONENT:
      return None
    return Fraction(s)
  frac = _FRAC.fullmatch(s) or _FRAC_SHORT.fullmatch(s)
  if frac:
    sign, top, bottom = frac.groups()
    return _ratio(parse_number(top), parse_number(bottom), negate=sign == "-")
  if s.count("/") == 1:
    top, bottom = s.split("/")
    return _ratio(parse_number(top), parse_number(bottom))
  return None


def _unwrap_parens(s: str) -> str:
  """Drops parentheses around the whole string: "(5)" -> "5", but "(1)/(2)" stays."""
  while s.startswith("(") and s.endswith(")"):
    depth = 0
    for i, char in enumerate(s):
      depth += {"(": 1, ")": -1}.get(char, 0)
      if depth == 0 and i < len(s) - 1:
        return s
    s = s[1:-1]
  return s


def _ratio(top, bottom, negate=False) -> Optional[Fraction]:
  if top is None or bottom is None or bottom == 0:
    return None
  return -top / bottom if negate else top / bottom


# LaTeX that changes how an answer looks but not what it says.
_LATEX_NOISE = (
    r"\left", r"\right", r"\displaystyle", r"\!", r"\,", r"\;", r"\:", r"\ ", r"^\circ",
    r"^{\circ}", "\\$",
)
_WRAPPERS = re.compile(r"\\(?:boxed|text|textbf|mathrm|mathbf|mbox)\{")


def _strip_markup(s: str) -> str:
  """Removes math delimiters, wrappers like \\boxed{..}/\\text{..} and spacing commands."""
  for noise in _LATEX_NOISE:
    s = s.replace(noise, "")
  s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\%", "%")
  s = s.replace("−", "-")  # unicode minus
  while (match := _WRAPPERS.search(s)) is not None:
    inner = _braced(s, match.end() - 1)
    if inner is None:
      break
    s = s[:match.start()] + inner + s[match.end() + len(inner) + 1:]
  for opener, closer in (("\\(", "\\)"), ("\\[", "\\]"), ("$", "$")):
    if s.startswith(opener) and s.endswith(closer) and len(s) >= len(opener) + len(closer):
      s = s[len(opener):len(s) - len(closer)]
  s = s.replace("$", "").strip()
  return s.rstrip(".").strip()


def _normalize_value(s: str) -> str:
  """One value: the exact rational if it is a number, else a whitespace/case-free string.

  In a chain like "487*319 = 155353" the value is the part after the last "=".
  """
  s = s.split("=")[-1].strip()
  number = parse_number(s)
  if number is not None:
    return format_number(number)
  return "".join(s.split()).lower()


_ASSIGNMENT = re.compile(r"([A-Za-z][A-Za-z0-9_{}]*)\s*=\s*(.+)", flags=re.DOTALL)
_PAIR = re.compile(r"\(\s*([A-Za-z]\w*)\s*,\s*([A-Za-z]\w*)\s*\)\s*=\s*\((.+),(.+)\)")
_SEPARATORS = re.compile(r",|;|\band\b|\\quad|\\qquad")


def _pieces(s: str) -> list[str]:
  """Splits "x=2, y=3" (or "x = 2 and y = 3") into one piece per "="-statement.

  Pieces without "=" are glued back to the previous one, so "x = 1,000" stays one piece.
  """
  pieces: list[str] = []
  for piece in _SEPARATORS.split(s):
    if "=" in piece or not pieces:
      pieces.append(piece)
    else:
      pieces[-1] += "," + piece
  return pieces


def _assignments(pieces: list[str]) -> Optional[dict[str, str]]:
  """{"x": "2", "y": "3"} for the pieces of "x=2, y=3"; None unless each is `name = value` once."""
  values = {}
  for piece in pieces:
    match = _ASSIGNMENT.fullmatch(piece.strip())
    if match is None or match.group(1).lower() in values:
      return None
    values[match.group(1).lower()] = _normalize_value(match.group(2))
  return values


def normalize_answer(s: Optional[str]) -> Optional[str]:
  """Canonical answer string: equal strings are the same answer for the vote; None if empty.

  Numbers become exact rationals in lowest terms ("0.5", "2/4", "\\frac{1}{2}" -> "1/2",
  "1,000" -> "1000", "$5$" -> "5"); a single assignment "x = 3" becomes its value "3"; several
  assignments become "x=2,y=3", sorted by variable; anything else is lower-cased with
  whitespace and LaTeX decoration removed.
  """
  if s is None:
    return None
  s = _strip_markup(s)
  if not s:
    return None
  pair = _PAIR.fullmatch(s)
  if pair:  # "(x, y) = (2, 3)"
    s = f"{pair[1]}={pair[3]},{pair[2]}={pair[4]}"
  if "=" not in s:
    return _normalize_value(s) or None
  pieces = _pieces(s)
  values = _assignments(pieces)
  if values is not None and len(values) > 1:
    return ",".join(f"{name}={value}" for name, value in sorted(values.items()))
  if values is not None:
    return next(iter(values.values())) or None
  if len(pieces) > 1:  # several statements that are not a clean set of assignments
    return "".join(s.split()).lower()
  return _normalize_value(s) or None


# The reference trainer's answer (verl's reward_score/multiply.py, extract_solution): the last
# <answer>...</answer> on one line (no DOTALL), case-sensitive.
_REFERENCE_ANSWER = re.compile(r"<answer>(.*?)</answer>")


def reference_answer(text: str) -> Optional[str]:
  """The reference's vote key: the stripped text of the last single-line <answer>...</answer>,
  kept as written, and only if Python's int() parses it; else None.

  So "042" and "42" are different answers, and "3/2", "1.5", "x=2, y=3", "\\boxed{5}" and
  "1,234" are all None (rewards.answer_parser="reference").
  """
  matches = _REFERENCE_ANSWER.findall(text)
  if not matches:
    return None
  answer = matches[-1].strip()
  try:
    int(answer)
  except ValueError:
    return None
  return answer


def canonical_answer(text: str) -> Optional[str]:
  """Solver completion -> canonical answer (the Task.extract_answer of the math topics)."""
  return normalize_answer(extract_answer(text))


def answer_ids(answers: Sequence[Sequence[Optional[str]]]) -> np.ndarray:
  """int32 [Q, N] ids for the vote: equal canonical strings share an id, None -> -1.

  Ids are given per question in order of first appearance, so a tie goes to the answer
  sampled first (rewards.majority_vote breaks ties towards the smallest id).
  """
  ids = np.full((len(answers), max((len(row) for row in answers), default=0)), -1, np.int32)
  for q, row in enumerate(answers):
    seen: dict[str, int] = {}
    for n, answer in enumerate(row):
      if answer is not None:
        ids[q, n] = seen.setdefault(answer, len(seen))
  return ids
