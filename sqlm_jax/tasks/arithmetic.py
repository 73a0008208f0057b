"""Arithmetic topic: the proposer writes one problem with numbers of up to three digits.

Ground truth (for the pseudo-label monitor only, never a reward) comes from evaluating the
question when it is a bare expression ("What is 487 * 319?"). The expression is model
output, so it is parsed with `ast` and walked over a whitelist of number nodes and + - * / **;
nothing is ever passed to eval().
"""

from __future__ import annotations

import ast
import dataclasses
import random
import re
from fractions import Fraction
from typing import Optional

from sqlm_jax.tasks import math_answers
from sqlm_jax.tasks.base import Proposal, Task

DEFAULT_TOPIC = "Three-digit arithmetic"
MAX_QUESTION_CHARS = 400

# Bounds that keep a hostile expression ("9**9**9", a thousand nested brackets) cheap.
MAX_EXPRESSION_CHARS = 200
MAX_NODES = 60
MAX_POWER = 12
MAX_MAGNITUDE = 10**40

PROPOSER_PROMPT = """Topic: {topic}

Write one new arithmetic problem on this topic. Use whole numbers of at most three digits, and \
pick them so they look random: no repeated digits such as 111 or 222, no round numbers, and no \
two numbers that resemble each other. Do not solve the problem and do not hint at its answer.

Reply with the problem alone inside question tags: <question>your problem</question>"""


def proposer_messages(topic: str) -> list[dict]:
  return [{"role": "user", "content": PROPOSER_PROMPT.format(topic=topic or DEFAULT_TOPIC)}]


# "... = 155353" at the end: the proposer gave the answer away.
_GIVES_ANSWER = re.compile(r"=\s*[-+]?\d[\d,./]*\s*[.?!]?\s*$")


def parse_proposal(text: str) -> Proposal:
  """The question in the last <question> tags; question None if missing, too long or answered."""
  question = math_answers.last_tagged(text, "question")
  if question is None or len(question) > MAX_QUESTION_CHARS:
    return Proposal(question=None)
  if "<answer>" in question.lower() or "\\boxed" in question or _GIVES_ANSWER.search(question):
    return Proposal(question=None)
  return Proposal(question=question)


def solver_messages(proposal: Proposal) -> list[dict]:
  return math_answers.solver_messages(proposal.question)


# Written forms of the operators, rewritten to Python's before parsing.
_WORD_OPERATORS = (
    (r"\\times|\\cdot|×|·|∗", "*"),
    (r"\\div|÷", "/"),
    (r"−|–", "-"),
    (r"\bmultiplied by\b|\btimes\b", "*"),
    (r"\bdivided by\b|\bover\b", "/"),
    (r"\bplus\b", "+"),
    (r"\bminus\b", "-"),
    (r"(?<=\d)\s*x\s*(?=\d)", "*"),  # "487 x 319"
    (r"\^", "**"),
)
_PREFIX = re.compile(
    r"^(?:please\s+)?(?:what\s+is|what's|compute|calculate|evaluate|simplify|work\s+out|"
    r"determine|find|solve)?(?:\s+the\s+(?:value|result)\s+of)?(?:\s+the\s+following)?\s*:?\s*")
_SUFFIX = re.compile(r"\s*(?:=\s*\??)?\s*[?.!]*\s*$")
_EXPRESSION_CHARS = re.compile(r"[\d\s+\-*/().]+")


def expression_of(question: str) -> Optional[str]:
  """The arithmetic expression a question asks for, in Python syntax; None for word problems."""
  text = question.lower().replace("$", "").replace("\\(", "").replace("\\)", "")
  text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)  # 1,234 -> 1234
  for pattern, operator in _WORD_OPERATORS:
    text = re.sub(pattern, operator, text)
  text = _SUFFIX.sub("", _PREFIX.sub("", text.strip(), count=1), count=1)
  if not text or len(text) > MAX_EXPRESSION_CHARS or not _EXPRESSION_CHARS.fullmatch(text):
    return None
  if not re.search(r"\d", text) or not re.search(r"[-+*/]", text):
    return None
  return text


def safe_eval(expression: str) -> Optional[Fraction]:
  """Exact value of an expression of numbers, + - * / ** and brackets; None for anything else.

  Rejects names, calls, attributes and every other node type, exponents above MAX_POWER and
  values above MAX_MAGNITUDE, so a hostile string costs microseconds and runs no code.
  """
  if len(expression) > MAX_EXPRESSION_CHARS:
    return None
  try:
    tree = ast.parse(expression, mode="eval")
  except (SyntaxError, ValueError, RecursionError, MemoryError):
    return None
  if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
    return None
  try:
    return _evaluate(tree.body)
  except (_Unsafe, ZeroDivisionError):
    return None


class _Unsafe(Exception):
  """An expression outside the whitelist or the size bounds."""


def _evaluate(node: ast.AST) -> Fraction:
  if isinstance(node, ast.Constant) and type(node.value) in (int, float):
    value = Fraction(str(node.value))  # str(): 0.1 stays 1/10, not the nearest binary float
  elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
    operand = _evaluate(node.operand)
    value = -operand if isinstance(node.op, ast.USub) else operand
  elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
    value = _power(_evaluate(node.left), _evaluate(node.right))
  elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
    value = _BINARY[type(node.op)](_evaluate(node.left), _evaluate(node.right))
  else:
    raise _Unsafe(type(node).__name__)
  if abs(value.numerator) > MAX_MAGNITUDE or value.denominator > MAX_MAGNITUDE:
    raise _Unsafe("value too large")
  return value


_BINARY = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
}


def _power(base: Fraction, exponent: Fraction) -> Fraction:
  if exponent.denominator != 1 or not 0 <= exponent <= MAX_POWER:
    raise _Unsafe(f"exponent {exponent}")
  if base == 0 and exponent == 0:
    raise ZeroDivisionError("0**0")
  return base ** int(exponent)


def true_answer(proposal: Proposal) -> Optional[str]:
  """Canonical value of the question's expression; None for word problems or unsafe input."""
  if proposal.question is None:
    return None
  expression = expression_of(proposal.question)
  value = safe_eval(expression) if expression is not None else None
  return math_answers.format_number(value) if value is not None else None


def difficulty(proposal: Proposal) -> Optional[float]:
  """Digits of the longest number in the question (3 for "487 * 319"); None if it has none."""
  if proposal.question is None:
    return None
  numbers = re.findall(r"\d+", re.sub(r"(?<=\d),(?=\d{3}\b)", "", proposal.question))
  return float(max(len(number) for number in numbers)) if numbers else None


# The no-proposer baseline's questions: the topic's three operations on two three-digit numbers
# (division is left out: its answers are mostly fractions, unlike the rest of the topic).
GENERATED_OPERATORS = ("+", "-", "*")


def generate_question(rng: random.Random) -> Proposal:
  """"What is a OP b?" with a, b uniform in 100..999 and OP uniform over GENERATED_OPERATORS."""
  a, b = rng.randint(100, 999), rng.randint(100, 999)
  operator = rng.choice(GENERATED_OPERATORS)
  return parse_proposal(f"<question>What is {a} {operator} {b}?</question>")


def _reasked(node: ast.expr) -> Optional[ast.expr]:
  """The top operation re-asked with the same value: a + b -> b + a, a * b -> b * a,
  a - b -> -(b - a), a / b -> (-a) / (-b); None for anything else."""
  if not isinstance(node, ast.BinOp):
    return None
  a, b = node.left, node.right
  if isinstance(node.op, (ast.Add, ast.Mult)):
    return ast.BinOp(b, node.op, a)
  if isinstance(node.op, ast.Sub):
    return ast.UnaryOp(ast.USub(), ast.BinOp(b, ast.Sub(), a))
  if isinstance(node.op, ast.Div):
    return ast.BinOp(ast.UnaryOp(ast.USub(), a), ast.Div(), ast.UnaryOp(ast.USub(), b))
  return None


def paraphrase(proposal: Proposal) -> Proposal:
  """The question re-asked in another form with the same answer (the paraphrase guard): a bare
  expression's top operation rewritten by `_reasked` ("What is 487 * 319?" -> "What is 319 *
  487?"). A word problem, or an expression whose value the rewrite would not keep, is asked
  again unchanged: the guard then compares two independent votes on the same question."""
  expression = expression_of(proposal.question) if proposal.question is not None else None
  value = safe_eval(expression) if expression is not None else None
  if value is None:
    return proposal
  reasked = _reasked(ast.parse(expression, mode="eval").body)
  if reasked is None:
    return proposal
  text = ast.unparse(ast.fix_missing_locations(reasked))
  if safe_eval(text) != value:
    return proposal
  return Proposal(question=f"What is {text}?")


TASK = Task(
    name="arithmetic",
    reward_kind="vote",
    proposer_messages=proposer_messages,
    parse_proposal=parse_proposal,
    solver_messages=solver_messages,
    extract_answer=math_answers.canonical_answer,
    canonical_answer=math_answers.normalize_answer,
    true_answer=true_answer,
    difficulty=difficulty,
    default_topic=DEFAULT_TOPIC,
    generate_question=generate_question,
    paraphrase=paraphrase,
)


# The reference's format (task.proposal_format="reference"), in our words: the proposer is asked
# for a problem without tags, its whole reply is the question, and nothing is malformed.
REFERENCE_PROPOSER_PROMPT = """Write one arithmetic problem on this topic: {topic}. Use numbers \
of up to three digits that look unpredictable and unlike each other. Do not solve it."""


def reference_proposer_messages(topic: str) -> list[dict]:
  return [{"role": "user",
           "content": REFERENCE_PROPOSER_PROMPT.format(topic=topic or DEFAULT_TOPIC)}]


def reference_parse_proposal(text: str) -> Proposal:
  """The whole reply, stripped, is the question (the reference's arithmetic parser)."""
  return Proposal(question=text.strip())


REFERENCE_TASK = dataclasses.replace(
    TASK, proposer_messages=reference_proposer_messages,
    parse_proposal=reference_parse_proposal,
    solver_messages=lambda proposal: math_answers.reference_solver_messages(proposal.question))
