"""What a self-play run is made of: each role's fixed machinery, and the state that changes.

`setup(config)` builds one `Role` record per role (its training layout, its rollout layout,
sampler and weight resharder, its log-prob function, its donated update), the frozen KL
reference, the optional value model, the held-out set, and the starting `RunState`. With shared
weights both roles train one parameter set, "policy", and their records share its objects.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from typing import Any, Callable, Optional

import jax
import ml_collections

from sqlm_jax import rl
from sqlm_jax.evals import evaluation
from sqlm_jax.reward import diversity
from sqlm_jax.rollout import decoding
from sqlm_jax.scale import memory_plan, sharding
from sqlm_jax.models import ModelConfig, forward, load_pretrained, read_config, transformer
from sqlm_jax.rl import critic
from sqlm_jax.rollout.sampling import Sampler
from sqlm_jax.tasks import get_task
from sqlm_jax.tasks.base import Task
from sqlm_jax.models.tokenizer import Tokenizer, load_tokenizer

ROLES = ("solver", "proposer")


@dataclasses.dataclass
class RunState:
  """Everything that changes during a run: what a whole-run checkpoint holds.

  `arrays()` is the device pytree (params and optimizer states, saved sharded) and `host()`
  the plain data; with shared weights, params/opt_state hold a single "policy" entry used by
  both roles; with rl.advantage_estimator="gae" they also hold the value model's, "critic"
  (sqlm_jax/rl/critic.py). The frozen KL reference is not part of it: it is always the starting
  weights, reloaded from model.path by `setup`.
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


@dataclasses.dataclass(frozen=True)
class Role:
  """One role's fixed machinery; with shared weights both roles' records share these objects.

  params_key names the role's parameter set in RunState ("policy" or the role). `to_rollout`
  casts, splits per layer and reshards those weights into the rollout layout, where `sampler`
  decodes. `logprob_fn` scores sequences with the
  training forward pass (the frozen reference; recomputed old log-probs); `update` is the
  donated optimizer step of params_key.
  """

  name: str
  params_key: str
  layout: sharding.Layout
  rollout_layout: sharding.Layout
  sampler: Sampler
  to_rollout: Callable
  logprob_fn: Callable
  update: Callable


@dataclasses.dataclass
class Setup:
  """What stays fixed during a run: the model, tokenizer, task, roles, compiled functions."""

  config: ml_collections.ConfigDict
  model_config: ModelConfig
  tokenizer: Tokenizer
  task: Task
  topic: str
  roles: dict[str, Role]
  lr_schedule: Any
  reference: dict[str, Any]  # Frozen starting weights per role (empty without a KL term).
  recompute_old_logprobs: bool
  critic_update: Optional[Callable]  # With rl.advantage_estimator="gae": the value model's
  value_fn: Optional[Callable]  # donated update and its old values.
  heldout: list[dict]
  memory_plan: dict
  rows_per_call: int  # rollout.rows_per_call, or the plan's choice for 0.
  sandbox_pool: Optional[Any] = None


def role_key(config, role: str) -> str:
  return "policy" if config.shared_weights else role


def recomputes_old_logprobs(config) -> bool:
  """Whether old log-probs come from the trainer's forward pass rather than the sampler's.

  rl.recompute_old_logprobs, or when unset: whenever the sampler's numerics are not the
  trainer's float32 (model.dtype or rollout.dtype not float32); always under top-k / top-p,
  whose sampling distribution is not the policy's.
  """
  value = config.rl.recompute_old_logprobs
  if value is None:
    value = (config.model.dtype != "float32"
             or decoding.resolve_dtype(config.rollout.dtype, config) != "float32")
  return bool(value) or config.rollout.top_k > 0 or config.rollout.top_p < 1.0


def make_task(config) -> tuple[Task, str]:
  """The Task and the topic text (a free-text topic falls back to the generic math format)."""
  if config.task.name == "generic":
    from sqlm_jax.tasks import generic
    task = generic.make_task(config.task.topic or generic.DEFAULT_TOPIC)
  elif config.task.name == "coding":
    from sqlm_jax.tasks import coding
    task = coding.make_task(config.task.max_tests, config.task.code_extraction,
                            config.task.proposal_format)
  else:
    task = get_task(config.task.name, config.task.proposal_format)
  return task, config.task.topic or task.default_topic


def role_layouts(config) -> dict[str, sharding.Layout]:
  """Each role's training mesh: both on every device, or (mesh.role_split) half the devices each.

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


def check_batch_rule(layouts: dict[str, sharding.Layout]) -> None:
  """Refuses rules that leave training rows whole over a data or fsdp axis: every device of
  that axis would compute every row (an N-fold slowdown, or out of memory)."""
  for layout in layouts.values():
    axes = dict(layout.rules).get("batch") or ()
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    whole = [a for a in ("data", "fsdp") if layout.mesh.shape[a] > 1 and a not in axes]
    if whole:
      raise sharding.MeshError(
          f"mesh.rules.batch={','.join(axes)!r} does not split batch rows over mesh axis "
          f"{' and '.join(whole)} (size {math.prod(layout.mesh.shape[a] for a in whole)}): each "
          "of its devices would compute every row. Pass --config.mesh.rules.batch=data,fsdp.")


def fit_micro_batch(config, layouts: dict[str, sharding.Layout]) -> int:
  """rl.micro_batch_size rounded up to a multiple of every role's batch shards (mesh.data x
  mesh.fsdp), in place, with a warning naming the knob: a micro-batch the shards do not divide
  would run whole on every device (replicated); padded with zero-weight rows instead, its loss
  and metrics are unchanged. Called before anything compiles."""
  micro = config.rl.micro_batch_size
  shards = math.lcm(*(layout.batch_shards for layout in layouts.values()))
  fitted = -(-micro // shards) * shards
  if fitted == micro:
    return micro
  mini = config.rl.ppo_mini_batch_size
  if mini % fitted:
    raise sharding.MeshError(
        f"rl.micro_batch_size={micro} is not a multiple of the {shards} batch shards (mesh.data "
        f"x mesh.fsdp), and rl.ppo_mini_batch_size={mini} is not a multiple of {fitted}, the "
        f"micro-batch it would be padded to; set --config.rl.micro_batch_size to a multiple of "
        f"{shards} that divides rl.ppo_mini_batch_size.")
  if jax.process_index() == 0:
    print(f"Warning: rl.micro_batch_size={micro} is not a multiple of the {shards} batch shards "
          f"(mesh.data x mesh.fsdp): each micro-batch runs as {fitted} rows, padded with "
          f"zero-weight rows; set --config.rl.micro_batch_size to a multiple of {shards} to "
          "choose its size.", file=sys.stderr, flush=True)
  config.rl.micro_batch_size = fitted
  return fitted


def model_configs(config) -> tuple[ModelConfig, ModelConfig]:
  """The training model config and the decoding copy's (rollout.dtype weights)."""
  train = read_config(config.model.path, config.model.dtype, config.model.param_dtype,
                      remat=config.model.remat)
  return train, decoding.model_config(config, train)


def apply_fn(model_config: ModelConfig, layout: sharding.Layout, logprob_chunk: int = 0
             ) -> Callable:
  """The training forward pass as rl's functions take it: logits, or with rl.logprob_chunk the
  final hidden states and the output head, so log-probs are computed a chunk at a time."""
  if logprob_chunk > 0:
    return functools.partial(_hidden_and_head, config=model_config, layout=layout)
  return functools.partial(_apply, config=model_config, layout=layout)


def _apply(params, tokens, positions, mask, *, config, layout):
  return forward(params, config, tokens, positions, mask, layout)


def _hidden_and_head(params, tokens, positions, mask, *, config, layout):
  return transformer.hidden_and_head(params, config, tokens, positions, mask, layout)


def build_roles(config, model_config: ModelConfig, rollout_config: ModelConfig, tokenizer,
                layouts: dict[str, sharding.Layout], optimizer) -> dict[str, Role]:
  """One Role per role; roles on the same devices share the compiled functions (their parameter
  sets, if separate, have the same shapes and layout)."""
  built: dict[str, Role] = {}
  for name in ROLES:
    key, layout = role_key(config, name), layouts[name]
    same = next((r for r in built.values() if r.layout == layout), None)
    if same is not None:
      built[name] = dataclasses.replace(same, name=name, params_key=key)
      continue
    shardings = sharding.param_shardings(layout, model_config)
    opt_shardings = sharding.like_params(
        optimizer, shardings, jax.eval_shape(optimizer.init, _shapes(model_config)),
        layout.replicated)
    forward_fn = apply_fn(model_config, layout, config.rl.logprob_chunk)
    decode_layout = decoding.layout(layout, config.rollout.tensor)
    built[name] = Role(
        name=name, params_key=key, layout=layout, rollout_layout=decode_layout,
        sampler=Sampler(rollout_config, pad_id=tokenizer.pad_id, stop_ids=tokenizer.stop_ids,
                        layout=decode_layout, per_layer_params=True),
        to_rollout=decoding.make_resharder(layout, decode_layout, model_config, rollout_config),
        logprob_fn=rl.make_logprob_fn(forward_fn, config.rl.temperature,
                                      config.rl.micro_batch_size, shardings,
                                      logprob_chunk=config.rl.logprob_chunk, layout=layout),
        update=rl.make_update_fn(forward_fn, optimizer, config.rl, config.rl.micro_batch_size,
                                 layout, shardings, opt_shardings))
  return built


def _shapes(model_config: ModelConfig):
  return jax.eval_shape(lambda: transformer.init_params(model_config, jax.random.key(0)))


def setup(config: ml_collections.ConfigDict) -> tuple[Setup, RunState]:
  layouts = role_layouts(config)
  check_batch_rule(layouts)
  fit_micro_batch(config, layouts)
  model_config, rollout_config = model_configs(config)
  tokenizer = load_tokenizer(config.model.path)
  task, topic = make_task(config)
  # Checked before any weight loads; compiled programs where there is a limit to meet.
  plan = memory_plan.memory_plan(config, model_config, layouts, tokenizer, task,
                                 compile_programs=memory_plan.device_memory_bytes(config)
                                 is not None)
  memory_plan.check(plan)
  optimizer = rl.make_optimizer(config.rl)
  roles = build_roles(config, model_config, rollout_config, tokenizer, layouts, optimizer)

  def load(layout, dtype=None):
    """The checkpoint read straight into `layout`'s parameter shardings (cast to dtype)."""
    cfg = model_config if dtype is None else model_config.replace(param_dtype=dtype)
    return load_pretrained(config.model.path, dtype=config.model.dtype, param_dtype=cfg.param_dtype,
                           remat=config.model.remat,
                           shardings=sharding.param_shardings(layout, cfg))[1]

  params, opt_state = {}, {}
  for role in roles.values():
    if role.params_key not in params:
      params[role.params_key] = load(role.layout)
      opt_shardings = sharding.like_params(
          optimizer, sharding.param_shardings(role.layout, model_config),
          jax.eval_shape(optimizer.init, params[role.params_key]), role.layout.replicated)
      opt_state[role.params_key] = jax.jit(optimizer.init, out_shardings=opt_shardings)(
          params[role.params_key])
  critic_update = value_fn = None
  if config.rl.advantage_estimator == "gae":  # The value model, on the solver's devices.
    layout = layouts["solver"]
    shardings = critic.param_shardings(layout, model_config)
    init = functools.partial(critic.init, model_config=model_config,
                             head_init=config.critic.head_init)
    head_key = jax.random.fold_in(jax.random.key(config.seed), 2**31 - 2)
    params["critic"] = jax.jit(init, out_shardings=shardings)(load(layout), key=head_key)
    critic_cfg = rl.critic_config(config.rl)
    critic_optimizer = rl.make_optimizer(critic_cfg)
    opt_shardings = sharding.like_params(critic_optimizer, shardings,
                                         jax.eval_shape(critic_optimizer.init, params["critic"]),
                                         layout.replicated)
    opt_state["critic"] = jax.jit(critic_optimizer.init,
                                  out_shardings=opt_shardings)(params["critic"])
    critic_apply = functools.partial(critic.apply, config=model_config, layout=layout)
    critic_update = rl.make_update_fn(critic_apply, critic_optimizer, critic_cfg,
                                      config.rl.micro_batch_size, layout, shardings,
                                      opt_shardings, objective="value")
    value_fn = rl.make_value_fn(critic_apply, config.rl.micro_batch_size, shardings)
  reference = {}
  if config.rl.kl_coef > 0:  # The frozen start in rl.reference_dtype, on each role's devices.
    dtype = decoding.resolve_dtype(config.rl.reference_dtype, config)
    for role in roles.values():
      same = next((r for r in reference if roles[r].layout == role.layout), None)
      reference[role.name] = reference[same] if same else load(role.layout, dtype)
  heldout = evaluation.load_examples(config.eval.heldout, config.eval.num_examples,
                                     config.eval.data_dir, config.eval.split)
  pool = None
  if task.reward_kind == "tests" or config.eval.heldout == "humaneval":
    from sqlm_jax import sandbox
    pool = sandbox.SandboxPool(workers=config.sandbox.workers or None,
                               limits=sandbox.Limits(timeout_s=config.sandbox.timeout_s),
                               allow_unsandboxed=config.sandbox.allow_unsandboxed)
  s = Setup(config=config, model_config=model_config, tokenizer=tokenizer, task=task, topic=topic,
            roles=roles, lr_schedule=rl.make_lr_schedule(config.rl), reference=reference,
            recompute_old_logprobs=recomputes_old_logprobs(config), critic_update=critic_update,
            value_fn=value_fn, heldout=heldout, memory_plan=plan,
            rows_per_call=plan["rows_per_call"], sandbox_pool=pool)
  state = RunState(step=0, params=params, opt_state=opt_state,
                   recent_questions=diversity.RecentQuestions(max_steps=10))
  return s, state
