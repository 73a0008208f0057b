"""A few self-play steps on a tiny random model, end to end, and the loop's masking/sharing rules."""

import dataclasses
import json
import math

import jax
import numpy as np
import pytest

from sqlm_jax import rl
from sqlm_jax.loop import batches, roles, selfplay
from sqlm_jax.reward import scoring
from sqlm_jax.rollout import decoding
from sqlm_jax.config_base import base_config
from sqlm_jax.models import load_pretrained
from sqlm_jax.tasks.base import Proposal, Task


def permissive_task() -> Task:
  """A random model never writes a parseable arithmetic problem; this topic accepts most text.

  Proposals whose length is a multiple of 3 are "unparseable", so masking is exercised too.
  """
  return Task(
      name="permissive", reward_kind="vote",
      proposer_messages=lambda topic: [{"role": "user", "content": "Ask:"}],
      parse_proposal=lambda text: Proposal(text if len(text) % 3 else None),
      solver_messages=lambda p: [{"role": "user", "content": p.question[:8]}],
      extract_answer=lambda text: text[:1] or None,
      true_answer=lambda p: "a", difficulty=lambda p: float(len(p.question)))


def tiny_config(path, **overrides):
  c = base_config()
  c.model.path = path
  c.model.dtype = "float32"
  c.total_steps = 2
  c.rollout.prompts_per_step = 2
  c.rollout.proposals_per_prompt = 3
  c.rollout.answers_per_question = 4
  c.rollout.max_proposal_tokens = 10
  c.rollout.max_answer_tokens = 6
  c.rl.micro_batch_size = 4
  c.rl.learning_rate = 1e-3
  c.proposer_update_every = 1
  c.eval.num_examples = 3
  c.eval.num_samples = 2
  c.eval.max_new_tokens = 6
  c.log.progress_bar = False
  c.log.tensorboard = True
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def generating_task() -> Task:
  """The permissive topic with a question generator of its own (for question_source="fixed")."""
  return dataclasses.replace(permissive_task(),
                             generate_question=lambda rng: Proposal(f"q{rng.randrange(10**6)}"))


@pytest.fixture
def permissive(monkeypatch):
  monkeypatch.setattr(roles, "make_task", lambda config: (permissive_task(), "topic"))


def test_selfplay_steps_end_to_end(qwen2_dir, tmp_path, permissive):
  config = tiny_config(qwen2_dir)
  _, initial = load_pretrained(qwen2_dir)
  summary = selfplay.train(config, str(tmp_path))
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in records] == [0, 1, 2]
  for record in records[1:]:
    for key in ("solver_reward", "proposer_reward", "valid_proposal_rate", "pseudo_label_accuracy",
                "solver/grad_norm", "solver/kl", "solver/entropy", "solver/clip_low",
                "time/propose", "time/solve", "time/train", "proposal_distinct2", "k_histogram"):
      assert key in record, key
    for key, value in record.items():
      if isinstance(value, float):
        assert math.isfinite(value), key
    assert sum(record["k_histogram"]) == record["num_questions"]
  assert "heldout/greedy_accuracy" in records[0] and "heldout/greedy_accuracy" in records[2]
  assert summary["heldout_size"] == 3 and 0 <= summary["final_accuracy"] <= 1
  assert (tmp_path / "samples.jsonl").read_text().count("\n") >= 2
  assert any((tmp_path / "tensorboard").iterdir())
  # The exported roles load, and training changed them.
  for role in ("solver", "proposer"):
    _, trained = load_pretrained(str(tmp_path / role))
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(initial),
                                                        jax.tree.leaves(trained))]
    assert all(changed), role


def test_masked_proposal_contributes_exactly_zero_gradient(qwen2_dir, permissive):
  """A weight-0 proposal's tokens and advantage do not touch the proposer's gradient."""
  config = tiny_config(qwen2_dir)
  s, state = selfplay.setup(config)
  params = state.params["proposer"]
  out = s.roles["proposer"].sampler(decoding.weights(s.roles["proposer"], params), [[2, 5, 6]],
                                    jax.random.key(0), max_new_tokens=6, num_samples=4)
  weights = np.array([1.0, 0.0, 1.0, 1.0])
  advantages = np.array([0.5, 3.0, -0.5, 0.0])
  apply_fn = roles.apply_fn(s.model_config, s.roles["proposer"].layout)
  grad_fn = jax.jit(rl.make_grad_fn(apply_fn, config.rl, config.rl.micro_batch_size))
  batch = batches.training_batch(s, "proposer", out, 4, np.arange(4), advantages, weights,
                                  params)
  grads, _ = grad_fn(params, batch)
  out.tokens = out.tokens.copy()
  out.logprobs = out.logprobs.copy()
  out.tokens[1] = (out.tokens[1] + 7) % 100  # Rewrite the masked proposal entirely...
  out.logprobs[1] = -5.0
  advantages[1] = -40.0  # ...and its advantage.
  batch2 = batches.training_batch(s, "proposer", out, 4, np.arange(4), advantages, weights,
                                   params)
  grads2, _ = grad_fn(params, batch2)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_shared_weights_are_exported_once(qwen2_dir, permissive, tmp_path):
  s, state = selfplay.setup(tiny_config(qwen2_dir, shared_weights=True))
  selfplay.export_roles(s, state, str(tmp_path))
  _, exported = load_pretrained(str(tmp_path / "solver"))
  for a, b in zip(jax.tree.leaves(state.params["policy"]), jax.tree.leaves(exported)):
    np.testing.assert_array_equal(np.asarray(a), b)
  assert not (tmp_path / "proposer").exists()  # The same weights: not written twice.


def test_shared_weights_update_one_pytree_with_both_roles(qwen2_dir, permissive):
  config = tiny_config(qwen2_dir, shared_weights=True)
  s, state = selfplay.setup(config)
  assert set(state.params) == {"policy"}
  before = jax.tree.map(np.asarray, state.params["policy"])
  state, metrics, _ = selfplay.train_step(s, state, jax.random.key(1))
  assert set(state.params) == {"policy"}
  assert "solver/grad_norm_combined" in metrics and "proposer/grad_norm_combined" in metrics
  assert int(state.opt_state["policy"].count) == 1  # Summed: both roles in one step.
  after = state.params["policy"]
  assert any(not np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(before),
                                                                  jax.tree.leaves(after)))


@pytest.mark.slow  # Four steps of separate roles: CI's slow step.
def test_separate_roles_proposer_waits_for_its_cadence(qwen2_dir, permissive):
  config = tiny_config(qwen2_dir, proposer_update_every=2, **{"rl.lr_schedule": "cosine"})
  s, state = selfplay.setup(config)
  proposer_before = jax.tree.map(np.asarray, state.params["proposer"])
  state, metrics, _ = selfplay.train_step(s, state, jax.random.key(1))  # step 1: solver only
  assert "solver/grad_norm" in metrics and "proposer/grad_norm" not in metrics
  for a, b in zip(jax.tree.leaves(proposer_before), jax.tree.leaves(state.params["proposer"])):
    np.testing.assert_array_equal(a, np.asarray(b))
  state, metrics, _ = selfplay.train_step(s, state, jax.random.key(2))  # step 2: both
  assert "proposer/grad_norm" in metrics
  # The proposer's first update is at the schedule's step 1, like the solver's second: the
  # cosine over total_steps = 2 is at its middle for both.
  expected = float(s.lr_schedule(1))
  assert expected == pytest.approx(0.5 * config.rl.learning_rate)
  assert metrics["proposer/learning_rate"] == pytest.approx(expected)
  assert metrics["solver/learning_rate"] == pytest.approx(expected)


def test_malformed_proposals_trained_with_reward_zero_in_their_group():
  config = base_config()
  config.rollout.prompts_per_step, config.rollout.proposals_per_prompt = 2, 3
  valid = np.array([True, False, True, True, True, False])
  proposer_r = np.ones(4, np.float32)  # [Q]: the valid ones only
  masked = scoring.proposer_advantages(config, proposer_r, valid)
  np.testing.assert_array_equal(scoring.proposer_weights(config, valid), valid)
  np.testing.assert_allclose(masked[[0, 2]], 0.0, atol=1e-5)  # group 1: rewards 1, 1 -> no signal
  config.rewards.train_malformed_proposals = True
  trained = scoring.proposer_advantages(config, proposer_r, valid)
  np.testing.assert_array_equal(scoring.proposer_weights(config, valid), np.ones(6))
  # Group 1 is now rewards (1, 0, 1): the malformed one is below its group's mean.
  assert trained[1] < 0 < trained[0] and trained[0] == pytest.approx(trained[2])
  assert trained[5] < 0 and trained[3] > 0


def test_malformed_proposals_trained_in_a_step(qwen2_dir, permissive):
  config = tiny_config(qwen2_dir, **{"rewards.train_malformed_proposals": True})
  s, state = selfplay.setup(config)
  _, metrics, _ = selfplay.train_step(s, state, jax.random.key(1))
  assert metrics["valid_proposal_rate"] < 1  # some proposals are malformed...
  assert metrics["proposer/sequences"] == 6  # ...and all 6 are trained on.
  assert metrics["solver/sequences"] == metrics["num_questions"] * 4


def test_critic_fits_proposer_then_solver_before_the_policy():
  import types
  calls = []

  def critic_update(params, opt_state, mbs, step):
    calls.append(("critic",) + tuple(mbs))
    return params, opt_state, [{"value_loss": 0.0}]

  def policy_update(params, opt_state, mbs, step):
    calls.append(("policy",) + tuple(mbs))
    return params, opt_state, [{"loss": 0.0, "grad_norm": 0.0} for _ in mbs]

  config = base_config()
  config.shared_weights, config.shared_weights_update = True, "sequential"
  role = types.SimpleNamespace(update=policy_update)
  s = types.SimpleNamespace(config=config, critic_update=critic_update,
                            roles={"solver": role, "proposer": role})
  state = roles.RunState(step=0, params={"policy": 0, "critic": 0},
                         opt_state={"policy": 0, "critic": 0}, recent_questions=None)
  # A step without a proposer update: the critic still fits the proposer's batch, first.
  _, metrics = selfplay.apply_role_updates(s, state, {"solver": ["s1", "s2"]},
                                           {"solver": ["s1", "s2"], "proposer": ["p1"]})
  assert calls == [("critic", "p1"), ("critic", "s1"), ("critic", "s2"),
                   ("policy", "s1"), ("policy", "s2")]
  assert metrics["critic"]["optimizer_steps"] == 3 and "proposer" not in metrics


def test_solver_prompts_cut_to_their_last_tokens():
  """rollout.max_solver_prompt_tokens: the reference's max_prompt_length with truncation left."""
  assert selfplay.cut_prompts([[1, 2, 3, 4], [5]], 2) == [[3, 4], [5]]
  assert selfplay.cut_prompts([[1, 2, 3]], 0) == [[1, 2, 3]]


def test_vote_signals_on_a_hand_worked_batch():
  ids = np.array([[0, 0, 1, -1], [0, 1, 2, 3], [-1, -1, -1, -1], [0, 0, 0, 0]], np.int32)
  majority, k, solver_r, proposer_r, adv = scoring.vote_signals(
      ids, 0.5, 0.2, 1e-6, shape="sqlm", estimator="grpo", min_votes=1, break_ties=True)
  np.testing.assert_array_equal(majority, [0, 0, -1, 0])
  np.testing.assert_array_equal(k, [2, 1, 0, 4])
  np.testing.assert_array_equal(solver_r, [[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
  np.testing.assert_array_equal(proposer_r, [1, 0, 0, 0])  # only 1 < k < N
  np.testing.assert_allclose(np.asarray(adv)[3], 0.0)  # unanimous: no signal
  assert np.asarray(adv)[0, 0] > 0 > np.asarray(adv)[0, 2]


def test_vote_signals_with_the_gaussian_proposer_reward():
  ids = np.array([[0, 0, 1, 2], [0, 0, 0, 1], [0, 0, 0, 0]], np.int32)  # k = 2, 3, 4 of N = 4
  _, _, _, proposer_r, _ = scoring.vote_signals(
      ids, 0.75, 0.1, 1e-6, shape="gaussian", estimator="grpo", min_votes=1, break_ties=True)
  np.testing.assert_allclose(proposer_r, np.exp(-np.square([-0.25, 0.0, 0.25]) / 0.02), rtol=1e-6)


def test_update_plan_orders_roles_and_mini_batches():
  s0, s1, p0 = "s0", "s1", "p0"
  batches = {"proposer": [p0], "solver": [s0, s1]}
  config = base_config()
  config.shared_weights = True
  config.shared_weights_update = "sequential"  # Solver first, then the proposer.
  assert selfplay.update_plan(config, batches) == [
      ("policy", ("solver",), (s0,)), ("policy", ("solver",), (s1,)),
      ("policy", ("proposer",), (p0,))]
  config.shared_weights_update = "summed"  # The roles' j-th mini-batches in one step.
  assert selfplay.update_plan(config, batches) == [
      ("policy", ("solver", "proposer"), (s0, p0)), ("policy", ("solver",), (s1,))]
  config.rl.ppo_epochs = 2
  assert len(selfplay.update_plan(config, batches)) == 4
  config.shared_weights = False
  assert selfplay.update_plan(config, batches) == [
      ("solver", ("solver",), (s0,)), ("solver", ("solver",), (s1,)),
      ("solver", ("solver",), (s0,)), ("solver", ("solver",), (s1,)),
      ("proposer", ("proposer",), (p0,)), ("proposer", ("proposer",), (p0,))]


@pytest.mark.slow  # A run with a value model: CI's slow step.
def test_sequential_mini_batches_with_a_value_model(qwen2_dir, permissive):
  """Shared weights, sequential: the solver's mini-batches then the proposer's, each one
  optimizer step; GAE advantages from the value model, which takes the same steps."""
  config = tiny_config(qwen2_dir, shared_weights=True, shared_weights_update="sequential",
                       **{"rl.ppo_mini_batch_size": 4, "rl.advantage_estimator": "gae",
                          "rl.critic_learning_rate": 1e-3, "rl.kl_coef": 0.0})
  s, state = selfplay.setup(config)
  assert set(state.params) == set(state.opt_state) == {"policy", "critic"}
  critic_before = jax.tree.map(np.asarray, state.params["critic"])
  state, metrics, _ = selfplay.train_step(s, state, jax.random.key(1))
  solver_steps = metrics["solver/optimizer_steps"]
  proposer_steps = metrics["proposer/optimizer_steps"]
  q = metrics["num_questions"]
  assert solver_steps == -(-q * 4 // 4) and proposer_steps == 2  # 4 answers per question; 6 proposals
  assert int(state.opt_state["policy"].count) == solver_steps + proposer_steps
  assert int(state.opt_state["critic"].count) == solver_steps + proposer_steps
  assert metrics["critic/optimizer_steps"] == solver_steps + proposer_steps
  assert math.isfinite(metrics["critic/value_loss"]) and "solver/grad_norm" in metrics
  assert metrics["critic/learning_rate"] == pytest.approx(1e-3)
  changed = [not np.array_equal(a, np.asarray(b)) for a, b in zip(
      jax.tree.leaves(critic_before), jax.tree.leaves(state.params["critic"]))]
  assert any(changed)


def test_fixed_questions_replace_the_proposer(qwen2_dir, monkeypatch):
  """question_source="fixed": the step's questions come from the task's generator, seeded from
  (seed, step) only; the proposer is neither sampled nor updated."""
  monkeypatch.setattr(roles, "make_task", lambda config: (generating_task(), "topic"))
  config = tiny_config(qwen2_dir, **{"task.question_source": "fixed"})
  s, state = selfplay.setup(config)
  proposer_before = jax.tree.map(np.asarray, state.params["proposer"])
  solver_before = jax.tree.map(np.asarray, state.params["solver"])
  state, metrics, samples = selfplay.train_step(s, state, jax.random.key(1))
  expected = [p.question for p in selfplay.fixed_questions(config, s.task, 0)]
  assert len(expected) == 6 and metrics["num_questions"] == 6
  assert [r["question"] for r in samples] == expected[:len(samples)]
  assert metrics["proposal_length"] is None and "proposer/grad_norm" not in metrics
  assert metrics["time/propose"] < 0.05
  for a, b in zip(jax.tree.leaves(proposer_before), jax.tree.leaves(state.params["proposer"])):
    np.testing.assert_array_equal(a, np.asarray(b))
  assert any(not np.array_equal(a, np.asarray(b)) for a, b in zip(
      jax.tree.leaves(solver_before), jax.tree.leaves(state.params["solver"])))
  # The same (seed, step) draws the same questions whatever the step key; others differ.
  _, _, again = selfplay.train_step(s, dataclasses.replace(state, step=0), jax.random.key(7))
  assert [r["question"] for r in again] == [r["question"] for r in samples]
  assert selfplay.fixed_questions(config, s.task, 1) != selfplay.fixed_questions(config, s.task, 0)
  config.seed = 1
  assert selfplay.fixed_questions(config, s.task, 0) != selfplay.fixed_questions(
      tiny_config(qwen2_dir), s.task, 0)


VOTE = dict(shape="sqlm", estimator="grpo", min_votes=1, break_ties=True)


def test_random_solver_reward_keeps_the_vote_for_the_proposer():
  ids = np.array([[0, 0, 1, -1], [0, 1, 2, 2], [3, 3, 3, 1], [0, 0, 0, 0]], np.int32)
  majority = scoring.vote_signals(ids, 0.5, 0.2, 1e-6, **VOTE)
  seen = set()
  for seed in range(8):
    random = scoring.vote_signals(ids, 0.5, 0.2, 1e-6, solver_reward="random",
                                   key=jax.random.key(seed), **VOTE)
    for real, got in zip(majority[:2] + majority[3:4], random[:2] + random[3:4]):
      np.testing.assert_array_equal(real, got)  # majority, k and the proposer's reward
    solver_r = np.asarray(random[2])
    np.testing.assert_array_equal(np.sort(solver_r, -1), np.sort(majority[2], -1))
    assert solver_r[0, 3] == 0  # the invalid answer is never paid
    np.testing.assert_allclose(random[4], rl.group_advantages(solver_r, "grpo", 1e-6), atol=1e-6)
    seen.add(solver_r.tobytes())
  assert len(seen) > 1


def test_margin_guard_on_a_hand_worked_batch():
  ids = np.array([
      [0, 0, 0, 1, 1, 2, -1, -1],  # k = 3, margin 1: in the band, low confidence
      [5, 5, 5, 5, 5, 5, 2, 3],  # k = 6, margin 5
      [4, 4, 4, 4, 4, 4, 4, 4],  # unanimous: out of the band
      [0, 0, 1, 1, 2, 2, 3, 3],  # k = 2, a four-way tie: margin 0
  ], np.int32)
  off = scoring.vote_signals(ids, 0.5, 0.2, 1e-6, **VOTE)
  zero = scoring.vote_signals(ids, 0.5, 0.2, 1e-6, proposer_min_margin=0, solver_min_margin=0,
                               **VOTE)
  for a, b in zip(off, zero):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(off[3], [1, 1, 0, 1])
  _, _, solver_r, proposer_r, adv = scoring.vote_signals(
      ids, 0.5, 0.2, 1e-6, proposer_min_margin=2, solver_min_margin=2, **VOTE)
  np.testing.assert_array_equal(proposer_r, [0, 1, 0, 0])
  np.testing.assert_array_equal(solver_r[0], 0)  # the low-margin groups train nothing
  np.testing.assert_array_equal(solver_r[3], 0)
  np.testing.assert_array_equal(adv[0], 0)
  np.testing.assert_array_equal(solver_r[1], off[2][1])  # the confident one is unchanged
  only_proposer = scoring.vote_signals(ids, 0.5, 0.2, 1e-6, proposer_min_margin=2, **VOTE)
  np.testing.assert_array_equal(only_proposer[2], off[2])


def test_paraphrase_guard_on_a_hand_worked_batch():
  ids = np.array([[0, 0, 1, 2], [0, 0, 0, 1], [3, 3, 1, 1]], np.int32)  # all in the band
  agrees = np.array([True, False, True])
  off = scoring.vote_signals(ids, 0.5, 0.2, 1e-6, **VOTE)
  for a, b in zip(off, scoring.vote_signals(ids, 0.5, 0.2, 1e-6, paraphrase_guard="off",
                                             paraphrase_agrees=agrees, **VOTE)):
    np.testing.assert_array_equal(a, b)
  proposer = scoring.vote_signals(ids, 0.5, 0.2, 1e-6, paraphrase_guard="proposer",
                                   paraphrase_agrees=agrees, **VOTE)
  np.testing.assert_array_equal(off[3], [1, 1, 1])
  np.testing.assert_array_equal(proposer[3], [1, 0, 1])
  np.testing.assert_array_equal(proposer[2], off[2])  # the solver still trains on every group
  both = scoring.vote_signals(ids, 0.5, 0.2, 1e-6, paraphrase_guard="both",
                               paraphrase_agrees=agrees, **VOTE)
  np.testing.assert_array_equal(both[3], [1, 0, 1])
  np.testing.assert_array_equal(both[2][1], 0)
  np.testing.assert_array_equal(both[4][1], 0)  # the disagreeing group trains nothing
  np.testing.assert_array_equal(np.asarray(both[2])[[0, 2]], np.asarray(off[2])[[0, 2]])


def paraphrasing_task() -> Task:
  """The permissive topic whose paraphrase of a question is its text reversed."""
  return dataclasses.replace(permissive_task(),
                             paraphrase=lambda p: Proposal(p.question[::-1]))


def test_paraphrase_guard_asks_every_question_twice_and_pays_only_agreement(qwen2_dir,
                                                                          monkeypatch):
  monkeypatch.setattr(roles, "make_task", lambda config: (paraphrasing_task(), "topic"))
  config = tiny_config(qwen2_dir, **{"rewards.paraphrase_guard": "both",
                                     "rewards.proposer_shape": "sqlm_paper"})
  s, state = selfplay.setup(config)
  calls, scored = [], []
  sampler, score = s.roles["solver"].sampler, scoring.score

  def counting_sampler(params, prompts, *args, **kwargs):
    calls.append(len(prompts))
    return sampler(params, prompts, *args, **kwargs)

  def keeping_score(*args, **kwargs):
    scored.append(score(*args, **kwargs))
    return scored[-1]

  s.roles["solver"] = dataclasses.replace(s.roles["solver"], sampler=counting_sampler)
  monkeypatch.setattr(scoring, "score", keeping_score)
  _, metrics, _ = selfplay.train_step(s, state, jax.random.key(1))
  q = metrics["num_questions"]
  assert q > 0 and calls == [2 * q]  # each question and its paraphrase, in one sampler call
  _, _, solver_r, proposer_r, _, agrees = scored[0]
  assert agrees.shape == (q,) and metrics["paraphrase_agreement"] == pytest.approx(agrees.mean())
  assert (~agrees).any()  # the guard has something to hold back
  assert (proposer_r[~agrees] == 0).all() and (solver_r[~agrees] == 0).all()
  assert metrics["solver/sequences"] == q * 4  # the paraphrases' answers only vote
