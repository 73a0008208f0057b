"""The CPU default: full SQLM self-play on the project's tiny char model, a few minutes on 2 cores.

  python -m sqlm_jax.main --config configs/tiny.py

The model (sqlm_jax/assets/tiny_addition, made by `python -m sqlm_jax.pretrain_tiny`) knows
addition of up to 3-digit numbers and has rarely seen 4-digit sums; the held-out set is 4-digit
addition it has never seen. Proposer and solver train separately, with no labels: the solver is
rewarded for agreeing with its majority answer, the proposer for questions in the 1 < k < N band,
and a question whose majority changes when it is re-asked in another form trains nothing.
"""

import os

import sqlm_jax
from sqlm_jax.config_base import base_config
from sqlm_jax.tasks import tiny_addition


def get_config():
  c = base_config()
  c.model.path = os.path.join(os.path.dirname(sqlm_jax.__file__), "assets", "tiny_addition")
  c.model.dtype = "float32"  # Tiny matrices: bfloat16 buys nothing on a CPU here.
  c.task.name = "tiny_addition"
  c.total_steps = 150
  c.shared_weights = False  # Separate roles (R-Zero found sharing less stable).
  c.rollout.prompts_per_step = 16
  c.rollout.proposals_per_prompt = 4  # 64 questions per step,
  c.rollout.answers_per_question = 8  # x N = 8 answers.
  c.rollout.max_proposal_tokens = tiny_addition.MAX_QUESTION_TOKENS
  c.rollout.max_answer_tokens = tiny_addition.MAX_ANSWER_TOKENS
  c.rollout.temperature = 0.7  # A weak base votes right more often at a lower temperature.
  c.rewards.proposer_shape = "sqlm"
  c.rewards.min_votes = 2  # An all-different group rewards nobody.
  # The paraphrase guard: a question whose majority differs from that of the same question
  # re-asked (operands swapped) pays the proposer nothing and trains the solver on nothing.
  # Chosen on the validation split of both CPU topics (docs/results.md).
  c.rewards.paraphrase_guard = "both"
  c.rl.learning_rate = 1e-4  # Tiny models take large steps; the cosine decay keeps the end stable.
  c.rl.lr_schedule = "cosine"  # Decays to 0 at total_steps.
  c.rl.kl_coef = 0.0
  c.rl.max_grad_norm = 1.0
  c.rl.micro_batch_size = 128
  c.rl.loss_agg = "seq_mean_token_mean"
  c.proposer_update_every = 1  # The curriculum needs the proposer to move every step.
  c.eval.heldout = "addition4"
  c.eval.every = 25
  c.eval.num_samples = 8
  c.eval.temperature = 0.7
  c.eval.max_new_tokens = tiny_addition.MAX_ANSWER_TOKENS
  c.eval.batch_size = 500
  c.log.samples_per_step = 8
  return c
