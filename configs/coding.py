"""The paper's coding run: Qwen2.5-Coder-3B-Instruct writes problems with unit tests and solves them.

  python -m sqlm_jax.main --config configs/coding.py --config.model.path=/ckpt/Qwen2.5-Coder-3B-Instruct
  python -m sqlm_jax.main --config configs/coding.py:small ...   # 64 prompts per step

The solver's programs run in the sandbox (sqlm_jax/sandbox/, needs bubblewrap); the solver
reward is the pass rate over the first min(#tests, 10) of the proposer's tests, the proposer's
is 1 iff 0 < mean pass rate < 1. Evaluated on HumanEval (pass@1 greedy, pass@k sampled). As in
the reference's coding run, the update is PPO with GAE and a learned value model (a copy of the
base with a scalar head, sqlm_jax/rl/critic.py) and no KL term.

The reference's batch (exps/coding_selfplay.yaml): 1,024 topic prompts x 4 proposals = 4,096
questions x n = 4 = 16,384 solver programs per step, in PPO mini-batches of 256 prompts x n =
1,024 sequences: 16 solver and 4 proposer optimizer steps per update. The "small" variant keeps
64 prompts with mini-batches of 256 (4 and 1 steps), 16 times less sampling and sandbox work.
"""

from sqlm_jax.config_base import base_config


def get_config(variant: str = ""):
  if variant not in ("", "small"):
    raise ValueError(f"configs/coding.py has no variant {variant!r}; use configs/coding.py or "
                     "configs/coding.py:small.")
  c = base_config()
  c.task.name = "coding"
  c.task.topic = "Easy coding problems whose input is a single line of integers"
  c.total_steps = 100
  c.shared_weights = True  # The reference code trains one model in both roles.
  # Recompute each layer in the backward pass: at 3B and 2,048-token rows, the stored
  # activations of a 16-row micro-batch would take ~255 GiB per device over 8 (memory_plan_3b).
  c.model.remat = True
  c.rollout.prompts_per_step = 64 if variant == "small" else 1024  # train_batch_size: 1024
  c.rollout.proposals_per_prompt = 4
  c.rollout.answers_per_question = 4
  c.rollout.max_proposal_tokens = 512  # Both roles: max_response_length 512.
  c.rollout.max_answer_tokens = 512
  c.rollout.max_solver_prompt_tokens = 512  # max_prompt_length 512, truncation: left.
  c.rl.learning_rate = 1e-6
  c.rl.advantage_estimator = "gae"  # PPO with a value model (exps/coding_selfplay.yaml).
  c.rl.critic_learning_rate = 1e-5
  c.critic.head_init = "random"  # verl's AutoModelForTokenClassification head.
  c.rl.kl_coef = 0.0
  c.proposer_update_every = 5
  # The reference trainer's update (verl; see docs/fidelity.md).
  c.shared_weights_update = "sequential"
  c.rl.weight_decay = 0.01
  c.rl.weight_decay_mask = "all"
  c.rl.clip_eps_low = 0.2
  c.rl.clip_eps_high = 0.2
  c.rl.dual_clip = 3.0
  c.rl.loss_agg = "token_mean"
  # 256 prompts x n = 4 = 1,024 sequences per optimizer step (ppo_mini_batch_size: 256).
  c.rl.ppo_mini_batch_size = 256 if variant == "small" else 1024
  c.rl.ppo_epochs = 1
  c.rewards.proposer_shape = "sqlm"  # For pass rates: 1 iff 0 < p < 1.
  c.rewards.train_malformed_proposals = True  # Its dummy tests score 0: proposer reward 0.
  c.task.proposal_format = "reference"  # Its prompts; the problem before "Test Cases:".
  c.task.max_tests = 10  # The pass rate over the first min(#tests, 10) tests.
  c.task.code_extraction = "reference"  # The last ```python block, even if unclosed.
  c.sandbox.output_match = "newlines"
  c.sandbox.timeout_s = 10.0
  c.eval.heldout = "humaneval"
  c.eval.num_samples = 4  # pass@1 greedy and pass@4 from 4 samples.
  c.eval.max_new_tokens = 512
  c.eval.every = 5  # test_freq: 5, and once before the first step.
  return c
