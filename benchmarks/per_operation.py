"""Held-out accuracy of tiny arithmetic checkpoints per operation: which ones does self-play lift?

  python benchmarks/per_operation.py DIR [DIR ...] [--split validation|test]

Each DIR is a checkpoint folder (a bundled base, a pretrain_tiny output) or a self-play workdir,
whose exported `solver/` is read. Prints, for each, greedy accuracy and the accuracy of the
majority of 8 answers at the tiny config's temperature (0.7) on arithmetic4's split, for sums,
differences and products separately and all together. For a workdir it also reads the questions
logged in samples.jsonl (log.samples_per_step a step) and prints, per operation and per half of
the run, the share of well-formed questions and the pseudo-label accuracy (how often the
majority answer was right). The truth is read only here.
"""

import argparse
import collections
import json
import os

import jax
import numpy as np

from sqlm_jax import pretrain_tiny
from sqlm_jax.models import load_pretrained
from sqlm_jax.models.tokenizer import load_tokenizer
from sqlm_jax.rollout.sampling import Sampler
from sqlm_jax.tasks import tiny_arithmetic
from sqlm_jax.tasks.base import Proposal

OPERATIONS = {"+": "sums", "-": "differences", "*": "products"}


def by_operation(examples: list[dict]) -> dict[str, list[dict]]:
  """{"sums" | "differences" | "products": the examples of that operation}."""
  groups = {name: [] for name in OPERATIONS.values()}
  for example in examples:
    groups[OPERATIONS[tiny_arithmetic.operation(Proposal(example["question"]))]].append(example)
  return groups


def per_operation(folder: str, groups: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
  """{"greedy" | "maj8 t0.7": {operation name or "all": accuracy}} for one checkpoint, loaded
  and compiled once for both."""
  config, params = load_pretrained(folder)
  tokenizer = load_tokenizer(folder)
  sampler = Sampler(config, tokenizer.pad_id, tokenizer.stop_ids)
  total = sum(len(rows) for rows in groups.values())
  results = {}
  for num_samples, temperature, label in ((1, 0.0, "greedy"), (8, 0.7, "maj8 t0.7")):
    accuracy = {name: pretrain_tiny.accuracy(sampler, tokenizer, params, rows, jax.random.key(0),
                                             num_samples, temperature, topic=tiny_arithmetic)
                for name, rows in groups.items()}
    accuracy["all"] = sum(accuracy[name] * len(rows) for name, rows in groups.items()) / total
    results[label] = accuracy
  return results


def logged_questions(workdir: str) -> dict[str, dict[str, tuple[float, float, int]]]:
  """{"first half" | "second half": {operation: (share of well-formed questions, pseudo-label
  accuracy, count)}} from a workdir's samples.jsonl."""
  with open(os.path.join(workdir, "samples.jsonl")) as f:
    records = [json.loads(line) for line in f]
  last = max(r["step"] for r in records)
  halves = {}
  for half, keep in (("first half", lambda step: step <= last // 2),
                     ("second half", lambda step: step > last // 2)):
    right = collections.defaultdict(list)
    for record in records:
      proposal = Proposal(record["question"])
      operation = tiny_arithmetic.operation(proposal)
      if keep(record["step"]) and operation is not None:
        right[OPERATIONS[operation]].append(record["majority"] == tiny_arithmetic.true_answer(
            proposal))
    total = sum(len(rows) for rows in right.values())
    halves[half] = {name: (len(right[name]) / max(total, 1),
                           float(np.mean(right[name])) if right[name] else float("nan"),
                           len(right[name])) for name in OPERATIONS.values()}
  return halves


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("folders", nargs="+")
  parser.add_argument("--split", choices=["validation", "test"], default="validation")
  args = parser.parse_args()
  test, validation, _ = pretrain_tiny.evaluation_sets(tiny_arithmetic)
  groups = by_operation(validation if args.split == "validation" else test)
  print(f"arithmetic4 {args.split}: {sum(len(rows) for rows in groups.values())} problems "
        + ", ".join(f"{len(rows)} {name}" for name, rows in groups.items()))
  print(f"{'checkpoint':40s} {'answers':>10s} " + " ".join(f"{n:>11s}" for n in OPERATIONS.values())
        + f" {'all':>6s}")
  for folder in args.folders:
    solver = os.path.join(folder, "solver")
    for label, accuracy in per_operation(solver if os.path.isdir(solver) else folder,
                                         groups).items():
      print(f"{folder[-40:]:40s} {label:>10s} "
            + " ".join(f"{accuracy[n]:11.3f}" for n in OPERATIONS.values())
            + f" {accuracy['all']:6.3f}")
    if os.path.isfile(os.path.join(folder, "samples.jsonl")):
      for half, rows in logged_questions(folder).items():
        print(f"{'':40s} {'logged':>10s} {half}: " + ", ".join(
            f"{name} {share:.0%} of questions (n={n}), majority right {right:.2f}"
            for name, (share, right, n) in rows.items()))


if __name__ == "__main__":
  main()
