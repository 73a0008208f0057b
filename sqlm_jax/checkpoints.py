"""Exports of trained roles as Hugging Face checkpoint folders (loadable by sqlm_jax and transformers)."""

from __future__ import annotations

import os
import shutil

import jax

from sqlm_jax import sharding
from sqlm_jax.models import ModelConfig, save_pretrained

# Files of a checkpoint folder that are not weights: copied so an export is self-contained.
_WEIGHT_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json")


def export(path: str, config: ModelConfig, params, tokenizer_from: str) -> None:
  """Writes params as config.json + model.safetensors in `path`, with the tokenizer files.

  Written to a temporary folder then renamed, so an interrupted export never leaves a
  half-written checkpoint where a previous good one was. Every process must call it (sharded
  weights are gathered across processes); only process 0 writes.
  """
  params = jax.tree.map(sharding.to_host, params)
  if not sharding.is_writer():
    return
  tmp = path.rstrip("/") + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  save_pretrained(tmp, config, params)
  for name in os.listdir(tokenizer_from):
    source = os.path.join(tokenizer_from, name)
    if (os.path.isfile(source) and name not in _WEIGHT_FILES
        and not (name.startswith("model-") and name.endswith(".safetensors"))):
      shutil.copy2(source, os.path.join(tmp, name))
  if os.path.isdir(path):
    old = path.rstrip("/") + ".old"
    shutil.rmtree(old, ignore_errors=True)
    os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old)
  else:
    os.rename(tmp, path)
