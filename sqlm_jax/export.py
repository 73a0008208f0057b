"""A Hugging Face folder (config, safetensors, tokenizer files) from a run's whole-run checkpoint.

  python -m sqlm_jax.export --workdir DIR --role solver|proposer --out OUT [--step S]

Reads one role's parameters (the shared "policy" set with shared weights) of step S (default:
the newest complete checkpoint) onto one device; the optimizer states are not read. The model
config and tokenizer files come from the run's model.path (saved in the checkpoint), or from
--model_path when that folder has moved. Safe beside a running run: the checkpoints are only
read. The result loads in transformers (and so vLLM) and passes `python -m sqlm_jax.check_parity`.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import jax

from sqlm_jax.loop import checkpoints
from sqlm_jax.scale import sharding
from sqlm_jax.models import read_config, transformer


class ExportError(ValueError):
  """No such checkpoint, step or role; the message says what there is."""


def export_checkpoint(workdir: str, role: str, out: str, step: Optional[int] = None,
                      model_path: Optional[str] = None) -> int:
  """Writes `role` of checkpoint `step` (default: newest) of `workdir` to `out`; returns step."""
  if role not in ("solver", "proposer"):
    raise ExportError(f"--role={role!r}: choose solver or proposer.")
  folder = os.path.join(workdir, checkpoints.CHECKPOINT_DIR)
  if not os.path.isdir(folder):
    raise ExportError(f"{folder} does not exist: is {workdir!r} the workdir of a self-play run?")
  mngr = checkpoints.manager(workdir, read_only=True)
  steps = sorted(mngr.all_steps())
  if not steps:
    raise ExportError(f"{folder} holds no complete checkpoint.")
  step = steps[-1] if step is None else step
  if step not in steps:
    raise ExportError(f"No checkpoint of step {step} in {folder}; saved steps: "
                      f"{', '.join(map(str, steps))}.")
  ocp = checkpoints._ocp()
  host = mngr.restore(step, args=ocp.args.Composite(host=ocp.args.JsonRestore()))["host"]
  config = host["config"]
  model_path = model_path or config["model"]["path"]
  if not os.path.isfile(os.path.join(model_path, "config.json")):
    raise ExportError(f"The run's starting checkpoint {model_path!r} (model config and tokenizer) "
                      "is not there; pass --model_path=DIR where it is now.")
  model_config = read_config(model_path, config["model"]["dtype"], config["model"]["param_dtype"])
  key = "policy" if config["shared_weights"] else role
  layout = sharding.default_layout()
  shapes = jax.eval_shape(lambda: transformer.init_params(model_config, jax.random.key(0)))
  abstract = {"params": {key: jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
      sharding.param_shardings(layout, model_config))}}
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
      partial_restore=True)))
  checkpoints.export(out, model_config, restored["state"]["params"][key], model_path)
  mngr.close()
  return step


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="The run's workdir (holds checkpoints/).")
  parser.add_argument("--role", required=True, choices=("solver", "proposer"))
  parser.add_argument("--out", required=True, help="Folder to write (replaced if it exists).")
  parser.add_argument("--step", type=int, default=None, help="Saved step (default: the newest).")
  parser.add_argument("--model_path", default=None,
                      help="The run's starting checkpoint folder, if it moved since the run.")
  args = parser.parse_args(argv)
  try:
    step = export_checkpoint(args.workdir, args.role, args.out, args.step, args.model_path)
  except ExportError as error:
    print(f"Export error: {error}", file=sys.stderr)
    sys.exit(2)
  print(f"{args.role} of step {step} -> {args.out}")


if __name__ == "__main__":
  main()
