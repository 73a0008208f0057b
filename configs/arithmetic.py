"""The paper's arithmetic run: Qwen2.5-3B-Instruct proposes and solves three-digit arithmetic.

  python -m sqlm_jax.main --config configs/arithmetic.py --config.model.path=/ckpt/Qwen2.5-3B-Instruct
"""

from sqlm_jax.config_base import base_config, reference_update


def get_config():
  c = base_config()
  c.task.name = "arithmetic"
  c.task.topic = "Three-digit arithmetic"
  c.total_steps = 100
  c.shared_weights = True  # The reference code trains one model in both roles.
  # Recompute each layer in the backward pass: at 3B and 2,048-token rows, the stored
  # activations of a 16-row micro-batch would take ~255 GiB per device over 8 (memory_plan_3b).
  c.model.remat = True
  c.rollout.prompts_per_step = 64  # 64 topic prompts x 4 proposals = 256 questions per step,
  c.rollout.proposals_per_prompt = 4
  c.rollout.answers_per_question = 4  # x N = 4 answers = 1,024 solver samples per step.
  c.rollout.max_proposal_tokens = 1024  # Both roles: max_response_length 1024.
  c.rollout.max_answer_tokens = 1024
  c.rl.learning_rate = 1e-6
  c.rl.kl_coef = 1e-3  # KL to the starting model, low-variance (k3) estimator.
  c.rl.kl_estimator = "low_var"
  c.proposer_update_every = 5
  reference_update(c)  # The reference trainer's update constants (config_base).
  c.rewards.proposer_shape = "sqlm"  # 1 iff 1 < k < N, as in the reference code.
  c.rewards.invalid_answers_vote = True  # An unparseable answer votes, as None.
  c.eval.heldout = "multiplication3"  # Three-digit multiplication, like the paper's test set.
  return c
