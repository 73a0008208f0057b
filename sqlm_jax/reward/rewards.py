"""Label-free rewards: majority vote for the solver, difficulty shapes for the proposer.

Everything here is array code over a [Q, N] matrix (Q questions, N solver samples each), so
it runs inside `jax.jit` and costs nothing next to sampling. The host maps each parsed answer
to an integer id (equal ids = the same normalised answer, -1 = no parseable answer); the
reward code never sees text.

Shapes of the proposer reward (`PROPOSER_SHAPES`), with k = votes for the majority answer
and p = k / N (or the mean pass rate for coding):
  "sqlm"         1 iff 1 < k < N: the reference code (a lone majority of 1 is not agreement).
  "sqlm_paper"   1 iff 0 < k < N: as the paper states it.
  "rzero"        min(p, 1 - p): R-Zero's uncertainty reward, highest (0.5) at p = 0.5.
  "learnability" 1 - p, and 0 when p == 0: AZR's learnability reward.
  "gaussian"     exp(-(p - centre)^2 / (2 width^2)): a soft band around `centre`.

`SOLVER_REWARDS`: "majority" is the vote above; "random" is the information-free control
(`random_solver_reward`), which keeps each question's rewards but hands them to random answers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PROPOSER_SHAPES = ("sqlm", "sqlm_paper", "rzero", "learnability", "gaussian")

SOLVER_REWARDS = ("majority", "random")

INVALID_ID = -1


def majority_vote(answer_ids, invalid_votes=False):
  """Most frequent valid answer per question.

  Args:
    answer_ids: int [Q, N]; ids >= 0 are answers, -1 (any negative id) is an invalid answer
      (no parseable answer, e.g. the solver ran out of tokens).
    invalid_votes: False (ours): an invalid answer never votes and never wins. True (the
      reference): the invalid answers are one more candidate, "None"; when None has more
      votes than every answer, or ties with the best and was sampled first (the reference's
      Counter.most_common), None wins, and a question won by None has no majority: nobody is
      rewarded and k = 0. For [None, None, a, a]: None wins (k = 0), where without the option
      a wins with k = 2.

  Returns:
    majority_id: int [Q], the winning id, -1 where no answer is valid (or None won).
    k: int [Q], how many of the N answers equal the winning answer (0 where there is none).
    has_majority: bool [Q], k > 0.

  Ties between answers are broken towards the smallest id. If the host assigns ids in order
  of first appearance within a question, that is the tied answer seen first. Use
  `majority_is_tied` to treat ties as "no majority" instead.
  """
  answer_ids = jnp.asarray(answer_ids)
  valid = answer_ids >= 0  # [Q, N]
  # same[q, i, j]: answers i and j of question q are the same valid answer. O(N^2) per
  # question, which is cheaper than a sort for the N (4..64) used in self-play.
  same = (answer_ids[:, :, None] == answer_ids[:, None, :]) & valid[:, :, None]  # [Q, N, N]
  votes = jnp.sum(same, axis=-1, dtype=jnp.int32)  # [Q, N], 0 for invalid answers
  k = jnp.max(votes, axis=-1)  # [Q]
  # Among the answers that reach k votes, the smallest id wins.
  at_max = (votes == k[:, None]) & valid  # [Q, N]
  big = jnp.iinfo(answer_ids.dtype).max
  majority_id = jnp.min(jnp.where(at_max, answer_ids, big), axis=-1)  # [Q]
  if invalid_votes:
    none_votes = jnp.sum(~valid, axis=-1, dtype=jnp.int32)  # [Q]
    first_none = jnp.argmax(~valid, axis=-1)  # [Q]
    first_winner = jnp.argmax(answer_ids == majority_id[:, None], axis=-1)  # [Q]
    none_wins = (none_votes > 0) & ((none_votes > k) | ((none_votes == k) & (first_none <
                                                                            first_winner)))
    k = jnp.where(none_wins, 0, k)
  has_majority = k > 0
  majority_id = jnp.where(has_majority, majority_id, INVALID_ID).astype(answer_ids.dtype)
  return majority_id, k, has_majority


def majority_is_tied(answer_ids, invalid_votes=False):
  """bool [Q]: two or more distinct candidates share the top vote count (with invalid_votes,
  the invalid answers are one candidate)."""
  answer_ids = jnp.asarray(answer_ids)
  valid = answer_ids >= 0
  same = (answer_ids[:, :, None] == answer_ids[:, None, :]) & valid[:, :, None]
  votes = jnp.sum(same, axis=-1, dtype=jnp.int32)  # [Q, N]
  k = jnp.max(votes, axis=-1)  # [Q]
  # Each answer id at the top appears exactly k times among the answers at the top.
  answers_at_max = jnp.sum((votes == k[:, None]) & valid, axis=-1)  # [Q]
  tied = (k > 0) & (answers_at_max > k)
  if invalid_votes:
    tied = tied | ((k > 0) & (jnp.sum(~valid, axis=-1) == k))
  return tied


def vote_margin(answer_ids, invalid_votes=False):
  """int [Q]: the majority's votes minus the runner-up candidate's (0 where there is no majority).

  A label-free confidence of the vote: 0 for a tie, k for a lone answer among invalid ones
  (with invalid_votes, the invalid answers are one candidate, None, that can be runner-up).
  For [0, 0, 0, 1, 1, 2, -1, -1]: k = 3, runner-up 2 -> 1; with invalid_votes also 1.
  """
  answer_ids = jnp.asarray(answer_ids)
  valid = answer_ids >= 0  # [Q, N]
  same = (answer_ids[:, :, None] == answer_ids[:, None, :]) & valid[:, :, None]  # [Q, N, N]
  votes = jnp.sum(same, axis=-1, dtype=jnp.int32)  # [Q, N]
  majority_id, k, has_majority = majority_vote(answer_ids, invalid_votes)
  others = valid & (answer_ids != majority_id[:, None])  # [Q, N]
  runner_up = jnp.max(jnp.where(others, votes, 0), axis=-1)  # [Q]
  if invalid_votes:
    runner_up = jnp.maximum(runner_up, jnp.sum(~valid, axis=-1, dtype=jnp.int32))
  return jnp.where(has_majority, k - runner_up, 0)


def confident_majority(answer_ids, min_margin, invalid_votes=False):
  """bool [Q]: the question has a majority that leads the runner-up by at least `min_margin`
  votes (the guard against paying for, and training on, a low-confidence vote; see
  docs/ablations.md). min_margin=0 keeps every question that has a majority."""
  return (vote_margin(answer_ids, invalid_votes) >= min_margin) & majority_vote(
      answer_ids, invalid_votes)[2]


def majorities_agree(answer_ids, other_ids, invalid_votes=False):
  """bool [Q]: both votes have a majority, and it is the same answer. The ids of a row of the
  two must come from one numbering (math_answers.answer_ids over the two rows joined)."""
  first, _, has_first = majority_vote(answer_ids, invalid_votes)
  second, _, has_second = majority_vote(other_ids, invalid_votes)
  return has_first & has_second & (first == second)


def split_half_agreement(answer_ids):
  """bool [Q]: the majority of the first N // 2 answers equals that of the last N // 2 (both
  exist): the vote's stability across two independent rounds of half the size. For diagnostics."""
  answer_ids = jnp.asarray(answer_ids)
  half = answer_ids.shape[1] // 2
  return majorities_agree(answer_ids[:, :half], answer_ids[:, half:2 * half])


def solver_reward(answer_ids, min_votes=1, break_ties=True, invalid_votes=False):
  """float [Q, N]: 1.0 where the answer is valid and equals the question's majority answer.

  Args:
    answer_ids: int [Q, N], -1 = invalid.
    min_votes: a majority with fewer votes than this rewards nobody. The reference uses 1;
      2 stops an all-different group from rewarding one arbitrary answer.
    break_ties: if False, a question whose top vote count is shared rewards nobody, rather
      than rewarding the smallest tied id.
    invalid_votes: the invalid answers vote as one candidate (see `majority_vote`).
  """
  answer_ids = jnp.asarray(answer_ids)
  majority_id, k, has_majority = majority_vote(answer_ids, invalid_votes)
  rewarded = has_majority & (k >= min_votes)  # [Q]
  if not break_ties:
    rewarded = rewarded & ~majority_is_tied(answer_ids, invalid_votes)
  agrees = (answer_ids == majority_id[:, None]) & (answer_ids >= 0)  # [Q, N]
  return (agrees & rewarded[:, None]).astype(jnp.float32)


def random_solver_reward(key, solver_reward, valid=None):
  """float [Q, N]: each question's rewards shuffled at random among its valid answers.

  The control that says whether the vote carries information: every question keeps exactly its
  rewards (the same number of positives per group, as in the majority reward, so the batch's
  rate and the advantages' scale are unchanged; pass rates keep their values), but which
  answer receives them no longer depends on what the answer says.

  Args:
    key: a jax.random key; the same key gives the same shuffle.
    solver_reward: float [Q, N], the rewards to shuffle (e.g. `solver_reward(answer_ids)`).
    valid: bool [Q, N], answers that may be rewarded (e.g. `answer_ids >= 0`); rewards move
      only between valid answers, so an unparseable answer is never paid, as under the vote.
      None = all answers.
  """
  solver_reward = jnp.asarray(solver_reward)
  q, n = solver_reward.shape
  invalid = (jnp.zeros((q, n), bool) if valid is None else ~jnp.asarray(valid, bool))
  invalid = invalid.astype(jnp.float32)
  # Both orders list the valid answers first: `fixed` by position, `shuffled` at random, so
  # the j-th reward among the valid answers goes to the j-th valid answer of a random order.
  fixed = jnp.argsort(invalid * n + jnp.arange(n), axis=-1)  # [Q, N]
  shuffled = jnp.argsort(invalid * 2.0 + jax.random.uniform(key, (q, n)), axis=-1)  # [Q, N]
  values = jnp.take_along_axis(solver_reward, fixed, axis=-1)  # [Q, N]
  rows = jnp.arange(q)[:, None]
  return jnp.zeros_like(solver_reward).at[rows, shuffled].set(values)


def _check_shape(shape):
  if shape not in PROPOSER_SHAPES:
    raise ValueError(
        f"Unknown proposer reward shape {shape!r}; choose one of {', '.join(PROPOSER_SHAPES)}.")


def _soft_shape(p, shape, centre, width):
  """Proposer reward as a function of the solve rate p in [0, 1] for the non-band shapes."""
  if shape == "rzero":
    return jnp.minimum(p, 1.0 - p)
  if shape == "learnability":
    return jnp.where(p > 0, 1.0 - p, 0.0)
  if shape == "gaussian":
    if width <= 0:
      raise ValueError(f"Gaussian proposer reward needs width > 0, got {width}.")
    return jnp.exp(-jnp.square(p - centre) / (2.0 * width * width))
  raise AssertionError(shape)


def proposer_reward(k, n, shape="sqlm", centre=0.5, width=0.2):
  """float [Q]: how useful each question is as a training question for the current solver.

  Args:
    k: int [Q], votes for the majority answer (from `majority_vote`); 0 = no valid answer.
    n: N, the number of solver samples per question.
    shape: one of PROPOSER_SHAPES (see the module docstring).
    centre, width: the "gaussian" shape's peak and spread in units of p = k / N.
  """
  _check_shape(shape)
  k = jnp.asarray(k)
  if shape == "sqlm":
    return ((k > 1) & (k < n)).astype(jnp.float32)
  if shape == "sqlm_paper":
    return ((k > 0) & (k < n)).astype(jnp.float32)
  p = k.astype(jnp.float32) / n
  return _soft_shape(p, shape, centre, width).astype(jnp.float32)


def pass_rate_solver_reward(passed, test_mask):
  """float [Q, N]: fraction of the question's tests that each program passes.

  Args:
    passed: float [Q, N, T], 1.0 where program n passed test t (0 for a crash or timeout).
    test_mask: [Q, T], 1 for real tests, 0 for padding. A question with no tests gets 0;
      the caller masks such proposals out as malformed.
  """
  passed = jnp.asarray(passed, jnp.float32)
  test_mask = jnp.asarray(test_mask, jnp.float32)
  n_tests = jnp.sum(test_mask, axis=-1)  # [Q]
  n_passed = jnp.einsum("qnt,qt->qn", passed, test_mask)  # [Q, N]
  return n_passed / jnp.maximum(n_tests, 1.0)[:, None]


def pass_rate_proposer_reward(passed, test_mask, shape="sqlm", centre=0.5, width=0.2):
  """float [Q]: the proposer reward shapes applied to p = the mean pass rate over N programs.

  "sqlm" and "sqlm_paper" both mean 0 < p < 1 here: some program fails some test and some
  program passes some test.
  """
  _check_shape(shape)
  p = jnp.mean(pass_rate_solver_reward(passed, test_mask), axis=-1)  # [Q]
  if shape in ("sqlm", "sqlm_paper"):
    return ((p > 0) & (p < 1)).astype(jnp.float32)
  return _soft_shape(p, shape, centre, width).astype(jnp.float32)
