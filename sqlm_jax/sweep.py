"""Ablations: every combination of config grids x seeds, each run its own `sqlm_jax.main` process.

  python -m sqlm_jax.sweep --config configs/tiny.py --workdir runs/sweep \
      --grid proposer_update_every=1,1000000 --grid rewards.proposer_shape=sqlm,rzero \
      --seeds 0,1,2 [--parallel K] [--dry_run] [--config.KEY=VALUE ...]

An arm is one combination of grid values; run S of arm A lives in WORKDIR/A/seedS, where A
reads like `proposer_update_every=1,rewards.proposer_shape=sqlm`. Named arms change one thing
at a time instead (an ablation table), and combine with any grid:

  python -m sqlm_jax.sweep --config configs/tiny.py --workdir runs/ablations --seeds 0,1,2 \
      --arm full: --arm frozen:proposer_update_every=1000000 \
      --arm guard:rewards.proposer_min_margin=3,rewards.solver_min_margin=3

Their folders and the `arm` column of the results are their names. Further `--config.` overrides
apply to every run. Every arm's config is built and checked (unknown keys, values of the wrong
type, `main.validate`) before anything runs. A run is finished when its summary.json records
the config's total_steps; rerunning the same command skips finished runs and starts the others
again with the same command line. This is checked again when each run's turn comes, so a run
that another sweep process on the same folder finished in the meantime is not repeated (two
processes starting the same unfinished run at once are not prevented). `--dry_run` prints those
command lines and runs nothing; `--report` writes the results of the runs finished so far and
runs nothing.

Writes WORKDIR/results.csv (one row per run), WORKDIR/results.md (per arm: mean ± sd over
seeds) and WORKDIR/sweep.png (held-out greedy accuracy and pseudo-label accuracy against step:
per arm the mean over seeds, with a band from the lowest to the highest seed). The results cover
every run planned in WORKDIR, by this call or an earlier one (WORKDIR/sweep_runs.json), so a
sweep can be extended an arm at a time; a run folder that an earlier call planned with other
settings is refused by name.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import dataclasses
import hashlib
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from typing import Optional, Sequence

import numpy as np

RUNS_FILE = "sweep_runs.json"  # Every run planned in a sweep's folder, by any call.
RESULT_FIELDS = ("seed", "base_accuracy", "final_accuracy", "gain", "pseudo_label_accuracy",
                 "wall_seconds")
TAIL_STEPS = 10  # "final" pseudo-label accuracy: the mean over the run's last 10 steps
CURVES = (("heldout/greedy_accuracy", "Held-out greedy accuracy"),
          ("pseudo_label_accuracy", "Pseudo-label accuracy (majority is right)"))


class SweepError(ValueError):
  """A grid, seed list or override that cannot make a sweep; the message names it."""


@dataclasses.dataclass(frozen=True)
class Run:
  arm: str  # folder name of the arm
  columns: tuple[tuple[str, str], ...]  # the arm's results columns: ("arm", NAME) for a named
  # arm, then (key, value) of the grid, in --grid order
  seed: int
  workdir: str
  total_steps: int
  argv: tuple[str, ...]  # sqlm_jax.main's arguments
  heldout: tuple[str, str] = ("", "")  # (config.eval.heldout, config.eval.data_dir)

  def command(self, python: str = "python") -> list[str]:
    return [python, "-m", "sqlm_jax.main", *self.argv]


def parse_grid(text: str) -> tuple[str, list[str]]:
  """"KEY=V1,V2" -> (KEY, [V1, V2])."""
  key, sep, values = text.partition("=")
  key = key.strip().removeprefix("config.")
  items = [v.strip() for v in values.split(",")] if sep else []
  if not key or not items or "" in items:
    raise SweepError(f"--grid {text!r} is not KEY=VALUE[,VALUE...], e.g. "
                     "--grid rewards.proposer_shape=sqlm,rzero.")
  if len(set(items)) != len(items):
    raise SweepError(f"--grid {text!r} repeats a value.")
  return key, items


def parse_arm(text: str) -> tuple[str, list[tuple[str, str]]]:
  """"NAME:KEY=V,KEY=V" -> (NAME, [(KEY, V), ...]); "NAME:" is the config unchanged."""
  name, sep, body = text.partition(":")
  items = [item.strip() for item in body.split(",")] if body.strip() else []
  pairs = [item.partition("=") for item in items]
  if not sep or not re.fullmatch(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]*", name) or any(
      not key.strip() or not eq or not value.strip() for key, eq, value in pairs):
    raise SweepError(f"--arm {text!r} is not NAME:KEY=VALUE[,KEY=VALUE...] (NAME of letters, "
                     "digits, '.', '_', '+', '-'; 'NAME:' alone is the unchanged config), e.g. "
                     "--arm frozen:proposer_update_every=1000000.")
  overrides = [(key.strip().removeprefix("config."), value.strip()) for key, _, value in pairs]
  keys = [key for key, _ in overrides]
  if len(set(keys)) != len(keys):
    raise SweepError(f"--arm {text!r} sets a key twice.")
  return name, overrides


def parse_seeds(text: str) -> list[int]:
  try:
    seeds = [int(s) for s in text.split(",")]
  except ValueError:
    raise SweepError(f"--seeds {text!r} must be comma-separated integers, e.g. 0,1,2.") from None
  if len(set(seeds)) != len(seeds):
    raise SweepError(f"--seeds {text!r} repeats a seed.")
  return seeds


def parse_overrides(args: Sequence[str]) -> list[tuple[str, str]]:
  """["--config.a.b=v", ...] -> [("a.b", "v"), ...]; anything else is refused by name."""
  overrides = []
  for arg in args:
    key, sep, value = arg.partition("=")
    if not key.startswith("--config.") or not sep:
      raise SweepError(f"unexpected argument {arg!r}: config overrides are written "
                       "--config.KEY=VALUE (with '='); see --help for the sweep's own flags.")
    overrides.append((key.removeprefix("--config."), value))
  return overrides


def arm_name(grid: Sequence[tuple[str, str]]) -> str:
  """A readable folder name: "key=value,key=value", with unsafe characters replaced by '_'."""
  if not grid:
    return "default"
  name = ",".join(f"{key}={value}" for key, value in grid)
  safe = re.sub(r"[^A-Za-z0-9._=,+-]", "_", name).lstrip(".")
  if safe != name or len(safe) > 200:  # Keep distinct arms distinct after the replacement.
    safe = f"{safe[:180]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
  return safe


def build_config(config_path: str, overrides: Sequence[tuple[str, str]]):
  """The run's config exactly as `sqlm_jax.main` would parse it, checked by `main.validate`.

  Overrides go through ml_collections' config_flags on a private flag set, so each value is
  parsed by its field's type and an unknown key is refused the same way the run would refuse it.
  """
  from absl import flags
  from ml_collections import config_flags

  from sqlm_jax import main
  argv = ["sweep", f"--config={config_path}", *(f"--config.{k}={v}" for k, v in overrides)]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config file", flag_values=flag_values,
                                  lock_config=True, sys_argv=argv)
  try:
    flag_values(argv)
  except (AttributeError, KeyError) as error:  # config_flags: a key not in the config
    key = next((k for k, _ in overrides if k.split(".")[-1] in str(error)), None)
    raise SweepError(f"config.{key} is not a config key of {config_path} (keys: "
                     "sqlm_jax/config_base.py)." if key else f"{error}") from None
  except flags.Error as error:  # a value of the wrong type, a missing config file
    raise SweepError(str(error)) from None
  config = flag_values.config
  try:
    main.validate(config)
  except main.ConfigError as error:
    raise SweepError(str(error)) from None
  return config


def plan(config_path: str, grids: Sequence[tuple[str, list[str]]], seeds: Sequence[int],
         overrides: Sequence[tuple[str, str]], workdir: str,
         arms: Sequence[tuple[str, list[tuple[str, str]]]] = ()) -> list[Run]:
  """Every run of the sweep (named arms x grid x seeds), each arm's config checked.

  Raises SweepError naming what is wrong.
  """
  keys = [key for key, _ in grids]
  if len(set(keys)) != len(keys):
    raise SweepError(f"a --grid key is given twice: {', '.join(keys)}.")
  arm_names = [name for name, _ in arms]
  if len(set(arm_names)) != len(arm_names):
    raise SweepError(f"an --arm name is given twice: {', '.join(arm_names)}.")
  arm_keys = {key for _, arm in arms for key, _ in arm}
  if "seed" in [*keys, *arm_keys, *(k for k, _ in overrides)]:
    raise SweepError("seeds are set with --seeds, not --grid seed=..., --arm or --config.seed.")
  for key, _ in overrides:
    if key in keys or key in arm_keys:
      raise SweepError(f"config.{key} is both a --grid or --arm key and a --config override.")
  for key in keys:
    if key in arm_keys:
      raise SweepError(f"config.{key} is both a --grid key and an --arm key.")
  runs, names = [], {}
  for (name, named), values in itertools.product(arms or [(None, [])],
                                                 itertools.product(*(v for _, v in grids))):
    grid = tuple(zip(keys, values))
    arm = arm_name(grid)  # "default" without a grid
    if name:
      arm = f"{name},{arm}" if grid else name
    if arm in names:
      raise SweepError(f"arms {names[arm]} and {grid} need the same folder name {arm!r}.")
    names[arm] = grid
    arm_overrides = [*named, *grid, *overrides]
    try:
      config = build_config(config_path, [("seed", str(seeds[0])), *arm_overrides])
    except SweepError as error:
      where = f"arm {arm}: " if name or grid else ""
      raise SweepError(f"{where}{error}") from None
    columns = ((("arm", name),) if name else ()) + grid
    for seed in seeds:
      run_dir = os.path.join(workdir, arm, f"seed{seed}")
      argv = ("--config", config_path, "--workdir", run_dir, f"--config.seed={seed}",
              *(f"--config.{k}={v}" for k, v in arm_overrides))
      runs.append(Run(arm, columns, seed, run_dir, int(config.total_steps), argv,
                      (config.eval.heldout, config.eval.data_dir)))
  return runs


def record_runs(runs: Sequence[Run], workdir: str) -> list[Run]:
  """The runs earlier calls planned in `workdir`, then this call's, saved for the next call.

  Raises SweepError where a run folder was planned before with another command line: its
  results would mix two settings under one arm.
  """
  path = os.path.join(workdir, RUNS_FILE)
  earlier = [Run(r["arm"], tuple(map(tuple, r["columns"])), r["seed"], r["workdir"],
                 r["total_steps"], tuple(r["argv"]), tuple(r["heldout"]))
             for r in _read_json(path) or []]
  before = {run.workdir: run for run in earlier}
  for run in runs:
    old = before.get(run.workdir)
    if old is not None and old.argv != run.argv:
      raise SweepError(f"{run.workdir} was planned by an earlier sweep in {workdir} with other "
                       f"settings ({shlex.join(old.argv)}); give the arm another name or use "
                       "another --workdir.")
  merged = list({run.workdir: run for run in [*earlier, *runs]}.values())
  os.makedirs(workdir, exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump([dataclasses.asdict(run) for run in merged], f, indent=1)
  os.replace(path + ".tmp", path)
  return merged


def prepare_heldout(runs: Sequence[Run]) -> None:
  """Prepares each held-out set once here: runs preparing the same one at once would race."""
  from sqlm_jax.evals import datasets
  for name, data_dir in dict.fromkeys(run.heldout for run in runs):
    if name in datasets.HELDOUT_SETS:
      datasets.load_heldout(name, data_dir or None)


def _read_json(path: str) -> Optional[dict]:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def is_finished(run: Run) -> bool:
  summary = _read_json(os.path.join(run.workdir, "summary.json"))
  return summary is not None and summary.get("steps") == run.total_steps


def execute(run: Run) -> int:
  """Runs one `sqlm_jax.main` process, its output in WORKDIR/ARM/seedS/sweep.log."""
  os.makedirs(run.workdir, exist_ok=True)
  info_path = os.path.join(run.workdir, "sweep_run.json")
  info = _read_json(info_path) or {"wall_seconds": 0.0, "attempts": 0}
  start = time.time()
  with open(os.path.join(run.workdir, "sweep.log"), "a") as log:
    log.write(f"$ {shlex.join(run.command(sys.executable))}\n")
    log.flush()
    returncode = subprocess.run(run.command(sys.executable), stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
  info = {"wall_seconds": info["wall_seconds"] + time.time() - start,
          "attempts": info["attempts"] + 1, "returncode": returncode,
          "command": shlex.join(run.command())}
  with open(info_path, "w") as f:
    json.dump(info, f, indent=2)
  return returncode


def execute_all(runs: Sequence[Run], parallel: int, progress_bar: bool = True) -> list[Run]:
  """Runs the unfinished runs, `parallel` at a time; returns the ones that failed."""
  from tqdm.auto import tqdm
  todo = [run for run in runs if not is_finished(run)]
  failed = []
  with tqdm(total=len(runs), initial=len(runs) - len(todo), desc="sweep runs", unit="run",
            disable=not progress_bar) as bar, \
      concurrent.futures.ThreadPoolExecutor(max(1, parallel)) as pool:
    # Checked again when a run's turn comes: another sweep process on the same folder (another
    # machine's, or one started with other arms) may have finished it in the meantime.
    futures = {pool.submit(lambda run: 0 if is_finished(run) else execute(run), run): run
               for run in todo}
    for future in concurrent.futures.as_completed(futures):
      run = futures[future]
      if future.result() != 0 or not is_finished(run):
        failed.append(run)
        bar.write(f"failed: {run.workdir} (see {os.path.join(run.workdir, 'sweep.log')})")
      bar.update(1)
  return failed


# ---- Results ----------------------------------------------------------------------------------


def run_result(run: Run) -> dict:
  """One CSV row: the grid values, the seed and the run's outcome (blank where unfinished)."""
  row = {**dict(run.columns), "seed": run.seed}
  summary = _read_json(os.path.join(run.workdir, "summary.json")) if is_finished(run) else None
  if summary is not None:
    row["base_accuracy"] = summary["base_accuracy"]
    row["final_accuracy"] = summary["final_accuracy"]
    row["gain"] = summary["final_accuracy"] - summary["base_accuracy"]
    row["pseudo_label_accuracy"] = _tail_mean(run, "pseudo_label_accuracy")
  info = _read_json(os.path.join(run.workdir, "sweep_run.json"))
  if info is not None:
    row["wall_seconds"] = round(info["wall_seconds"], 1)
  return row


def _curves(run: Run) -> dict[str, tuple[list[int], list[float]]]:
  from sqlm_jax.loop.metrics import read_metrics
  try:
    records = read_metrics(run.workdir)
  except FileNotFoundError:
    records = []
  return {key: ([r["step"] for r in records if r.get(key) is not None],
                [r[key] for r in records if r.get(key) is not None]) for key, _ in CURVES}


def _tail_mean(run: Run, key: str, steps: int = TAIL_STEPS) -> Optional[float]:
  """The mean over the last `steps` logged values: one step's 64 questions are a noisy sample."""
  _, values = _curves(run)[key]
  return float(np.mean(values[-steps:])) if values else None


def write_csv(runs: Sequence[Run], path: str) -> list[dict]:
  keys = list(dict.fromkeys(key for run in runs for key, _ in run.columns))
  rows = [run_result(run) for run in runs]
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=[*keys, *RESULT_FIELDS])
    writer.writeheader()
    writer.writerows(rows)
  return rows


def _mean_sd(values: Sequence[Optional[float]], scale: float = 1.0, signed: bool = False,
             fmt: str = ".3f") -> str:
  values = [v * scale for v in values if v is not None]
  if not values:
    return "–"
  sign = "+" if signed else ""
  if len(values) == 1:
    return f"{values[0]:{sign}{fmt}}"
  return f"{np.mean(values):{sign}{fmt}} ± {np.std(values, ddof=1):{fmt}}"


def write_markdown(runs: Sequence[Run], rows: Sequence[dict], path: str) -> None:
  """Per arm: mean ± sample sd over its finished seeds."""
  lines = ["| arm | seeds | base | final | gain (points) | pseudo-label accuracy, last 10 steps "
           "| wall s |",
           "|---|---|---|---|---|---|---|"]
  arms = list(dict.fromkeys(run.arm for run in runs))
  for arm in arms:
    arm_rows = [row for run, row in zip(runs, rows) if run.arm == arm and "gain" in row]
    column = lambda key: [row.get(key) for row in arm_rows]
    lines.append(f"| {arm} | {len(arm_rows)} | {_mean_sd(column('base_accuracy'))} | "
                 f"{_mean_sd(column('final_accuracy'))} | "
                 f"{_mean_sd(column('gain'), 100.0, signed=True, fmt='.1f')} | "
                 f"{_mean_sd(column('pseudo_label_accuracy'))} | "
                 f"{_mean_sd(column('wall_seconds'), fmt='.0f')} |")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def draw_sweep(runs: Sequence[Run], path: str) -> str:
  """Curves per arm over steps: the mean over seeds, a band from the lowest to the highest."""
  import matplotlib
  matplotlib.use("Agg")  # Files only: works on headless machines and in CI.
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(CURVES), figsize=(13, 4.8))
  colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for index, arm in enumerate(dict.fromkeys(run.arm for run in runs)):
    colour = colours[index % len(colours)]
    curves = [_curves(run) for run in runs if run.arm == arm]
    for ax, (key, _) in zip(axes, CURVES):
      by_step: dict[int, list[float]] = {}
      for steps, values in (curve[key] for curve in curves):
        for step, value in zip(steps, values):
          by_step.setdefault(step, []).append(value)
      if not by_step:
        continue
      steps = sorted(by_step)
      ax.plot(steps, [np.mean(by_step[s]) for s in steps], "-", color=colour, label=arm)
      ax.fill_between(steps, [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps],
                      color=colour, alpha=0.2, linewidth=0)
  for ax, (_, title) in zip(axes, CURVES):
    ax.set(title=title, xlabel="step", ylim=(-0.02, 1.02))
    if ax.has_data():
      ax.legend(loc="lower left", fontsize=7)
  fig.suptitle(f"Sweep: {os.path.dirname(path)} (band: lowest to highest seed)",
               fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path


def write_results(runs: Sequence[Run], workdir: str) -> None:
  os.makedirs(workdir, exist_ok=True)
  rows = write_csv(runs, os.path.join(workdir, "results.csv"))
  write_markdown(runs, rows, os.path.join(workdir, "results.md"))
  draw_sweep(runs, os.path.join(workdir, "sweep.png"))


# ---- Command line -----------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      epilog="Any --config.KEY=VALUE after these flags applies to every run.")
  parser.add_argument("--config", required=True, help="a configs/*.py file")
  parser.add_argument("--workdir", required=True, help="the sweep's folder")
  parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                      help="a config key and its values; repeat for more keys")
  parser.add_argument("--arm", action="append", default=[], metavar="NAME:KEY=V,KEY=V",
                      help="a named arm and its overrides ('NAME:' alone: none); repeat for more")
  parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
  parser.add_argument("--parallel", type=int, default=1, help="runs at a time")
  parser.add_argument("--dry_run", action="store_true",
                      help="print one command line per run and run nothing")
  parser.add_argument("--report", action="store_true",
                      help="write results.csv, results.md and sweep.png from the runs so far and "
                      "run nothing (e.g. while the sweep is still running elsewhere)")
  parser.add_argument("--no_progress_bar", action="store_true")
  args, rest = parser.parse_known_args(argv)
  try:
    if args.parallel < 1:
      raise SweepError(f"--parallel {args.parallel} must be at least 1.")
    runs = plan(args.config, [parse_grid(g) for g in args.grid], parse_seeds(args.seeds),
                parse_overrides(rest), args.workdir, [parse_arm(a) for a in args.arm])
  except SweepError as error:
    print(f"Sweep error: {error}", file=sys.stderr)
    return 2
  if args.dry_run:
    for run in runs:
      print(shlex.join(run.command()))
    return 0
  try:
    recorded = record_runs(runs, args.workdir)
  except SweepError as error:
    print(f"Sweep error: {error}", file=sys.stderr)
    return 2
  if args.report:
    finished = sum(is_finished(run) for run in recorded)
    write_results(recorded, args.workdir)
    print(f"results of {finished} finished runs of {len(recorded)}: "
          f"{os.path.join(args.workdir, 'results.csv')}, results.md, sweep.png")
    return 0
  finished = sum(is_finished(run) for run in runs)
  print(f"{len(runs)} runs ({finished} already finished) in {args.workdir}", flush=True)
  prepare_heldout(runs)
  failed = execute_all(runs, args.parallel, progress_bar=not args.no_progress_bar)
  write_results(recorded, args.workdir)
  print(f"results: {os.path.join(args.workdir, 'results.csv')}, results.md, sweep.png")
  if failed:
    print(f"{len(failed)} runs failed: " + ", ".join(run.workdir for run in failed),
          file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
