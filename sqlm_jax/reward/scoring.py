"""From answers to rewards and advantages: the vote (or the tests), the guards, the groups.

Array code over [Q, N] (questions x answers), jitted once per padded shape; the host part only
turns answer texts into ids and programs into pass matrices.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import numpy as np

from sqlm_jax import rl
from sqlm_jax.reward import rewards
from sqlm_jax.rollout.sampling import bucket
from sqlm_jax.tasks.base import Proposal
from sqlm_jax.tasks import math_answers
from sqlm_jax.tasks.math_answers import answer_ids


# The reward shape's constants are static: they come from the config and never change in a run.
@functools.partial(jax.jit, static_argnames=("centre", "width", "eps", "shape", "estimator",
                                             "min_votes", "break_ties", "invalid_votes", "ddof",
                                             "solver_reward", "proposer_min_margin",
                                             "solver_min_margin", "paraphrase_guard"))
def vote_signals(ids, centre, width, eps, *, shape, estimator, min_votes, break_ties,
                 invalid_votes=False, ddof=0, solver_reward="majority", proposer_min_margin=0,
                 solver_min_margin=0, paraphrase_guard="off", paraphrase_agrees=None, key=None):
  """answer ids [Q, N] -> majority id [Q], k [Q], solver reward [Q, N], proposer reward [Q],
  solver advantages [Q, N] (the N answers of a question are one group).

  The margin guard (0 = off): a question whose majority leads the runner-up by fewer than
  proposer_min_margin votes pays the proposer 0, by fewer than solver_min_margin rewards no
  answer. The paraphrase guard: where paraphrase_agrees [Q] is False (the question re-asked in
  another form got another majority), "proposer" pays the proposer 0 and "both" also rewards no
  answer. solver_reward="random" hands each question's rewards to random valid answers (`key`)
  and the advantages follow; the proposer is still paid from the real vote's k, so the control
  changes only what the solver learns from, not the questions it is asked.
  """
  majority_id, k, _ = rewards.majority_vote(ids, invalid_votes)
  solver_r = rewards.solver_reward(ids, min_votes, break_ties, invalid_votes)  # [Q, N]
  proposer_r = rewards.proposer_reward(k, ids.shape[1], shape, centre, width)  # [Q]
  if solver_min_margin > 0:
    solver_r *= rewards.confident_majority(ids, solver_min_margin, invalid_votes)[:, None]
  if proposer_min_margin > 0:
    proposer_r *= rewards.confident_majority(ids, proposer_min_margin, invalid_votes)
  if paraphrase_guard != "off":
    proposer_r *= paraphrase_agrees
  if paraphrase_guard == "both":
    solver_r *= paraphrase_agrees[:, None]
  if solver_reward == "random":
    solver_r = rewards.random_solver_reward(key, solver_r, ids >= 0)
  return majority_id, k, solver_r, proposer_r, rl.group_advantages(solver_r, estimator, eps,
                                                                   ddof=ddof)


@functools.partial(jax.jit, static_argnames=("centre", "width", "eps", "shape", "estimator",
                                             "ddof", "solver_reward"))
def test_signals(passes, test_mask, centre, width, eps, *, shape, estimator, ddof=0,
                 solver_reward="majority", key=None):
  """Test results [Q, N, T] -> solver reward (pass rate) [Q, N], proposer reward [Q], advantages.

  solver_reward="random" shuffles each question's pass rates among its N programs (`key`).
  """
  solver_r = rewards.pass_rate_solver_reward(passes, test_mask)
  proposer_r = rewards.pass_rate_proposer_reward(passes, test_mask, shape, centre, width)
  if solver_reward == "random":
    solver_r = rewards.random_solver_reward(key, solver_r)
  return solver_r, proposer_r, rl.group_advantages(solver_r, estimator, eps, ddof=ddof)


ANSWER_PARSERS = ("lenient", "reference")


def vote_answer(config, task):
  """Solver completion -> the answer it votes with: the task's own canonical answer
  (rewards.answer_parser="lenient") or the reference trainer's integer-only raw string
  ("reference", math topics). Held-out evaluation always grades with the task's own."""
  if config.rewards.answer_parser == "reference":
    return math_answers.reference_answer
  return task.extract_answer


def score(s, questions: list[Proposal], answers: list[list], key: jax.Array,
          paraphrase_answers: Optional[list[list]] = None):
  """Answers -> majority answers [Q], k [Q], solver rewards [Q, N], proposer rewards [Q],
  solver advantages [Q, N] (under GAE the rewards: the critic makes the advantages) and, with
  the paraphrase guard, whether each question's paraphrase got the same majority [Q] (else
  None)."""
  c, n, q = s.config, s.config.rollout.answers_per_question, len(questions)
  gae, agrees = c.rl.advantage_estimator == "gae", None
  shape = dict(shape=c.rewards.proposer_shape, centre=c.rewards.gaussian_centre,
               width=c.rewards.gaussian_width, eps=c.rl.advantage_eps, ddof=c.rl.std_ddof,
               estimator="grpo" if gae else c.rl.advantage_estimator,
               solver_reward=c.rewards.solver_reward, key=key)
  rows = bucket(q, 1)  # Padded question count: the jitted reward code sees few shapes.
  if s.task.reward_kind == "tests":
    from sqlm_jax.tasks.coding import pass_matrix
    passes, test_mask = pass_matrix(questions + [Proposal(None)] * (rows - q),
                                    answers + [[None] * n] * (rows - q), s.sandbox_pool,
                                    output_match=c.sandbox.output_match)
    solver_r, proposer_r, solver_adv = test_signals(passes, test_mask, **shape)
    # Answers passing every test (a random shuffle keeps each question's rewards).
    k = (np.asarray(solver_r) == 1.0).sum(-1)
    majority = [None] * q
  else:
    guard = c.rewards.paraphrase_guard
    if guard != "off":  # One numbering for the answers to a question and to its paraphrase.
      answers_and_paraphrases = [a + b for a, b in zip(answers, paraphrase_answers)]
    else:
      answers_and_paraphrases = answers
    ids = np.full((rows, n if guard == "off" else 2 * n), -1, np.int32)
    ids[:q] = answer_ids(answers_and_paraphrases) if q else ids[:0]
    ids, paraphrase_ids = ids[:, :n], ids[:, n:]
    if guard != "off":
      agrees = np.asarray(rewards.majorities_agree(ids, paraphrase_ids,
                                                   c.rewards.invalid_answers_vote))
    majority_id, k, solver_r, proposer_r, solver_adv = vote_signals(
        ids, min_votes=c.rewards.min_votes, break_ties=c.rewards.break_ties,
        invalid_votes=c.rewards.invalid_answers_vote,
        proposer_min_margin=c.rewards.proposer_min_margin,
        solver_min_margin=c.rewards.solver_min_margin, paraphrase_guard=guard,
        paraphrase_agrees=agrees, **shape)
    majority_id = np.asarray(majority_id)
    majority = [row[list(ids[i]).index(majority_id[i])] if majority_id[i] >= 0 else None
                for i, row in enumerate(answers)]
  k, solver_r, proposer_r, solver_adv = (np.asarray(x)[:q] for x in (k, solver_r, proposer_r,
                                                                      solver_adv))
  return (majority, k, solver_r, proposer_r, (solver_r if gae else solver_adv),
          None if agrees is None else agrees[:q])


def proposer_weights(config, valid: np.ndarray) -> np.ndarray:
  """Each proposal's weight in the proposer's loss [P*M]: 1 for the valid, and for the
  malformed 1 with rewards.train_malformed_proposals (the reference), else 0 (masked)."""
  if config.rewards.train_malformed_proposals:
    return np.ones(len(valid), np.float32)
  return valid.astype(np.float32)


def proposer_advantages(config, proposer_r: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """Proposer rewards [Q] -> advantages over every proposal [P*M], grouped by topic prompt; a
  malformed proposal has reward 0 and is masked (weight 0, out of the statistics) unless
  rewards.train_malformed_proposals; under GAE the rewards themselves."""
  full_r = np.zeros(len(valid), np.float32)
  full_r[valid] = proposer_r
  trained = proposer_weights(config, valid) > 0
  if config.rl.advantage_estimator == "gae":
    return full_r
  groups = (config.rollout.prompts_per_step, config.rollout.proposals_per_prompt)
  return np.asarray(rl.group_advantages(
      full_r.reshape(groups), config.rl.advantage_estimator, config.rl.advantage_eps,
      mask=trained.reshape(groups), ddof=config.rl.std_ddof)).reshape(-1)
