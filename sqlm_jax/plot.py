"""A PNG dashboard of a self-play run, drawn from its metrics.jsonl (any run, CPU or TPU).

  python -m sqlm_jax.plot WORKDIR [--out WORKDIR/dashboard.png]

Panels: held-out accuracy, solver and proposer rewards, pseudo-label accuracy (is the majority
right?), the distribution of agreement counts k, and proposal difficulty, over steps.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from sqlm_jax.loop.metrics import read_metrics


def _series(records, key):
  steps = [r["step"] for r in records if r.get(key) is not None]
  return steps, [r[key] for r in records if r.get(key) is not None]


def draw_dashboard(workdir: str, out: str | None = None) -> str:
  import matplotlib
  matplotlib.use("Agg")  # Files only: works on headless machines and in CI.
  import matplotlib.pyplot as plt

  records = read_metrics(workdir)
  out = out or os.path.join(workdir, "dashboard.png")
  fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
  (acc, rew, pseudo), (khist, diff, valid) = axes

  for key, label in (("heldout/greedy_accuracy", "greedy"), ("heldout/majority_accuracy",
                                                              "majority of N")):
    steps, values = _series(records, key)
    if values:
      acc.plot(steps, values, "o-", label=label)
  acc.set(title="Held-out accuracy", xlabel="step", ylim=(0, 1))
  acc.legend(loc="lower right")

  for key, label in (("solver_reward", "solver"), ("proposer_reward", "proposer")):
    steps, values = _series(records, key)
    rew.plot(steps, values, label=label, alpha=0.85)
  rew.set(title="Mean rewards", xlabel="step", ylim=(-0.02, 1.02))
  rew.legend(loc="lower right")

  steps, values = _series(records, "pseudo_label_accuracy")
  pseudo.plot(steps, values, color="tab:red")
  pseudo.set(title="Pseudo-label accuracy (majority is right)", xlabel="step", ylim=(-0.02, 1.02))
  if not values:
    pseudo.text(0.5, 0.5, "not computable for this topic", ha="center", transform=pseudo.transAxes)

  hist_records = [r for r in records if r.get("k_histogram")]
  if hist_records:
    counts = np.array([r["k_histogram"] for r in hist_records], float)
    shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    khist.stackplot([r["step"] for r in hist_records], shares.T,
                    labels=[f"k={k}" for k in range(shares.shape[1])])
    khist.legend(loc="upper left", fontsize=7, ncol=2)
  khist.set(title="Agreement with the majority (share of questions by k)", xlabel="step",
            ylim=(0, 1))

  diff_records = [r for r in records if r.get("difficulty_histogram")]
  if diff_records:
    levels = sorted({float(k) for r in diff_records for k in r["difficulty_histogram"]})
    shares = np.array([[r["difficulty_histogram"].get(f"{v:g}", 0) for v in levels]
                       for r in diff_records], float)
    shares /= np.maximum(shares.sum(1, keepdims=True), 1)
    diff.stackplot([r["step"] for r in diff_records], shares.T,
                   labels=[f"{v:g}" for v in levels], cmap="viridis")
    diff.legend(loc="upper left", fontsize=7, ncol=2, title="difficulty", title_fontsize=7)
    diff.set(ylim=(0, 1))
  diff.set(title="Proposal difficulty (share per level)", xlabel="step")

  steps, values = _series(records, "valid_proposal_rate")
  valid.plot(steps, values, label="valid proposals")
  steps, values = _series(records, "proposal_duplicate_rate")
  valid.plot(steps, values, label="duplicate proposals")
  valid.set(title="Proposal validity and repetition", xlabel="step", ylim=(-0.02, 1.02))
  valid.legend(loc="center right")

  fig.suptitle(f"Self-play run: {os.path.abspath(workdir)}", fontsize=10)
  fig.tight_layout()
  fig.savefig(out, dpi=90)
  plt.close(fig)
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("workdir")
  parser.add_argument("--out", default=None, help="PNG path (default WORKDIR/dashboard.png)")
  args = parser.parse_args(argv)
  try:
    print(draw_dashboard(args.workdir, args.out))
  except FileNotFoundError as error:
    print(f"Error: {error}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
