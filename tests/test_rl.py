"""Policy-gradient pieces against hand-worked values and a loop-by-loop NumPy reference."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from sqlm_jax import rl

pytestmark = pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")

V, D, T = 7, 8, 6


def _cfg(**overrides):
  cfg = rl.default_config()
  cfg.update(overrides)
  return cfg


# ------------------------------------------------------------------------------ advantages


def test_group_advantages_hand_cases():
  rewards = np.array([[1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
  np.testing.assert_allclose(
      rl.group_advantages(rewards, "grpo", eps=0.0),
      [[1, -1, -1, 1], [math.sqrt(3), -1 / math.sqrt(3), -1 / math.sqrt(3), -1 / math.sqrt(3)]],
      rtol=1e-6)
  np.testing.assert_allclose(
      rl.group_advantages(rewards, "rloo"),
      [[2 / 3, -2 / 3, -2 / 3, 2 / 3], [1, -1 / 3, -1 / 3, -1 / 3]], rtol=1e-6)
  np.testing.assert_allclose(
      rl.group_advantages(rewards, "drgrpo"),
      [[0.5, -0.5, -0.5, 0.5], [0.75, -0.25, -0.25, -0.25]], rtol=1e-6)


@pytest.mark.parametrize("estimator", rl.GROUP_ESTIMATORS)
def test_group_advantages_equal_rewards_are_exactly_zero(estimator):
  # 0.1 is not exact in binary: the mean rounds, and grpo's eps would amplify it.
  rewards = np.array([[0.1, 0.1, 0.1], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
  np.testing.assert_array_equal(rl.group_advantages(rewards, estimator), np.zeros((3, 3)))


def test_group_advantages_masked_members():
  rewards = np.array([[1.0, 0.0, 5.0, 1.0], [3.0, 1.0, 0.0, 0.0]])
  mask = np.array([[True, True, False, True], [True, False, False, False]])
  std = math.sqrt(2 / 9)
  np.testing.assert_allclose(
      rl.group_advantages(rewards, "grpo", eps=0.0, mask=mask),
      [[1 / 3 / std, -2 / 3 / std, 0, 1 / 3 / std], [0, 0, 0, 0]], rtol=1e-6)
  np.testing.assert_allclose(
      rl.group_advantages(rewards, "rloo", mask=mask), [[0.5, -1, 0, 0.5], [0, 0, 0, 0]],
      rtol=1e-6)
  np.testing.assert_allclose(
      rl.group_advantages(rewards, "drgrpo", mask=mask),
      [[1 / 3, -2 / 3, 0, 1 / 3], [0, 0, 0, 0]], rtol=1e-6, atol=1e-7)


def test_group_advantages_unknown_estimator():
  with pytest.raises(ValueError, match="'ppo'.*rloo"):
    rl.group_advantages(np.zeros((1, 2)), "ppo")


# ------------------------------------------------------------------------------- log-probs


def test_token_logprobs_shift_and_temperature():
  logits = np.random.default_rng(0).normal(size=(2, 3, 4)).astype(np.float32)
  tokens = np.array([[1, 2, 3], [0, 3, 3]])
  logprobs, entropy = rl.token_logprobs(jnp.asarray(logits), jnp.asarray(tokens), 2.0)
  assert logprobs.shape == entropy.shape == (2, 3)
  for b in range(2):
    assert logprobs[b, 0] == 0 and entropy[b, 0] == 0
    for t in range(1, 3):
      z = logits[b, t - 1] / 2.0
      logp = z - np.log(np.sum(np.exp(z)))
      np.testing.assert_allclose(logprobs[b, t], logp[tokens[b, t]], rtol=1e-5)
      np.testing.assert_allclose(entropy[b, t], -np.sum(np.exp(logp) * logp), rtol=1e-5)


def test_positions_from_mask():
  mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
  np.testing.assert_array_equal(rl.positions_from_mask(mask), [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]])


# ------------------------------------------------------------------------------------ loss


def test_policy_loss_single_sequence_by_hand():
  # Ratios 2 and 0.5 on two scored tokens, eps 0.2 / 0.28.
  logprobs = jnp.array([[0.0, math.log(2.0), math.log(0.5)]])
  old = jnp.zeros((1, 3))
  loss_mask = jnp.array([[0.0, 1.0, 1.0]])
  cfg = _cfg(clip_eps_low=0.2, clip_eps_high=0.28, loss_agg="token_mean")
  # A = +2: min(2*2, 2*1.28) = 2.56 and min(2*0.5, 2*0.8) = 1.0; the high clip bites once.
  loss, m = rl.policy_loss(logprobs, old, jnp.array([2.0]), loss_mask, jnp.ones(1), cfg)
  np.testing.assert_allclose(loss, -(2.56 + 1.0) / 2, rtol=1e-6)
  np.testing.assert_allclose([m["clip_high"], m["clip_low"]], [0.5, 0.0])
  np.testing.assert_allclose([m["ratio"], m["ratio_max"], m["ratio_min"]], [1.25, 2, 0.5],
                             rtol=1e-6)
  # A = -2: max(4, 2.56) = 4 and max(1.0, 1.6) = 1.6; the low clip bites once.
  loss, m = rl.policy_loss(logprobs, old, jnp.array([-2.0]), loss_mask, jnp.ones(1), cfg)
  np.testing.assert_allclose(loss, (4 + 1.6) / 2, rtol=1e-6)
  np.testing.assert_allclose([m["clip_high"], m["clip_low"]], [0.0, 0.5])


def _numpy_loss(lp, old, adv, loss_mask, sw, cfg, ref=None):
  """Loop-by-loop reference for `policy_loss`."""
  b_size, t_size = lp.shape
  token_loss = np.zeros((b_size, t_size))
  for b in range(b_size):
    for t in range(t_size):
      if loss_mask[b, t] == 0 or sw[b] == 0:
        continue
      r = math.exp(lp[b, t] - old[b, t])
      clipped = min(max(r, 1 - cfg.clip_eps_low), 1 + cfg.clip_eps_high)
      x = max(-adv[b] * r, -adv[b] * clipped)
      if cfg.kl_coef:
        d = ref[b, t] - lp[b, t]
        x += cfg.kl_coef * (-d if cfg.kl_estimator == "k1" else math.exp(d) - d - 1)
      token_loss[b, t] = x
  if cfg.loss_agg == "token_mean":
    weights = loss_mask * sw[:, None]
    return np.sum(weights * token_loss) / np.sum(weights)
  total = 0.0
  for b in range(b_size):
    if cfg.loss_agg == "seq_mean_token_mean":
      seq = np.sum(token_loss[b] * loss_mask[b]) / np.sum(loss_mask[b])
    else:
      seq = np.sum(token_loss[b] * loss_mask[b]) / cfg.max_completion_length
    total += sw[b] * seq
  return total / np.sum(sw)


def _loss_inputs():
  loss_mask = np.array([
      [0, 0, 1, 1, 1, 1],
      [0, 0, 0, 1, 1, 0],
      [0, 1, 1, 1, 1, 1],
      [0, 0, 0, 0, 1, 1],
  ], np.float32)
  # Log-ratios spread over both clip sides (exp(+-0.5) is outside [0.8, 1.28]).
  log_ratio = np.array([
      [0, 0, 0.5, -0.5, 0.1, -0.1],
      [0, 0, 0, 0.4, -0.4, 0],
      [0, 3.0, -3.0, 0.2, 0.0, 0.0],
      [0, 0, 0, 0, -0.6, 0.6],
  ], np.float32)
  lp = np.random.default_rng(1).uniform(-3, -0.1, size=(4, T)).astype(np.float32) * loss_mask
  old = (lp - log_ratio) * loss_mask
  ref = (lp + np.random.default_rng(2).normal(0, 0.3, size=(4, T))).astype(np.float32) * loss_mask
  adv = np.array([1.5, -0.7, 2.0, -1.2], np.float32)
  sw = np.array([1, 1, 0, 1], np.float32)  # row 2 is masked out
  return lp, old, adv, loss_mask, sw, ref


@pytest.mark.parametrize("loss_agg", rl.LOSS_AGGREGATIONS)
@pytest.mark.parametrize("kl", [None, "k1", "k3", "low_var"])
def test_policy_loss_matches_numpy(loss_agg, kl):
  lp, old, adv, loss_mask, sw, ref = _loss_inputs()
  cfg = _cfg(loss_agg=loss_agg, kl_coef=0.0 if kl is None else 0.3, kl_estimator=kl or "k1",
             max_completion_length=8)
  loss, metrics = rl.policy_loss(jnp.asarray(lp), old, adv, loss_mask, sw, cfg, ref_logprobs=ref)
  np.testing.assert_allclose(loss, _numpy_loss(lp, old, adv, loss_mask, sw, cfg, ref), rtol=1e-5)
  # Scored tokens: rows 0, 1, 3 -> 4 + 2 + 2 (row 2 has weight 0).
  assert metrics["tokens"] == 8 and metrics["sequences"] == 3
  # High side active only for A > 0 and ratio > 1.28: row 0's e^0.5.
  np.testing.assert_allclose(metrics["clip_high"], 1 / 8)
  # Low side active only for A < 0 and ratio < 0.8: row 1's e^-0.4 and row 3's e^-0.6.
  np.testing.assert_allclose(metrics["clip_low"], 2 / 8)


def test_policy_loss_needs_ref_for_kl():
  lp, old, adv, loss_mask, sw, _ = _loss_inputs()
  with pytest.raises(ValueError, match="kl_coef=0.1 needs ref_logprobs"):
    rl.policy_loss(jnp.asarray(lp), old, adv, loss_mask, sw, _cfg(kl_coef=0.1))


def test_plain_object_config():
  class Cfg:
    clip_eps_low, clip_eps_high, kl_coef, kl_estimator = 0.2, 0.2, 0.0, "k1"
    loss_agg = "token_mean"
  lp, old, adv, loss_mask, sw, _ = _loss_inputs()
  loss, _ = rl.policy_loss(jnp.asarray(lp), old, adv, loss_mask, sw, Cfg())
  assert np.isfinite(loss)
  with pytest.raises(ValueError, match="loss_agg='sum'"):
    Cfg.loss_agg = "sum"
    rl.policy_loss(jnp.asarray(lp), old, adv, loss_mask, sw, Cfg())


# ---------------------------------------------------------------------- toy model and steps


def toy_apply(params, tokens, positions, attention_mask):
  """A causal toy LM: running mean of the embeddings of real tokens, plus positions."""
  mask = attention_mask.astype(jnp.float32)[..., None]  # [B, T, 1]
  h = params["embed"][tokens] * mask  # [B, T, D]
  h = jnp.cumsum(h, axis=1) / jnp.maximum(jnp.cumsum(mask, axis=1), 1.0)
  h = jnp.tanh(h + params["pos"][positions])
  return h @ params["out"] + params["bias"]  # [B, T, V]


def toy_params(seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  return dict(embed=jax.random.normal(k1, (V, D)), pos=0.5 * jax.random.normal(k2, (T, D)),
              out=jax.random.normal(k3, (D, V)) / math.sqrt(D), bias=jnp.zeros(V))


def toy_batch(params, cfg):
  """Left-padded prompts, right-padded completions; row 2 has sample_weight 0."""
  rng = np.random.default_rng(3)
  attention_mask = np.array([
      [1, 1, 1, 1, 1, 1],
      [0, 1, 1, 1, 1, 0],
      [1, 1, 1, 1, 1, 1],
      [0, 0, 1, 1, 1, 1],
  ], np.int32)
  loss_mask = np.array([
      [0, 0, 1, 1, 1, 1],
      [0, 0, 0, 1, 1, 0],
      [0, 1, 1, 1, 1, 1],
      [0, 0, 0, 0, 1, 1],
  ], np.float32)
  tokens = rng.integers(0, V, size=(4, T)).astype(np.int32) * attention_mask
  logprobs = rl.make_logprob_fn(toy_apply, cfg.temperature, 4)(params, tokens, attention_mask)
  # Sampling-time log-probs a little off the current ones, so some ratios clip.
  old = (np.asarray(logprobs) + rng.normal(0, 0.3, size=(4, T))) * loss_mask
  ref = (np.asarray(logprobs) + rng.normal(0, 0.3, size=(4, T))) * loss_mask
  return dict(tokens=tokens, attention_mask=attention_mask, loss_mask=loss_mask,
              old_logprobs=old.astype(np.float32), ref_logprobs=ref.astype(np.float32),
              advantages=np.array([1.0, -0.5, 2.0, 0.8], np.float32),
              sample_weight=np.array([1, 1, 0, 1], np.float32))


def full_batch_grads(params, batch, cfg):
  def loss_fn(p):
    positions = rl.positions_from_mask(batch["attention_mask"])
    logits = toy_apply(p, batch["tokens"], positions, batch["attention_mask"])
    logprobs, _ = rl.token_logprobs(logits, batch["tokens"], cfg.temperature)
    return rl.policy_loss(logprobs, batch["old_logprobs"], batch["advantages"],
                          batch["loss_mask"], batch["sample_weight"], cfg,
                          ref_logprobs=batch["ref_logprobs"])[0]
  return jax.value_and_grad(loss_fn)(params)


@pytest.mark.parametrize("loss_agg", rl.LOSS_AGGREGATIONS)
def test_micro_batched_gradient_equals_full_batch(loss_agg):
  cfg = _cfg(loss_agg=loss_agg, kl_coef=0.1, temperature=0.7, max_completion_length=5)
  params = toy_params()
  batch = toy_batch(params, cfg)
  expected_loss, expected = full_batch_grads(params, batch, cfg)
  for micro in (1, 2, 4):
    grads, metrics = jax.jit(rl.make_grad_fn(toy_apply, cfg, micro))(params, batch)
    for key in params:
      np.testing.assert_allclose(grads[key], expected[key], rtol=2e-5, atol=1e-7,
                                 err_msg=f"{key}, micro_batch_size={micro}")
    np.testing.assert_allclose(metrics["loss"], expected_loss, rtol=1e-5)
    assert metrics["tokens"] == 8 and metrics["sequences"] == 3


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean_token_mean"])
def test_zero_weight_sequence_has_no_effect(loss_agg):
  cfg = _cfg(loss_agg=loss_agg, kl_coef=0.1)
  params = toy_params()
  batch = toy_batch(params, cfg)
  grad_fn = jax.jit(rl.make_grad_fn(toy_apply, cfg, 2))
  grads, metrics = grad_fn(params, batch)
  changed = dict(batch)
  changed["tokens"] = batch["tokens"].copy()
  changed["tokens"][2] = (batch["tokens"][2] + 3) % V
  changed["advantages"] = batch["advantages"].copy()
  changed["advantages"][2] = 1e6
  changed["old_logprobs"] = batch["old_logprobs"].copy()
  changed["old_logprobs"][2] = -np.inf  # would make an infinite ratio if it leaked
  changed["ref_logprobs"] = batch["ref_logprobs"].copy()
  changed["ref_logprobs"][2] = 50.0
  grads2, metrics2 = grad_fn(params, changed)
  for key in params:
    assert np.all(np.isfinite(grads2[key]))
    np.testing.assert_allclose(grads2[key], grads[key], rtol=0, atol=1e-7, err_msg=key)
  np.testing.assert_allclose(metrics2["loss"], metrics["loss"], rtol=0, atol=1e-7)


def test_batch_checks():
  cfg = _cfg(kl_coef=0.1)
  params = toy_params()
  batch = toy_batch(params, cfg)
  with pytest.raises(ValueError, match="Batch size 4 is not divisible by micro_batch_size=3"):
    rl.make_grad_fn(toy_apply, cfg, 3)(params, batch)
  without_ref = {k: v for k, v in batch.items() if k != "ref_logprobs"}
  with pytest.raises(KeyError, match="ref_logprobs"):
    rl.make_grad_fn(toy_apply, cfg, 2)(params, without_ref)
  bad = dict(batch, advantages=np.zeros((4, 1), np.float32))
  with pytest.raises(ValueError, match=r"batch\['advantages'\] has shape \(4, 1\)"):
    rl.make_grad_fn(toy_apply, cfg, 2)(params, bad)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_update_moves_logprob_of_sampled_tokens(sign):
  cfg = _cfg(learning_rate=0.03, max_grad_norm=1.0, loss_agg="token_mean")
  params = toy_params()
  batch = toy_batch(params, cfg)
  logprob_fn = rl.make_logprob_fn(toy_apply, cfg.temperature, 2)
  before = logprob_fn(params, batch["tokens"], batch["attention_mask"])
  batch = dict(batch, old_logprobs=np.asarray(before) * batch["loss_mask"],
               advantages=np.array([sign, 0.0, 0.0, 0.0], np.float32),
               sample_weight=np.array([1, 1, 0, 0], np.float32))
  del batch["ref_logprobs"]
  optimizer = rl.make_optimizer(cfg)
  update = rl.make_update_fn(toy_apply, optimizer, cfg, micro_batch_size=2)
  params, opt_state, metrics = update(params, optimizer.init(params), batch)
  after = logprob_fn(params, batch["tokens"], batch["attention_mask"])
  gain = float(np.sum((np.asarray(after) - np.asarray(before))[0] * batch["loss_mask"][0]))
  assert sign * gain > 0.01, gain
  assert metrics["grad_norm"] > 0 and metrics["ratio"] == pytest.approx(1.0, abs=1e-6)
  assert metrics["clip_low"] == metrics["clip_high"] == 0


@pytest.mark.parametrize("skip", [True, False])
def test_update_with_nonfinite_gradient_is_skipped_and_counted(skip):
  cfg = _cfg(learning_rate=0.03, skip_nonfinite_updates=skip)
  params = toy_params()
  batch = toy_batch(params, cfg)
  del batch["ref_logprobs"]
  optimizer = rl.make_optimizer(cfg)
  update = rl.make_update_fn(toy_apply, optimizer, cfg, micro_batch_size=2)
  params, opt_state, metrics = update(params, optimizer.init(params), batch)  # A good step.
  assert metrics["skipped_updates"] == 0 and np.isfinite(metrics["grad_norm"])
  before = jax.tree.map(np.array, (params, opt_state))
  poisoned = dict(batch, advantages=np.array([np.nan, 1, 0, 0], np.float32))
  params, opt_state, metrics = update(params, opt_state, poisoned)
  assert not np.isfinite(metrics["grad_norm"])
  after = jax.tree.map(np.array, (params, opt_state))
  if skip:  # Parameters, Adam's moments and step count exactly as before the bad batch.
    assert metrics["skipped_updates"] == 1
    jax.tree.map(np.testing.assert_array_equal, after, before)
  else:
    assert metrics["skipped_updates"] == 0
    assert not np.isfinite(after[0]["embed"]).all()
  params, opt_state, metrics = update(params, opt_state, batch)  # The run goes on.
  assert metrics["skipped_updates"] == 0 and (not skip or np.isfinite(params["embed"]).all())


def test_skip_nonfinite_updates_is_on_by_default():
  assert rl.default_config().skip_nonfinite_updates is True


def test_logprob_fn_matches_direct_and_order():
  params = toy_params()
  cfg = _cfg(temperature=0.7)
  batch = toy_batch(params, cfg)
  tokens, mask = jnp.asarray(batch["tokens"]), jnp.asarray(batch["attention_mask"])
  logits = toy_apply(params, tokens, rl.positions_from_mask(mask), mask)
  direct, _ = rl.token_logprobs(logits, tokens, 0.7)
  micro = rl.make_logprob_fn(toy_apply, 0.7, 2)(params, batch["tokens"], batch["attention_mask"])
  np.testing.assert_allclose(micro, direct, rtol=1e-6, atol=1e-6)


def test_lr_schedule():
  lr = rl.make_lr_schedule(_cfg(learning_rate=1.0, warmup_steps=4))
  np.testing.assert_allclose([lr(s) for s in range(6)], [0.25, 0.5, 0.75, 1, 1, 1])
  lr = rl.make_lr_schedule(_cfg(learning_rate=1.0, warmup_steps=2, lr_schedule="cosine",
                                total_steps=6, final_lr_ratio=0.1))
  np.testing.assert_allclose([lr(s) for s in (0, 2, 4, 6, 9)], [0.5, 1.0, 0.55, 0.1, 0.1],
                             rtol=1e-6)
  with pytest.raises(ValueError, match="total_steps > warmup_steps=2"):
    rl.make_lr_schedule(_cfg(warmup_steps=2, lr_schedule="cosine", total_steps=2))


def test_weight_decay_skips_vectors():
  cfg = _cfg(learning_rate=0.1, weight_decay=0.5, max_grad_norm=0.0)
  params = dict(w=jnp.ones((2, 2)), b=jnp.ones(2))
  optimizer = rl.make_optimizer(cfg)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = optimizer.update(zero, optimizer.init(params), params)
  np.testing.assert_allclose(updates["w"], -0.05 * np.ones((2, 2)), rtol=1e-6)
  np.testing.assert_array_equal(updates["b"], np.zeros(2))


def test_weight_decay_mask_all_decays_vectors_too():
  cfg = _cfg(learning_rate=0.1, weight_decay=0.5, max_grad_norm=0.0, weight_decay_mask="all")
  params = dict(w=jnp.ones((2, 2)), b=jnp.ones(2))
  optimizer = rl.make_optimizer(cfg)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = optimizer.update(zero, optimizer.init(params), params)
  np.testing.assert_allclose(updates["w"], -0.05 * np.ones((2, 2)), rtol=1e-6)
  np.testing.assert_allclose(updates["b"], -0.05 * np.ones(2), rtol=1e-6)
  with pytest.raises(ValueError, match="weight_decay_mask='some'"):
    rl.make_optimizer(_cfg(weight_decay_mask="some"))


def _dual_clip_loss(logprob, adv, dual_clip):
  cfg = _cfg(clip_eps_low=0.2, clip_eps_high=0.2, dual_clip=dual_clip, loss_agg="token_mean")
  return rl.policy_loss(jnp.array([[logprob]]), jnp.zeros((1, 1)), jnp.array([adv]),
                        jnp.ones((1, 1)), jnp.ones(1), cfg)


def test_dual_clip_caps_negative_advantage_loss_at_c_times_minus_a():
  # Ratio e^2 = 7.39 with A = -1: PPO's loss is -A * r = 7.39; dual-clip caps it at 3.
  loss, metrics = _dual_clip_loss(2.0, -1.0, 3.0)
  np.testing.assert_allclose(loss, 3.0, rtol=1e-6)
  assert metrics["clip_dual"] == 1
  grad = jax.grad(lambda lp: _dual_clip_loss(lp, -1.0, 3.0)[0])(2.0)
  assert grad == 0  # verl's torch.min picks the constant: no gradient through the ratio.
  off, metrics = _dual_clip_loss(2.0, -1.0, 0.0)
  np.testing.assert_allclose(off, np.exp(2.0), rtol=1e-6)
  assert metrics["clip_dual"] == 0


def test_dual_clip_leaves_positive_advantages_and_small_ratios_alone():
  for logprob, adv in ((2.0, 1.0), (0.5, -1.0), (-1.0, -1.0)):
    np.testing.assert_allclose(_dual_clip_loss(logprob, adv, 3.0)[0],
                               _dual_clip_loss(logprob, adv, 0.0)[0], rtol=1e-6)
  with pytest.raises(ValueError, match="dual_clip=0.5 must be 0"):
    _dual_clip_loss(0.0, -1.0, 0.5)


def test_missing_config_field_names_it():
  cfg = ml_collections.ConfigDict(dict(temperature=1.0, loss_agg="token_mean"))
  with pytest.raises(AttributeError, match="no field 'clip_eps_low'.*default_config"):
    rl.policy_loss(jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.ones(1), jnp.ones((1, 2)),
                   jnp.ones(1), cfg)


@pytest.mark.parametrize("adv", [1.0, -1.0])
def test_garbage_sampling_logprob_stays_finite(adv):
  # A scored token whose recorded sampling log-prob is -inf: the ratio is clamped, not inf.
  def loss(lp):
    return rl.policy_loss(lp, jnp.array([[0.0, -jnp.inf]]), jnp.array([adv]),
                          jnp.array([[0.0, 1.0]]), jnp.ones(1), _cfg())[0]
  lp = jnp.array([[0.0, -1.0]])
  assert np.isfinite(loss(lp)) and np.all(np.isfinite(jax.grad(loss)(lp)))


# ------------------------------------------------------------------ mini-batches and schedule


def _adamw_step(params, grads, cfg):
  """One plain optax AdamW step (no injected learning rate), as the update was before."""
  opt = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm),
                    optax.adamw(cfg.learning_rate, weight_decay=cfg.weight_decay,
                                mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)))
  updates, _ = opt.update(grads, opt.init(params), params)
  return optax.apply_updates(params, updates)


def test_k_mini_batches_make_k_optimizer_steps_and_one_equals_the_full_batch_step():
  cfg = _cfg(learning_rate=0.05, weight_decay=0.01, loss_agg="token_mean", kl_coef=0.1)
  params = toy_params()
  batch = toy_batch(params, cfg)
  optimizer = rl.make_optimizer(cfg)
  update = rl.make_update_fn(toy_apply, optimizer, cfg, micro_batch_size=2)
  # One mini-batch (size 0, or at least the batch) is today's full-batch step.
  for size in (0, 4, 8):
    assert len(rl.mini_batches(batch, 4, size)) == 1
  _, grads = full_batch_grads(params, batch, cfg)
  expected = _adamw_step(params, grads, cfg)
  p, opt_state = jax.tree.map(jnp.array, params), optimizer.init(params)
  for mb in rl.mini_batches(batch, 4, 0):
    p, opt_state, _ = update(p, opt_state, mb, 0)
  for key in params:
    np.testing.assert_allclose(p[key], expected[key], rtol=1e-5, atol=1e-7, err_msg=key)
  # Two mini-batches of two rows: two optimizer steps, the second from the first's weights.
  minis = rl.mini_batches(batch, 4, 2)
  assert [m["tokens"].shape[0] for m in minis] == [2, 2]
  p, opt_state = jax.tree.map(jnp.array, params), optimizer.init(params)
  for mb in minis:
    p, opt_state, metrics = update(p, opt_state, mb, 0)
  assert int(opt_state.count) == 2
  assert not np.allclose(p["out"], expected["out"])
  # Three real rows of six, mini-batches of two: [0:2], then the rest with the padding.
  assert [m["tokens"].shape[0] for m in rl.mini_batches(
      jax.tree.map(lambda x: np.concatenate([x, x[:2]]), batch), 3, 2)] == [2, 4]


def test_the_learning_rate_follows_the_self_play_step_not_the_optimizer_count():
  cfg = _cfg(learning_rate=1.0, lr_schedule="cosine", total_steps=10, warmup_steps=0)
  schedule = rl.make_lr_schedule(cfg)
  params = toy_params()
  batch = toy_batch(params, _cfg())
  del batch["ref_logprobs"]
  optimizer = rl.make_optimizer(cfg)
  update = rl.make_update_fn(toy_apply, optimizer, cfg, micro_batch_size=4)
  opt_state = optimizer.init(params)
  p = jax.tree.map(jnp.array, params)
  # A role that skipped steps 0..6 takes its first optimizer step at self-play step 7.
  p, opt_state, metrics = update(p, opt_state, batch, 7)
  np.testing.assert_allclose(metrics["learning_rate"], schedule(7), rtol=1e-6)
  p, opt_state, metrics = update(p, opt_state, batch, 7)  # A second mini-batch, same step.
  np.testing.assert_allclose(metrics["learning_rate"], schedule(7), rtol=1e-6)
  assert float(schedule(7)) < 0.5
  # Without a step, the optimizer's own count (2 steps taken) drives it.
  _, _, metrics = update(p, opt_state, batch)
  np.testing.assert_allclose(metrics["learning_rate"], schedule(2), rtol=1e-6)


# ------------------------------------------------------------------------ GAE and the critic


def test_gae_advantages_and_returns_by_hand():
  # Row 0: prompt token, then three scored tokens, reward 1 on the last. Row 1: padding.
  mask = np.array([[0, 1, 1, 1], [0, 0, 0, 0]], np.float32)
  values = np.array([[0.0, 0.5, 0.2, 0.9], [0.3, 0.3, 0.3, 0.3]], np.float32)
  token_rewards = rl.last_token_rewards(np.array([1.0, 5.0]), mask)
  np.testing.assert_array_equal(token_rewards, [[0, 0, 0, 1], [0, 0, 0, 0]])
  gamma, lam = 0.9, 0.8
  adv, returns = rl.gae_advantages(token_rewards, values, mask, gamma, lam, whiten=False)
  a3 = 1.0 - 0.9  # delta_3 = r - V_3 (nothing after the last token)
  a2 = (0.9 * 0.9 - 0.2) + gamma * lam * a3  # delta_2 = gamma V_3 - V_2
  a1 = (0.9 * 0.2 - 0.5) + gamma * lam * a2
  np.testing.assert_allclose(adv, [[0, a1, a2, a3], [0, 0, 0, 0]], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(returns, [[0, a1 + 0.5, a2 + 0.2, a3 + 0.9], [0, 0, 0, 0]],
                             rtol=1e-6)
  # gamma = lam = 1 (verl's default): every token's return is the outcome reward.
  _, returns = rl.gae_advantages(token_rewards, values, mask, 1.0, 1.0, whiten=False)
  np.testing.assert_allclose(returns[0, 1:], [1, 1, 1], rtol=1e-6)
  # Whitened over the scored tokens: mean 0, unbiased std 1; padding stays 0.
  white, _ = rl.gae_advantages(token_rewards, values, mask, gamma, lam)
  raw = np.array([a1, a2, a3])
  np.testing.assert_allclose(white[0, 1:], (raw - raw.mean()) / raw.std(ddof=1), rtol=1e-4)
  np.testing.assert_array_equal(white[1], 0)


def test_value_loss_clips_like_verl():
  cfg = _cfg(value_clip=0.5)
  one = np.ones((1, 1), np.float32)
  # New value 1, old 0, return 2: clipped value 0.5 is further from the return -> it counts.
  loss, sums = rl.losses._value_sums(jnp.array([[1.0]]), 0 * one, 2 * one, one, np.ones(1), cfg)
  np.testing.assert_allclose(loss, 1.5 ** 2)  # No factor 1/2, as verl's compute_value_loss.
  assert sums["value_clip_frac"] == 1
  # Return -1: the unclipped value is the further one; its loss counts (the larger of two).
  loss, sums = rl.losses._value_sums(jnp.array([[1.0]]), 0 * one, -one, one, np.ones(1), cfg)
  np.testing.assert_allclose(loss, 2.0 ** 2, rtol=1e-5)
  assert sums["value_clip_frac"] == 0


def toy_values(params, tokens, positions, attention_mask):
  """A toy value model: the toy LM's hidden state read by a vector head."""
  mask = attention_mask.astype(jnp.float32)[..., None]
  h = params["embed"][tokens] * mask
  h = jnp.cumsum(h, axis=1) / jnp.maximum(jnp.cumsum(mask, axis=1), 1.0)
  return jnp.tanh(h + params["pos"][positions]) @ params["head"]  # [B, T]


def test_the_critic_loss_falls_on_a_toy_problem():
  cfg = rl.critic_config(_cfg(critic_learning_rate=0.05, value_clip=0.5, max_grad_norm=1.0))
  params = dict(toy_params(), head=jnp.zeros(D))
  del params["out"], params["bias"]
  batch = toy_batch(toy_params(), _cfg())
  value_fn = rl.make_value_fn(toy_values, 2)
  returns = np.where(batch["loss_mask"] > 0, np.linspace(-1, 1, T)[None, :], 0).astype(np.float32)
  optimizer = rl.make_optimizer(cfg)
  update = rl.make_update_fn(toy_values, optimizer, cfg, 2, objective="value")
  opt_state = optimizer.init(params)
  losses = []
  for step in range(40):
    old = np.asarray(value_fn(params, batch["tokens"], batch["attention_mask"])) * batch["loss_mask"]
    value_batch = dict(tokens=batch["tokens"], attention_mask=batch["attention_mask"],
                       loss_mask=batch["loss_mask"], sample_weight=batch["sample_weight"],
                       old_values=old, returns=returns)
    params, opt_state, metrics = update(params, opt_state, value_batch, step)
    losses.append(float(metrics["value_loss"]))
  assert losses[-1] < 0.2 * losses[0], losses
  assert metrics["learning_rate"] == pytest.approx(0.05)


def test_unbiased_group_std_and_kl_clamp():
  adv = rl.group_advantages(np.array([[1.0, 0.0, 0.0, 1.0]]), "grpo", eps=0.0, ddof=1)
  np.testing.assert_allclose(adv, [[0.5 / math.sqrt(1 / 3)] * 1 + [-0.5 / math.sqrt(1 / 3)] * 2
                                   + [0.5 / math.sqrt(1 / 3)]], rtol=1e-6)
  # ref - logp = 13: the low-variance KL is e^13 - 14, clamped to 10.
  args = (jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.ones(1), jnp.array([[0.0, 1.0]]), jnp.ones(1))
  ref = jnp.array([[0.0, 13.0]])
  _, clamped = rl.policy_loss(*args, _cfg(kl_coef=0.1, kl_clamp=10.0), ref_logprobs=ref)
  _, free = rl.policy_loss(*args, _cfg(kl_coef=0.1), ref_logprobs=ref)
  assert float(clamped["kl"]) == pytest.approx(10.0) and float(free["kl"]) > 1e5


# ------------------------------------------------- memory plan: chunked log-probs on a real model


def _tiny_model(vocab=96, tie=False):
  """A tiny Qwen2-style decoder (q/k/v biases) and its two apply forms: logits, (hidden, head)."""
  from sqlm_jax.models import ModelConfig, transformer
  config = ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True,
                       tie_word_embeddings=tie)
  params = transformer.init_params(config, jax.random.key(1))
  logits_apply = lambda p, t, pos, m: transformer.forward(p, config, t, pos, m)
  hidden_apply = lambda p, t, pos, m: transformer.hidden_and_head(p, config, t, pos, m)
  return params, logits_apply, hidden_apply


def _tiny_model_batch(params, apply, cfg, rows=4, length=11, vocab=96):
  """Left-padded prompts, right-padded completions, T = 11 (a multiple of neither 3 nor 8)."""
  rng = np.random.default_rng(5)
  attention_mask = np.ones((rows, length), np.int32)
  attention_mask[1, :3] = 0
  attention_mask[3, -2:] = 0
  loss_mask = np.zeros((rows, length), np.float32)
  loss_mask[:, 5:] = attention_mask[:, 5:]
  tokens = rng.integers(0, vocab, (rows, length)).astype(np.int32) * attention_mask
  logprobs = np.asarray(rl.make_logprob_fn(apply, cfg.temperature, 2)(params, tokens,
                                                                      attention_mask))
  noise = lambda: rng.normal(0, 0.3, (rows, length)).astype(np.float32)
  return dict(tokens=tokens, attention_mask=attention_mask, loss_mask=loss_mask,
              old_logprobs=(logprobs + noise()) * loss_mask,
              ref_logprobs=(logprobs + noise()) * loss_mask,
              advantages=np.array([1.0, -0.5, 2.0, 0.8], np.float32),
              sample_weight=np.array([1, 1, 0, 1], np.float32))


# Tied embeddings: CI's slow step.
@pytest.mark.parametrize("tie", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_memory_plan_chunked_logprobs_equal_unchunked(tie):
  params, logits_apply, hidden_apply = _tiny_model(tie=tie)
  batch = _tiny_model_batch(params, logits_apply, _cfg())
  args = (params, batch["tokens"], batch["attention_mask"])
  expected = rl.make_logprob_fn(logits_apply, 0.7, 2)(*args)
  for chunk in (0, 3, 8, 11, 16):
    got = rl.make_logprob_fn(hidden_apply, 0.7, 2, logprob_chunk=chunk)(*args)
    if chunk == 0 or chunk >= 11:  # One chunk: the model's own numbers, bit for bit.
      np.testing.assert_array_equal(got, expected, err_msg=f"logprob_chunk={chunk}")
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6,
                               err_msg=f"logprob_chunk={chunk}")
  # The chunked function alone, entropy included, against token_logprobs of the logits.
  hidden, head = hidden_apply(params, batch["tokens"], rl.positions_from_mask(
      batch["attention_mask"]), batch["attention_mask"])
  logits = logits_apply(params, batch["tokens"], rl.positions_from_mask(
      batch["attention_mask"]), batch["attention_mask"])
  want = rl.token_logprobs(logits, jnp.asarray(batch["tokens"]), 0.7)
  got = rl.chunked_token_logprobs(hidden, head, jnp.asarray(batch["tokens"]), 0.7, chunk=4)
  for g, w in zip(got, want):
    assert g.shape == w.shape == batch["tokens"].shape
    np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


_CHUNK_TEST_RL = dict(kl_coef=0.1, temperature=0.7, loss_agg="token_mean")


# Tied embeddings with other chunk sizes: CI's slow step.
@pytest.mark.parametrize("tie, chunks", [(False, (3, 16)),
                                         pytest.param(True, (8, 11), marks=pytest.mark.slow)])
def test_memory_plan_chunked_gradients_equal_unchunked(tie, chunks):
  params, logits_apply, hidden_apply = _tiny_model(tie=tie)
  batch = _tiny_model_batch(params, logits_apply, _cfg(**_CHUNK_TEST_RL))
  expected_grads, expected = jax.jit(rl.make_grad_fn(
      logits_apply, _cfg(**_CHUNK_TEST_RL, logprob_chunk=0), 2))(params, batch)
  assert float(expected["entropy"]) > 1.0 and float(expected["clip_low"]) > 0  # not trivial
  for chunk in chunks:
    grads, metrics = jax.jit(rl.make_grad_fn(
        hidden_apply, _cfg(**_CHUNK_TEST_RL, logprob_chunk=chunk), 2))(params, batch)
    assert metrics.keys() == expected.keys()
    # One chunk (0, or >= T = 11) is the model's own computation: bit for bit, gradients too.
    exact = chunk == 0 or chunk >= 11
    for key in expected:
      np.testing.assert_allclose(metrics[key], expected[key], rtol=0 if exact else 1e-5,
                                 atol=0 if exact else 1e-7, err_msg=f"{key}, chunk={chunk}")
    for (path, g), want in zip(jax.tree_util.tree_leaves_with_path(grads),
                               jax.tree.leaves(expected_grads)):
      np.testing.assert_allclose(g, want, rtol=0 if exact else 1e-5, atol=0 if exact else 1e-7,
                                 err_msg=f"{jax.tree_util.keystr(path)}, chunk={chunk}")


def test_memory_plan_update_step_equal_unchunked():
  params, logits_apply, hidden_apply = _tiny_model()
  batch = _tiny_model_batch(params, logits_apply, _cfg(**_CHUNK_TEST_RL))
  optimizer = rl.make_optimizer(_cfg(learning_rate=0.01))
  stepped = []
  for apply, chunk in ((logits_apply, 0), (hidden_apply, 3)):
    update = rl.make_update_fn(apply, optimizer, _cfg(**_CHUNK_TEST_RL, logprob_chunk=chunk), 2)
    fresh = jax.tree.map(jnp.copy, params)  # donated
    stepped.append(update(fresh, optimizer.init(fresh), batch))
  (plain, _, plain_metrics), (chunked, _, chunked_metrics) = stepped
  for a, b in zip(jax.tree.leaves(chunked), jax.tree.leaves(plain)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(chunked_metrics["grad_norm"], plain_metrics["grad_norm"], rtol=1e-5)
  assert float(plain_metrics["grad_norm"]) > 0


def test_memory_plan_chunking_shrinks_compiled_temp_memory():
  # Logits dominate here: [2, 256, 4096] float32 is 8 MiB, the rest of the model about as much.
  rows, length, vocab = 2, 256, 4096
  params, logits_apply, hidden_apply = _tiny_model(vocab=vocab)
  batch = dict(tokens=np.zeros((rows, length), np.int32),
               attention_mask=np.ones((rows, length), np.int32),
               loss_mask=np.ones((rows, length), np.float32),
               old_logprobs=np.zeros((rows, length), np.float32),
               advantages=np.ones(rows, np.float32), sample_weight=np.ones(rows, np.float32))

  def temp_bytes(apply, chunk):
    grad_fn = rl.make_grad_fn(apply, _cfg(logprob_chunk=chunk), rows)
    return jax.jit(grad_fn).lower(params, batch).compile().memory_analysis().temp_size_in_bytes

  logits_bytes = rows * length * vocab * 4
  plain, chunked = temp_bytes(logits_apply, 0), temp_bytes(hidden_apply, 32)
  # Unchunked holds the logits about three times over (and their backward); chunked, a chunk's.
  assert plain - chunked > 2.5 * logits_bytes, (plain, chunked, logits_bytes)
  assert chunked < 0.5 * plain, (plain, chunked)


def test_memory_plan_logprob_chunk_errors():
  params, _, hidden_apply = _tiny_model()
  with pytest.raises(ValueError, match="logprob_chunk=-1 must be"):
    rl.make_grad_fn(hidden_apply, _cfg(logprob_chunk=-1), 2)
  with pytest.raises(ValueError, match="logprob_chunk=2.5 must be"):
    rl.make_logprob_fn(hidden_apply, 1.0, 2, logprob_chunk=2.5)
  batch = _tiny_model_batch(params, hidden_apply, _cfg())
  value_batch = dict(tokens=batch["tokens"], attention_mask=batch["attention_mask"],
                     loss_mask=batch["loss_mask"], sample_weight=batch["sample_weight"],
                     old_values=batch["old_logprobs"], returns=batch["old_logprobs"])
  with pytest.raises(ValueError, match="objective='value' needs an apply_fn that returns values"):
    rl.make_grad_fn(hidden_apply, _cfg(), 2, objective="value")(params, value_batch)
