"""The self-play loop: propose -> solve -> reward -> update -> log / evaluate / save.

One step, top to bottom (see `train_step`):
  1. propose  sample `proposals_per_prompt` proposals for each of `prompts_per_step` topic prompts
  2. parse    proposals -> questions; unparseable ones are masked out of both roles' losses
  3. solve    sample N answers per question (one shared prefill per question)
  4. score    answers -> ids -> majority vote (or test pass rates for code) -> rewards [Q, N], [Q]
  5. update   the solver every step, the proposer every `proposer_update_every` steps, each in
              PPO mini-batches (and, with rl.advantage_estimator="gae", the value model)
  6. log      metrics.jsonl, TensorBoard, samples.jsonl; evaluate every `eval.every` steps
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import random
import time
from typing import Any, Optional

import jax
import ml_collections
import numpy as np

from sqlm_jax import (checkpoints, critic, diversity, evaluation, memory_plan,
                      metrics as metrics_lib, rewards, rl, sharding)
from sqlm_jax.models import ModelConfig, forward, load_pretrained, read_config
from sqlm_jax.sampling import SampleOutput, Sampler, bucket
from sqlm_jax.tasks import get_task
from sqlm_jax.tasks.base import Proposal, Task
from sqlm_jax.tasks.math_answers import answer_ids
from sqlm_jax.tokenizer import Tokenizer, encode_chat, load_tokenizer

ROLES = ("solver", "proposer")


@dataclasses.dataclass
class RunState:
  """Everything that changes during a run: what a whole-run checkpoint holds.

  `arrays()` is the device pytree (params and optimizer states, saved sharded) and `host()`
  the plain data; with shared weights, params/opt_state hold a single "policy" entry used by
  both roles; with rl.advantage_estimator="gae" they also hold the value model's, "critic"
  (sqlm_jax/critic.py). The frozen KL reference is not part of it: it is always the starting weights,
  reloaded from model.path by `setup`.
  """

  step: int
  params: dict[str, Any]
  opt_state: dict[str, Any]
  recent_questions: diversity.RecentQuestions

  def arrays(self) -> dict[str, Any]:
    return {"params": self.params, "opt_state": self.opt_state}

  def host(self) -> dict[str, Any]:
    return {"step": self.step, "recent_questions": self.recent_questions.steps(),
            "recent_questions_max_steps": self.recent_questions.max_steps}

  @classmethod
  def from_saved(cls, arrays: dict[str, Any], host: dict[str, Any]) -> "RunState":
    return cls(step=host["step"], params=arrays["params"], opt_state=arrays["opt_state"],
               recent_questions=diversity.RecentQuestions(host["recent_questions_max_steps"],
                                                          host["recent_questions"]))


@dataclasses.dataclass
class Setup:
  """What stays fixed during a run: the model, tokenizer, task, layouts, compiled functions.

  Dicts keyed by role ("proposer", "solver") hold each role's layout and sampler (the same
  objects when the roles share the mesh); dicts keyed by parameter set ("policy" with shared
  weights, else the roles, and "critic") hold the donated update functions.
  """

  config: ml_collections.ConfigDict
  model_config: ModelConfig
  tokenizer: Tokenizer
  task: Task
  topic: str
  layouts: dict[str, sharding.Layout]
  samplers: dict[str, Sampler]
  updates: dict[str, Any]
  lr_schedule: Any
  ref_logprob_fns: dict[str, Any]  # Empty without a KL term.
  ref_params: dict[str, Any]  # The frozen starting weights, one copy per distinct layout.
  old_logprob_fns: dict[str, Any]  # Set when sampling log-probs are not the policy's.
  value_fn: Optional[Any]  # The critic's old values, with rl.advantage_estimator="gae".
  heldout: list[dict]
  memory_plan: dict
  sandbox_pool: Optional[Any] = None


def role_key(config, role: str) -> str:
  return "policy" if config.shared_weights else role


def recomputes_old_logprobs(config) -> bool:
  """Whether old log-probs come from the trainer's forward pass rather than the sampler's.

  rl.recompute_old_logprobs, or when unset: whenever model.dtype is not float32 (the sampler's
  and the trainer's numerics then differ); always under top-k / top-p, whose sampling
  distribution is not the policy's.
  """
  value = config.rl.recompute_old_logprobs
  if value is None:
    value = config.model.dtype != "float32"
  return bool(value) or config.rollout.top_k > 0 or config.rollout.top_p < 1.0


# ---- Setup ---------------------------------------------------------------------------------------


def make_task(config) -> tuple[Task, str]:
  """The Task and the topic text (a free-text topic falls back to the generic math format)."""
  if config.task.name == "generic":
    from sqlm_jax.tasks import generic
    task = generic.make_task(config.task.topic or generic.DEFAULT_TOPIC)
  else:
    task = get_task(config.task.name)
  return task, config.task.topic or task.default_topic


def role_layouts(config) -> dict[str, sharding.Layout]:
  """Each role's mesh: both on every device, or (mesh.role_split) half of the devices each.

  With shared weights there is one parameter set, so the roles always share the mesh. A split
  gives each role half of every process's devices, so both meshes span every process.
  """
  m = config.mesh
  rules = sharding.rules_from_config(m.rules)
  if not m.role_split or config.shared_weights:
    layout = sharding.Layout(sharding.make_mesh(m.data, m.fsdp, m.tensor), rules)
    return {role: layout for role in ROLES}
  halves = {role: [] for role in ROLES}
  for process in range(jax.process_count()):
    local = [d for d in jax.devices() if d.process_index == process]
    if len(local) % 2:
      raise sharding.MeshError(f"mesh.role_split=True needs an even number of devices per "
                               f"process; process {process} has {len(local)}.")
    halves["proposer"] += local[:len(local) // 2]
    halves["solver"] += local[len(local) // 2:]
  return {role: sharding.Layout(sharding.make_mesh(m.data, m.fsdp, m.tensor, devices), rules)
          for role, devices in halves.items()}


def setup(config: ml_collections.ConfigDict) -> tuple[Setup, RunState]:
  layouts = role_layouts(config)
  model_config = read_config(config.model.path, config.model.dtype, config.model.param_dtype,
                             remat=config.model.remat)
  tokenizer = load_tokenizer(config.model.path)
  task, topic = make_task(config)
  # Checked before any weight loads; compiled (exact) activations where there is a limit to meet.
  plan = memory_plan.memory_plan(config, model_config, layouts, tokenizer, task,
                                 compile_activations=memory_plan.device_memory_bytes() is not None)
  memory_plan.check(plan)
  optimizer = rl.make_optimizer(config.rl)
  recompute = recomputes_old_logprobs(config)

  def load(layout):
    """The checkpoint read straight into `layout`'s parameter shardings."""
    shardings = sharding.param_shardings(layout, model_config)
    return load_pretrained(config.model.path, dtype=config.model.dtype,
                           param_dtype=config.model.param_dtype, remat=config.model.remat,
                           shardings=shardings)[1]

  samplers, per_layout = {}, {}  # per_layout: id(layout) -> (sampler, logprob fn, shardings)
  for role, layout in layouts.items():
    if id(layout) not in per_layout:
      shardings = sharding.param_shardings(layout, model_config)
      apply_fn = functools.partial(_apply, config=model_config, layout=layout)
      per_layout[id(layout)] = (
          Sampler(model_config, pad_id=tokenizer.pad_id, stop_ids=tokenizer.stop_ids,
                  layout=layout),
          rl.make_logprob_fn(apply_fn, config.rl.temperature, config.rl.micro_batch_size,
                             shardings),
          shardings, apply_fn)
    samplers[role] = per_layout[id(layout)][0]

  params, opt_state, updates = {}, {}, {}
  for key in (("policy",) if config.shared_weights else ROLES):
    layout = layouts["solver" if key == "policy" else key]
    _, _, shardings, apply_fn = per_layout[id(layout)]
    params[key] = load(layout)
    opt_shardings = sharding.like_params(optimizer, shardings,
                                         jax.eval_shape(optimizer.init, params[key]),
                                         layout.replicated)
    opt_state[key] = jax.jit(optimizer.init, out_shardings=opt_shardings)(params[key])
    updates[key] = rl.make_update_fn(apply_fn, optimizer, config.rl, config.rl.micro_batch_size,
                                     layout, shardings, opt_shardings)
  value_fn = None
  if config.rl.advantage_estimator == "gae":  # The value model, on the solver's devices.
    layout = layouts["solver"]
    shardings = critic.param_shardings(layout, model_config)
    params["critic"] = jax.jit(functools.partial(critic.init, model_config=model_config),
                               out_shardings=shardings)(load(layout))
    critic_cfg = rl.critic_config(config.rl)
    critic_optimizer = rl.make_optimizer(critic_cfg)
    opt_shardings = sharding.like_params(critic_optimizer, shardings,
                                         jax.eval_shape(critic_optimizer.init, params["critic"]),
                                         layout.replicated)
    opt_state["critic"] = jax.jit(critic_optimizer.init,
                                  out_shardings=opt_shardings)(params["critic"])
    critic_apply = functools.partial(critic.apply, config=model_config, layout=layout)
    updates["critic"] = rl.make_update_fn(critic_apply, critic_optimizer, critic_cfg,
                                          config.rl.micro_batch_size, layout, shardings,
                                          opt_shardings, objective="value")
    value_fn = rl.make_value_fn(critic_apply, config.rl.micro_batch_size, shardings)
  ref_params, ref_fns = {}, {}
  if config.rl.kl_coef > 0:  # The frozen start, on each role's devices.
    by_layout = {}
    for role, layout in layouts.items():
      if id(layout) not in by_layout:
        by_layout[id(layout)] = load(layout)
      ref_params[role] = by_layout[id(layout)]
      ref_fns[role] = per_layout[id(layout)][1]
  heldout = evaluation.load_examples(config.eval.heldout, config.eval.num_examples,
                                     config.eval.data_dir, config.eval.split)
  pool = None
  if task.reward_kind == "tests" or config.eval.heldout == "humaneval":
    from sqlm_jax import sandbox
    pool = sandbox.SandboxPool(workers=config.sandbox.workers or None,
                               limits=sandbox.Limits(timeout_s=config.sandbox.timeout_s),
                               allow_unsandboxed=config.sandbox.allow_unsandboxed)
  s = Setup(config=config, model_config=model_config, tokenizer=tokenizer, task=task, topic=topic,
            layouts=layouts, samplers=samplers, updates=updates,
            lr_schedule=rl.make_lr_schedule(config.rl), ref_logprob_fns=ref_fns,
            ref_params=ref_params,
            old_logprob_fns={role: per_layout[id(layouts[role])][1] for role in ROLES}
            if recompute else {},
            value_fn=value_fn, heldout=heldout, memory_plan=plan, sandbox_pool=pool)
  state = RunState(step=0, params=params, opt_state=opt_state,
                   recent_questions=diversity.RecentQuestions(max_steps=10))
  return s, state


def _apply(params, tokens, positions, mask, *, config, layout):
  return forward(params, config, tokens, positions, mask, layout)


# ---- Rollouts -> training batches -----------------------------------------------------------------


def training_batch(s: Setup, role: str, out: SampleOutput, num_samples: int, rows: np.ndarray,
                   advantages: np.ndarray, weights: np.ndarray, params,
                   critic_params=None) -> dict[str, jax.Array]:
  """Prompt + completion rows of a SampleOutput as the batch dict rl.make_grad_fn expects.

  The completion part is trimmed to a length bucket and the rows padded (with copies of a real
  row at weight 0) to a bucketed multiple of the micro-batch, so shapes repeat across steps.
  Every process builds the same host batch; `put_batch` keeps each process's rows only.
  Reference and old log-probs come from the weights before any update. With a value model
  (critic_params), `advantages` are the sequences' rewards: they become per-token GAE
  advantages, and the batch also carries the old values and the returns the critic learns.
  """
  micro = s.config.rl.micro_batch_size
  prompt_rows = rows // num_samples
  lengths = out.lengths[rows]
  length = min(out.tokens.shape[1], bucket(int(lengths.max()), 16))
  completion_mask = np.arange(length)[None, :] < lengths[:, None]  # [R, L]
  prompt_mask = out.prompt_mask[prompt_rows]
  batch = {
      "tokens": np.concatenate([out.prompt_tokens[prompt_rows], out.tokens[rows, :length]], 1),
      "attention_mask": np.concatenate([prompt_mask, completion_mask], 1),
      "loss_mask": np.concatenate([np.zeros_like(prompt_mask), completion_mask], 1).astype(np.float32),
      "old_logprobs": np.concatenate([np.zeros(prompt_mask.shape, np.float32),
                                      out.logprobs[rows, :length] * completion_mask], 1),
      "advantages": advantages.astype(np.float32),
      "sample_weight": weights.astype(np.float32),
  }
  size = -(-bucket(len(rows), 1) // micro) * micro
  pad = size - len(rows)
  for name, value in batch.items():
    filler = np.repeat(value[:1], pad, axis=0)
    if name == "sample_weight":
      filler = np.zeros_like(filler)
    batch[name] = np.concatenate([value, filler], 0)
  batch = s.layouts[role].put_batch(batch)
  if role in s.ref_logprob_fns:
    batch["ref_logprobs"] = s.ref_logprob_fns[role](s.ref_params[role], batch["tokens"],
                                                    batch["attention_mask"]) * batch["loss_mask"]
  if role in s.old_logprob_fns:  # Score the sampled tokens with the trainer's forward pass.
    batch["old_logprobs"] = s.old_logprob_fns[role](params, batch["tokens"],
                                                    batch["attention_mask"]) * batch["loss_mask"]
  if critic_params is not None:
    batch.update(gae_batch(batch, s.value_fn(critic_params, batch["tokens"],
                                             batch["attention_mask"]),
                           gamma=s.config.rl.gae_gamma, lam=s.config.rl.gae_lambda))
  return batch


@functools.partial(jax.jit, static_argnames=("gamma", "lam"))
def gae_batch(batch, values, *, gamma, lam):
  """Per-token advantages, old values and returns of a batch whose `advantages` hold rewards."""
  mask = batch["loss_mask"] * (batch["sample_weight"] > 0)[:, None]  # [B, T]
  token_rewards = rl.last_token_rewards(batch["advantages"], mask)
  advantages, returns = rl.gae_advantages(token_rewards, values, mask, gamma, lam)
  return {"advantages": advantages, "old_values": values * mask, "returns": returns}


# ---- Rewards and advantages (array code, jitted once per padded shape) ---------------------------


# The reward shape's constants are static: they come from the config and never change in a run.
@functools.partial(jax.jit, static_argnames=("centre", "width", "eps", "shape", "estimator",
                                             "min_votes", "break_ties", "invalid_votes", "ddof",
                                             "solver_reward", "proposer_min_margin",
                                             "solver_min_margin", "paraphrase_guard"))
def vote_signals(ids, centre, width, eps, *, shape, estimator, min_votes, break_ties,
                 invalid_votes=False, ddof=0, solver_reward="majority", proposer_min_margin=0,
                 solver_min_margin=0, paraphrase_guard="off", paraphrase_agrees=None, key=None):
  """answer ids [Q, N] -> majority id [Q], k [Q], solver reward [Q, N], proposer reward [Q],
  solver advantages [Q, N] (the N answers of a question are one group).

  The margin guard (0 = off): a question whose majority leads the runner-up by fewer than
  proposer_min_margin votes pays the proposer 0, by fewer than solver_min_margin rewards no
  answer. The paraphrase guard: where paraphrase_agrees [Q] is False (the question re-asked in
  another form got another majority), "proposer" pays the proposer 0 and "both" also rewards no
  answer. solver_reward="random" hands each question's rewards to random valid answers (`key`)
  and the advantages follow; the proposer is still paid from the real vote's k, so the control
  changes only what the solver learns from, not the questions it is asked.
  """
  majority_id, k, _ = rewards.majority_vote(ids, invalid_votes)
  solver_r = rewards.solver_reward(ids, min_votes, break_ties, invalid_votes)  # [Q, N]
  proposer_r = rewards.proposer_reward(k, ids.shape[1], shape, centre, width)  # [Q]
  if solver_min_margin > 0:
    solver_r *= rewards.confident_majority(ids, solver_min_margin, invalid_votes)[:, None]
  if proposer_min_margin > 0:
    proposer_r *= rewards.confident_majority(ids, proposer_min_margin, invalid_votes)
  if paraphrase_guard != "off":
    proposer_r *= paraphrase_agrees
  if paraphrase_guard == "both":
    solver_r *= paraphrase_agrees[:, None]
  if solver_reward == "random":
    solver_r = rewards.random_solver_reward(key, solver_r, ids >= 0)
  return majority_id, k, solver_r, proposer_r, rl.group_advantages(solver_r, estimator, eps,
                                                                   ddof=ddof)


@functools.partial(jax.jit, static_argnames=("centre", "width", "eps", "shape", "estimator",
                                             "ddof", "solver_reward"))
def test_signals(passes, test_mask, centre, width, eps, *, shape, estimator, ddof=0,
                 solver_reward="majority", key=None):
  """Test results [Q, N, T] -> solver reward (pass rate) [Q, N], proposer reward [Q], advantages.

  solver_reward="random" shuffles each question's pass rates among its N programs (`key`).
  """
  solver_r = rewards.pass_rate_solver_reward(passes, test_mask)
  proposer_r = rewards.pass_rate_proposer_reward(passes, test_mask, shape, centre, width)
  if solver_reward == "random":
    solver_r = rewards.random_solver_reward(key, solver_r)
  return solver_r, proposer_r, rl.group_advantages(solver_r, estimator, eps, ddof=ddof)


def score(s: Setup, questions: list[Proposal], answers: list[list], key: jax.Array,
          paraphrase_answers: Optional[list[list]] = None):
  """Answers -> majority answers [Q], k [Q], solver rewards [Q, N], proposer rewards [Q],
  solver advantages [Q, N] (under GAE the rewards: the critic makes the advantages) and, with
  the paraphrase guard, whether each question's paraphrase got the same majority [Q] (else
  None)."""
  c, n, q = s.config, s.config.rollout.answers_per_question, len(questions)
  gae, agrees = c.rl.advantage_estimator == "gae", None
  shape = dict(shape=c.rewards.proposer_shape, centre=c.rewards.gaussian_centre,
               width=c.rewards.gaussian_width, eps=c.rl.advantage_eps, ddof=c.rl.std_ddof,
               estimator="grpo" if gae else c.rl.advantage_estimator,
               solver_reward=c.rewards.solver_reward, key=key)
  rows = bucket(q, 1)  # Padded question count: the jitted reward code sees few shapes.
  if s.task.reward_kind == "tests":
    from sqlm_jax.tasks.coding import pass_matrix
    passes, test_mask = pass_matrix(questions + [Proposal(None)] * (rows - q),
                                    answers + [[None] * n] * (rows - q), s.sandbox_pool)
    solver_r, proposer_r, solver_adv = test_signals(passes, test_mask, **shape)
    # Answers passing every test (a random shuffle keeps each question's rewards).
    k = (np.asarray(solver_r) == 1.0).sum(-1)
    majority = [None] * q
  else:
    guard = c.rewards.paraphrase_guard
    if guard != "off":  # One numbering for the answers to a question and to its paraphrase.
      answers_and_paraphrases = [a + b for a, b in zip(answers, paraphrase_answers)]
    else:
      answers_and_paraphrases = answers
    ids = np.full((rows, n if guard == "off" else 2 * n), -1, np.int32)
    ids[:q] = answer_ids(answers_and_paraphrases) if q else ids[:0]
    ids, paraphrase_ids = ids[:, :n], ids[:, n:]
    if guard != "off":
      agrees = np.asarray(rewards.majorities_agree(ids, paraphrase_ids,
                                                   c.rewards.invalid_answers_vote))
    majority_id, k, solver_r, proposer_r, solver_adv = vote_signals(
        ids, min_votes=c.rewards.min_votes, break_ties=c.rewards.break_ties,
        invalid_votes=c.rewards.invalid_answers_vote,
        proposer_min_margin=c.rewards.proposer_min_margin,
        solver_min_margin=c.rewards.solver_min_margin, paraphrase_guard=guard,
        paraphrase_agrees=agrees, **shape)
    majority_id = np.asarray(majority_id)
    majority = [row[list(ids[i]).index(majority_id[i])] if majority_id[i] >= 0 else None
                for i, row in enumerate(answers)]
  k, solver_r, proposer_r, solver_adv = (np.asarray(x)[:q] for x in (k, solver_r, proposer_r,
                                                                      solver_adv))
  return (majority, k, solver_r, proposer_r, (solver_r if gae else solver_adv),
          None if agrees is None else agrees[:q])


def fixed_questions(config, task: Task, step: int) -> list[Proposal]:
  """The step's questions from the task's own generator (task.question_source="fixed"), seeded
  from (seed, step) alone, so a resumed run draws the same ones."""
  rng = random.Random(f"{config.seed}:{step}")
  count = config.rollout.prompts_per_step * config.rollout.proposals_per_prompt
  return [task.generate_question(rng) for _ in range(count)]


def proposer_advantages(config, proposer_r: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """Proposer rewards [Q] -> advantages over every proposal [P*M], grouped by topic prompt, the
  invalid masked (weight 0, out of the statistics); under GAE the rewards themselves."""
  full_r = np.zeros(len(valid), np.float32)
  full_r[valid] = proposer_r
  if config.rl.advantage_estimator == "gae":
    return full_r
  groups = (config.rollout.prompts_per_step, config.rollout.proposals_per_prompt)
  return np.asarray(rl.group_advantages(
      full_r.reshape(groups), config.rl.advantage_estimator, config.rl.advantage_eps,
      mask=valid.reshape(groups), ddof=config.rl.std_ddof)).reshape(-1)


# ---- One step --------------------------------------------------------------------------------------


def train_step(s: Setup, state: RunState, key: jax.Array) -> tuple[RunState, dict, list[dict]]:
  c, task, tok = s.config, s.task, s.tokenizer
  n = c.rollout.answers_per_question
  fixed = c.task.question_source == "fixed"
  times, m = {}, {}
  sampling = dict(top_k=c.rollout.top_k, top_p=c.rollout.top_p)

  # 1. Propose: every topic prompt is one proposer group of `proposals_per_prompt` samples. The
  #    prompts are identical, so all P*M proposals share one prefill (row r is in group r // M).
  #    With fixed questions the task's generator writes them instead, and nothing is sampled.
  t0 = time.perf_counter()
  proposals_out = None
  if not fixed:
    proposals_out = s.samplers["proposer"](
        state.params[role_key(c, "proposer")], [encode_chat(tok, task.proposer_messages(s.topic))],
        jax.random.fold_in(key, 0), max_new_tokens=c.rollout.max_proposal_tokens,
        num_samples=c.rollout.prompts_per_step * c.rollout.proposals_per_prompt,
        temperature=c.rollout.temperature, **sampling)
  times["propose"] = time.perf_counter() - t0

  # 2. Parse: proposals -> questions; the invalid are masked out of both losses.
  t0 = time.perf_counter()
  if fixed:
    proposals = fixed_questions(c, task, state.step)
    proposal_texts = [p.question for p in proposals]
  else:
    proposal_texts = evaluation.decode_rows(tok, proposals_out)
    proposals = [task.parse_proposal(text) for text in proposal_texts]  # [P*M]
  valid = np.array([p.valid for p in proposals])
  questions = [p for p in proposals if p.valid]  # [Q]
  solver_prompts = [encode_chat(tok, task.solver_messages(p)) for p in questions]
  if c.rewards.paraphrase_guard != "off":  # Each question re-asked; its answers only vote.
    solver_prompts += [encode_chat(tok, task.solver_messages(task.paraphrase(p)))
                       for p in questions]
  times["host_parse"] = time.perf_counter() - t0

  # 3. Solve: N answers per question (and per paraphrase, with the guard) from one shared
  #    prefill.
  t0 = time.perf_counter()
  answers_out = None
  if questions:
    answers_out = s.samplers["solver"](
        state.params[role_key(c, "solver")], solver_prompts, jax.random.fold_in(key, 1),
        max_new_tokens=c.rollout.max_answer_tokens, num_samples=n,
        temperature=c.rollout.temperature, **sampling)
  times["solve"] = time.perf_counter() - t0

  # 4. Score: answers -> rewards (array code over [Q, N]).
  t0 = time.perf_counter()
  q = len(questions)
  answer_texts = evaluation.decode_rows(tok, answers_out) if questions else []
  extracted = [[task.extract_answer(t) for t in answer_texts[i * n:(i + 1) * n]]
               for i in range(len(solver_prompts))]
  answers, paraphrase_answers = extracted[:q], extracted[q:]
  majority, k, solver_r, proposer_r, solver_adv, agrees = score(
      s, questions, answers, jax.random.fold_in(key, 2), paraphrase_answers)
  m.update(score_metrics(s, state, proposals, questions, answers, majority, solver_r, proposer_r,
                         k, answers_out, proposals_out))
  if agrees is not None:
    m["paraphrase_agreement"] = float(agrees.mean()) if q else None
  times["host_score"] = time.perf_counter() - t0

  # 5. Update: solver groups are the N answers of a question; proposer groups the M proposals
  #    of a topic prompt. Every batch (old log-probs, values) is built from the weights before
  #    any update. Fixed questions have no proposer to update.
  t0 = time.perf_counter()
  batches, rows = {}, {}
  critic_params = state.params.get("critic")
  if q:
    rows["solver"] = q * n
    batches["solver"] = training_batch(s, "solver", answers_out, n, np.arange(q * n),
                                       solver_adv.reshape(-1), np.ones(q * n),
                                       state.params[role_key(c, "solver")], critic_params)
  update_proposer = not fixed and (state.step + 1) % c.proposer_update_every == 0
  if update_proposer and valid.any():
    rows["proposer"] = len(proposals)
    batches["proposer"] = training_batch(s, "proposer", proposals_out, len(proposals),
                                         np.arange(len(proposals)),
                                         proposer_advantages(c, proposer_r, valid),
                                         valid.astype(np.float32),
                                         state.params[role_key(c, "proposer")], critic_params)
  mini = {role: rl.mini_batches(batch, rows[role], c.rl.ppo_mini_batch_size)
          for role, batch in batches.items()}
  state, update_metrics = apply_role_updates(s, state, mini)
  for role, role_metrics in update_metrics.items():
    for name, value in role_metrics.items():
      m[f"{role}/{name}"] = float(value)
  m["learning_rate"] = float(s.lr_schedule(state.step))
  times["train"] = time.perf_counter() - t0

  total = sum(times.values())
  m.update({f"time/{name}": value for name, value in times.items()})
  m["time/step"] = total
  m["time/host_fraction"] = (times["host_parse"] + times["host_score"]) / total
  trained_tokens = sum(float(update_metrics[r]["tokens"]) for r in batches)
  m["train_tokens_per_s"] = trained_tokens / max(times["train"], 1e-9)
  samples = sample_records(c.log.samples_per_step, proposals, proposal_texts, questions, answers,
                           answer_texts, majority, solver_r, proposer_r, n)
  state = dataclasses.replace(state, step=state.step + 1)
  return state, m, samples


def update_plan(config, batches: dict[str, list]) -> list[tuple[str, tuple, tuple]]:
  """The optimizer steps of one self-play step, in order: (parameter set, roles, mini-batches).

  Each role's batch is a list of mini-batches, one optimizer step each, run rl.ppo_epochs
  times. Separate weights, or shared with "sequential": the solver's steps, then the
  proposer's (on the solver-updated weights when shared). Shared with "summed": the roles'
  j-th mini-batches in one step (their gradients add).
  """
  epochs = config.rl.ppo_epochs
  roles = [role for role in ROLES if role in batches]
  if config.shared_weights and config.shared_weights_update == "summed":
    joint = []
    for j in range(max((len(batches[r]) for r in roles), default=0)):
      present = tuple(r for r in roles if j < len(batches[r]))
      joint.append(("policy", present, tuple(batches[r][j] for r in present)))
    return joint * epochs
  return [(role_key(config, role), (role,), (mb,))
          for role in roles for _ in range(epochs) for mb in batches[role]]


def apply_role_updates(s: Setup, state: RunState, batches: dict[str, list]) -> tuple[RunState, dict]:
  """Runs `update_plan`'s optimizer steps with the donated updates, all at the learning rate of
  self-play step state.step (see rl.default_config); with a value model, the critic takes the
  same steps on the same mini-batches. Returns each role's (and the critic's) metrics over its
  steps: means, with token and sequence counts summed and the number of steps as
  optimizer_steps. With summed shared weights, grad_norm is the summed gradient's, reported as
  grad_norm_combined."""
  c = s.config
  params, opt_state = dict(state.params), dict(state.opt_state)
  per_role: dict[str, list] = {}
  plan = update_plan(c, batches)
  for key, roles, mbs in plan:
    params[key], opt_state[key], metrics = s.updates[key](params[key], opt_state[key], mbs,
                                                          state.step)
    for role, m in zip(roles, metrics):
      per_role.setdefault(role, []).append(m)
  if "critic" in s.updates:
    for _, _, mbs in plan:
      params["critic"], opt_state["critic"], metrics = s.updates["critic"](
          params["critic"], opt_state["critic"], mbs, state.step)
      per_role.setdefault("critic", []).extend(metrics)
  summed = c.shared_weights and c.shared_weights_update == "summed"
  out = {}
  for role, steps in per_role.items():
    out[role] = _mean_metrics(steps)
    if summed and role != "critic":
      out[role]["grad_norm_combined"] = out[role].pop("grad_norm")
  return dataclasses.replace(state, params=params, opt_state=opt_state), out


def _mean_metrics(steps: list[dict]) -> dict[str, float]:
  """One role's metrics over its optimizer steps."""
  steps = [jax.tree.map(float, m) for m in steps]
  out = {}
  for name in steps[0]:
    values = [m[name] for m in steps]
    if name in ("tokens", "sequences"):
      out[name] = sum(values)
    elif name.endswith("_max"):
      out[name] = max(values)
    elif name.endswith("_min"):
      out[name] = min(values)
    else:
      out[name] = sum(values) / len(values)
  out["optimizer_steps"] = len(steps)
  return out


# ---- What a researcher watches ----------------------------------------------------------------------


def score_metrics(s, state, proposals, questions, answers, majority, solver_r, proposer_r, k,
                  answers_out, proposals_out) -> dict[str, Any]:
  task, n = s.task, s.config.rollout.answers_per_question
  texts = [p.question for p in questions]
  m = {
      "valid_proposal_rate": float(np.mean([p.valid for p in proposals])),
      "num_questions": len(questions),
      "solver_reward": float(solver_r.mean()) if solver_r.size else None,
      "proposer_reward": float(proposer_r.mean()) if proposer_r.size else None,
      "k_histogram": np.bincount(np.asarray(k, np.int64), minlength=n + 1).tolist(),
      "answer_valid_rate": float(np.mean([[a is not None for a in row] for row in answers]))
                           if answers else None,
      "proposal_length": float(proposals_out.lengths.mean()) if proposals_out is not None
                         else None,
      "answer_length": float(answers_out.lengths.mean()) if answers_out is not None else None,
      "proposal_distinct2": diversity.distinct_n(texts, 2),
      "proposal_duplicate_rate": diversity.duplicate_rate(texts),
      "proposal_recent_overlap": state.recent_questions.update(texts),
  }
  # The pseudo-label monitor: how often the majority is actually right (never a reward).
  truths = [task.true_answer(p) for p in questions]
  judged = [(mj == t) for mj, t in zip(majority, truths) if t is not None and mj is not None]
  m["pseudo_label_accuracy"] = float(np.mean(judged)) if judged else None
  m["pseudo_label_coverage"] = len(judged) / len(questions) if questions else 0.0
  difficulties = [task.difficulty(p) for p in questions]
  difficulties = [d for d in difficulties if d is not None]
  m["proposal_difficulty"] = float(np.mean(difficulties)) if difficulties else None
  if difficulties:
    values, counts = np.unique(difficulties, return_counts=True)
    m["difficulty_histogram"] = {f"{v:g}": int(c) for v, c in zip(values, counts)}
  return m


def sample_records(count, proposals, proposal_texts, questions, answers, answer_texts, majority,
                   solver_r, proposer_r, n) -> list[dict]:
  """A few proposals with their N answers and rewards, for reading (samples.jsonl)."""
  records, q = [], 0
  for proposal, text in zip(proposals, proposal_texts):
    if len(records) >= count:
      break
    record = {"proposal": text, "question": proposal.question}
    if proposal.valid:
      record.update(answers=answer_texts[q * n:(q + 1) * n], extracted=answers[q],
                    majority=majority[q], solver_rewards=solver_r[q].tolist(),
                    proposer_reward=float(proposer_r[q]))
      q += 1
    records.append(record)
  return records


# ---- Evaluation and the run ---------------------------------------------------------------------


def evaluate(s: Setup, params, key) -> dict[str, float]:
  return evaluation.run_heldout(s.config.eval, params, s.samplers["solver"], s.tokenizer, s.task,
                                s.heldout, key, s.sandbox_pool)


def step_key(seed: int, step: int) -> jax.Array:
  """Each step's randomness from (seed, step) alone, so a resumed run continues identically."""
  return jax.random.fold_in(jax.random.key(seed), step)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs self-play for config.total_steps; returns the summary also written to summary.json.

  A workdir with a checkpoint (WORKDIR/checkpoints) is resumed: the run restores the newest
  complete one and continues, cutting the logs back to its step. On SIGTERM / SIGINT the run
  finishes the current step, saves and returns a summary with "stopped": True. In a
  multi-process run every process runs this same loop on its share of the mesh; only process 0
  writes (metrics, samples, exports, the dashboard).
  """
  from tqdm.auto import tqdm
  sharding.initialize(config.mesh)
  writes = sharding.is_writer()
  say = print if writes else (lambda *args, **kwargs: None)
  if config.overwrite:
    checkpoints.clear(workdir)
  _barrier("sqlm_jax_workdir_cleared")
  saved = None  # (step, host data) of the newest checkpoint.
  if os.path.isdir(os.path.join(workdir, checkpoints.CHECKPOINT_DIR)):
    reader = checkpoints.manager(workdir, read_only=True)
    saved = checkpoints.read_host(reader)
    reader.close()
  if saved:
    finished = resume_check(config, workdir, *saved)
    if finished:
      return finished
  else:
    checkpoints.check_workdir(workdir, config)
  _barrier("sqlm_jax_workdir_checked")
  mngr = checkpoints.manager(workdir, config.checkpoint.keep)
  if writes:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  s, state = setup(config)
  say(memory_plan.format_plan(s.memory_plan), flush=True)
  if writes:
    memory_plan.write_plan(s.memory_plan, workdir)
  # Evaluation samples come from their own key, the same at every evaluation of the run.
  eval_key = jax.random.fold_in(jax.random.key(config.seed), 2**31 - 1)
  if saved:
    state, host = restore_state(s, state, mngr, saved[0])
    base, last_eval = host["base_eval"], host["last_eval"]
    say(f"Resumed from {checkpoints.folder(mngr, state.step)} at step {state.step}.", flush=True)
  else:
    base = last_eval = evaluate(s, state.params[role_key(config, "solver")], eval_key)
  writer = metrics_lib.MetricsWriter(workdir, tensorboard=config.log.tensorboard,
                                     resume_from=state.step if saved else None) if writes else None
  if writer and not saved:
    writer.write(0, base)
    say(metrics_lib.summary_line(0, config.total_steps, base), flush=True)

  def save(state):
    host = dict(state.host(), base_eval=metrics_lib.plain(base),
                last_eval=metrics_lib.plain(last_eval),
                config=json.loads(config.to_json_best_effort()))
    checkpoints.save(mngr, state.step, state.arrays(), host)

  bar = tqdm(total=config.total_steps, initial=state.step,
             disable=not (config.log.progress_bar and writes), desc="self-play")
  stopped = False
  try:
    with checkpoints.StopSignal() as stop:
      while state.step < config.total_steps and not stopped:
        state, m, samples = train_step(s, state, step_key(config.seed, state.step))
        step = state.step
        if step == config.total_steps or (config.eval.every and step % config.eval.every == 0):
          last_eval = evaluate(s, state.params[role_key(config, "solver")], eval_key)
          m.update(last_eval)
        stopped = _any_process(stop.requested)
        every = config.checkpoint.every
        t0 = time.perf_counter()
        if stopped or step == config.total_steps or (every and step % every == 0):
          save(state)  # Asynchronous: the write overlaps the next step.
        m["time/checkpoint"] = time.perf_counter() - t0
        if writer:
          writer.write(step, m)
          writer.write_samples(step, samples)
        bar.update(1)
        if writes:
          bar.write(metrics_lib.summary_line(step, config.total_steps, m))
      mngr.wait_until_finished()
  finally:
    bar.close()
    if writer:
      writer.close()
    mngr.close()
  if stopped and state.step < config.total_steps:
    if s.sandbox_pool is not None:
      s.sandbox_pool.close()
    return {"stopped": True, "steps": state.step,
            "checkpoint": checkpoints.folder(mngr, state.step)}
  export_roles(s, state, workdir)
  summary = {
      "heldout_set": config.eval.heldout,
      "heldout_split": config.eval.split,
      "heldout_size": len(s.heldout),
      "base_accuracy": base["heldout/greedy_accuracy"],
      "final_accuracy": last_eval["heldout/greedy_accuracy"],
      "base_majority_accuracy": base.get("heldout/majority_accuracy"),
      "final_majority_accuracy": last_eval.get("heldout/majority_accuracy"),
      "steps": state.step,
  }
  if writes:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
    from sqlm_jax.plot import draw_dashboard
    draw_dashboard(workdir)
  if s.sandbox_pool is not None:
    s.sandbox_pool.close()
  return summary


def resume_check(config, workdir: str, step: int, host: dict) -> Optional[dict[str, Any]]:
  """Refuses a checkpoint this config cannot continue; the saved summary if the run is done."""
  folder = os.path.join(workdir, checkpoints.CHECKPOINT_DIR, str(step))
  differ = checkpoints.meaning_differences(checkpoints.flat_config(host["config"]),
                                           checkpoints.flat_config(config))
  if differ:
    raise checkpoints.ResumeError(
        f"{folder} was saved with a different {', '.join(differ)}; rerun with the same values "
        "to resume, or pass --config.overwrite=True (or another --workdir) to start a new run.")
  if step > config.total_steps:
    raise checkpoints.ResumeError(
        f"{folder} is past config.total_steps={config.total_steps}; pass "
        f"--config.total_steps={step} or more to resume it.")
  summary_path = os.path.join(workdir, "summary.json")
  if step == config.total_steps and os.path.isfile(summary_path):
    with open(summary_path) as f:
      return dict(json.load(f), finished=True)
  return None


def restore_state(s: Setup, state: RunState, mngr, newest: int) -> tuple[RunState, dict]:
  """The newest complete checkpoint at or below `newest`, read into this run's shardings.

  The starting arrays `setup` made only give the shapes and shardings; they are freed first,
  so a restore needs no more device memory than the run itself.
  """
  arrays = state.arrays()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          arrays)
  jax.tree.map(lambda x: x.delete(), arrays)
  restored = checkpoints.restore(mngr, abstract, newest)
  if restored is None:
    raise checkpoints.ResumeError(
        f"No checkpoint in {mngr.directory} could be read (see the warnings above); move the "
        "folder aside, or pass --config.overwrite=True to start over.")
  _, arrays, host = restored
  return RunState.from_saved(arrays, host), host


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _any_process(flag: bool) -> bool:
  """True when any process got a stop signal, so that every process stops at the same step."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(np.asarray(multihost_utils.process_allgather(np.array(flag))).any())


def export_roles(s: Setup, state: RunState, workdir: str) -> None:
  """WORKDIR/solver and WORKDIR/proposer as Hugging Face checkpoints (with the tokenizer).

  Every process takes part in gathering the weights; process 0 writes them.
  """
  for role in ROLES:
    checkpoints.export(os.path.join(workdir, role), s.model_config,
                       state.params[role_key(s.config, role)], s.config.model.path)
