"""The paper's algebra run: linear-equation word problems, evaluated on OMEGA-style equations.

  python -m sqlm_jax.main --config configs/algebra.py --config.model.path=/ckpt/Qwen2.5-3B-Instruct
"""

from sqlm_jax.config_base import base_config, reference_update


def get_config():
  c = base_config()
  c.task.name = "algebra"
  c.task.topic = "Algebra: linear equations in up to two variables"
  c.total_steps = 100
  c.shared_weights = True  # The reference code trains one model in both roles.
  # Recompute each layer in the backward pass: at 3B and 2,048-token rows, the stored
  # activations of a 16-row micro-batch would take ~255 GiB per device over 8 (memory_plan_3b).
  c.model.remat = True
  c.rollout.prompts_per_step = 64
  c.rollout.proposals_per_prompt = 4
  c.rollout.answers_per_question = 4
  # Both roles: max_response_length 3072 (word problems need longer reasoning).
  c.rollout.max_proposal_tokens = 3072
  c.rollout.max_answer_tokens = 3072
  c.rl.learning_rate = 1e-6
  c.rl.kl_coef = 1e-3
  c.rl.kl_estimator = "low_var"
  c.proposer_update_every = 5
  reference_update(c)  # The reference trainer's update constants (config_base).
  c.rewards.proposer_shape = "sqlm"
  c.rewards.invalid_answers_vote = True  # An unparseable answer votes, as None.
  c.eval.heldout = "linear_equations"
  c.eval.max_new_tokens = 3072
  return c
