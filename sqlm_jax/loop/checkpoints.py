"""What a run saves: whole-run checkpoints (orbax) to resume from, and Hugging Face exports.

A whole-run checkpoint is WORKDIR/checkpoints/STEP/, written by an orbax `CheckpointManager`:
  state/  the device arrays {"params", "opt_state"} (one entry "policy" with shared weights,
          else "solver" and "proposer"), saved sharded by every process and restorable onto
          any mesh: `restore` reads them into the shardings of the current run;
  host/   plain JSON: the step, the recent-questions buffer, the base and last held-out
          evaluations, and the config of the run that wrote it.
Saves are asynchronous (the arrays are copied to host memory, then written in a background
thread while the next step runs). orbax writes each step into a temporary folder and renames
it when complete, so a process killed mid-write never leaves a folder taken for a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from typing import Any, Optional

import jax
from etils import epath

from sqlm_jax.scale import multihost, sharding
from sqlm_jax.models import ModelConfig, save_pretrained

# Files of a checkpoint folder that are not weights: copied so an export is self-contained.
_WEIGHT_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json")

CHECKPOINT_DIR = "checkpoints"

# Config keys whose change alters what a run computes: resuming under a different value would
# splice two different runs together. Everything else (logging, evaluation, checkpoint cadence,
# mesh sizes and rules, micro-batch size, remat, sandbox) only changes how or what is reported.
MEANING = ("seed", "model.path", "model.dtype", "model.param_dtype", "shared_weights", "task.",
           "rollout.", "rewards.", "rl.", "critic.", "proposer_update_every")
# Gradients accumulate to the full-batch value (rl/update.py), log-probs chunk to the same values,
# and a row's tokens do not depend on how rows are grouped into decoding calls or over which
# devices.
HARMLESS = ("rl.micro_batch_size", "rl.logprob_chunk", "rollout.rows_per_call", "rollout.tensor")

# What a run writes into its workdir besides checkpoints: another run's copies are refused.
LOGS = ("metrics.jsonl", "samples.jsonl", "summary.json", "tensorboard")


class ResumeError(ValueError):
  """A workdir that this run cannot continue; the message says why and what to do."""


# ---- Whole-run checkpoints ---------------------------------------------------------------------


def _ocp():
  import orbax.checkpoint as ocp  # Imported on use: it is slow to import.
  return ocp


def workdir_path(workdir: str) -> epath.Path:
  """A workdir as an epath.Path: local folders (made absolute) and gs:// alike."""
  return epath.Path(workdir if "://" in workdir else os.path.abspath(workdir))


def manager(workdir: str, keep: int = 0, read_only: bool = False, this_process_only: bool = False):
  """The CheckpointManager of WORKDIR/checkpoints, keeping the newest `keep` (0 = all).

  `read_only` for readers beside a live run (exports): it neither creates, deletes, nor
  cleans up the unfinished folder of a save in progress. `this_process_only`: a reader that
  one process of a multi-process run opens alone (it takes part in no collective).
  """
  ocp = _ocp()
  if read_only:
    alone = {}
    if this_process_only:
      alone["multiprocessing_options"] = ocp.options.MultiprocessingOptions(
          primary_host=jax.process_index(), active_processes={jax.process_index()})
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, **alone)
  else:
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(keep) if keep else None,
        enable_async_checkpointing=True, create=True, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(workdir_path(workdir) / CHECKPOINT_DIR, options=options)


def folder(mngr, step: int) -> str:
  return os.path.join(str(mngr.directory), str(step))


def save(mngr, step: int, arrays: dict[str, Any], host: dict[str, Any]) -> None:
  """Starts an asynchronous save of step; returns once the arrays are copied off the devices.

  A folder already there for this step is one that `restore` skipped as damaged: replaced.
  """
  ocp = _ocp()
  if step in mngr.all_steps():
    mngr.delete(step)
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(arrays),
                                          host=ocp.args.JsonSave(host)), force=True)


def read_host(mngr) -> Optional[tuple[int, dict]]:
  """(step, host data) of the newest checkpoint whose host data reads; None without one."""
  ocp = _ocp()
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      return step, mngr.restore(step, args=ocp.args.Composite(host=ocp.args.JsonRestore()))["host"]
    except Exception as error:  # noqa: BLE001 - any unreadable folder is skipped the same way
      _warn_damaged(mngr, step, error)
  return None


def restore(mngr, abstract_arrays, newest: int) -> Optional[tuple[int, dict, dict]]:
  """(step, arrays, host) of the newest complete checkpoint at or below `newest`.

  `abstract_arrays` are jax.ShapeDtypeStructs carrying the current run's shardings, so the
  arrays land on this run's mesh whatever mesh saved them. A folder that fails to read (on any
  process: they agree) is skipped with a warning naming it, and the one before it is tried.
  """
  ocp = _ocp()
  restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_arrays)
  for step in sorted((s for s in mngr.all_steps() if s <= newest), reverse=True):
    out, error = None, None
    try:
      out = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(item=abstract_arrays, restore_args=restore_args),
          host=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001
      error = e
    failed = multihost.flags(error is not None)
    if failed.any():  # Every process moves to the same earlier step.
      _warn_damaged(mngr, step, error or RuntimeError(
          f"unreadable on process {', '.join(str(i) for i in failed.nonzero()[0])}"))
      continue
    return step, out["state"], out["host"]
  return None


def _warn_damaged(mngr, step: int, error: Exception) -> None:
  if sharding.is_writer():
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    print(f"Warning: skipping damaged checkpoint {folder(mngr, step)} "
          f"({type(error).__name__}: {first[:300]}); trying the one before it.",
          file=sys.stderr, flush=True)


def flat_config(config) -> dict[str, Any]:
  """A ConfigDict (or its JSON dict) as {"a.b": value}, JSON-normalised."""
  tree = json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort") \
      else config
  flat = {}

  def walk(node, prefix):
    for key, value in node.items():
      if isinstance(value, dict):
        walk(value, f"{prefix}{key}.")
      else:
        flat[f"{prefix}{key}"] = value
  walk(tree, "")
  return flat


def meaning_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """Keys (of both flat configs) that change what the run computes and differ.

  rl.total_steps follows total_steps unless set: extending a run stretches its schedule too,
  which is allowed like a larger total_steps.
  """
  keys = []
  for key in sorted(set(saved) & set(current)):
    if not key.startswith(MEANING) or key in HARMLESS or saved[key] == current[key]:
      continue
    if (key == "rl.total_steps" and saved[key] == saved.get("total_steps")
        and current[key] == current.get("total_steps")):
      continue
    keys.append(key)
  return keys


def check_workdir(workdir: str, config) -> None:
  """Before a run with no checkpoint to resume: refuses another run's logs in `workdir`.

  Logs written under the same meaning (a run stopped before its first checkpoint) are the
  same run's: they are removed and the run starts over.
  """
  root = workdir_path(workdir)
  present = [name for name in LOGS if (root / name).exists()]
  if not present:
    return
  why = "no config.json"
  if (root / "config.json").is_file():
    differ = meaning_differences(flat_config(json.loads((root / "config.json").read_text())),
                                 flat_config(config))
    why = f"its config differs in {', '.join(differ)}" if differ else ""
  if why:
    raise ResumeError(f"{workdir} holds another run's logs ({', '.join(present)}; {why}) and no "
                      "checkpoint to resume; pass --config.overwrite=True to replace them, or "
                      "choose another --workdir.")
  clear(workdir, with_checkpoints=False)  # Only unreadable or unfinished folders are there.


def clear(workdir: str, with_checkpoints: bool = True) -> None:
  """Removes what a run writes into `workdir`: logs, exports, checkpoints (process 0 only)."""
  if not sharding.is_writer():
    return
  names = (*LOGS, "solver", "proposer", "config.json")
  for name in names + ((CHECKPOINT_DIR,) if with_checkpoints else ()):
    path = workdir_path(workdir) / name
    if path.is_dir():
      path.rmtree()
    elif path.exists():
      path.unlink()


# ---- Stopping cleanly on SIGTERM / SIGINT ------------------------------------------------------


class StopSignal:
  """While active, the first SIGTERM or SIGINT asks the loop to stop after the current step
  (`requested`); a second one exits at once."""

  def __init__(self):
    self.requested = False
    self._previous = {}

  def __enter__(self):
    for signum in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[signum] = signal.signal(signum, self._handle)
      except ValueError:  # Not the main thread (e.g. a notebook worker): no handlers.
        pass
    return self

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)

  def _handle(self, signum, frame):
    if self.requested:
      os._exit(128 + signum)
    self.requested = True
    print(f"\n{signal.Signals(signum).name}: finishing this step, saving a checkpoint, then "
          "exiting (send it again to exit at once).", file=sys.stderr, flush=True)


# ---- Hugging Face exports -----------------------------------------------------------------------


def export(path: str, config: ModelConfig, params, tokenizer_from: str) -> None:
  """Writes params as config.json + model.safetensors in `path`, with the tokenizer files.

  Written to a temporary folder then renamed, so an interrupted export never leaves a
  half-written checkpoint where a previous good one was. Every process must call it: the
  tensors are gathered one at a time (a gather is a collective), so no device holds more than
  one whole tensor; only process 0 keeps them and writes.
  """
  writer = sharding.is_writer()
  leaves, treedef = jax.tree.flatten(params)
  kept = []
  for leaf in leaves:
    value = sharding.to_host(leaf)
    kept.append(value if writer else None)
  if not writer:
    return
  params = treedef.unflatten(kept)
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
