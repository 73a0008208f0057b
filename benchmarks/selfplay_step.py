"""Time per self-play step, split by phase, and training tokens/s.

  python benchmarks/selfplay_step.py --config configs/tiny.py --steps 12 [--config.x=y ...]

Runs the real loop (selfplay.train) for a few steps in a temporary workdir, then summarises
its metrics.jsonl: the median over steps after the first `--warmup` (which include
compilation) of each phase's seconds, its share of the step, the host-side share (tokenising,
parsing, voting, logging bookkeeping) and training tokens/s.
"""

import json
import os
import sys
import tempfile

import numpy as np
from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config file.")
_STEPS = flags.DEFINE_integer("steps", 12, "Self-play steps to run.")
_WARMUP = flags.DEFINE_integer("warmup", 4, "Leading steps left out (compilation).")

PHASES = ("propose", "host_parse", "solve", "host_score", "train")


def main(argv):
  del argv
  from sqlm_jax.loop import selfplay
  config = _CONFIG.value
  config.total_steps = _STEPS.value
  config.eval.every = 0
  config.log.progress_bar = False
  workdir = tempfile.mkdtemp(prefix="selfplay_bench_")
  selfplay.train(config, workdir)
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  steps = [r for r in records if "time/step" in r][_WARMUP.value:]
  if not steps:
    sys.exit(f"need more than --warmup={_WARMUP.value} steps")
  total = np.median([r["time/step"] for r in steps])
  print(f"config {config_flags.get_config_filename(flags.FLAGS['config'])}: "
        f"{config.rollout.prompts_per_step} prompts x {config.rollout.proposals_per_prompt} "
        f"proposals, N = {config.rollout.answers_per_question}; median over steps "
        f"{steps[0]['step']}..{steps[-1]['step']}")
  for phase in PHASES:
    value = np.median([r[f"time/{phase}"] for r in steps])
    print(f"  {phase:<11} {value:8.3f} s  {100 * value / total:5.1f} %")
  print(f"  {'step':<11} {total:8.3f} s")
  print(f"  host share (parse + score): "
        f"{100 * np.median([r['time/host_fraction'] for r in steps]):.1f} %")
  print(f"  training tokens/s: {np.median([r['train_tokens_per_s'] for r in steps]):,.0f}")
  print(f"  questions/step: {np.median([r['num_questions'] for r in steps]):.0f}, "
        f"answer length {np.median([r['answer_length'] or 0 for r in steps]):.1f} tokens")


if __name__ == "__main__":
  app.run(main)
