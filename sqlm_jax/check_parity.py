"""Checks a checkpoint folder against transformers' PyTorch model before spending accelerator hours.

  python -m sqlm_jax.check_parity CHECKPOINT_DIR [--tolerance 1e-4] [--batch 3] [--length 24]

Loads the folder both ways in float32, runs the same left-padded batch of random token ids
through both and prints the largest absolute logit difference over real (non-pad) positions.
Exits 1 when it exceeds the tolerance. Needs torch (the `test` extra).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def max_logit_difference(path: str, batch: int = 3, length: int = 24, seed: int = 0) -> float:
  import jax.numpy as jnp
  import torch
  from transformers import AutoModelForCausalLM

  from sqlm_jax.models import forward, load_pretrained

  config, params = load_pretrained(path, dtype="float32", param_dtype="float32")
  reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, config.vocab_size, (batch, length))
  mask = np.ones((batch, length), np.int64)
  for row in range(1, batch):  # Rows after the first are left-padded by growing amounts.
    mask[row, :min(length - 1, row * length // (2 * batch))] = 0
  positions = np.maximum(mask.cumsum(-1) - 1, 0)
  with torch.no_grad():
    theirs = reference(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                       position_ids=torch.tensor(positions)).logits.float().numpy()
  ours = np.asarray(forward(params, config, jnp.asarray(tokens), jnp.asarray(positions),
                            jnp.asarray(mask)))
  return float(np.abs(ours - theirs)[mask.astype(bool)].max())


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("checkpoint", help="folder with config.json and model*.safetensors")
  parser.add_argument("--tolerance", type=float, default=1e-4)
  parser.add_argument("--batch", type=int, default=3)
  parser.add_argument("--length", type=int, default=24)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  diff = max_logit_difference(args.checkpoint, args.batch, args.length, args.seed)
  ok = diff <= args.tolerance
  print(f"max |logits(sqlm_jax) - logits(transformers)| = {diff:.3e} "
        f"({'OK' if ok else 'FAIL'}, tolerance {args.tolerance:g})")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
