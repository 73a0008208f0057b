"""The self-play loop: propose -> solve -> reward -> update -> log / evaluate / save.

One step, top to bottom (see `train_step`):
  1. propose  sample `proposals_per_prompt` proposals for each of `prompts_per_step` topic prompts
  2. parse    proposals -> questions; unparseable ones are masked out of both roles' losses
              (or, rewards.train_malformed_proposals, trained on with proposer reward 0)
  3. solve    sample N answers per question (one shared prefill per question)
  4. score    answers -> ids -> majority vote (or test pass rates for code) -> rewards [Q, N], [Q]
  5. update   with rl.advantage_estimator="gae", the value model on the proposer's batch, then
              the solver's; the solver every step, the proposer every `proposer_update_every`
              steps, each in PPO mini-batches
  6. log      metrics.jsonl, TensorBoard, samples.jsonl; evaluate every `eval.every` steps
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import random
import sys
import time
from typing import Any, Optional

import jax
import ml_collections
import numpy as np

from sqlm_jax import rl
from sqlm_jax.evals import evaluation
from sqlm_jax.loop import checkpoints, metrics as metrics_lib
from sqlm_jax.loop.batches import training_batch
from sqlm_jax.loop.roles import ROLES, RunState, Setup, role_key, setup  # noqa: F401 (setup)
from sqlm_jax.models.tokenizer import encode_chat
from sqlm_jax.reward import scoring
from sqlm_jax.rollout import decoding
from sqlm_jax.rollout.sampling import SampleOutput
from sqlm_jax.scale import memory_plan, multihost, sharding
from sqlm_jax.tasks.base import Proposal, Task

# ---- One step --------------------------------------------------------------------------------------


def fixed_questions(config, task: Task, step: int) -> list[Proposal]:
  """The step's questions from the task's own generator (task.question_source="fixed"), seeded
  from (seed, step) alone, so a resumed run draws the same ones."""
  rng = random.Random(f"{config.seed}:{step}")
  count = config.rollout.prompts_per_step * config.rollout.proposals_per_prompt
  return [task.generate_question(rng) for _ in range(count)]


def cut_prompts(prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
  """Each prompt's last max_tokens tokens (left truncation, as the reference); 0 = uncut."""
  return [p[-max_tokens:] for p in prompts] if max_tokens else prompts


def decode(s: Setup, state: RunState, role: str, copies: dict, prompts, key: jax.Array,
           **kwargs) -> SampleOutput:
  """A role's rollouts on its rollout layout, in calls of s.rows_per_call rows. `copies` keeps
  each parameter set's decoding copy for the step (both roles use one with shared weights)."""
  r = s.roles[role]
  if r.params_key not in copies:
    copies[r.params_key] = decoding.weights(r, state.params[r.params_key])
  return decoding.sample(r.sampler, copies[r.params_key], prompts, key,
                        rows_per_call=s.rows_per_call, **kwargs)


def parse_proposals(s: Setup, step: int, proposals_out: Optional[SampleOutput]):
  """Proposal texts [P*M], parsed proposals [P*M] (the task's generator's with fixed
  questions) and the solver's prompts: one per valid question, then, with the paraphrase
  guard, one per question re-asked in another form (its answers only vote)."""
  task, tok = s.task, s.tokenizer
  if s.config.task.question_source == "fixed":
    proposals = fixed_questions(s.config, task, step)
    texts = [p.question for p in proposals]
  else:
    texts = evaluation.decode_rows(tok, proposals_out)
    proposals = [task.parse_proposal(text) for text in texts]
  questions = [p for p in proposals if p.valid]
  prompts = [encode_chat(tok, task.solver_messages(p)) for p in questions]
  if s.config.rewards.paraphrase_guard != "off":
    prompts += [encode_chat(tok, task.solver_messages(task.paraphrase(p))) for p in questions]
  return texts, proposals, cut_prompts(prompts, s.config.rollout.max_solver_prompt_tokens)


def score_answers(s: Setup, state: RunState, proposals, questions, num_prompts: int,
                  answers_out: Optional[SampleOutput], proposals_out, key: jax.Array):
  """Answer texts [Q*N], extracted answers [Q][N], majorities [Q], k [Q], solver rewards
  [Q, N], proposer rewards [Q], solver advantages [Q, N] and the step's scoring metrics."""
  n, q = s.config.rollout.answers_per_question, len(questions)
  answer_texts = evaluation.decode_rows(s.tokenizer, answers_out) if questions else []
  extract = scoring.vote_answer(s.config, s.task)
  extracted = [[extract(t) for t in answer_texts[i * n:(i + 1) * n]]
               for i in range(num_prompts)]
  answers, paraphrase_answers = extracted[:q], extracted[q:]
  majority, k, solver_r, proposer_r, solver_adv, agrees = scoring.score(
      s, questions, answers, key, paraphrase_answers)
  m = metrics_lib.score_metrics(s, state, proposals, questions, answers, majority, solver_r,
                                proposer_r, k, answers_out, proposals_out)
  if agrees is not None:
    m["paraphrase_agreement"] = float(agrees.mean()) if q else None
  return answer_texts, answers, majority, k, solver_r, proposer_r, solver_adv, m


def train_step(s: Setup, state: RunState, key: jax.Array) -> tuple[RunState, dict, list[dict]]:
  c, task, tok = s.config, s.task, s.tokenizer
  n = c.rollout.answers_per_question
  fixed = c.task.question_source == "fixed"
  times, m = {}, {}
  sampling = dict(top_k=c.rollout.top_k, top_p=c.rollout.top_p,
                  temperature=c.rollout.temperature)
  copies = {}  # The step's decoding copies of the weights, freed before the update.

  # 1. Propose: every topic prompt is one proposer group of `proposals_per_prompt` samples. The
  #    prompts are identical, so all P*M proposals share one prefill (row r is in group r // M).
  #    With fixed questions the task's generator writes them instead, and nothing is sampled.
  t0 = time.perf_counter()
  proposals_out = None
  if not fixed:
    proposals_out = decode(
        s, state, "proposer", copies, [encode_chat(tok, task.proposer_messages(s.topic))],
        jax.random.fold_in(key, 0), max_new_tokens=c.rollout.max_proposal_tokens,
        num_samples=c.rollout.prompts_per_step * c.rollout.proposals_per_prompt, **sampling)
  # The proposer's own copy (separate weights) is freed before the solver's is made, so at
  # most one role's copy is held at a time, as the memory plan counts.
  proposer_key = s.roles["proposer"].params_key
  if proposer_key != s.roles["solver"].params_key and proposer_key in copies:
    decoding.free(copies.pop(proposer_key))
  times["propose"] = time.perf_counter() - t0

  # 2. Parse: proposals -> questions; the invalid are masked out of both losses. Host work
  #    that shapes the batch is done on process 0 alone and shared, so every process of a
  #    multi-process run builds the same batch.
  t0 = time.perf_counter()
  proposal_texts, proposals, solver_prompts = multihost.on_process_0(
      parse_proposals, s, state.step, proposals_out)  # [P*M], [P*M], [Q] (+ [Q] paraphrases)
  valid = np.array([p.valid for p in proposals])
  questions = [p for p in proposals if p.valid]  # [Q]
  times["host_parse"] = time.perf_counter() - t0

  # 3. Solve: N answers per question (and per paraphrase, with the guard) from one shared
  #    prefill.
  t0 = time.perf_counter()
  answers_out = None
  if questions:
    answers_out = decode(s, state, "solver", copies, solver_prompts, jax.random.fold_in(key, 1),
                         max_new_tokens=c.rollout.max_answer_tokens, num_samples=n, **sampling)
  for copy in copies.values():
    decoding.free(copy)
  times["solve"] = time.perf_counter() - t0

  # 4. Score: answers -> rewards (array code over [Q, N]), on process 0 alone and shared.
  t0 = time.perf_counter()
  q = len(questions)
  answer_texts, answers, majority, k, solver_r, proposer_r, solver_adv, score_m = \
      multihost.on_process_0(score_answers, s, state, proposals, questions, len(solver_prompts),
                             answers_out, proposals_out, jax.random.fold_in(key, 2))
  m.update(score_m)
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
  proposer_weights = None if fixed else scoring.proposer_weights(c, valid)
  # The value model fits the proposer's batch every step (verl), the policy only on its steps.
  if (update_proposer or critic_params is not None) and not fixed and proposer_weights.any():
    rows["proposer"] = len(proposals)
    batches["proposer"] = training_batch(s, "proposer", proposals_out, len(proposals),
                                         np.arange(len(proposals)),
                                         scoring.proposer_advantages(c, proposer_r, valid),
                                         proposer_weights,
                                         state.params[role_key(c, "proposer")], critic_params)
  mini = {role: rl.mini_batches(batch, rows[role], c.rl.ppo_mini_batch_size)
          for role, batch in batches.items()}
  policy_mini = {role: mbs for role, mbs in mini.items()
                 if role == "solver" or update_proposer}
  state, update_metrics = apply_role_updates(s, state, policy_mini, mini)
  for role, role_metrics in update_metrics.items():
    for name, value in role_metrics.items():
      m[f"{role}/{name}"] = float(value)
  # Optimizer steps left out because their gradients were not finite (rl.skip_nonfinite_updates).
  m["skipped_updates"] = sum(float(r.get("skipped_updates", 0)) for r in update_metrics.values())
  m["learning_rate"] = float(s.lr_schedule(state.step))
  times["train"] = time.perf_counter() - t0

  total = sum(times.values())
  m.update({f"time/{name}": value for name, value in times.items()})
  m["time/step"] = total
  m["time/host_fraction"] = (times["host_parse"] + times["host_score"]) / total
  trained_tokens = sum(float(update_metrics[r]["tokens"]) for r in policy_mini)
  m["train_tokens_per_s"] = trained_tokens / max(times["train"], 1e-9)
  samples = metrics_lib.sample_records(c.log.samples_per_step, proposals, proposal_texts,
                                       questions, answers, answer_texts, majority, solver_r,
                                       proposer_r, n)
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


def apply_role_updates(s: Setup, state: RunState, batches: dict[str, list],
                       critic_batches: Optional[dict[str, list]] = None
                       ) -> tuple[RunState, dict]:
  """Runs `update_plan`'s optimizer steps with the donated updates, all at the learning rate of
  self-play step state.step (see rl.default_config). With a value model, the critic first
  fits critic_batches (default `batches`) as verl does: the proposer's mini-batches, then the
  solver's, one step each, rl.ppo_epochs times, before either policy moves. Returns each
  role's (and the critic's) metrics over its steps: means, with token and sequence counts
  summed and the number of steps as optimizer_steps. With summed shared weights, grad_norm is
  the summed gradient's, reported as grad_norm_combined."""
  c = s.config
  params, opt_state = dict(state.params), dict(state.opt_state)
  per_role: dict[str, list] = {}
  if s.critic_update is not None:
    critic_batches = batches if critic_batches is None else critic_batches
    for role in ("proposer", "solver"):
      for _ in range(c.rl.ppo_epochs):
        for mb in critic_batches.get(role, []):
          params["critic"], opt_state["critic"], metrics = s.critic_update(
              params["critic"], opt_state["critic"], (mb,), state.step)
          per_role.setdefault("critic", []).extend(metrics)
  for key, roles, mbs in update_plan(c, batches):
    update = s.roles[roles[0]].update
    params[key], opt_state[key], metrics = update(params[key], opt_state[key], mbs, state.step)
    for role, m in zip(roles, metrics):
      per_role.setdefault(role, []).append(m)
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
    if name in ("tokens", "sequences", "skipped_updates"):
      out[name] = sum(values)
    elif name.endswith("_max"):
      out[name] = max(values)
    elif name.endswith("_min"):
      out[name] = min(values)
    else:
      out[name] = sum(values) / len(values)
  out["optimizer_steps"] = len(steps)
  return out


# ---- Evaluation and the run ---------------------------------------------------------------------


def evaluate(s: Setup, params, key) -> dict[str, float]:
  """The held-out evaluation of the solver's weights, decoded on its rollout layout."""
  solver = s.roles["solver"]
  copy = decoding.weights(solver, params)
  sample = functools.partial(decoding.sample, solver.sampler, rows_per_call=s.rows_per_call)
  try:
    return evaluation.run_heldout(s.config.eval, copy, sample, s.tokenizer, s.task, s.heldout,
                                  key, s.sandbox_pool)
  finally:
    decoding.free(copy)


def step_key(seed: int, step: int) -> jax.Array:
  """Each step's randomness from (seed, step) alone, so a resumed run continues identically."""
  return jax.random.fold_in(jax.random.key(seed), step)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs self-play for config.total_steps; returns the summary also written to summary.json.

  A workdir with a checkpoint (WORKDIR/checkpoints) is resumed: the run restores the newest
  complete one and continues, cutting the logs back to its step. On SIGTERM / SIGINT the run
  finishes the current step, saves and returns a summary with "stopped": True. In a
  multi-process run every process runs this same loop on its share of the mesh, in a workdir
  they all see (checked first); process 0 decides whether and from where to resume, computes
  the host-side results that shape each batch (sqlm_jax/scale/multihost.py), and alone writes
  (metrics, samples, exports, the dashboard).
  """
  from tqdm.auto import tqdm
  sharding.initialize(config.mesh)
  sharding.use_compile_cache(config.compile_cache_dir)
  writes = sharding.is_writer()
  say = print if writes else (lambda *args, **kwargs: None)
  multihost.check_same_software()
  multihost.check_shared_workdir(workdir)
  # (step, host data) of the checkpoint to resume (None: start), and the summary of a run that
  # is already done: process 0's reading of the workdir, or its refusal, on every process.
  saved, finished = multihost.on_process_0(resume_decision, config, workdir)
  if finished:
    return finished
  mngr = checkpoints.manager(workdir, config.checkpoint.keep)
  if writes:
    root = checkpoints.workdir_path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(config.to_json_best_effort(indent=2))
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
        stopped = multihost.any_process(stop.requested)
        every = config.checkpoint.every
        t0 = time.perf_counter()
        if stopped or step == config.total_steps or (every and step % every == 0):
          save(state)  # Asynchronous: the write overlaps the next step.
        m["time/checkpoint"] = time.perf_counter() - t0
        if writes and m["skipped_updates"]:
          print(f"Warning: step {step}: skipped {m['skipped_updates']:g} optimizer step(s) whose "
                "gradient norm was not finite; parameters and optimizer state kept "
                "(rl.skip_nonfinite_updates).", file=sys.stderr, flush=True)
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


def resume_decision(config, workdir: str) -> tuple[Optional[tuple[int, dict]], Optional[dict]]:
  """(step, host data) of the newest checkpoint to resume (None: a new run), and the saved
  summary when the run finished already. Starts over when config.overwrite; refuses (raises
  ResumeError) a checkpoint or logs this config cannot continue. Run by process 0 alone."""
  if config.overwrite:
    checkpoints.clear(workdir)
  saved = None
  if (checkpoints.workdir_path(workdir) / checkpoints.CHECKPOINT_DIR).is_dir():
    reader = checkpoints.manager(workdir, read_only=True, this_process_only=True)
    saved = checkpoints.read_host(reader)
    reader.close()
  if saved:
    return saved, resume_check(config, workdir, *saved)
  checkpoints.check_workdir(workdir, config)
  return None, None


def resume_check(config, workdir: str, step: int, host: dict) -> Optional[dict[str, Any]]:
  """Refuses a checkpoint this config cannot continue; the saved summary if the run is done."""
  folder = str(checkpoints.workdir_path(workdir) / checkpoints.CHECKPOINT_DIR / str(step))
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
  summary_path = checkpoints.workdir_path(workdir) / "summary.json"
  if step == config.total_steps and summary_path.is_file():
    return dict(json.loads(summary_path.read_text()), finished=True)
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


def export_roles(s: Setup, state: RunState, workdir: str) -> None:
  """WORKDIR/solver and WORKDIR/proposer as Hugging Face checkpoints (with the tokenizer); with
  shared weights, one export, WORKDIR/solver, serves both roles.

  Every process takes part in gathering the weights, one tensor at a time; process 0 writes.
  """
  for role in ROLES[:1] if s.config.shared_weights else ROLES:
    checkpoints.export(os.path.join(workdir, role), s.model_config,
                       state.params[role_key(s.config, role)], s.config.model.path)
