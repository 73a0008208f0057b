"""How varied the proposer's questions are: within a step and against recent steps.

A proposer rewarded for "medium" questions can settle on one question it knows works;
these numbers show that collapse in the logs before the reward curve does.
"""

from __future__ import annotations

import collections
from typing import Iterable, Sequence


def normalize_text(text: str) -> str:
  """Lower case, single spaces: "What is  2+2?" and "what is 2+2?" count as the same question."""
  return " ".join(text.lower().split())


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
  """Distinct n-grams / all n-grams, over whitespace tokens of all texts; 0.0 if there are none."""
  if n < 1:
    raise ValueError(f"n must be a positive n-gram length, got {n}")
  ngrams = [tuple(tokens[i:i + n])
            for tokens in (normalize_text(text).split() for text in texts)
            for i in range(len(tokens) - n + 1)]
  return len(set(ngrams)) / len(ngrams) if ngrams else 0.0


def duplicate_rate(texts: Sequence[str]) -> float:
  """Share of texts equal (after normalize_text) to an earlier text in the list; 0.0 if empty."""
  seen, duplicates = set(), 0
  for text in map(normalize_text, texts):
    duplicates += text in seen
    seen.add(text)
  return duplicates / len(texts) if texts else 0.0


class RecentQuestions:
  """The normalised questions of the last `max_steps` steps, to measure repetition across steps.

  Host-side state: `steps()` / `RecentQuestions(max_steps, steps)` round-trip it through a
  checkpoint so a resumed run reports the same overlap.
  """

  def __init__(self, max_steps: int = 10, steps: Iterable[Iterable[str]] = ()):
    if max_steps < 1:
      raise ValueError(f"max_steps must be at least 1, got {max_steps}")
    self.max_steps = max_steps
    self._steps = collections.deque(
        (frozenset(map(normalize_text, step)) for step in steps), maxlen=max_steps)

  def overlap_rate(self, texts: Sequence[str]) -> float:
    """Share of `texts` already asked in one of the remembered steps; 0.0 if `texts` is empty."""
    if not texts:
      return 0.0
    recent = set().union(*self._steps)
    return sum(normalize_text(text) in recent for text in texts) / len(texts)

  def add(self, texts: Iterable[str]) -> None:
    """Remembers this step's questions, forgetting the oldest step beyond max_steps."""
    self._steps.append(frozenset(map(normalize_text, texts)))

  def update(self, texts: Sequence[str]) -> float:
    """overlap_rate(texts), then add(texts): the one call a training step needs."""
    rate = self.overlap_rate(texts)
    self.add(texts)
    return rate

  def steps(self) -> list[list[str]]:
    """The remembered steps, oldest first, as sorted lists (JSON-friendly)."""
    return [sorted(step) for step in self._steps]
