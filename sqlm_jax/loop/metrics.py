"""What a run writes: one JSON object per step (metrics.jsonl), TensorBoard events, samples, console."""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any, Optional

import numpy as np

from sqlm_jax.reward import diversity

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


# ---- What a researcher watches ----------------------------------------------------------------------


def score_metrics(s, state, proposals, questions, answers, majority, solver_r, proposer_r, k,
                  answers_out, proposals_out) -> dict[str, Any]:
  task, n = s.task, s.config.rollout.answers_per_question
  texts = [p.question for p in questions]
  m = {
      "valid_proposal_rate": float(np.mean([p.valid for p in proposals])),
      "num_questions": len(questions),
      "solver_reward": float(solver_r.mean()) if solver_r.size else None,
      "proposer_reward": float(proposer_r.mean()) if proposer_r.size else None,
      "k_histogram": np.bincount(np.asarray(k, np.int64), minlength=n + 1).tolist(),
      "answer_valid_rate": float(np.mean([[a is not None for a in row] for row in answers]))
                           if answers else None,
      "proposal_length": float(proposals_out.lengths.mean()) if proposals_out is not None
                         else None,
      "answer_length": float(answers_out.lengths.mean()) if answers_out is not None else None,
      "proposal_distinct2": diversity.distinct_n(texts, 2),
      "proposal_duplicate_rate": diversity.duplicate_rate(texts),
      "proposal_recent_overlap": state.recent_questions.update(texts),
  }
  # The pseudo-label monitor: how often the majority is actually right (never a reward).
  truths = [task.true_answer(p) for p in questions]
  judged = [(mj == t) for mj, t in zip(majority, truths) if t is not None and mj is not None]
  m["pseudo_label_accuracy"] = float(np.mean(judged)) if judged else None
  m["pseudo_label_coverage"] = len(judged) / len(questions) if questions else 0.0
  difficulties = [task.difficulty(p) for p in questions]
  difficulties = [d for d in difficulties if d is not None]
  m["proposal_difficulty"] = float(np.mean(difficulties)) if difficulties else None
  if difficulties:
    values, counts = np.unique(difficulties, return_counts=True)
    m["difficulty_histogram"] = {f"{v:g}": int(c) for v, c in zip(values, counts)}
  return m


def sample_records(count, proposals, proposal_texts, questions, answers, answer_texts, majority,
                   solver_r, proposer_r, n) -> list[dict]:
  """A few proposals with their N answers and rewards, for reading (samples.jsonl)."""
  records, q = [], 0
  for proposal, text in zip(proposals, proposal_texts):
    if len(records) >= count:
      break
    record = {"proposal": text, "question": proposal.question}
    if proposal.valid:
      record.update(answers=answer_texts[q * n:(q + 1) * n], extracted=answers[q],
                    majority=majority[q], solver_rewards=solver_r[q].tolist(),
                    proposer_reward=float(proposer_r[q]))
      q += 1
    records.append(record)
  return records
