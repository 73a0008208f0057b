"""The command line: config overrides users script against, and errors before any compilation."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The override paths the README documents; every config must accept them.
SMALL = ["--config.total_steps=2", "--config.seed=3", "--config.proposer_update_every=2",
         "--config.rl.ppo_mini_batch_size=4", "--config.rollout.prompts_per_step=2",
         "--config.rollout.proposals_per_prompt=2", "--config.rollout.answers_per_question=3",
         "--config.rollout.max_proposal_tokens=8", "--config.rollout.max_answer_tokens=6",
         "--config.eval.num_examples=2", "--config.eval.max_new_tokens=4",
         "--config.eval.num_samples=2", "--config.rl.micro_batch_size=4",
         "--config.model.dtype=float32", "--config.log.progress_bar=False"]


def run_main(*args, timeout=600):
  return subprocess.run([sys.executable, "-m", "sqlm_jax.main", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)


# The paper configs run end to end in CI's slow step (the CPU default's run is in the default
# run's tests/test_checkpoints.py and tests/test_notebook.py).
@pytest.mark.parametrize("config,extra", [
    pytest.param("configs/arithmetic.py", [], marks=pytest.mark.slow),
    pytest.param("configs/algebra.py", [], marks=pytest.mark.slow),
    pytest.param("configs/arithmetic.py", [
        "--config.task.name=generic", "--config.task.proposal_format=tagged",
        "--config.task.topic=Probability of dice rolls"], marks=pytest.mark.slow),
    pytest.param("configs/coding.py", [], marks=pytest.mark.slow),  # Sandbox; HumanEval.
])
def test_main_runs_steps_and_writes_metrics(qwen2_dir, tmp_path, config, extra):
  result = run_main("--config", config, f"--config.model.path={qwen2_dir}",
                    f"--workdir={tmp_path}", *SMALL, *extra)
  assert result.returncode == 0, result.stderr[-3000:]
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  step1, step2 = ([r for r in records if r["step"] == i][0] for i in (1, 2))
  for key in ("step", "solver_reward", "proposer_reward", "valid_proposal_rate",
              "pseudo_label_accuracy", "learning_rate"):
    assert key in step1, key
  assert "heldout/greedy_accuracy" in step2
  if step2["num_questions"]:  # Mini-batches of 4 of the questions' 3 answers each.
    assert step2["solver/optimizer_steps"] == -(-3 * step2["num_questions"] // 4)
    assert step2["solver/learning_rate"] == step2["learning_rate"]
  if step2["valid_proposal_rate"] > 0:  # The proposer's turn (every 2 steps), after the solver.
    assert step2["proposer/optimizer_steps"] == 1
  if "coding" in config:  # PPO with GAE: the value model trains with the policy.
    assert "critic/value_loss" in step2 or not step2["num_questions"]
  summary = json.load(open(tmp_path / "summary.json"))
  assert {"base_accuracy", "final_accuracy", "heldout_set", "heldout_size"} <= set(summary)
  assert "greedy accuracy" in result.stdout
  saved = json.load(open(tmp_path / "config.json"))
  assert saved["seed"] == 3
  assert saved["rl"]["total_steps"] == 2  # The cosine schedule ends with the run.


@pytest.mark.parametrize("args,expected", [
    (["--config.rl.learnin_rate=3"], "config.rl.learnin_rate is not a config key"),
    (["--config.total_steps=many"], "--config.total_steps=many"),
    ([], "config.model.path is required"),
    (["--config.model.path=/no/such/folder"], "'/no/such/folder' does not exist"),
    (["--config.model.path=/tmp", "--config.rewards.proposer_shape=cubic"], "config.model.path"),
])
def test_config_errors_stop_before_compiling(args, expected):
  result = run_main("--config", "configs/arithmetic.py", *args, timeout=120)
  assert result.returncode != 0
  assert expected in result.stderr, result.stderr[-2000:]
  assert "Traceback" not in result.stderr


def test_bad_choice_names_key_and_choices(qwen2_dir):
  result = run_main("--config", "configs/arithmetic.py", f"--config.model.path={qwen2_dir}",
                    "--config.rewards.proposer_shape=cubic", timeout=120)
  assert result.returncode == 2
  assert "config.rewards.proposer_shape='cubic' is not one of: sqlm, sqlm_paper" in result.stderr


def test_a_gs_workdir_is_refused_naming_a_mount(qwen2_dir):
  result = run_main("--config", "configs/tiny.py", "--workdir=gs://bucket/run", timeout=120)
  assert result.returncode == 2
  assert "--workdir=gs://bucket/run" in result.stderr and "gcsfuse" in result.stderr
  assert "Traceback" not in result.stderr


def test_split_must_exist_in_the_heldout_set(qwen2_dir):
  result = run_main("--config", "configs/arithmetic.py", f"--config.model.path={qwen2_dir}",
                    "--config.eval.split=validation", timeout=120)
  assert result.returncode == 2
  assert "config.eval.split='validation' is not one of: test." in result.stderr


def test_gaussian_width_must_be_positive(qwen2_dir):
  result = run_main("--config", "configs/arithmetic.py", f"--config.model.path={qwen2_dir}",
                    "--config.rewards.proposer_shape=gaussian",
                    "--config.rewards.gaussian_width=0", timeout=120)
  assert result.returncode == 2
  assert "config.rewards.gaussian_width=0" in result.stderr


def test_the_lr_schedule_ends_with_the_run_unless_told_otherwise():
  from sqlm_jax.config_base import load_config
  config = load_config("tiny")
  config.total_steps = 40
  assert config.rl.total_steps == 40
  config.rl.total_steps = 30  # An explicit schedule length does not change the run's length.
  assert (config.total_steps, config.rl.total_steps) == (40, 30)


@pytest.mark.parametrize("args,expected", [
    (["--config.task.question_source=fixed"],
     "config.task.question_source='fixed' needs a question generator, which task 'algebra'"),
    (["--config.task.question_source=written"],
     "config.task.question_source='written' is not one of: proposer, fixed."),
    (["--config.rewards.solver_reward=coin"],
     "config.rewards.solver_reward='coin' is not one of: majority, random."),
    (["--config.rewards.proposer_min_margin=-1"], "config.rewards.proposer_min_margin=-1"),
    (["--config.rewards.paraphrase_guard=both", "--config.task.name=generic",
      "--config.task.proposal_format=tagged"],
     "config.rewards.paraphrase_guard='both' needs a task that can re-ask a question"),
    (["--config.task.name=generic"],
     "config.task.proposal_format='reference' is the reference trainer's format for arithmetic, "
     "algebra, coding; task 'generic' has none"),
    (["--config.task.name=coding", "--config.task.proposal_format=tagged"],
     "config.rewards.answer_parser='reference' reads integer answers from <answer> tags"),
    (["--config.rewards.answer_parser=strict"],
     "config.rewards.answer_parser='strict' is not one of: lenient, reference."),
    (["--config.rl.dual_clip=0.5"], "config.rl.dual_clip=0.5 must be 0 (off) or > 1"),
    (["--config.rl.weight_decay_mask=vectors"],
     "config.rl.weight_decay_mask='vectors' is not one of: matrices, all."),
    (["--config.rollout.max_solver_prompt_tokens=-1"],
     "config.rollout.max_solver_prompt_tokens=-1 must be >= 0"),
    (["--config.critic.head_init=ones"],
     "config.critic.head_init='ones' is not one of: zeros, random."),
    (["--config.rewards.paraphrase_guard=on"],
     "config.rewards.paraphrase_guard='on' is not one of: off, proposer, both."),
])
def test_ablation_controls_are_checked(qwen2_dir, args, expected):
  result = run_main("--config", "configs/algebra.py", f"--config.model.path={qwen2_dir}", *args,
                    timeout=120)
  assert result.returncode == 2
  assert expected in result.stderr, result.stderr[-2000:]
  assert result.stderr.count("\n") == 1  # one line, no traceback


@pytest.fixture(scope="module")
def short_context_dir(tmp_path_factory):
  from tests import tiny
  return tiny.save_random_checkpoint(tmp_path_factory.mktemp("short"), "qwen2",
                                     max_position_embeddings=1024)


@pytest.mark.parametrize("args,expected", [
    (["--config.rollout.max_solver_prompt_tokens=0"],
     "config.rollout.max_proposal_tokens=1024: a question that long makes the solver's "
     "prompt 2048 tokens"),
    # The solver's prompt cut to 512 tokens (the paper configs): the proposer's limit is next.
    ([], "config.rollout.max_proposal_tokens=1024 plus the proposer's prompt"),
    (["--config.rollout.max_proposal_tokens=200"],
     "config.rollout.max_answer_tokens=1024 plus the solver's prompt"),
    (["--config.rollout.max_proposal_tokens=200", "--config.rollout.max_answer_tokens=200"],
     "lower config.eval.max_new_tokens to at most 768"),  # The reference template: 256 tokens.
])
def test_context_length_is_checked_before_loading(short_context_dir, args, expected):
  """A 1,024-token model and the paper's limits: the error names the key to lower."""
  from sqlm_jax import main
  from sqlm_jax.config_base import load_config
  config = load_config("arithmetic")
  config.model.path = short_context_dir
  for arg in args:
    key, value = arg[len("--config."):].split("=")
    section, name = key.split(".")
    config[section][name] = int(value)
  with pytest.raises(main.ConfigError, match="max_position_embeddings=1024") as error:
    main.validate(config)
  assert expected in str(error.value)


def test_too_few_answers_for_a_vote_is_refused_on_the_tiny_default():
  """N = 2 answers can never put a question in the 1 < k < N band: refused before loading."""
  result = run_main("--config", "configs/tiny.py", "--config.rollout.answers_per_question=2",
                    timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  assert "config.rollout.answers_per_question=2" in result.stderr
  assert "at least 3" in result.stderr
  assert "Traceback" not in result.stderr


@pytest.mark.parametrize("overrides,expected", [
    ({"rollout.answers_per_question": 1}, "config.rollout.answers_per_question=1"),
    ({"rollout.proposals_per_prompt": 1}, "config.rollout.proposals_per_prompt=1"),
    ({"rollout.proposals_per_prompt": 1, "task.question_source": "fixed"}, None),
    ({"rollout.proposals_per_prompt": 1, "proposer_update_every": 10**6}, None),
    ({"rollout.answers_per_question": 2, "rl.advantage_estimator": "gae",
      "mesh.role_split": False}, "config.rollout.answers_per_question=2"),
    ({"rollout.answers_per_question": 3}, None),
])
def test_groups_that_cannot_learn_are_refused(overrides, expected):
  """A group of one has all-zero advantages; a frozen or absent proposer may have one."""
  from sqlm_jax import main
  from sqlm_jax.config_base import load_config
  config = load_config("configs/tiny.py")
  for key, value in overrides.items():
    section, _, name = key.rpartition(".")
    (config[section] if section else config)[name] = value
  if expected is None:
    main.validate(config)
  else:
    with pytest.raises(main.ConfigError, match=expected):
      main.validate(config)


def test_one_answer_is_refused_for_tests_rewards_with_group_advantages(qwen2_dir):
  from sqlm_jax import main
  from sqlm_jax.config_base import load_config
  config = load_config("configs/coding.py")
  config.model.path = str(qwen2_dir)
  config.rollout.answers_per_question = 1
  config.rl.advantage_estimator = "grpo"
  with pytest.raises(main.ConfigError, match="answers_per_question=1.*never learns"):
    main.validate(config)
  config.rollout.answers_per_question = 2  # Tests, not a vote: two answers can learn.
  main.validate(config)


@pytest.mark.parametrize("args,expected", [
    (["--config", "configs/tiny.py:small"], "configs/tiny.py:small: this config file has no "
     "variants; pass it without ':small'"),
    (["--config=configs/tyni.py"], "no such file 'configs/tyni.py'; the repository's configs "
     "are configs/{algebra.py"),
    (["--config", "configs/coding.py:big"], "has no variant 'big'"),
    (["--config", "configs/arithmetic.py", "--config.model.path=Qwen/Qwen2.5-3B-Instruct"],
     "hf download Qwen/Qwen2.5-3B-Instruct --local-dir DIR"),
])
def test_config_file_mistakes_are_one_line(args, expected):
  result = run_main(*args, timeout=120)
  assert result.returncode == 2
  assert expected in result.stderr, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
