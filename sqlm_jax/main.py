"""Entry point: python -m sqlm_jax.main --config configs/X.py [--workdir DIR] [--config.a.b=value ...]

The config is checked (required fields, paths, choices, sizes) before anything is loaded or
compiled; a bad value stops the run with a message naming the key and the fix. Rerunning the
same command resumes the run from its newest checkpoint (see sqlm_jax/loop/checkpoints.py).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from sqlm_jax import config_base, rl
from sqlm_jax.loop import checkpoints
from sqlm_jax.reward import rewards
from sqlm_jax.scale import multihost, sharding

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where metrics, samples, exports go "
                               "(default: runs/<config name>).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Build the mesh, print the per-device memory plan, "
                             "write WORKDIR/memory_plan.json and exit; reads only config.json and "
                             "the tokenizer files of model.path (no weights).")


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key and the fix."""


def validate(config) -> None:
  """Raises ConfigError on the first problem found, before any model is loaded."""
  from sqlm_jax.evals.datasets import HELDOUT_SETS, split_names
  from sqlm_jax.evals.evaluation import HELDOUT_NAMES
  from sqlm_jax.tasks import TASK_NAMES
  path = config.model.path
  if path in (None, "", config_base.REQUIRED):
    raise ConfigError("config.model.path is required: pass --config.model.path=DIR, a Hugging "
                      "Face checkpoint folder (config.json, *.safetensors, tokenizer files).")
  if not os.path.isdir(path):
    hub = (f" It looks like a Hugging Face Hub name: download it first (e.g. `hf download "
           f"{path} --local-dir DIR`) and pass --config.model.path=DIR."
           if path.count("/") == 1 and not path.startswith((".", "/")) else "")
    raise ConfigError(f"config.model.path={path!r} does not exist or is not a folder; point it at "
                      f"a local checkpoint folder.{hub}")
  if not os.path.isfile(os.path.join(path, "config.json")):
    raise ConfigError(f"config.model.path={path!r} has no config.json; it must be a Hugging Face "
                      "checkpoint folder.")
  _choice(config, "task.name", TASK_NAMES)
  _choice(config, "rewards.proposer_shape", rewards.PROPOSER_SHAPES)
  _choice(config, "rewards.solver_reward", rewards.SOLVER_REWARDS)
  _choice(config, "task.question_source", ("proposer", "fixed"))
  _choice(config, "rewards.paraphrase_guard", ("off", "proposer", "both"))
  _choice(config, "rl.advantage_estimator", rl.ADVANTAGE_ESTIMATORS)
  _choice(config, "rl.kl_estimator", rl.KL_ESTIMATORS)
  _choice(config, "rl.loss_agg", rl.LOSS_AGGREGATIONS)
  _choice(config, "rl.lr_schedule", rl.LR_SCHEDULES)
  _choice(config, "eval.heldout", HELDOUT_NAMES)
  splits = split_names(config.eval.heldout) if config.eval.heldout in HELDOUT_SETS else ("test",)
  _choice(config, "eval.split", splits)
  _choice(config, "model.dtype", ("float32", "bfloat16"))
  _choice(config, "model.param_dtype", ("float32", "bfloat16"))
  _choice(config, "rollout.dtype", ("auto", "float32", "bfloat16"))
  _choice(config, "rl.reference_dtype", ("auto", "float32", "bfloat16"))
  if config.rollout.tensor < 1:
    raise ConfigError(f"config.rollout.tensor={config.rollout.tensor} must be at least 1 (1 = "
                      "weights replicated for decoding, rows split over every device).")
  if config.rollout.rows_per_call < 0:
    raise ConfigError(f"config.rollout.rows_per_call={config.rollout.rows_per_call} must be >= 0 "
                      "(0 = chosen by the memory plan).")
  if config.rollout.max_solver_prompt_tokens < 0:
    raise ConfigError(f"config.rollout.max_solver_prompt_tokens="
                      f"{config.rollout.max_solver_prompt_tokens} must be >= 0 (0 = no cut).")
  if config.rl.logprob_chunk < 0:
    raise ConfigError(f"config.rl.logprob_chunk={config.rl.logprob_chunk} must be >= 0 (0 = the "
                      "whole sequence at once).")
  if config.mesh.device_memory_gib < 0:
    raise ConfigError(f"config.mesh.device_memory_gib={config.mesh.device_memory_gib} must be >= "
                      "0 (0 = what the device reports).")
  for key in ("total_steps", "rollout.prompts_per_step", "rollout.proposals_per_prompt",
              "rollout.answers_per_question", "rollout.max_proposal_tokens",
              "rollout.max_answer_tokens", "rl.micro_batch_size", "proposer_update_every",
              "eval.max_new_tokens", "eval.batch_size", "eval.num_samples"):
    if _get(config, key) < 1:
      raise ConfigError(f"config.{key}={_get(config, key)} must be at least 1.")
  if config.rollout.temperature <= 0:
    raise ConfigError(f"config.rollout.temperature={config.rollout.temperature} must be > 0: "
                      "policy-gradient training needs sampled, not greedy, rollouts.")
  if not 0 < config.rollout.top_p <= 1:
    raise ConfigError(f"config.rollout.top_p={config.rollout.top_p} must be in (0, 1].")
  if config.rewards.proposer_shape == "gaussian" and config.rewards.gaussian_width <= 0:
    raise ConfigError(f"config.rewards.gaussian_width={config.rewards.gaussian_width} must be > 0 "
                      "(the spread of the gaussian proposer reward in units of k / N, e.g. 0.2).")
  _choice(config, "mesh.distributed", ("auto", "on", "off"))
  sizes = [config.mesh.data, config.mesh.fsdp, config.mesh.tensor]
  if sizes.count(-1) > 1 or any(v == 0 or v < -1 for v in sizes):
    raise ConfigError(f"mesh.data={sizes[0]}, mesh.fsdp={sizes[1]}, mesh.tensor={sizes[2]}: each "
                      "must be a positive integer, and at most one may be -1 (the remaining "
                      "devices).")
  try:
    sharding.rules_from_config(config.mesh.rules)
  except sharding.MeshError as error:
    raise ConfigError(str(error)) from None
  for key in ("checkpoint.every", "checkpoint.keep"):
    if _get(config, key) < 0:
      raise ConfigError(f"config.{key}={_get(config, key)} must be >= 0 (0 = only at the end; "
                        "for keep: all).")
  if config.rl.kl_coef < 0:
    raise ConfigError(f"config.rl.kl_coef={config.rl.kl_coef} must be >= 0 (0 disables the KL).")
  _choice(config, "shared_weights_update", ("summed", "sequential"))
  _choice(config, "rl.std_ddof", (0, 1))
  if config.rl.kl_clamp < 0:
    raise ConfigError(f"config.rl.kl_clamp={config.rl.kl_clamp} must be >= 0 (0 = no clamp).")
  _choice(config, "rl.weight_decay_mask", ("matrices", "all"))
  if config.rl.dual_clip != 0 and config.rl.dual_clip <= 1:
    raise ConfigError(f"config.rl.dual_clip={config.rl.dual_clip} must be 0 (off) or > 1 (the "
                      "reference: 3.0).")
  if config.rl.ppo_epochs < 1:
    raise ConfigError(f"config.rl.ppo_epochs={config.rl.ppo_epochs} must be at least 1.")
  mini, micro = config.rl.ppo_mini_batch_size, config.rl.micro_batch_size
  if mini < 0 or mini % micro:
    raise ConfigError(f"config.rl.ppo_mini_batch_size={mini} must be 0 (the whole batch) or a "
                      f"multiple of config.rl.micro_batch_size={micro}.")
  if config.rl.advantage_estimator == "gae":
    if config.mesh.role_split:
      raise ConfigError("config.rl.advantage_estimator='gae' trains one value model for both "
                        "roles on one mesh; set config.mesh.role_split=False.")
    for key in ("rl.critic_learning_rate", "rl.value_clip"):
      if _get(config, key) <= 0:
        raise ConfigError(f"config.{key}={_get(config, key)} must be > 0.")
    for key in ("rl.gae_gamma", "rl.gae_lambda"):
      if not 0 <= _get(config, key) <= 1:
        raise ConfigError(f"config.{key}={_get(config, key)} must be in [0, 1].")
  for key in ("rewards.proposer_min_margin", "rewards.solver_min_margin"):
    if _get(config, key) < 0:
      raise ConfigError(f"config.{key}={_get(config, key)} must be >= 0 (0 = off).")
  check_task_options(config)
  check_context_length(config)


MATH_TASKS = ("arithmetic", "algebra", "generic")  # Answers in <answer> tags.


def check_task_options(config) -> None:
  """Options that need something of the task: a question generator, a vote to guard, a
  paraphrase."""
  from sqlm_jax.loop.roles import make_task
  from sqlm_jax.tasks import PROPOSAL_FORMATS, REFERENCE_FORMAT_TASKS
  _choice(config, "task.proposal_format", PROPOSAL_FORMATS)
  if (config.task.proposal_format == "reference"
      and config.task.name not in REFERENCE_FORMAT_TASKS):
    raise ConfigError(f"config.task.proposal_format='reference' is the reference trainer's "
                      f"format for {', '.join(REFERENCE_FORMAT_TASKS)}; task "
                      f"{config.task.name!r} has none, so use 'tagged'.")
  _choice(config, "task.code_extraction", ("closed", "reference"))
  _choice(config, "sandbox.output_match", ("tokens", "newlines"))
  if config.task.max_tests < 0:
    raise ConfigError(f"config.task.max_tests={config.task.max_tests} must be >= 0 (0 = exactly "
                      "5 tests per coding proposal).")
  _choice(config, "critic.head_init", ("zeros", "random"))
  task, _ = make_task(config)
  if config.task.question_source == "fixed" and task.generate_question is None:
    raise ConfigError(f"config.task.question_source='fixed' needs a question generator, which "
                      f"task {task.name!r} does not have; use tiny_addition, tiny_arithmetic or "
                      "arithmetic, or "
                      "question_source='proposer'.")
  if task.reward_kind != "vote":
    for key in ("rewards.proposer_min_margin", "rewards.solver_min_margin"):
      if _get(config, key):
        raise ConfigError(f"config.{key}={_get(config, key)} guards a majority vote; task "
                          f"{task.name!r} scores answers by tests, so set it to 0.")
  _choice(config, "rewards.answer_parser", ("lenient", "reference"))
  if config.rewards.answer_parser == "reference" and task.name not in MATH_TASKS:
    raise ConfigError(f"config.rewards.answer_parser='reference' reads integer answers from "
                      f"<answer> tags, the math topics' format; task {task.name!r} answers "
                      f"otherwise, so use 'lenient' (or one of {', '.join(MATH_TASKS)}).")
  check_groups(config, task)
  guard = config.rewards.paraphrase_guard
  if guard != "off" and (task.paraphrase is None or task.reward_kind != "vote"):
    raise ConfigError(f"config.rewards.paraphrase_guard={guard!r} needs a task that can re-ask a "
                      f"question in another form and votes on answers; task {task.name!r} "
                      "cannot, so set it to 'off' (tiny_addition and tiny_arithmetic can).")


def check_groups(config, task) -> None:
  """Group sizes under which a role cannot learn: the run would spend minutes and change nothing."""
  n = config.rollout.answers_per_question
  if task.reward_kind == "vote" and n < 3:
    raise ConfigError(
        f"config.rollout.answers_per_question={n}: task {task.name!r} rewards the solver by a "
        f"majority vote of its N answers, and with N < 3 no question can be neither trivial nor "
        f"impossible (1 < k < N for the proposer's reward), while a vote of {n} answers is "
        "unanimous or tied; use at least 3 (the default is 4, the paper's configs use more).")
  if config.rl.advantage_estimator not in rl.GROUP_ESTIMATORS:
    return  # A value model gives a baseline; groups of one still learn.
  if n < 2:
    raise ConfigError(
        f"config.rollout.answers_per_question={n}: rl.advantage_estimator="
        f"{config.rl.advantage_estimator!r} compares each answer with the other answers to its "
        "question, so with one answer every advantage is 0 and the solver never learns; use at "
        "least 2 (or rl.advantage_estimator='gae').")
  proposer_trains = (config.task.question_source == "proposer"
                     and config.proposer_update_every <= config.total_steps)
  if config.rollout.proposals_per_prompt < 2 and proposer_trains:
    raise ConfigError(
        f"config.rollout.proposals_per_prompt={config.rollout.proposals_per_prompt}: "
        f"rl.advantage_estimator={config.rl.advantage_estimator!r} compares each proposal with "
        "the other proposals for its topic prompt, so with one proposal every proposer advantage "
        "is 0 and the proposer never learns; use at least 2 (the default is 4), or freeze the "
        "proposer on purpose with proposer_update_every > total_steps.")


def check_context_length(config) -> None:
  """Every sampled sequence must fit the model's context (config.json's max_position_embeddings).

  The sampler's cache holds a prompt (rounded up to a power of two) plus the new tokens. The
  proposer's prompt is measured; the solver's is its template with a question as long as
  rollout.max_proposal_tokens (the longest a proposal can be, as the memory plan assumes);
  evaluation's at least the template (its questions only add to it).
  """
  import json
  with open(os.path.join(config.model.path, "config.json")) as f:
    limit = json.load(f).get("max_position_embeddings")
  if not limit:
    return
  from sqlm_jax.rollout.sampling import bucket
  from sqlm_jax.loop.roles import make_task
  from sqlm_jax.tasks.base import Proposal
  from sqlm_jax.models.tokenizer import encode_chat, load_tokenizer
  tokenizer = load_tokenizer(config.model.path)
  task, topic = make_task(config)
  proposer = bucket(len(encode_chat(tokenizer, task.proposer_messages(topic))))
  template = len(encode_chat(tokenizer, task.solver_messages(Proposal("?")))) - 1
  solver = template + config.rollout.max_proposal_tokens
  if config.rollout.max_solver_prompt_tokens:
    solver = min(solver, config.rollout.max_solver_prompt_tokens)
  solver = bucket(solver)
  template = bucket(template)
  if proposer >= limit or template >= limit:
    raise ConfigError(
        f"The prompts alone ({max(proposer, template)} tokens, rounded up to a power of two) fill "
        f"the model's context, max_position_embeddings={limit} in {config.model.path}/"
        "config.json; use a model with a longer context (or a shorter config.task.topic).")
  if solver >= limit:  # Only without a cut (rollout.max_solver_prompt_tokens) below the limit.
    raise ConfigError(
        f"config.rollout.max_proposal_tokens={config.rollout.max_proposal_tokens}: a question "
        f"that long makes the solver's prompt {solver} tokens, the whole of the model's context, "
        f"max_position_embeddings={limit} in {config.model.path}/config.json; lower "
        "config.rollout.max_proposal_tokens.")
  needs = [("rollout.max_proposal_tokens", "the proposer's prompt", proposer,
            config.rollout.max_proposal_tokens),
           ("rollout.max_answer_tokens", "the solver's prompt with a question of "
            "rollout.max_proposal_tokens tokens", solver, config.rollout.max_answer_tokens),
           ("eval.max_new_tokens", "the evaluation prompt's template", template,
            config.eval.max_new_tokens)]
  for key, what, prompt, new in needs:
    if prompt + new > limit:
      raise ConfigError(
          f"config.{key}={new} plus {what} ({prompt} tokens, rounded up to a power of two) is "
          f"{prompt + new}, more than the model's context, max_position_embeddings={limit} in "
          f"{config.model.path}/config.json; lower config.{key} to at most {limit - prompt}.")


def _get(config, dotted: str):
  value = config
  for part in dotted.split("."):
    value = value[part]
  return value


def _choice(config, dotted: str, choices) -> None:
  value = _get(config, dotted)
  if value not in choices:
    raise ConfigError(f"config.{dotted}={value!r} is not one of: {', '.join(choices)}.")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)  # Keep the console to the run's own summary lines.
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config configs/tiny.py")
  try:
    validate(config)
  except ConfigError as error:
    print(f"Config error: {error}", file=sys.stderr)
    sys.exit(2)
  name = os.path.splitext(os.path.basename(config_flags.get_config_filename(flags.FLAGS["config"])))[0]
  workdir = _WORKDIR.value or os.path.join("runs", name)
  if "://" in workdir:
    print(f"Config error: --workdir={workdir}: checkpoints could go there, but the logs, "
          "TensorBoard files and exports are written as local files; mount the bucket (e.g. "
          "gcsfuse) at the same path on every host and pass that path.", file=sys.stderr)
    sys.exit(2)
  from sqlm_jax.loop import selfplay  # After validation: loading JAX takes seconds.
  from sqlm_jax.scale import memory_plan
  try:
    if _DRY_RUN.value:
      dry_run(config, workdir)
      return
    summary = selfplay.train(config, workdir)
  except (sharding.MeshError, memory_plan.PlanError) as error:
    print(f"Config error: {error}", file=sys.stderr)
    sys.exit(2)
  except checkpoints.ResumeError as error:
    print(f"Cannot run in this workdir: {error}", file=sys.stderr)
    sys.exit(2)
  except multihost.MultihostError as error:
    print(f"Cannot start the processes together: {error}", file=sys.stderr)
    sys.exit(2)
  if not sharding.is_writer():
    return
  if summary.get("stopped"):
    print(f"\nStopped after step {summary['steps']}; saved {summary['checkpoint']}. Rerun the same "
          "command to continue.")
    return
  if summary.get("finished"):
    print(f"This run finished all {summary['steps']} steps already; its summary:")
  print(f"\nheld-out {summary['heldout_set']} {summary['heldout_split']} split "
        f"({summary['heldout_size']} problems), greedy accuracy:"
        f" base {summary['base_accuracy']:.3f} -> trained {summary['final_accuracy']:.3f}")
  print(f"metrics: {os.path.join(workdir, 'metrics.jsonl')}  summary: "
        f"{os.path.join(workdir, 'summary.json')}")


def dry_run(config, workdir: str) -> None:
  """The memory plan alone: mesh, per-phase bytes per device, memory_plan.json; the programs are
  compiled on abstract shapes and no weights are read."""
  from sqlm_jax.loop import roles
  from sqlm_jax.scale import memory_plan
  from sqlm_jax.models.tokenizer import load_tokenizer
  sharding.initialize(config.mesh)
  sharding.use_compile_cache(config.compile_cache_dir)
  layouts = roles.role_layouts(config)
  roles.check_batch_rule(layouts)
  roles.fit_micro_batch(config, layouts)
  model_config, _ = roles.model_configs(config)
  task, _ = roles.make_task(config)
  plan = memory_plan.memory_plan(config, model_config, layouts,
                                 load_tokenizer(config.model.path), task)
  if sharding.is_writer():
    print(memory_plan.format_plan(plan))
    print(f"plan: {memory_plan.write_plan(plan, workdir)}")


def parse_flags(argv):
  """absl flag parsing, with unknown or mistyped config keys reported in one line, no traceback."""
  _check_config_file(argv)
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as error:  # config_flags: a key that is not in the config.
    message = str(error).replace("\\n", " ").replace("\\'", "").replace("'", "").strip('"')
    keys = [a[2:].split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    bad = next((k for k in keys if k.split(".")[-1] in message.split()), "")
    hint = message[message.index("Did you mean"):] if "Did you mean" in message else ""
    print(f"Config error: {bad or message} is not a config key. {hint} The keys are listed with "
          "comments in sqlm_jax/config_base.py.", file=sys.stderr)
  except flags.Error as error:  # A value of the wrong type, or a config file that fails.
    print(f"Config error: {_short_flag_error(error)}", file=sys.stderr)
  sys.exit(2)


def _check_config_file(argv) -> None:
  """--config naming no file stops here: absl would only say so at the first use, in a traceback."""
  value = None
  for i, arg in enumerate(argv[1:], 1):
    if arg.startswith("--config="):
      value = arg[len("--config="):]
    elif arg == "--config" and i + 1 < len(argv):
      value = argv[i + 1]
  path = (value or "").split(":")[0]
  if value is None or os.path.isfile(path):
    return
  configs = config_base.CONFIGS_DIR
  names = sorted(f for f in os.listdir(configs) if f.endswith(".py")) if os.path.isdir(
      configs) else []
  print(f"Config error: --config={value}: no such file {path!r}"
        + (f"; the repository's configs are configs/{{{','.join(names)}}}" if names else "")
        + ".", file=sys.stderr)
  sys.exit(2)


def _short_flag_error(error) -> str:
  """A config file that fails to load: its last line and the fix, without absl's traceback."""
  text = str(error)
  if "Error whilst parsing config file" not in text:
    return text
  flag = text.split(": Error whilst", 1)[0].removeprefix("flag ")
  last = text.strip().splitlines()[-1]
  if "get_config() takes 0 positional arguments" in last:
    return (f"{flag}: this config file has no variants; pass it without "
            f"':{flag.split(':', 1)[1] if ':' in flag else ''}'.")
  return f"{flag}: {last}"


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
