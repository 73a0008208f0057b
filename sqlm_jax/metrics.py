"""What a run writes: one JSON object per step (metrics.jsonl), TensorBoard events, samples, console."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Optional

import numpy as np

# The fields of the one-line console summary, in order, with their short labels.
_CONSOLE = (("solver_reward", "solver_r"), ("proposer_reward", "proposer_r"),
            ("valid_proposal_rate", "valid"), ("pseudo_label_accuracy", "pseudo_acc"),
            ("proposal_difficulty", "difficulty"), ("heldout/greedy_accuracy", "heldout"),
            ("time/step", "s/step"))


def _plain(value: Any) -> Any:
  """JSON-safe: numpy/jax scalars to Python, NaN/inf to None, arrays to lists."""
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if hasattr(value, "tolist"):
    return _plain(np.asarray(value).tolist())
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


class MetricsWriter:
  """Appends to WORKDIR/metrics.jsonl and WORKDIR/samples.jsonl; mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str, tensorboard: bool = True):
    os.makedirs(workdir, exist_ok=True)
    self.workdir = workdir
    self._metrics = open(os.path.join(workdir, "metrics.jsonl"), "a")
    self._samples = open(os.path.join(workdir, "samples.jsonl"), "a")
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    record = _plain({"step": step, **metrics})
    self._metrics.write(json.dumps(record) + "\n")
    self._metrics.flush()  # A crash never loses a logged step.
    if self._tb is not None:
      for name, value in record.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "step":
          self._tb.add_scalar(name, value, step)
      self._tb.flush()

  def write_samples(self, step: int, samples: list[dict]) -> None:
    for sample in samples:
      self._samples.write(json.dumps(_plain({"step": step, **sample})) + "\n")
    self._samples.flush()

  def close(self) -> None:
    self._metrics.close()
    self._samples.close()
    if self._tb is not None:
      self._tb.close()


def summary_line(step: int, total: int, metrics: dict[str, Any]) -> str:
  parts = [f"step {step}/{total}"]
  for name, label in _CONSOLE:
    value = metrics.get(name)
    if isinstance(value, (int, float)) and value is not None and math.isfinite(value):
      parts.append(f"{label} {value:.3g}")
  return "  ".join(parts)


def read_metrics(workdir: str) -> list[dict]:
  """All records of WORKDIR/metrics.jsonl (a resumed or repeated run's later lines win)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: is {workdir!r} the workdir of a self-play run?")
  by_step: dict[int, dict] = {}
  with open(path) as f:
    for line in f:
      if line.strip():
        record = json.loads(line)
        by_step.setdefault(record["step"], {}).update(record)
  return [by_step[s] for s in sorted(by_step)]


def mean_or_none(values) -> Optional[float]:
  values = [v for v in values if v is not None]
  return float(np.mean(values)) if values else None
