"""The full set of self-play knobs, with defaults; every file in configs/ starts from `base_config`.

Each field is overridable from the command line, e.g. `--config.rl.learning_rate=3e-6`.
"""

from __future__ import annotations

import os

import ml_collections

from sqlm_jax import rl
from sqlm_jax.scale import sharding

# The repository's configs/ folder (present in a source checkout, the way the README installs).
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
REQUIRED = "__required__"  # Placeholder for fields the user must set (checked before any compile).
DEFAULT_COMPILE_CACHE = os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
    "sqlm_jax", "xla")


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # Every step's randomness is derived from (seed, step).
  c.total_steps = ml_collections.FieldReference(100)

  c.model = ml_collections.ConfigDict()
  c.model.path = REQUIRED  # Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer).
  c.model.dtype = "bfloat16"  # Compute dtype of matmuls (norms and softmax stay float32).
  c.model.param_dtype = "float32"  # Stored/updated parameter dtype.
  c.model.remat = False  # Recompute layer activations in the backward pass to save memory.
  # Proposer and solver share one parameter pytree (the reference code) or train two copies.
  c.shared_weights = False
  # With shared weights: "summed" adds the roles' gradients into one optimizer step per
  # mini-batch (ours); "sequential" updates on the solver's batch, then on the proposer's with
  # the solver-updated weights (the reference: two separate actor updates).
  c.shared_weights_update = "summed"

  # The device mesh (sqlm_jax/scale/sharding.py): sizes of its data / fsdp / tensor axes, whose product
  # is the device count; one of them may be -1 (the remaining devices).
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1
  c.mesh.role_split = False  # Proposer and solver on half of the devices each (separate weights).
  # Logical axis -> mesh axes ("data,fsdp"; "" = replicated), e.g. --config.mesh.rules.embed=.
  c.mesh.rules = ml_collections.ConfigDict(
      {name: ",".join((axes,) if isinstance(axes, str) else axes or ())
       for name, axes in sharding.RULES.items()})
  # Several processes (jax.distributed): auto = when the environment or coordinator says so.
  c.mesh.distributed = "auto"  # auto | on | off
  c.mesh.coordinator = ""  # "host:port" of process 0; "" = detected (TPU pods, SLURM, ...).
  c.mesh.num_processes = 0  # With a coordinator: how many processes (0 = detected).
  c.mesh.process_id = -1  # With a coordinator: this process's index (-1 = detected).
  # What one device holds, in GiB, for the memory plan (0 = what the device reports; a CPU
  # reports nothing). Set it to plan for a chip you are not on, e.g. 16 for a v5e-8 from a laptop
  # (`--dry_run`); the plan then says whether the run fits and chooses rollout.rows_per_call.
  c.mesh.device_memory_gib = 0.0

  c.task = ml_collections.ConfigDict()
  # arithmetic | algebra | generic | coding | tiny_addition | tiny_arithmetic
  c.task.name = "arithmetic"
  c.task.topic = ""  # Topic text for the proposer prompt; "" = the task's default topic.
  # Where each step's questions come from: "proposer" (self-play) or "fixed", the task's own
  # generator (Task.generate_question), seeded from (seed, step): the no-proposer baseline; the
  # proposer is then neither sampled nor updated.
  c.task.question_source = "proposer"
  # How the proposer is prompted and its reply parsed: "tagged" (ours: the question inside
  # <question> tags, a reply without them is malformed) or "reference" (the reference
  # trainer's prompts and parsers: arithmetic's whole reply, or algebra's text after the last
  # "Selected Question", is the question, and the solver's instruction comes before it; coding's
  # problem is the text before "Test Cases:", its solver gets a system message).
  c.task.proposal_format = "tagged"  # tagged | reference
  # Coding: how many of a proposal's tests count. 0 (ours) = exactly 5 are asked for and a
  # proposal with another number is malformed; > 0 (the reference: 10) = any number from 1, of
  # which the first max_tests are scored.
  c.task.max_tests = 0
  # Coding: the program is the last closed ```python block ("closed", ours) or, as the
  # reference's reward, the text after the last ```python even if never closed ("reference").
  c.task.code_extraction = "closed"  # closed | reference

  c.rollout = ml_collections.ConfigDict()
  c.rollout.prompts_per_step = 64  # Topic prompts per step (each one a proposer group).
  c.rollout.proposals_per_prompt = 4  # Proposals sampled per topic prompt.
  c.rollout.answers_per_question = 4  # N: solver answers per question (the vote's size).
  c.rollout.max_proposal_tokens = 1024
  c.rollout.max_answer_tokens = 1024
  # The solver's prompt (chat template and question) is cut to its last this many tokens (left
  # truncation, as the reference's max_prompt_length: 512, truncation: left); 0 = no cut.
  c.rollout.max_solver_prompt_tokens = 0
  # Sampling temperature of both roles; the loss scores log-probs at the same temperature.
  c.rollout.temperature = ml_collections.FieldReference(1.0)
  c.rollout.top_p = 1.0  # Nucleus filter for both roles (1.0 = off).
  c.rollout.top_k = 0  # Top-k filter for both roles (0 = off).
  # Decoding runs on its own layout (sqlm_jax/rollout/decoding.py): each step, a role's weights are cast to
  # rollout.dtype and resharded over the role's devices with `tensor` ways of tensor parallelism
  # and the remaining devices splitting the rows (data parallel), so decoding gathers no weights.
  c.rollout.tensor = 1
  # Dtype of the decoding copy of the weights: "auto" = bfloat16 on accelerators (and in a plan
  # for one, mesh.device_memory_gib > 0), float32 on CPU.
  c.rollout.dtype = "auto"  # auto | float32 | bfloat16
  # A role's rows (prompts x samples) are decoded in calls of at most this many rows, each
  # chunk of prompts sharing its prefill; the tokens do not depend on it. 0 = automatic: all
  # rows at once where the device does not report its memory (CPU), else the largest power of
  # two that the memory plan finds to fit.
  c.rollout.rows_per_call = 0

  c.rewards = ml_collections.ConfigDict()
  # Proposer reward from k = answers agreeing with the majority (see sqlm_jax/reward/rewards.py):
  # sqlm (1 < k < N) | sqlm_paper (0 < k < N) | rzero | learnability | gaussian.
  c.rewards.proposer_shape = "sqlm"
  c.rewards.gaussian_centre = 0.5
  c.rewards.gaussian_width = 0.2
  c.rewards.min_votes = 1  # A majority needs at least this many votes, else nobody is rewarded.
  c.rewards.break_ties = True  # False: a tied top count rewards nobody.
  # True (the reference): unparseable answers vote together as None; a question None wins
  # rewards nobody and counts k = 0 for the proposer. False (ours): they never vote.
  c.rewards.invalid_answers_vote = False
  # What an answer is, for the vote (math topics): "lenient" (ours: the task's canonical form;
  # fractions, decimals, assignments and \boxed{} count, "0.5" = "1/2") or "reference" (the
  # reference trainer's: the last single-line <answer>..</answer>, case-sensitive, counted
  # only if int() parses it, voting as its stripped raw text, so "042" != "42"). Held-out
  # evaluation always grades with the task's own form.
  c.rewards.answer_parser = "lenient"  # lenient | reference
  # Malformed proposals (no question could be parsed, or tests that do not parse): False (ours)
  # masks them out of both roles' losses; True (the reference trainer, whose loss mask is
  # computed but unused) pays them the proposer reward 0 and trains the proposer on them, in
  # its group's statistics. The solver has nothing to answer for them either way.
  c.rewards.train_malformed_proposals = False
  # "majority" (the vote) | "random": the information-free control, each question's rewards
  # handed to random valid answers (rewards.random_solver_reward); the proposer is still paid
  # from the real vote.
  c.rewards.solver_reward = "majority"
  # The guard against a low-confidence vote (docs/ablations.md); margin = the majority's votes
  # minus the runner-up's. A question whose margin is below proposer_min_margin pays the
  # proposer 0; one below solver_min_margin rewards no answer (its group trains nothing).
  # 0 = off (today's rewards exactly). No extra samples: array code over the same [Q, N] votes.
  c.rewards.proposer_min_margin = 0
  c.rewards.solver_min_margin = 0
  # The paraphrase guard (docs/ablations.md): the solver also answers each question re-asked
  # in another form with the same answer (Task.paraphrase; tiny_addition: the operands
  # swapped), N more samples that only vote. Where the two majorities differ, "proposer" pays
  # the proposer 0 and "both" also rewards none of the question's answers. "off" = today's
  # rewards exactly.
  c.rewards.paraphrase_guard = "off"  # off | proposer | both

  c.rl = rl.default_config()  # Loss, advantages, optimizer: documented in rl.default_config.
  c.rl.learning_rate = 1e-6
  c.rl.kl_coef = 1e-3
  c.rl.kl_estimator = "low_var"
  c.rl.micro_batch_size = 16  # Rows per forward/backward; bounds training memory.
  # Dtype of the frozen KL reference's weights: "auto" = bfloat16 on accelerators (and in a plan
  # for one), float32 on CPU.
  c.rl.reference_dtype = "auto"  # auto | float32 | bfloat16
  c.rl.temperature = c.rollout.get_ref("temperature")  # Follows rollout.temperature.
  c.rl.total_steps = c.get_ref("total_steps") * 1  # Cosine ends with the run (unless set).
  # Re-score sampled tokens with the training forward pass instead of trusting the sampler's
  # log-probs (always done when top-k/top-p filter the sampling distribution). Unset (None) =
  # derived: True unless model.dtype is float32, where sampler and trainer agree (the
  # reference always recomputes; in bfloat16 they differ by up to 3e-2 per token).
  c.rl.recompute_old_logprobs = ml_collections.config_dict.placeholder(bool)
  c.proposer_update_every = 5  # The proposer is updated every this many steps.

  # The value model (rl.advantage_estimator="gae", sqlm_jax/rl/critic.py): its head starts at
  # "zeros" (ours) or "random" (verl's). It fits the proposer's batch every step, then the
  # solver's, before either policy update (verl's order).
  c.critic = ml_collections.ConfigDict()
  c.critic.head_init = "zeros"  # zeros | random

  c.eval = ml_collections.ConfigDict()
  c.eval.every = 20  # Evaluate every this many steps (0 = only at the start and end).
  c.eval.heldout = "multiplication3"  # Held-out set with ground truth (sqlm_jax/evals/datasets.py).
  c.eval.split = "test"  # "validation" (addition4, arithmetic4) is for choosing settings.
  c.eval.num_examples = 0  # 0 = the whole set.
  c.eval.num_samples = 4  # For majority-of-N accuracy.
  c.eval.temperature = 1.0  # For the N samples; greedy accuracy uses temperature 0.
  c.eval.max_new_tokens = 1024
  c.eval.batch_size = 64
  c.eval.data_dir = ""  # "" = $SQLM_JAX_TFDS_DIR or ~/.cache/sqlm_jax/tfds.

  c.log = ml_collections.ConfigDict()
  c.log.samples_per_step = 4  # Proposals (with their answers and rewards) written per step.
  c.log.tensorboard = True
  c.log.progress_bar = True

  # Whole-run checkpoints (sqlm_jax/loop/checkpoints.py) in WORKDIR/checkpoints: rerunning the same
  # command resumes from the newest. Hugging Face exports of the roles are written at the end;
  # `python -m sqlm_jax.export` writes one from any saved step.
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 50  # Save every this many steps (0 = only at the end or on SIGTERM).
  c.checkpoint.keep = 2  # Keep the newest this many (0 = all); 3B, two roles: ~74 GB each.
  # Start over in a workdir that holds another run (its logs and checkpoints are deleted).
  c.overwrite = False

  # XLA's persistent compilation cache: a rerun, a resumed run and every sweep arm load the
  # compiled programs instead of compiling them again. "" = off.
  c.compile_cache_dir = DEFAULT_COMPILE_CACHE

  c.sandbox = ml_collections.ConfigDict()  # Coding topics only.
  c.sandbox.workers = 0  # 0 = one per CPU.
  c.sandbox.timeout_s = 5.0
  # A test passes when a clean exit's stdout has the expected whitespace-separated tokens
  # ("tokens", ours) or equals it after trailing newlines are stripped ("newlines", the
  # reference's sandbox comparison).
  c.sandbox.output_match = "tokens"  # tokens | newlines
  c.sandbox.allow_unsandboxed = False  # Never set on shared machines: runs model code unisolated.
  return c


def reference_update(c: ml_collections.ConfigDict) -> None:
  """The reference trainer's update and data path (verl, exps/smallbs.yaml; docs/fidelity.md),
  shared by the paper's math configs."""
  c.shared_weights_update = "sequential"  # Solver update, then proposer on the updated weights.
  c.rl.weight_decay = 0.01
  c.rl.clip_eps_low = 0.2
  c.rl.clip_eps_high = 0.2
  c.rl.loss_agg = "token_mean"
  c.rl.std_ddof = 1  # torch.std: the unbiased group std.
  c.rl.kl_clamp = 10.0
  c.rl.ppo_mini_batch_size = 128  # 32 prompts x n = 4: 8 steps per solver update, 2 per proposer.
  c.rl.ppo_epochs = 1
  c.rl.dual_clip = 3.0  # clip_ratio_c: dual-clip PPO for negative advantages.
  c.rl.weight_decay_mask = "all"  # torch AdamW decays every parameter.
  # The reference's data path: its answers (integers only), its prompt formats, every proposal
  # trained on, the solver's prompt cut to its last 512 tokens.
  c.rewards.answer_parser = "reference"
  c.task.proposal_format = "reference"
  c.rewards.train_malformed_proposals = True
  c.rollout.max_solver_prompt_tokens = 512
  c.eval.every = 5  # test_freq: 5, and once before the first step (val_before_train).


def load_config(name_or_path: str) -> ml_collections.ConfigDict:
  """get_config() of a config file: a path, or the name of one in the repository's configs/.

  For notebooks and scripts; the command line uses --config=configs/NAME.py instead.
  """
  import importlib.util
  import os
  path = name_or_path
  if not os.path.isfile(path):
    path = os.path.join(CONFIGS_DIR, f"{name_or_path}.py")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No config {name_or_path!r}: pass a config file path or the name of "
                            f"a file in {os.path.dirname(path)}.")
  spec = importlib.util.spec_from_file_location(f"sqlm_config_{os.path.basename(path)[:-3]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()
