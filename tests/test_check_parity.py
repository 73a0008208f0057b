"""The user-facing parity checker on checkpoints of varied shapes, and its failure exit code."""

import subprocess
import sys

import pytest

from sqlm_jax import check_parity
from tests import tiny

CASES = [
    ("qwen2", dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=3,
                   intermediate_size=40, tie_word_embeddings=False, rope_theta=1e6)),
    ("llama", dict(hidden_size=24, num_attention_heads=3, num_key_value_heads=1, head_dim=16,
                   num_hidden_layers=3, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    ("qwen3", dict(hidden_size=40, num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                   tie_word_embeddings=True)),
]


@pytest.mark.parametrize("model_type,overrides", CASES)
def test_check_parity_passes(tmp_path, model_type, overrides, capsys):
  path = tiny.save_random_checkpoint(tmp_path, model_type, with_tokenizer=False, **overrides)
  assert check_parity.main([path]) == 0
  assert "OK" in capsys.readouterr().out


def test_check_parity_exits_nonzero_above_tolerance(tmp_path):
  """A tolerance of 0 cannot be met by float32 arithmetic in two frameworks: the CLI must fail."""
  path = tiny.save_random_checkpoint(tmp_path, "qwen2", with_tokenizer=False)
  result = subprocess.run([sys.executable, "-m", "sqlm_jax.check_parity", path, "--tolerance", "0"],
                          capture_output=True, text=True)
  assert result.returncode == 1 and "FAIL" in result.stdout


def test_check_parity_detects_a_wrong_rope_theta(tmp_path, monkeypatch):
  """If our side read the config differently (here: rope_theta), the difference is caught."""
  path = tiny.save_random_checkpoint(tmp_path, "llama", with_tokenizer=False)
  from sqlm_jax import models
  real_load = models.load_pretrained

  def wrong_theta(p, **kw):
    config, params = real_load(p, **kw)
    return config.replace(rope_theta=config.rope_theta * 3), params

  monkeypatch.setattr(models, "load_pretrained", wrong_theta)
  assert check_parity.max_logit_difference(path) > 1e-3
