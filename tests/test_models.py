"""Logits parity with transformers' PyTorch models, and checkpoint I/O both ways."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from sqlm_jax.models import (ModelConfig, forward, forward_with_cache, init_cache, load_pretrained,
                             param_logical_axes, save_pretrained)
from sqlm_jax.models import transformer
from tests import tiny

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
VARIANTS = {
    "qwen2_tied": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen2_untied_gqa": ("qwen2", dict(tie_word_embeddings=False, num_key_value_heads=1)),
    "llama_gqa": ("llama", dict(num_key_value_heads=2)),
    "llama3_rope_untied_mqa": ("llama", dict(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0,
                                             num_key_value_heads=1, tie_word_embeddings=False)),
    "llama_bias_tied": ("llama", dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True)),
    "qwen3": ("qwen3", dict(head_dim=16, num_key_value_heads=2)),
    "qwen3_mha_untied": ("qwen3", dict(num_key_value_heads=4, tie_word_embeddings=False)),
}


def left_padded_batch(vocab, batch=3, length=11, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (batch, length))
  mask = np.ones((batch, length), np.int64)
  mask[1, :4] = 0
  mask[2, :length - 2] = 0
  return tokens, mask, np.maximum(mask.cumsum(-1) - 1, 0)


def torch_logits(model, tokens, mask, positions):
  with torch.no_grad():
    return model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(positions)).logits.numpy()


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def checkpoint(request, tmp_path_factory):
  model_type, overrides = VARIANTS[request.param]
  path = tiny.save_random_checkpoint(tmp_path_factory.mktemp(request.param), model_type,
                                     with_tokenizer=False, **overrides)
  model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  return path, model


def test_logits_match_transformers_on_left_padded_batch(checkpoint):
  path, model = checkpoint
  config, params = load_pretrained(path)
  tokens, mask, positions = left_padded_batch(config.vocab_size)
  ours = np.asarray(forward(params, config, jnp.asarray(tokens), jnp.asarray(positions),
                            jnp.asarray(mask)))
  theirs = torch_logits(model, tokens, mask, positions)
  assert np.abs(ours - theirs)[mask.astype(bool)].max() <= 1e-4


@pytest.mark.parametrize("per_layer", [True, False], ids=["per_layer_copy", "stacked"])
def test_prefill_then_decode_matches_full_forward(checkpoint, per_layer):
  """Both decode layouts: per-layer compute-dtype copies (CPU) and stacked (accelerators)."""
  path, _ = checkpoint
  config, params = load_pretrained(path)
  tokens, mask, positions = left_padded_batch(config.vocab_size, length=12)
  full = np.asarray(forward(params, config, jnp.asarray(tokens), jnp.asarray(positions),
                            jnp.asarray(mask)))
  decode_params = transformer.inference_params(params, config, per_layer=per_layer)
  assert isinstance(decode_params["layers"], tuple) == per_layer
  prompt = 7  # Prefill 7 tokens, then feed the remaining 5 one at a time through the cache.
  cache = init_cache(config, 3, 16)
  logits, cache = forward_with_cache(params, config, tokens[:, :prompt], positions[:, :prompt],
                                     mask[:, :prompt], cache)
  steps = [np.asarray(logits)]
  for t in range(prompt, 12):
    logits, cache = forward_with_cache(decode_params, config, tokens[:, t:t + 1],
                                       positions[:, t:t + 1], mask[:, t:t + 1], cache)
    steps.append(np.asarray(logits))
  cached = np.concatenate(steps, axis=1)
  assert np.abs(cached - full)[mask.astype(bool)].max() <= 1e-4


def test_rollout_blocked_cache_matches_full_forward(checkpoint):
  """A cache in blocks of 8, 2 and 2 slots: prefill writes 7 tokens into the first block,
  attending over it alone, then each decode step writes into the block its slot is in and
  attends over the blocks up to it; the logits are the full forward's."""
  path, _ = checkpoint
  config, params = load_pretrained(path)
  tokens, mask, positions = left_padded_batch(config.vocab_size, length=12)
  full = np.asarray(forward(params, config, jnp.asarray(tokens), jnp.asarray(positions),
                            jnp.asarray(mask)))
  cache = init_cache(config, 3, (8, 2, 2))
  assert transformer.cache_blocks(cache) == (8, 2, 2) and cache["mask"].shape == (3, 12)
  logits, cache = forward_with_cache(params, config, tokens[:, :7], positions[:, :7],
                                     mask[:, :7], cache, block=0)
  steps = [np.asarray(logits)]
  decode_params = transformer.inference_params(params, config)
  for t, block in zip(range(7, 12), (0, 1, 1, 2, 2)):
    logits, cache = forward_with_cache(decode_params, config, tokens[:, t:t + 1],
                                       positions[:, t:t + 1], mask[:, t:t + 1], cache,
                                       block=block)
    steps.append(np.asarray(logits))
  cached = np.concatenate(steps, axis=1)
  assert np.abs(cached - full)[mask.astype(bool)].max() <= 1e-4
  # Every slot holds the keys written to it (none left at zero).
  for layer in cache["k"]:
    assert all(np.abs(np.asarray(block)).sum(axis=(1, 3)).min() > 0 for block in layer)


def test_save_pretrained_loads_in_transformers_with_same_logits(checkpoint, tmp_path):
  path, model = checkpoint
  config, params = load_pretrained(path)
  save_pretrained(str(tmp_path), config, params)
  reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
  tokens, mask, positions = left_padded_batch(config.vocab_size, seed=1)
  a = torch_logits(model, tokens, mask, positions)
  b = torch_logits(reloaded, tokens, mask, positions)
  assert np.abs(a - b).max() <= 1e-6
  # And back into sqlm_jax: same config, same parameters.
  config2, params2 = load_pretrained(str(tmp_path))
  assert config2 == config
  for x, y in zip(np.asarray(jnp.concatenate([jnp.ravel(l) for l in _leaves(params)])),
                  np.asarray(jnp.concatenate([jnp.ravel(l) for l in _leaves(params2)]))):
    assert x == y


def _leaves(tree):
  import jax
  return jax.tree.leaves(tree)


def test_bfloat16_load_and_forward_close_to_float32(qwen2_dir):
  config, params = load_pretrained(qwen2_dir)
  config16, params16 = load_pretrained(qwen2_dir, dtype="bfloat16", param_dtype="bfloat16")
  assert params16["embed_tokens"].dtype == jnp.bfloat16
  tokens, mask, positions = left_padded_batch(config.vocab_size)
  a = np.asarray(forward(params, config, tokens, positions, mask))
  b = np.asarray(forward(params16, config16, tokens, positions, mask))
  assert np.abs(a - b)[mask.astype(bool)].max() < 0.25 * np.abs(a).max()


def test_every_leaf_has_logical_axes(qwen2_dir):
  config, params = load_pretrained(qwen2_dir)
  import jax
  axes = param_logical_axes(config)
  for (path, leaf), spec in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(
      axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))):
    assert len(spec) == leaf.ndim, jax.tree_util.keystr(path)
  assert axes["layers"]["self_attn"]["k_proj"] == jax.sharding.PartitionSpec(
      "layers", "embed", "kv_heads", "head_dim")


def test_sharded_checkpoint_with_index(tmp_path):
  model_type, overrides = VARIANTS["llama_gqa"]
  src = tiny.save_random_checkpoint(tmp_path / "src", model_type, with_tokenizer=False, **overrides)
  model = AutoModelForCausalLM.from_pretrained(src)
  model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="20KB")
  assert os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
  config, params = load_pretrained(str(tmp_path / "sharded"))
  _, reference = load_pretrained(src)
  import jax
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference)):
    np.testing.assert_array_equal(a, b)


# ---- errors that name the file, the field and the value -----------------------------------------


def test_missing_config_names_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    load_pretrained(str(tmp_path))


def test_missing_weights_names_the_folder(tmp_path, qwen2_dir):
  (tmp_path / "config.json").write_text(open(os.path.join(qwen2_dir, "config.json")).read())
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    load_pretrained(str(tmp_path))


def test_unsupported_model_type_names_field_and_value(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "hidden_size": 8}))
  with pytest.raises(ValueError, match="model_type='gpt2'"):
    load_pretrained(str(tmp_path))


def test_shape_disagreeing_with_config_names_tensor(tmp_path, qwen2_dir):
  import shutil
  shutil.copytree(qwen2_dir, tmp_path / "ckpt")
  config_file = tmp_path / "ckpt" / "config.json"
  hf = json.loads(config_file.read_text())
  hf["intermediate_size"] = 48
  config_file.write_text(json.dumps(hf))
  with pytest.raises(ValueError, match=r"mlp\..*_proj\.weight has shape .*intermediate_size"):
    load_pretrained(str(tmp_path / "ckpt"))


def test_unsupported_rope_type(tmp_path):
  hf = tiny.hf_config("llama").to_dict()
  hf["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
  with pytest.raises(ValueError, match="rope type 'yarn'"):
    ModelConfig.from_hf_dict(hf)
