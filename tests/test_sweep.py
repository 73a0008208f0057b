"""Sweeps: grid x seeds planned and checked up front, run as processes, rerun skips, results written."""

import csv
import json
import os
import shlex

import pytest

from sqlm_jax import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
# A few seconds per run: two steps of 8 questions x 2 answers, 20 held-out problems.
FAST = ["--config.total_steps=2", "--config.eval.every=0", "--config.eval.num_examples=20",
        "--config.eval.num_samples=2", "--config.rollout.prompts_per_step=4",
        "--config.rollout.proposals_per_prompt=2", "--config.rollout.answers_per_question=3",
        "--config.log.progress_bar=False", "--config.log.tensorboard=False"]


def test_dry_run_prints_one_main_command_per_run_and_runs_nothing(tmp_path, capsys):
  workdir = tmp_path / "sweep"
  code = sweep.main(["--config", TINY, "--workdir", str(workdir), "--grid",
                     "proposer_update_every=1,1000000", "--grid", "rewards.proposer_shape=sqlm,rzero",
                     "--seeds", "0,1,2", "--dry_run", "--config.total_steps=7"])
  assert code == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 2 * 2 * 3
  first = shlex.split(lines[0])
  assert first[:3] == ["python", "-m", "sqlm_jax.main"]
  arm = "proposer_update_every=1,rewards.proposer_shape=sqlm"
  assert first[first.index("--workdir") + 1] == str(workdir / arm / "seed0")
  assert {"--config.seed=0", "--config.proposer_update_every=1",
          "--config.rewards.proposer_shape=sqlm", "--config.total_steps=7"} <= set(first)
  last = shlex.split(lines[-1])
  assert last[last.index("--workdir") + 1] == str(
      workdir / "proposer_update_every=1000000,rewards.proposer_shape=rzero" / "seed2")
  assert all("--config.total_steps=7" in line for line in lines)
  assert not workdir.exists()


def test_named_arms_change_one_thing_each_and_combine_with_a_grid(tmp_path, capsys):
  workdir = tmp_path / "ablations"
  code = sweep.main(["--config", TINY, "--workdir", str(workdir), "--seeds", "0,1", "--dry_run",
                     "--arm", "full:", "--arm", "frozen:proposer_update_every=1000000",
                     "--arm", "guard: rewards.proposer_min_margin=3, rewards.solver_min_margin=3",
                     "--grid", "rl.learning_rate=1e-4,3e-5", "--config.total_steps=7"])
  assert code == 0
  commands = [shlex.split(line) for line in capsys.readouterr().out.strip().splitlines()]
  assert len(commands) == 3 * 2 * 2
  folders = [c[c.index("--workdir") + 1] for c in commands]
  assert folders[:2] == [str(workdir / "full,rl.learning_rate=1e-4" / f"seed{s}") for s in (0, 1)]
  full, guard = set(commands[0]), set(commands[-1])
  assert not any("min_margin" in a or "proposer_update_every" in a for a in full)
  assert {"--config.rewards.proposer_min_margin=3", "--config.rewards.solver_min_margin=3",
          "--config.rl.learning_rate=3e-5", "--config.seed=1", "--config.total_steps=7"} <= guard
  assert folders[-1] == str(workdir / "guard,rl.learning_rate=3e-5" / "seed1")
  runs = sweep.plan(TINY, [], [0], [], str(workdir),
                    [sweep.parse_arm("frozen:proposer_update_every=9")])
  assert runs[0].arm == "frozen" and runs[0].columns == (("arm", "frozen"),)
  rows = sweep.write_csv(runs, str(tmp_path / "results.csv"))
  assert rows == [{"arm": "frozen", "seed": 0}]
  assert (tmp_path / "results.csv").read_text().startswith("arm,seed,base_accuracy,")


@pytest.mark.parametrize("args, named", [
    (["--arm", "frozen"], "--arm 'frozen' is not NAME:KEY=VALUE"),
    (["--arm", "a/b:rl.kl_coef=0"], "--arm 'a/b:rl.kl_coef=0' is not NAME"),
    (["--arm", "x:rl.kl_coef"], "--arm 'x:rl.kl_coef' is not NAME"),
    (["--arm", "x:rl.kl_coef=0,rl.kl_coef=1"], "sets a key twice"),
    (["--arm", "x:", "--arm", "x:rl.kl_coef=0"], "an --arm name is given twice"),
    (["--arm", "x:rl.kl_coef=0", "--grid", "rl.kl_coef=0,1"], "both a --grid key and an --arm"),
    (["--arm", "x:rl.kl_coef=0", "--config.rl.kl_coef=1"], "both a --grid or --arm key"),
    (["--arm", "x:seed=3"], "--seeds"),
    (["--arm", "odd:rewards.proposer_shape=cubic"], "arm odd: config.rewards.proposer_shape='cubic'"),
])
def test_bad_arms_are_refused_by_name_before_anything_runs(tmp_path, capsys, args, named):
  workdir = tmp_path / "sweep"
  assert sweep.main(["--config", TINY, "--workdir", str(workdir), *args]) == 2
  assert named in capsys.readouterr().err
  assert not workdir.exists()


@pytest.mark.parametrize("args, named", [
    (["--grid", "rewards.proposer_shape=sqlm,cubic"], "config.rewards.proposer_shape='cubic'"),
    (["--grid", "rewards.proposer_shap=sqlm,rzero"], "config.rewards.proposer_shap is not a config key"),
    (["--grid", "total_steps=2,many"], "--config.total_steps=many"),
    (["--grid", "rollout.temperature=0.7,0"], "config.rollout.temperature=0.0 must be > 0"),
    (["--config.rl.learnin_rate=3"], "config.rl.learnin_rate is not a config key"),
    (["--grid", "seed=1,2"], "--seeds"),
    (["--grid", "rl.kl_coef"], "--grid 'rl.kl_coef' is not KEY=VALUE"),
    (["--grid", "rl.kl_coef=0", "--config.rl.kl_coef=0.1"],
     "both a --grid or --arm key and a --config"),
    (["--seeds", "0,x"], "--seeds '0,x'"),
])
def test_bad_grid_keys_and_values_are_refused_by_name_before_anything_runs(tmp_path, capsys,
                                                                           args, named):
  workdir = tmp_path / "sweep"
  assert sweep.main(["--config", TINY, "--workdir", str(workdir), *args]) == 2
  assert named in capsys.readouterr().err
  assert not workdir.exists()


def test_arm_names_are_readable_and_filesystem_safe():
  assert sweep.arm_name([("a.b", "1"), ("c", "sqlm")]) == "a.b=1,c=sqlm"
  assert sweep.arm_name([]) == "default"
  odd = sweep.arm_name([("model.path", "/x/y z")])
  assert "/" not in odd and " " not in odd and odd.startswith("model.path=_x_y_z-")
  assert odd != sweep.arm_name([("model.path", "/x/y_z")])  # still distinct after replacement


def test_rerun_starts_only_unfinished_runs(tmp_path, monkeypatch):
  runs = sweep.plan(TINY, [("rewards.proposer_shape", ["sqlm", "rzero"])], [0, 1], [],
                    str(tmp_path))
  finished = runs[1]
  os.makedirs(finished.workdir)
  with open(os.path.join(finished.workdir, "summary.json"), "w") as f:
    json.dump({"steps": finished.total_steps, "base_accuracy": 0.5, "final_accuracy": 0.6}, f)
  interrupted = runs[2]  # an earlier, shorter summary is not a finished run
  os.makedirs(interrupted.workdir)
  with open(os.path.join(interrupted.workdir, "summary.json"), "w") as f:
    json.dump({"steps": 3}, f)
  started = []
  monkeypatch.setattr(sweep, "execute", lambda run: started.append(run) or 0)
  failed = sweep.execute_all(runs, parallel=2, progress_bar=False)
  assert sorted(r.workdir for r in started) == sorted(
      r.workdir for r in runs if r is not finished)
  assert {r.workdir for r in failed} == {r.workdir for r in started}  # they wrote no summary


def test_a_run_finished_elsewhere_meanwhile_is_not_started_again(tmp_path, monkeypatch):
  first, second = sweep.plan(TINY, [], [0, 1], [], str(tmp_path))

  def finish(run, also=()):
    for done in (run, *also):
      os.makedirs(done.workdir, exist_ok=True)
      with open(os.path.join(done.workdir, "summary.json"), "w") as f:
        json.dump({"steps": done.total_steps}, f)
    started.append(run)
    return 0

  started = []  # the first run's turn also sees another process finish the second
  monkeypatch.setattr(sweep, "execute", lambda run: finish(run, also=[second]))
  assert sweep.execute_all([first, second], parallel=1, progress_bar=False) == []
  assert started == [first]


def test_report_writes_the_results_so_far_and_runs_nothing(tmp_path, monkeypatch, capsys):
  workdir = tmp_path / "sweep"
  argv = ["--config", TINY, "--workdir", str(workdir), "--arm", "full:", "--arm",
          "frozen:proposer_update_every=1000000", "--seeds", "0,1"]
  finished = sweep.plan(TINY, [], [0, 1], [], str(workdir),
                        [("full", []), ("frozen", [("proposer_update_every", "1000000")])])[2]
  os.makedirs(finished.workdir)
  with open(os.path.join(finished.workdir, "summary.json"), "w") as f:
    json.dump({"steps": finished.total_steps, "base_accuracy": 0.5, "final_accuracy": 0.75}, f)
  monkeypatch.setattr(sweep, "execute", lambda run: pytest.fail(f"started {run.workdir}"))
  assert sweep.main([*argv, "--report"]) == 0
  assert "results of 1 finished runs of 4" in capsys.readouterr().out
  with open(workdir / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert [(r["arm"], r["seed"], r["gain"]) for r in rows] == [
      ("full", "0", ""), ("full", "1", ""), ("frozen", "0", "0.25"), ("frozen", "1", "")]
  assert "| frozen | 1 | 0.500 | 0.750 | +25.0 |" in (workdir / "results.md").read_text()


def _finish(run, final):
  os.makedirs(run.workdir, exist_ok=True)
  with open(os.path.join(run.workdir, "summary.json"), "w") as f:
    json.dump({"steps": run.total_steps, "base_accuracy": 0.5, "final_accuracy": final}, f)


def test_a_sweep_extended_an_arm_at_a_time_reports_every_arm(tmp_path, monkeypatch, capsys):
  """A later call with other arms adds rows; it does not drop the earlier arms' results."""
  workdir = str(tmp_path / "sweep")
  monkeypatch.setattr(sweep, "execute", lambda run: _finish(run, 0.75) or 0)
  common = ["--config", TINY, "--workdir", workdir, "--seeds", "0", "--no_progress_bar"]
  assert sweep.main([*common, "--arm", "full:"]) == 0
  monkeypatch.setattr(sweep, "execute", lambda run: _finish(run, 0.625) or 0)
  assert sweep.main([*common, "--arm", "frozen:proposer_update_every=1000000",
                     "--grid", "rl.learning_rate=1e-4"]) == 0
  with open(os.path.join(workdir, "results.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [(r["arm"], r["rl.learning_rate"], r["gain"]) for r in rows] == [
      ("full", "", "0.25"), ("frozen", "1e-4", "0.125")]
  table = open(os.path.join(workdir, "results.md")).read()
  assert "| full | 1 |" in table and "| frozen,rl.learning_rate=1e-4 | 1 |" in table
  # The same arm name with other settings would mix two settings in one row: refused by name.
  capsys.readouterr()
  assert sweep.main([*common, "--arm", "full:rl.learning_rate=3e-5"]) == 2
  error = capsys.readouterr().err
  assert os.path.join(workdir, "full", "seed0") in error and "other settings" in error
  assert sweep.main([*common, "--arm", "full:", "--report"]) == 0  # The same settings: fine.


def test_results_table_is_mean_and_sd_over_seeds(tmp_path):
  runs = sweep.plan(TINY, [("rl.learning_rate", ["1e-4", "3e-5"])], [0, 1, 2], [], str(tmp_path))
  rows = [{"seed": r.seed, "base_accuracy": 0.7, "final_accuracy": f, "gain": f - 0.7,
           "pseudo_label_accuracy": 0.9, "wall_seconds": 10.0}
          for r, f in zip(runs, [0.8, 0.9, 1.0, 0.7, 0.7, 0.7])]
  rows[5] = {"seed": 2}  # an unfinished run counts in neither mean
  sweep.write_markdown(runs, rows, str(tmp_path / "results.md"))
  table = (tmp_path / "results.md").read_text().splitlines()
  assert table[2] == ("| rl.learning_rate=1e-4 | 3 | 0.700 ± 0.000 | 0.900 ± 0.100 | "
                      "+20.0 ± 10.0 | 0.900 ± 0.000 | 10 ± 0 |")
  assert table[3].startswith("| rl.learning_rate=3e-5 | 2 | 0.700 ± 0.000 | 0.700 ± 0.000 | "
                             "+0.0 ± 0.0 |")


def test_pseudo_label_accuracy_is_the_mean_of_the_last_ten_steps(tmp_path):
  run, = sweep.plan(TINY, [], [0], [], str(tmp_path))
  os.makedirs(run.workdir)
  with open(os.path.join(run.workdir, "summary.json"), "w") as f:
    json.dump({"steps": run.total_steps, "base_accuracy": 0.5, "final_accuracy": 0.6}, f)
  values = [1.0, 1.0] + [0.5] * 9 + [0.7]  # steps 1..12; the last 10 average 0.52
  with open(os.path.join(run.workdir, "metrics.jsonl"), "w") as f:
    for step, value in enumerate(values, 1):
      f.write(json.dumps({"step": step, "pseudo_label_accuracy": value}) + "\n")
    f.write(json.dumps({"step": 13, "pseudo_label_accuracy": None}) + "\n")  # nothing checkable
  row = sweep.run_result(run)
  assert row["pseudo_label_accuracy"] == pytest.approx(0.52)
  assert row["gain"] == pytest.approx(0.1)


@pytest.mark.slow  # Two whole runs side by side: CI's slow step.
def test_tiny_sweep_writes_results_and_a_rerun_skips_finished_runs(tmp_path, capsys):
  workdir = tmp_path / "sweep"
  argv = ["--config", TINY, "--workdir", str(workdir), "--grid", "rewards.proposer_shape=sqlm,rzero",
          "--parallel", "2", "--no_progress_bar", *FAST]
  assert sweep.main(argv) == 0, capsys.readouterr().err
  arms = ["rewards.proposer_shape=sqlm", "rewards.proposer_shape=rzero"]
  summaries = {arm: workdir / arm / "seed0" / "summary.json" for arm in arms}
  assert all(path.is_file() for path in summaries.values())

  with open(workdir / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == ["rewards.proposer_shape", "seed", "base_accuracy", "final_accuracy",
                           "gain", "pseudo_label_accuracy", "wall_seconds"]
  assert [(r["rewards.proposer_shape"], r["seed"]) for r in rows] == [("sqlm", "0"),
                                                                      ("rzero", "0")]
  for row in rows:
    summary = json.loads(summaries["rewards.proposer_shape=" + row["rewards.proposer_shape"]]
                         .read_text())
    assert float(row["base_accuracy"]) == pytest.approx(summary["base_accuracy"])
    assert float(row["gain"]) == pytest.approx(summary["final_accuracy"]
                                               - summary["base_accuracy"])
    assert 0.0 <= float(row["pseudo_label_accuracy"]) <= 1.0
    assert float(row["wall_seconds"]) > 0
  table = (workdir / "results.md").read_text().splitlines()
  assert len(table) == 2 + len(arms) and table[2].startswith("| rewards.proposer_shape=sqlm | 1 |")
  assert (workdir / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

  mtimes = {arm: path.stat().st_mtime_ns for arm, path in summaries.items()}
  assert sweep.main(argv) == 0
  assert "2 runs (2 already finished)" in capsys.readouterr().out
  assert {arm: path.stat().st_mtime_ns for arm, path in summaries.items()} == mtimes
  for arm in arms:
    info = json.loads((workdir / arm / "seed0" / "sweep_run.json").read_text())
    assert info["attempts"] == 1 and info["returncode"] == 0


@pytest.mark.slow  # Five whole runs one after another: minutes on 2 cores.
def test_the_arithmetic_controls_run_on_their_config(tmp_path, capsys):
  """The named controls of docs/results.md, on configs/tiny_arithmetic.py, each one short run."""
  workdir = tmp_path / "arith"
  arms = ["full:", "frozen_proposer:proposer_update_every=1000000",
          "fixed_questions:task.question_source=fixed",
          "random_solver_reward:rewards.solver_reward=random",
          "paraphrase_guard:rewards.paraphrase_guard=both"]
  argv = ["--config", os.path.join(ROOT, "configs", "tiny_arithmetic.py"), "--workdir",
          str(workdir), "--no_progress_bar", *(a for arm in arms for a in ("--arm", arm)), *FAST]
  assert sweep.main(argv) == 0, capsys.readouterr().err
  with open(workdir / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["arm"] for r in rows] == [arm.split(":")[0] for arm in arms]
  for arm in arms:
    summary = json.loads((workdir / arm.split(":")[0] / "seed0" / "summary.json").read_text())
    assert summary["heldout_set"] == "arithmetic4" and summary["heldout_size"] == 20
