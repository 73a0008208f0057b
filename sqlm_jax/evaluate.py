"""Standalone held-out evaluation of a trained solver (or any checkpoint folder).

  python -m sqlm_jax.evaluate --config configs/arithmetic.py --params-from WORKDIR_OR_CHECKPOINT

--params-from is either a checkpoint folder (config.json + safetensors + tokenizer), or a
self-play workdir, whose exported `solver/` folder is used (`--role proposer` for the other).
The config supplies the task and the evaluation settings (eval.*); prints the metrics as JSON.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.",
                                          lock_config=True)
_PARAMS_FROM = flags.DEFINE_string("params-from", None, "Checkpoint folder or self-play workdir.")
_ROLE = flags.DEFINE_enum("role", "solver", ["solver", "proposer"], "Which role of a workdir.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the sampled (majority-of-N) answers.")


def resolve_checkpoint(path: str, role: str = "solver") -> str:
  if os.path.isfile(os.path.join(path, "config.json")) and not os.path.isdir(
      os.path.join(path, role)):
    return path
  exported = os.path.join(path, role)
  if os.path.isfile(os.path.join(exported, "config.json")):
    return exported
  raise FileNotFoundError(f"--params-from={path!r} is neither a checkpoint folder (config.json) "
                          f"nor a self-play workdir with an exported {role}/ folder.")


def main(argv) -> None:
  del argv
  import jax

  from sqlm_jax.evals import evaluation
  from sqlm_jax.loop import roles
  from sqlm_jax.models import load_pretrained
  from sqlm_jax.rollout.sampling import Sampler
  from sqlm_jax.models.tokenizer import load_tokenizer

  config = _CONFIG.value
  if config is None or not _PARAMS_FROM.value:
    raise app.UsageError("--config and --params-from are required.")
  try:
    path = resolve_checkpoint(_PARAMS_FROM.value, _ROLE.value)
  except FileNotFoundError as error:
    print(f"Error: {error}", file=sys.stderr)
    sys.exit(2)
  model_config, params = load_pretrained(path, dtype=config.model.dtype,
                                         param_dtype=config.model.param_dtype)
  tokenizer = load_tokenizer(path)
  task, _ = roles.make_task(config)
  sampler = Sampler(model_config, pad_id=tokenizer.pad_id, stop_ids=tokenizer.stop_ids)
  examples = evaluation.load_examples(config.eval.heldout, config.eval.num_examples,
                                      config.eval.data_dir, config.eval.split)
  pool = None
  if config.eval.heldout == "humaneval":
    from sqlm_jax import sandbox
    pool = sandbox.SandboxPool(limits=sandbox.Limits(timeout_s=config.sandbox.timeout_s),
                               allow_unsandboxed=config.sandbox.allow_unsandboxed)
  key = jax.random.fold_in(jax.random.key(_SEED.value), 2**31 - 1)
  result = evaluation.run_heldout(config.eval, params, sampler, tokenizer, task, examples, key, pool)
  result = {"checkpoint": path, "heldout_set": config.eval.heldout,
            "heldout_split": config.eval.split, **result}
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  app.run(main)
