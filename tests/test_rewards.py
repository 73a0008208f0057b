"""Hand-worked cases for the majority vote, proposer shapes and pass-rate rewards."""

import jax
import numpy as np
import pytest

from sqlm_jax.reward import rewards


def test_majority_vote_hand_cases():
  answer_ids = np.array([
      [3, 3, 3, 3],  # unanimous
      [5, 2, 5, 2],  # tie between 5 and 2: smallest id wins
      [-1, -1, -1, -1],  # all invalid
      [-1, 4, 4, -1],  # mixed invalid: invalid answers never vote
      [0, 1, 2, 3],  # all different: tie of four, smallest id
      [-1, -1, -1, 7],  # one valid answer
      [1, 0, 0, 1],  # tie where the larger id was seen first
  ])
  majority_id, k, has_majority = jax.jit(rewards.majority_vote)(answer_ids)
  np.testing.assert_array_equal(majority_id, [3, 2, -1, 4, 0, 7, 0])
  np.testing.assert_array_equal(k, [4, 2, 0, 2, 1, 1, 2])
  np.testing.assert_array_equal(has_majority, [True, True, False, True, True, True, True])
  np.testing.assert_array_equal(
      rewards.majority_is_tied(answer_ids), [False, True, False, False, True, False, True])


def test_invalid_majority_never_wins():
  # Three invalid answers outnumber the two valid ones; the valid answer still wins.
  majority_id, k, _ = rewards.majority_vote(np.array([[-1, -1, -1, 9, 9]]))
  assert int(majority_id[0]) == 9 and int(k[0]) == 2


def test_n_equals_one():
  answer_ids = np.array([[4], [-1]])
  majority_id, k, has_majority = rewards.majority_vote(answer_ids)
  np.testing.assert_array_equal(majority_id, [4, -1])
  np.testing.assert_array_equal(k, [1, 0])
  np.testing.assert_array_equal(has_majority, [True, False])
  np.testing.assert_array_equal(rewards.solver_reward(answer_ids), [[1.0], [0.0]])
  # With N = 1 no band shape can reward a question: k is 0 or N.
  np.testing.assert_array_equal(rewards.proposer_reward(k, 1, "sqlm_paper"), [0.0, 0.0])


def test_solver_reward():
  answer_ids = np.array([
      [3, 3, 1, -1],
      [5, 2, 5, 2],
      [-1, -1, -1, -1],
      [0, 1, 2, 3],
  ])
  np.testing.assert_array_equal(
      jax.jit(rewards.solver_reward)(answer_ids),
      [[1, 1, 0, 0], [0, 1, 0, 1], [0, 0, 0, 0], [1, 0, 0, 0]])
  # min_votes=2: the all-different group rewards nobody.
  np.testing.assert_array_equal(
      rewards.solver_reward(answer_ids, min_votes=2),
      [[1, 1, 0, 0], [0, 1, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0]])
  # break_ties=False: tied groups reward nobody.
  np.testing.assert_array_equal(
      rewards.solver_reward(answer_ids, break_ties=False),
      [[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])


K = np.array([0, 1, 2, 3, 4])  # N = 4


@pytest.mark.parametrize("shape, expected", [
    ("sqlm", [0, 0, 1, 1, 0]),
    ("sqlm_paper", [0, 1, 1, 1, 0]),
    ("rzero", [0, 0.25, 0.5, 0.25, 0]),
    ("learnability", [0, 0.75, 0.5, 0.25, 0]),
    ("gaussian", np.exp(-np.square(K / 4 - 0.5) / (2 * 0.2**2))),
])
def test_proposer_shapes(shape, expected):
  got = rewards.proposer_reward(K, 4, shape)
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_gaussian_centre_width():
  got = rewards.proposer_reward(np.array([1, 3]), 4, "gaussian", centre=0.25, width=0.5)
  np.testing.assert_allclose(got, [1.0, np.exp(-0.25 / 0.5)], rtol=1e-6)


def test_proposer_shape_under_jit():
  fn = jax.jit(rewards.proposer_reward, static_argnames=("n", "shape"))
  np.testing.assert_array_equal(fn(K, n=4, shape="sqlm"), [0, 0, 1, 1, 0])


def test_unknown_shape_names_it_and_the_choices():
  with pytest.raises(ValueError, match="'band'.*sqlm_paper.*gaussian"):
    rewards.proposer_reward(K, 4, "band")
  with pytest.raises(ValueError, match="'band'"):
    rewards.pass_rate_proposer_reward(np.zeros((1, 1, 1)), np.ones((1, 1)), "band")


def _coding_case():
  # Q = 3 questions, N = 2 programs, T = 3 test slots; question 0 has only 2 real tests.
  test_mask = np.array([[1, 1, 0], [1, 1, 1], [1, 1, 1]], np.float32)
  passed = np.array([
      [[1, 0, 1], [1, 1, 1]],  # the passed masked test must not count
      [[1, 1, 1], [1, 1, 1]],  # everything passes
      [[0, 0, 0], [0, 0, 0]],  # nothing passes
  ], np.float32)
  return passed, test_mask


def test_pass_rate_solver_reward():
  passed, test_mask = _coding_case()
  np.testing.assert_allclose(
      jax.jit(rewards.pass_rate_solver_reward)(passed, test_mask),
      [[0.5, 1.0], [1.0, 1.0], [0.0, 0.0]])


def test_pass_rate_solver_reward_no_tests():
  np.testing.assert_array_equal(
      rewards.pass_rate_solver_reward(np.ones((1, 2, 2)), np.zeros((1, 2))), [[0.0, 0.0]])


@pytest.mark.parametrize("shape, expected", [
    ("sqlm", [1, 0, 0]),
    ("sqlm_paper", [1, 0, 0]),
    ("rzero", [0.25, 0, 0]),
    ("learnability", [0.25, 0, 0]),
    ("gaussian", [np.exp(-0.0625 / 0.08), np.exp(-0.25 / 0.08), np.exp(-0.25 / 0.08)]),
])
def test_pass_rate_proposer_reward(shape, expected):
  passed, test_mask = _coding_case()  # mean pass rates p = [0.75, 1, 0]
  got = rewards.pass_rate_proposer_reward(passed, test_mask, shape)
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_random_solver_reward_keeps_each_groups_rewards_on_valid_answers():
  answer_ids = np.array([
      [3, 3, 1, -1, 3, 2],
      [5, 2, 5, 2, -1, -1],
      [-1, -1, -1, -1, -1, -1],
      [0, 0, 0, 0, 0, 0],
  ])
  majority = rewards.solver_reward(answer_ids)
  valid = answer_ids >= 0
  shuffle = jax.jit(rewards.random_solver_reward)
  seen = set()
  for seed in range(20):
    got = np.asarray(shuffle(jax.random.key(seed), majority, valid))
    np.testing.assert_array_equal(np.sort(got, axis=-1), np.sort(majority, axis=-1))
    assert not np.any(got[~valid])
    seen.add(got.tobytes())
  assert len(seen) > 5  # the answers rewarded change with the key
  np.testing.assert_array_equal(shuffle(jax.random.key(3), majority, valid),
                                shuffle(jax.random.key(3), majority, valid))


def test_random_solver_reward_is_blind_to_the_answers():
  """Over many draws every valid answer is paid equally often: the majority's are not favoured."""
  answer_ids = np.array([[7, 7, 7, 1, 2, -1, 3, -1]])  # majority 7: three of six valid answers
  majority = np.asarray(rewards.solver_reward(answer_ids))
  keys = jax.random.split(jax.random.key(0), 3000)
  draws = jax.vmap(lambda k: rewards.random_solver_reward(k, majority, answer_ids >= 0))(keys)
  rate = np.asarray(draws).mean(axis=(0, 1))  # [N]
  np.testing.assert_allclose(rate[answer_ids[0] >= 0], 3 / 6, atol=0.04)
  np.testing.assert_array_equal(rate[answer_ids[0] < 0], 0.0)


def test_random_solver_reward_keeps_pass_rates_and_defaults_to_all_answers():
  pass_rates = np.array([[0.5, 1.0, 0.0, 0.25]], np.float32)
  got = np.asarray(rewards.random_solver_reward(jax.random.key(1), pass_rates))
  np.testing.assert_array_equal(np.sort(got), np.sort(pass_rates))
  firsts = {float(rewards.random_solver_reward(jax.random.key(s), pass_rates)[0, 0])
            for s in range(30)}
  assert firsts == {0.0, 0.25, 0.5, 1.0}


def test_invalid_answers_vote_as_the_reference_does():
  """[None, None, a, a]: the reference rewards nobody and pays the proposer nothing."""
  ids = np.array([
      [-1, -1, 0, 0],  # None ties with a and was sampled first: None wins
      [0, 0, -1, -1],  # a ties with None and was sampled first: a wins
      [-1, -1, -1, 0],  # None outvotes a
      [0, -1, 0, 1],  # a outvotes None
  ])
  majority_id, k, has_majority = rewards.majority_vote(ids, invalid_votes=True)
  np.testing.assert_array_equal(majority_id, [-1, 0, -1, 0])
  np.testing.assert_array_equal(k, [0, 2, 0, 2])
  np.testing.assert_array_equal(has_majority, [False, True, False, True])
  solver_r = rewards.solver_reward(ids, invalid_votes=True)
  np.testing.assert_array_equal(solver_r, [[0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0],
                                           [1, 0, 1, 0]])
  np.testing.assert_array_equal(rewards.proposer_reward(k, 4, "sqlm"), [0, 1, 0, 1])
  # Today's rule on the same answers: None never votes, so a wins the first and third.
  _, k_ours, _ = rewards.majority_vote(ids)
  np.testing.assert_array_equal(k_ours, [2, 2, 1, 2])
  np.testing.assert_array_equal(rewards.solver_reward(ids)[0], [0, 0, 1, 1])
  np.testing.assert_array_equal(rewards.proposer_reward(k_ours, 4, "sqlm"), [1, 1, 0, 1])


def test_a_tie_with_none_rewards_nobody_without_tie_breaking():
  ids = np.array([[0, 0, -1, -1], [0, 0, -1, 1]])
  np.testing.assert_array_equal(rewards.majority_is_tied(ids, invalid_votes=True), [True, False])
  np.testing.assert_array_equal(rewards.solver_reward(ids, break_ties=False, invalid_votes=True),
                                [[0, 0, 0, 0], [1, 1, 0, 0]])


def test_vote_margin_hand_cases():
  ids = np.array([
      [0, 0, 0, 1, 1, 2, -1, -1],  # 3 vs 2: margin 1
      [4, 4, 4, 4, 4, 4, 4, 4],  # unanimous: 8
      [0, 1, 0, 1, 2, 2, 3, 3],  # four-way tie: 0
      [-1, -1, -1, -1, -1, -1, -1, -1],  # no majority: 0
      [5, 5, 5, 5, 5, 5, 2, 3],  # 6 vs 1: 5
      [-1, -1, -1, -1, -1, 7, 7, -1],  # a lone answer among invalid ones: 2
  ])
  np.testing.assert_array_equal(jax.jit(rewards.vote_margin)(ids), [1, 8, 0, 0, 5, 2])
  # With invalid answers voting as None, they are a candidate: None (6) beats 7 in row 5
  # (no majority), and row 0's runner-up stays 2 (two Nones, two 1s).
  np.testing.assert_array_equal(rewards.vote_margin(ids, invalid_votes=True), [1, 8, 0, 0, 5, 0])
  np.testing.assert_array_equal(rewards.confident_majority(ids, 2),
                                [False, True, False, False, True, True])
  # min_margin 0 keeps every question with a majority, ties included.
  np.testing.assert_array_equal(rewards.confident_majority(ids, 0),
                                [True, True, True, False, True, True])


def test_split_half_agreement_hand_cases():
  ids = np.array([
      [0, 0, 1, 0, 0, 0, 2, 0],  # halves' majorities 0 and 0
      [0, 0, 1, 2, 1, 1, 0, 3],  # 0 then 1: unstable, although the whole vote has k = 3
      [0, -1, -1, -1, -1, -1, -1, -1],  # the second half has no majority
      [3, 1, 1, 3, 1, 3, 3, 2],  # tie 3/1 in the first half goes to the smaller id, 1; then 3
  ])
  np.testing.assert_array_equal(jax.jit(rewards.split_half_agreement)(ids),
                                [True, False, False, False])


def test_majorities_agree_hand_cases():
  ids = np.array([[0, 0, 1, 2], [0, 1, 1, 1], [0, 0, 1, -1], [-1, -1, -1, -1]])
  other = np.array([[0, 0, 0, 3], [0, 0, 0, 1], [-1, -1, -1, -1], [0, 0, 0, 0]])
  # Same majority; another one; the other has none; this one has none.
  np.testing.assert_array_equal(jax.jit(rewards.majorities_agree)(ids, other),
                                [True, False, False, False])
