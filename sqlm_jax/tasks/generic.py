"""Any free-text topic with a single final answer, e.g. "probability puzzles" or "unit conversion".

No ground truth: the vote is the only signal, so the pseudo-label monitor is blind here.
"""

from __future__ import annotations

from sqlm_jax.tasks import math_answers
from sqlm_jax.tasks.base import Proposal, Task

DEFAULT_TOPIC = "Grade-school math word problems"
MAX_QUESTION_CHARS = 1500

PROPOSER_PROMPT = """Topic: {topic}

Write one new question on this topic. It must have a single correct final answer that can be \
written briefly, such as a number, a fraction or a short expression. Do not give the answer or \
any hint towards it.

Reply with the question alone inside question tags: <question>your question</question>"""


def proposer_messages(topic: str) -> list[dict]:
  return [{"role": "user", "content": PROPOSER_PROMPT.format(topic=topic)}]


def parse_proposal(text: str) -> Proposal:
  """The question in the last <question> tags; question None if missing, too long or answered."""
  question = math_answers.last_tagged(text, "question")
  if question is None or len(question) > MAX_QUESTION_CHARS or "<answer>" in question.lower():
    return Proposal(question=None)
  return Proposal(question=question)


def solver_messages(proposal: Proposal) -> list[dict]:
  return math_answers.solver_messages(proposal.question)


def make_task(topic: str = DEFAULT_TOPIC) -> Task:
  """A vote-rewarded task for `topic`, which proposer_messages also uses when given no topic."""
  if not topic.strip():
    raise ValueError(f"topic must be non-empty text, got {topic!r}; pass e.g. {DEFAULT_TOPIC!r}")
  return Task(
      name="generic",
      reward_kind="vote",
      proposer_messages=lambda text: proposer_messages(text or topic),
      parse_proposal=parse_proposal,
      solver_messages=solver_messages,
      extract_answer=math_answers.canonical_answer,
      canonical_answer=math_answers.normalize_answer,
      default_topic=topic,
  )
