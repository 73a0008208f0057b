"""Linear-equation topic: the proposer writes three word problems and the last one is used.

Asking for three and keeping the last follows the reference setup: the first two act as a
warm-up that makes the selected one less formulaic.

Ground truth (pseudo-label monitor only) exists when the question states its equations
("Solve 3x + 2y = 12 and x - y = 1"): they are cut out of the text token by token, rebuilt
with explicit "*", parsed by sympy with a dictionary of single-letter symbols and no access to
builtins, and solved only if every equation is linear and the solution is unique.
"""

from __future__ import annotations

import dataclasses
import re
from fractions import Fraction
from typing import Optional

import sympy
from sympy.parsing.sympy_parser import auto_number, parse_expr, rationalize

from sqlm_jax.tasks import math_answers
from sqlm_jax.tasks.base import Proposal, Task

DEFAULT_TOPIC = "Linear equations"
MAX_QUESTION_CHARS = 1500
MAX_VARIABLES = 3
MAX_EQUATIONS = 6
MAX_EQUATION_CHARS = 120

PROPOSER_PROMPT = """Topic: {topic}

Write three word problems on this topic. Each must be solved by linear equations in one or two \
unknowns with whole-number coefficients, and each must have exactly one solution (a whole \
number or a fraction). Make the three problems differ from each other. Do not give any \
solution, answer or hint.

Number the problems 1 to 3. The third one is the selected question: write it inside question \
tags, <question>third problem</question>."""


def proposer_messages(topic: str) -> list[dict]:
  return [{"role": "user", "content": PROPOSER_PROMPT.format(topic=topic or DEFAULT_TOPIC)}]


def _selected_question(text: str) -> Optional[str]:
  """The last <question>...</question>, else the paragraph after the last "Selected question:"."""
  question = math_answers.last_tagged(text, "question")
  if question is not None:
    return question
  marker = text.lower().rfind("selected question:")
  if marker < 0:
    return None
  rest = text[marker + len("selected question:"):].strip()
  return rest.split("\n\n")[0].strip() or None


def parse_proposal(text: str) -> Proposal:
  """The selected (last) question; question None if missing, too long or carrying an answer."""
  question = _selected_question(text)
  if question is None or len(question) > MAX_QUESTION_CHARS:
    return Proposal(question=None)
  if "<answer>" in question.lower() or "\\boxed" in question:
    return Proposal(question=None)
  return Proposal(question=question)


def solver_messages(proposal: Proposal) -> list[dict]:
  return math_answers.solver_messages(proposal.question)


# LaTeX and unicode spellings of the operators, rewritten before tokenising.
_REWRITES = (
    (r"\\left|\\right|\$|\\\(|\\\)|\\\[|\\\]", ""),
    (r"\\cdot|\\times|×|·|∗", "*"),
    (r"−|–", "-"),
    (r"\\d?frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))"),
)
# number | word | operator | "=" | whitespace | anything else (punctuation ends an equation).
_TOKEN = re.compile(r"(\d+(?:\.\d+)?)|([A-Za-z]+)|([-+*/^()])|(=)|(\s+)|(.)", re.DOTALL)


def _math_runs(text: str) -> list[list[str]]:
  """Maximal runs of math tokens (numbers, single letters, operators, "="), whitespace dropped.

  A word of two or more letters or a punctuation mark ends a run, so "Solve 2x + 3 = 7, then"
  yields the run for "2x + 3 = 7".
  """
  runs, current = [], []
  for number, word, operator, equals, space, other in _TOKEN.findall(text):
    token = number or operator or equals or (word if len(word) == 1 else "")
    if token:
      current.append(token)
    elif not space:
      runs.append(current)
      current = []
  runs.append(current)
  return [run for run in runs if run]


def _with_explicit_products(tokens: list[str]) -> str:
  """Joins tokens, writing the products sympy would otherwise need implicit parsing for.

  "2x(y+1)" -> "2*x*(y+1)". Two numbers in a row get a space, which sympy rejects.
  """
  out = []
  for token in tokens:
    previous = out[-1] if out else ""
    if previous[:1].isdigit() and token[0].isdigit():
      out.append(" ")
    elif (previous[-1:].isalnum() or previous == ")") and (token[0].isalnum() or token == "("):
      out.append("*")
    out.append("**" if token == "^" else token)
  return "".join(out)


def find_equations(question: str) -> Optional[list[str]]:
  """The equations written in a question as "lhs = rhs" strings; None if one is malformed.

  Runs without "=" are prose (or a lone "a"); runs without a letter ("2 + 3 = 5") state no
  equation about an unknown and are skipped. A side left empty means a word was glued to
  the equation ("2xy = 4", "x = number"), which makes the whole question malformed.
  """
  text = question
  for pattern, replacement in _REWRITES:
    text = re.sub(pattern, replacement, text)
  if re.search(r"[<>≠≤≥]|==", text):
    return None  # inequalities and comparisons are not linear equations
  equations = []
  for run in _math_runs(text):
    if "=" not in run:
      continue
    if run.count("=") != 1 or run[0] == "=" or run[-1] == "=":
      return None  # "xy = 4" or "x = number": prose cut the equation
    if not any(token.isalpha() for token in run):
      continue
    lhs, rhs = run[:run.index("=")], run[run.index("=") + 1:]
    equations.append(f"{_with_explicit_products(lhs)} = {_with_explicit_products(rhs)}")
  return equations


_SAFE_EQUATION = re.compile(r"[0-9A-Za-z.+\-*/() =]+")
_SUSPICIOUS = re.compile(r"_|import|lambda|[A-Za-z]{2}")
_GLOBALS = {
    "Integer": sympy.Integer, "Float": sympy.Float, "Rational": sympy.Rational,
    "__builtins__": {},
}


def _parse_side(side: str, symbols: dict) -> sympy.Expr:
  """sympy expression of one side, with only single-letter symbols and numbers in scope."""
  return parse_expr(side, local_dict=dict(symbols), global_dict=dict(_GLOBALS),
                    transformations=(auto_number, rationalize))


def _linear_system(equations: list[str]):
  """(expressions equal to zero, sorted symbols), or None if unsafe, non-linear or too big."""
  if not equations or len(equations) > MAX_EQUATIONS:
    return None
  for equation in equations:
    if (len(equation) > MAX_EQUATION_CHARS or not _SAFE_EQUATION.fullmatch(equation)
        or _SUSPICIOUS.search(equation)):
      return None
  names = sorted({char for equation in equations for char in equation if char.isalpha()})
  if not names or len(names) > MAX_VARIABLES:
    return None
  symbols = {name: sympy.Symbol(name) for name in names}
  try:
    zeros = [_parse_side(lhs, symbols) - _parse_side(rhs, symbols)
             for lhs, rhs in (equation.split("=") for equation in equations)]
    if any(sympy.Poly(zero, *symbols.values()).total_degree() > 1 for zero in zeros):
      return None
  except (SyntaxError, TypeError, ValueError, ZeroDivisionError, sympy.SympifyError,
          sympy.PolynomialError, RecursionError):
    return None
  return zeros, [symbols[name] for name in names]


def solve_linear(equations: list[str]) -> Optional[dict[str, Fraction]]:
  """The unique rational solution, {"x": 2, "y": 1/3}; None if none, infinitely many or unparseable.
  """
  system = _linear_system(equations)
  if system is None:
    return None
  zeros, symbols = system
  solutions = sympy.linsolve(zeros, symbols)
  if not isinstance(solutions, sympy.FiniteSet) or len(solutions) != 1:
    return None
  (values,) = solutions
  if any(not isinstance(value, sympy.Rational) for value in values):
    return None  # a free parameter remains: infinitely many solutions
  return {str(symbol): Fraction(int(value.p), int(value.q))
          for symbol, value in zip(symbols, values)}


# "What is x?", "find the value of y", "solve for x": the question wants one unknown only.
_ASKS_FOR = re.compile(
    r"(?:what\s+is|find|determine|solve\s+for|value\s+of)\s+(?:the\s+value\s+of\s+)?"
    r"\$?([A-Za-z])\$?(?!\s*(?:and|,|&|\+|-|\*|/|=)\s*\$?[A-Za-z0-9(])", re.IGNORECASE)


def true_answer(proposal: Proposal) -> Optional[str]:
  """Canonical solution of the equations the question states; None without a unique one.

  One unknown (or a question asking for just one, "... What is x?") gives its value, several
  give "x=..,y=..", the same form normalize_answer gives the solver's answer.
  """
  if proposal.question is None:
    return None
  equations = find_equations(proposal.question)
  solution = solve_linear(equations) if equations else None
  if solution is None:
    return None
  asked = set(_ASKS_FOR.findall(proposal.question)) & set(solution)
  if len(solution) > 1 and len(asked) == 1:
    solution = {name: solution[name] for name in asked}
  if len(solution) == 1:
    return math_answers.format_number(next(iter(solution.values())))
  return math_answers.normalize_answer(
      ", ".join(f"{name}={math_answers.format_number(value)}" for name, value in solution.items()))


def difficulty(proposal: Proposal) -> Optional[float]:
  """Number of unknowns in the question's stated equations; None when it states none."""
  equations = find_equations(proposal.question) if proposal.question is not None else None
  if not equations:
    return None
  return float(len({char for equation in equations for char in equation if char.isalpha()}))


# One side of an equation as written: numbers, standalone letters, operators, spaces.
_SIDE = r"(?:\d+(?:\.\d+)?|(?<![A-Za-z])[A-Za-z](?![A-Za-z])|[-+*/^()]|[ \t])+"
_WRITTEN_EQUATION = re.compile(rf"({_SIDE})=({_SIDE})")


def _swap_sides(match: re.Match) -> str:
  lhs, rhs = match.group(1), match.group(2)
  lead = lhs[:len(lhs) - len(lhs.lstrip())]
  trail = rhs[len(rhs.rstrip()):]
  return f"{lead}{rhs.strip()} = {lhs.strip()}{trail}"


def paraphrase(proposal: Proposal) -> Proposal:
  """The question re-asked with every written equation's sides swapped ("3x + 5 = 2x - 7" ->
  "2x - 7 = 3x + 5"): the same unknowns and solution (the paraphrase guard). A question with
  no written equation (a word problem) is asked again unchanged."""
  if proposal.question is None:
    return proposal
  return Proposal(question=_WRITTEN_EQUATION.sub(_swap_sides, proposal.question))


TASK = Task(
    name="algebra",
    reward_kind="vote",
    proposer_messages=proposer_messages,
    parse_proposal=parse_proposal,
    solver_messages=solver_messages,
    extract_answer=math_answers.canonical_answer,
    canonical_answer=math_answers.normalize_answer,
    true_answer=true_answer,
    difficulty=difficulty,
    default_topic=DEFAULT_TOPIC,
    paraphrase=paraphrase,
)


# The reference's format (task.proposal_format="reference"), in our words: three problems, the
# last one repeated after a "Selected Question:" marker.
REFERENCE_PROPOSER_PROMPT = """Topic: {topic}. Write three different, challenging word \
problems solved by linear equations in at most two unknowns, with integer coefficients only, \
each with exactly one solution whose values are integers or fractions. Do not solve them. \
Then choose the last one and write it after the marker, as: Selected Question: <the problem>"""
REFERENCE_MARKER = "Selected Question"


def reference_proposer_messages(topic: str) -> list[dict]:
  return [{"role": "user",
           "content": REFERENCE_PROPOSER_PROMPT.format(topic=topic or DEFAULT_TOPIC)}]


def reference_parse_proposal(text: str) -> Proposal:
  """The text after the last "Selected Question" (case-sensitive, its colon dropped), else the
  whole reply: the reference's algebra parser, which never drops a proposal."""
  question = text.split(REFERENCE_MARKER)[-1] if REFERENCE_MARKER in text else text
  return Proposal(question=question.strip().removeprefix(":").strip())


REFERENCE_TASK = dataclasses.replace(
    TASK, proposer_messages=reference_proposer_messages,
    parse_proposal=reference_parse_proposal,
    solver_messages=lambda proposal: math_answers.reference_solver_messages(proposal.question))
