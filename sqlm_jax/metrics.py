"""What a run writes: one JSON object per step (metrics.jsonl), TensorBoard events, samples, console."""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any, Optional

import numpy as np

# The fields of the one-line console summary, in order, with their short labels.
_CONSOLE = (("solver_reward", "solver_r"), ("proposer_reward", "proposer_r"),
            ("valid_proposal_rate", "valid"), ("pseudo_label_accuracy", "pseudo_acc"),
            ("proposal_difficulty", "difficulty"), ("heldout/greedy_accuracy", "heldout"),
            ("time/step", "s/step"))


def plain(value: Any) -> Any:
  """JSON-safe: numpy/jax scalars to Python, NaN/inf to None, arrays to lists."""
  if isinstance(value, dict):
    return {k: plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [plain(v) for v in value]
  if hasattr(value, "tolist"):
    return plain(np.asarray(value).tolist())
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


class MetricsWriter:
  """Appends to WORKDIR/metrics.jsonl and WORKDIR/samples.jsonl; mirrors scalars to TensorBoard.

  `resume_from`: the step a resumed run restored; every record after it (written by the run
  that was stopped) is cut first, so each step appears exactly once.
  """

  def __init__(self, workdir: str, tensorboard: bool = True, resume_from: Optional[int] = None):
    os.makedirs(workdir, exist_ok=True)
    self.workdir = workdir
    tb_dir = os.path.join(workdir, "tensorboard")
    if resume_from is not None:
      for name in ("metrics.jsonl", "samples.jsonl"):
        truncate_jsonl(os.path.join(workdir, name), resume_from)
      truncate_events(tb_dir, resume_from)
    self._metrics = open(os.path.join(workdir, "metrics.jsonl"), "a")
    self._samples = open(os.path.join(workdir, "samples.jsonl"), "a")
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter
      # purge_step: a TensorBoard already showing the cut steps drops them too. The suffix keeps
      # the new file from taking the name of the one it continues (names end in seconds).
      self._tb = SummaryWriter(tb_dir, purge_step=None if resume_from is None else resume_from + 1,
                               filename_suffix="" if resume_from is None else f".from{resume_from}")

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    record = plain({"step": step, **metrics})
    self._metrics.write(json.dumps(record) + "\n")
    self._metrics.flush()  # A crash never loses a logged step.
    if self._tb is not None:
      for name, value in record.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "step":
          self._tb.add_scalar(name, value, step)
      self._tb.flush()

  def write_samples(self, step: int, samples: list[dict]) -> None:
    for sample in samples:
      self._samples.write(json.dumps(plain({"step": step, **sample})) + "\n")
    self._samples.flush()

  def close(self) -> None:
    self._metrics.close()
    self._samples.close()
    if self._tb is not None:
      self._tb.close()


def truncate_jsonl(path: str, step: int) -> None:
  """Keeps the records of steps <= `step` (and drops a line cut off mid-write)."""
  if not os.path.isfile(path):
    return
  kept = []
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if record.get("step", 0) <= step:
        kept.append(line if line.endswith("\n") else line + "\n")
  with open(path + ".tmp", "w") as f:
    f.writelines(kept)
  os.replace(path + ".tmp", path)


def read_events(path: str) -> list:
  """The Event protos of one TensorBoard events file (a record cut off mid-write ends it)."""
  from tensorboardX.proto.event_pb2 import Event
  events = []
  with open(path, "rb") as f:
    data = f.read()
  offset = 0
  while offset + 12 <= len(data):
    (length,) = struct.unpack("<Q", data[offset:offset + 8])
    end = offset + 12 + length + 4
    if end > len(data):
      break
    events.append(Event.FromString(data[offset + 12:offset + 12 + length]))
    offset = end
  return events


def truncate_events(tb_dir: str, step: int) -> None:
  """Rewrites each events file in `tb_dir` without the events of steps after `step`."""
  from tensorboardX.record_writer import RecordWriter
  if not os.path.isdir(tb_dir):
    return
  for name in sorted(os.listdir(tb_dir)):
    path = os.path.join(tb_dir, name)
    if "tfevents" not in name or not os.path.isfile(path):
      continue
    kept = [e for e in read_events(path) if e.step <= step]
    writer = RecordWriter(path + ".tmp")
    for event in kept:
      writer.write(event.SerializeToString())
    writer.close()
    os.replace(path + ".tmp", path)


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
