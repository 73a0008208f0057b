"""The update: losses -> gradients accumulated over micro-batches (`make_grad_fn`) -> one jitted
optimizer step (`make_update_fn`), for the policy and the value model alike.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from sqlm_jax.models.transformer import positions_from_mask
from sqlm_jax.rl.batching import OBJECTIVES, _check_batch, _split_micro
from sqlm_jax.rl.config import LOSS_AGGREGATIONS, _choice, _field
from sqlm_jax.rl.logprobs import _logprob_chunk, _model_logprobs
from sqlm_jax.rl.losses import (_empty_sums, _finish_metrics, _merge_sums, _policy_sums,
                                _value_sums, loss_normaliser)
from sqlm_jax.rl.optim import make_lr_schedule


def make_grad_fn(apply_fn, cfg, micro_batch_size, layout=None, objective="policy"):
  """(params, batch) -> (grads, metrics): the batch-loss gradient, accumulated over micro-batches.

  objective "policy": `policy_loss`, apply_fn gives logits [B, T, V] or (hidden, head) (see
  `sqlm_jax.rl.logprobs`; with the latter, cfg.logprob_chunk positions at a time). "value": the
  value model's clipped loss (`_value_sums`, always a token mean), apply_fn gives one value per
  position [B, T] (the value after reading that token); the batch holds old_values and returns
  instead of log-probs and advantages (`batching.VALUE_BATCH_KEYS`).
  Peak memory is that of one micro-batch's forward and backward (float32 logits [m, T, V], or
  [m, logprob_chunk, V] when chunked); the result equals the full-batch gradient for every
  loss_agg, because each micro-batch loss is divided by the whole batch's `loss_normaliser`.
  Gradients accumulate in float32 and come back in the parameters' dtype. With a
  `sharding.Layout`, each micro-batch's rows stay split over the mesh's batch axes.
  Not jitted: `make_update_fn` jits it.
  """
  if micro_batch_size < 1:
    raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}.")
  if objective not in OBJECTIVES:
    raise ValueError(f"objective={objective!r} is not one of {', '.join(OBJECTIVES)}.")
  temperature = float(_field(cfg, "temperature"))
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0 for log-probs, got {temperature}.")
  loss_agg = _choice(cfg, "loss_agg", LOSS_AGGREGATIONS) if objective == "policy" else "token_mean"
  chunk = _logprob_chunk(_field(cfg, "logprob_chunk"))

  def micro_loss(params, mb, normaliser):
    if layout is not None:
      mb = {k: layout.constrain(v, ("batch",) + (None,) * (v.ndim - 1)) for k, v in mb.items()}
    positions = positions_from_mask(mb["attention_mask"])
    out = apply_fn(params, mb["tokens"], positions, mb["attention_mask"])
    if objective == "value":  # Target-aligned: the value before token t is read at t - 1.
      if isinstance(out, tuple):
        raise ValueError("objective='value' needs an apply_fn that returns values [B, T], not a "
                         "(hidden, head) pair; pass the value model's apply (sqlm_jax.rl.critic).")
      values = jnp.pad(out[:, :-1], ((0, 0), (1, 0)))  # [m, T]
      objective_sum, sums = _value_sums(values, mb["old_values"], mb["returns"],
                                        mb["loss_mask"], mb["sample_weight"], cfg)
      return objective_sum / normaliser, sums
    logprobs, entropy = _model_logprobs(out, mb["tokens"], temperature, chunk, layout)  # [m, T]
    objective_sum, sums = _policy_sums(
        logprobs, mb["old_logprobs"], mb["advantages"], mb["loss_mask"], mb["sample_weight"],
        cfg, mb.get("ref_logprobs"), jax.lax.stop_gradient(entropy))
    return objective_sum / normaliser, sums

  grad_micro = jax.value_and_grad(micro_loss, has_aux=True)

  def grad_fn(params, batch):
    _check_batch(batch, cfg, micro_batch_size, objective)
    normaliser = loss_normaliser(batch["loss_mask"], batch["sample_weight"], loss_agg)
    micro = jax.tree.map(lambda x: _split_micro(x, micro_batch_size), batch)
    like = jax.eval_shape(grad_micro, params, jax.tree.map(lambda x: x[0], micro),
                          normaliser)[0][1]

    def accumulate(carry, mb):
      grads, loss, sums = carry
      (mb_loss, mb_sums), mb_grads = grad_micro(params, mb, normaliser)
      grads = jax.tree.map(lambda g, d: g + d.astype(jnp.float32), grads, mb_grads)
      return (grads, loss + mb_loss, _merge_sums(sums, mb_sums)), None

    init = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
            jnp.zeros((), jnp.float32), _empty_sums(like))
    (grads, loss, sums), _ = jax.lax.scan(accumulate, init, micro)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    metrics = _finish_metrics(sums)
    metrics["loss"] = loss
    return grads, metrics

  return grad_fn


def make_update_fn(apply_fn, optimizer, cfg, micro_batch_size, layout=None,
                   param_shardings=None, opt_shardings=None, objective="policy"):
  """Jitted `update(params, opt_state, batches, step=None) -> (params, opt_state, metrics)`.

  The one update, for the policy and (objective="value") the value model: one optimizer step.
  `batches` is one batch or a tuple of batches (one per role when proposer and solver share
  weights and their gradients are summed): one step on the sum of their losses' gradients,
  each accumulated over micro-batches (see `make_grad_fn`); metrics is a dict, or a tuple of
  dicts, with grad_norm (the global norm of the summed gradient, before clipping),
  learning_rate and skipped_updates (1 when a non-finite gradient left params and opt_state
  unchanged, see cfg.skip_nonfinite_updates) added to those of the loss. `optimizer` comes from
  `make_optimizer(cfg)`; the step's learning rate is `make_lr_schedule(cfg)(step)`, step being
  the self-play step (see `default_config`), or the optimizer's own count when step is None.
  PPO mini-batches and epochs are repeated calls (`mini_batches`). params and opt_state are
  donated, so the update holds one copy of each: do not reuse the arrays passed in. With shardings, they are the
  explicit in/out shardings of both (the parameters' and optimizer state's layouts never
  change); batches keep the layout they come with (`Layout.put_batch`). B must be divisible
  by micro_batch_size.
  """
  grad_fn = make_grad_fn(apply_fn, cfg, micro_batch_size, layout, objective)
  schedule = make_lr_schedule(cfg)
  skip_nonfinite = bool(_field(cfg, "skip_nonfinite_updates"))

  def update(params, opt_state, batches, step=None):
    single = isinstance(batches, dict)
    results = [grad_fn(params, batch) for batch in ((batches,) if single else batches)]
    grads = jax.tree.map(lambda *g: sum(g[1:], g[0]), *[g for g, _ in results])
    grad_norm = optax.tree.norm(grads)
    lr = schedule(opt_state.count if step is None else step)
    opt_state = opt_state._replace(hyperparams=dict(opt_state.hyperparams, learning_rate=lr))
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    skipped = jnp.zeros((), jnp.float32)
    if skip_nonfinite:  # One bad batch must not poison the weights, the moments or a checkpoint.
      finite = jnp.isfinite(grad_norm)
      new_params, new_opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                               (new_params, new_opt_state), (params, opt_state))
      skipped = 1.0 - finite.astype(jnp.float32)
    metrics = tuple(dict(m, grad_norm=grad_norm, learning_rate=lr, skipped_updates=skipped)
                    for _, m in results)
    return new_params, new_opt_state, metrics[0] if single else metrics

  if param_shardings is None:
    return jax.jit(update, donate_argnums=(0, 1))
  return jax.jit(update, donate_argnums=(0, 1),
                 in_shardings=(param_shardings, opt_shardings, None, None),
                 out_shardings=(param_shardings, opt_shardings, None))
