"""What a topic provides to self-play: prompts, parsing, answer extraction and (optional) truth."""

from __future__ import annotations

import dataclasses
import random
from typing import Callable, Optional

Messages = list[dict]  # chat messages: [{"role": "system"|"user"|"assistant", "content": str}]


@dataclasses.dataclass(frozen=True)
class Proposal:
  """A parsed proposer output. `question` is None when the text could not be parsed (masked)."""

  question: Optional[str]
  # Coding topics: the proposer's unit tests as (stdin, expected stdout) pairs.
  tests: tuple[tuple[str, str], ...] = ()

  @property
  def valid(self) -> bool:
    return self.question is not None


@dataclasses.dataclass(frozen=True)
class Task:
  """A topic for self-play. Plain functions, so a new topic is one small file.

  reward_kind: "vote" (solver reward = agreement with the majority answer) or
  "tests" (solver reward = pass rate on the proposer's tests, run in the sandbox).
  """

  name: str
  reward_kind: str
  proposer_messages: Callable[[str], Messages]  # topic text -> prompt
  parse_proposal: Callable[[str], Proposal]
  solver_messages: Callable[[Proposal], Messages]
  # Solver completion -> canonical answer string (equal strings = same answer); None = invalid.
  extract_answer: Callable[[str], Optional[str]]
  # Ground truth for the pseudo-label monitor (never a reward); None = cannot compute.
  true_answer: Callable[[Proposal], Optional[str]] = lambda proposal: None
  # A number describing how hard a proposal is (e.g. operand digits), for the curriculum plot.
  difficulty: Callable[[Proposal], Optional[float]] = lambda proposal: None
  # A ground-truth answer (held-out sets) -> the canonical form extract_answer produces.
  canonical_answer: Optional[Callable[[str], Optional[str]]] = None
  default_topic: str = ""
  # The task's own question distribution, for the no-proposer baseline (questions drawn here
  # instead of written by the proposer): one Proposal, of the same form parse_proposal returns
  # for proposer output, from a host-side random.Random that the caller seeds. None = the task
  # has none.
  generate_question: Optional[Callable[[random.Random], Proposal]] = None
  # The same question in another form with the same true answer (tiny_addition: "b+a" for
  # "a+b"), for the paraphrase guard (rewards.paraphrase_guard). None = the task has none.
  paraphrase: Optional[Callable[[Proposal], Proposal]] = None
