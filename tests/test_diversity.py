"""Diversity metrics on hand-counted lists."""

import pytest

from sqlm_jax.reward import diversity


def test_distinct_n_hand_counted():
  # bigrams: (a b) (b c) | (a b) (b d): 3 distinct of 4
  assert diversity.distinct_n(["a b c", "a b d"], n=2) == 0.75
  assert diversity.distinct_n(["a b c", "A  B c"], n=1) == 0.5  # case and spacing ignored
  assert diversity.distinct_n(["same words", "same words"], n=2) == 0.5
  assert diversity.distinct_n(["one"], n=2) == 0.0  # no bigram at all
  assert diversity.distinct_n([], n=2) == 0.0
  with pytest.raises(ValueError, match="n must be"):
    diversity.distinct_n(["a b"], n=0)


def test_duplicate_rate_counts_repeats_after_the_first():
  assert diversity.duplicate_rate(["What is 2+2?", "what is  2+2?", "What is 3+3?"]) == 1 / 3
  assert diversity.duplicate_rate(["a", "a", "a", "b"]) == 0.5
  assert diversity.duplicate_rate(["a", "b"]) == 0.0
  assert diversity.duplicate_rate([]) == 0.0


def test_recent_questions_window():
  recent = diversity.RecentQuestions(max_steps=2)
  assert recent.update(["q1", "q2"]) == 0.0
  assert recent.update(["Q1", "q3"]) == 0.5  # q1 seen one step ago
  assert recent.update(["q4"]) == 0.0
  # Steps kept: {q1, q3}, {q4}; {q1, q2} has been forgotten.
  assert recent.overlap_rate(["q2", "q3", "q4", "q5"]) == 0.5
  assert recent.overlap_rate([]) == 0.0


def test_recent_questions_round_trip():
  recent = diversity.RecentQuestions(max_steps=3)
  for step in (["a b", "c"], ["d"], ["e", "a  B"]):
    recent.add(step)
  restored = diversity.RecentQuestions(3, recent.steps())
  assert restored.steps() == recent.steps() == [["a b", "c"], ["d"], ["a b", "e"]]
  assert restored.overlap_rate(["A b", "zz"]) == 0.5
  with pytest.raises(ValueError, match="max_steps"):
    diversity.RecentQuestions(max_steps=0)
