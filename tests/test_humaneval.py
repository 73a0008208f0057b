"""HumanEval scoring: the pass@k estimator, canonical / wrong / cheating completions in the
sandbox, the wire format between harness and completion, and the command line."""

import json
import math
import pathlib
import subprocess
import sys

import pytest

from sqlm_jax import sandbox
from sqlm_jax.evals import humaneval

REPO = pathlib.Path(__file__).resolve().parents[1]
needs_bwrap = pytest.mark.skipif(sandbox.isolation._bwrap_problem(sandbox.isolation.BWRAP_PATH) is not None,
                                 reason="bubblewrap missing: apt-get install bubblewrap")


@pytest.mark.parametrize("n,c,k", [(10, 0, 1), (10, 3, 1), (10, 3, 5), (20, 19, 2), (5, 5, 5),
                                   (200, 7, 100)])
def test_pass_at_k_matches_the_binomial_formula(n, c, k):
  expected = 1 - math.comb(n - c, k) / math.comb(n, k)
  assert humaneval.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_rejects_k_above_the_sample_count():
  with pytest.raises(ValueError, match="pass@3 needs"):
    humaneval.pass_at_k(2, 1, 3)


def test_load_problems_in_task_order():
  problems = humaneval.load_problems(limit=12)
  assert [p["task_id"] for p in problems] == [f"HumanEval/{i}" for i in range(12)]
  assert len(humaneval.load_problems()) == 164


@needs_bwrap
def test_canonical_solutions_of_all_164_problems_score_one():
  problems = humaneval.load_problems()
  with sandbox.SandboxPool(limits=sandbox.Limits(timeout_s=10)) as pool:
    scores = humaneval.score(problems, [[p["canonical_solution"]] for p in problems], pool)
  assert scores == {"pass@1": 1.0, "num_problems": 164, "num_samples": 164}


@needs_bwrap
def test_canonical_solutions_score_one_and_wrong_ones_zero():
  problems = humaneval.load_problems(limit=10)
  wrong = "    return None\n"
  with sandbox.SandboxPool(limits=sandbox.Limits(timeout_s=3)) as pool:
    canonical = humaneval.score(problems, [[p["canonical_solution"]] for p in problems], pool)
    assert canonical == {"pass@1": 1.0, "num_problems": 10, "num_samples": 10}
    assert humaneval.score(problems, [[wrong]] * 10, pool)["pass@1"] == 0.0
    # Two samples each, one right: pass@1 = 1/2, pass@2 = 1; a missing sample counts as wrong.
    mixed = [[p["canonical_solution"], wrong] for p in problems[:4]]
    mixed[3][1] = None
    scores = humaneval.score(problems[:4], mixed, pool, ks=(1, 2))
    assert (scores["pass@1"], scores["pass@2"]) == (0.5, 1.0)


EARLY_EXITS = {
    "os._exit(0)": "    import os\n    os._exit(0)\n",
    "raise SystemExit": "    raise SystemExit\n",
    "sys.exit(0)": "    import sys\n    sys.exit(0)\n",
    "self-SIGKILL": "    import os, signal\n    os.kill(os.getpid(), signal.SIGKILL)\n",
}

# Completions that try to pass without solving. Before the harness ran out of process, the first
# two scored pass@1 = 1.0 on all 164 problems and the always-equal object 0.957.
CHEATS = {
    # Calls every function of the harness it can see (the one that prints the nonce among them).
    "harness functions": (
        "    import os\n"
        "    for name, f in list(globals().items()):\n"
        "        if name.startswith('_sqlm') and callable(f):\n"
        "            try:\n"
        "                f()\n"
        "            except Exception:\n"
        "                pass\n"
        "    os._exit(0)\n"),
    "harness functions, top level": (
        "    return None\n\n"
        "import os\n"
        "for _name, _f in list(globals().items()):\n"
        "    if _name.startswith('_sqlm') and callable(_f):\n"
        "        try:\n"
        "            _f()\n"
        "        except Exception:\n"
        "            pass\n"
        "os._exit(0)\n"),
    # Finds the nonce (32 hex digits and a newline, as read from stdin) in its process's memory
    # or any readable /proc file, and writes it to every descriptor it has (before the harness
    # ran apart, this passed wherever prctl(PR_SET_DUMPABLE) was allowed).
    "memory scan": (
        "    import ctypes, os, re\n"
        "    ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE: opens /proc/self/mem\n"
        "    found = set()\n"
        "    for line in open('/proc/self/maps'):\n"
        "        a, b = (int(x, 16) for x in line.split()[0].split('-'))\n"
        "        if line.split()[1][0] != 'r' or b - a > (64 << 20):\n"
        "            continue\n"
        "        try:\n"
        "            with open('/proc/self/mem', 'rb') as m:\n"
        "                m.seek(a)\n"
        "                found.update(re.findall(rb'(?<![0-9a-f])[0-9a-f]{32}\\n', m.read(b - a)))\n"
        "        except (OSError, ValueError):\n"
        "            pass\n"
        "    for pid in filter(str.isdigit, os.listdir('/proc')):\n"
        "        for name in ('cmdline', 'environ', 'fd/0'):\n"
        "            try:\n"
        "                found.update(re.findall(rb'[0-9a-f]{32}\\n',\n"
        "                                        open(f'/proc/{pid}/{name}', 'rb').read()))\n"
        "            except OSError:\n"
        "                pass\n"
        "    for fd in range(64):\n"
        "        try:\n"
        "            os.write(fd, b''.join(sorted(found)[:1]))\n"
        "        except OSError:\n"
        "            pass\n"
        "    os._exit(0)\n"),
    # __eq__ always true, arithmetic returning itself, abs() returning 0.
    "always-equal object": (
        "    class AlwaysEqual:\n"
        "        __eq__ = __le__ = __ge__ = __lt__ = __gt__ = lambda self, other: True\n"
        "        __ne__ = lambda self, other: False\n"
        "        __hash__ = lambda self: 0\n"
        "        __abs__ = __len__ = lambda self: 0\n"
        "        __iter__ = lambda self: iter(())\n"
        "        __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = (\n"
        "            __neg__) = __round__ = __getitem__ = lambda self, *args: self\n"
        "    return AlwaysEqual()\n"),
    "int subclass": (
        "    class Liar(int):\n"
        "        __eq__ = lambda self, other: True\n"
        "        __ne__ = lambda self, other: False\n"
        "        __hash__ = int.__hash__\n"
        "    return Liar(0)\n"),
    # Kills every process it may (the harness among them, were it of the same uid).
    "kill the harness": (
        "    import os, signal\n"
        "    for pid in filter(str.isdigit, os.listdir('/proc')):\n"
        "        try:\n"
        "            os.kill(int(pid), signal.SIGKILL)\n"
        "        except OSError:\n"
        "            pass\n"
        "    return None\n"),
    **EARLY_EXITS,
}


@needs_bwrap
def test_completions_that_do_not_solve_score_zero_however_they_cheat():
  problems = humaneval.load_problems(limit=12)
  with sandbox.SandboxPool(limits=sandbox.Limits(timeout_s=5)) as pool:
    scores = {name: humaneval.score(problems, [[body]] * len(problems), pool)["pass@1"]
              for name, body in CHEATS.items()}
  assert scores == {name: 0.0 for name in CHEATS}


@needs_bwrap
def test_harness_and_nonce_are_out_of_the_completions_reach():
  problem = humaneval.load_problems(limit=1)[0]
  harness, stdin, nonce, peer = humaneval.job(problem, problem["canonical_solution"])
  assert nonce not in harness + peer and stdin == nonce + "\n"
  assert problem["test"] in harness and problem["test"] not in peer
  assert problem["canonical_solution"] in peer and problem["canonical_solution"] not in harness
  assert humaneval.job(problem, "")[2] != nonce
  # Judged on exit status alone (no nonce required), the early exits still fail: the harness's
  # check() sees the completion's process gone.
  with sandbox.SandboxPool(workers=2, limits=sandbox.Limits(timeout_s=3)) as pool:
    jobs = [humaneval.job(problem, body) for body in EARLY_EXITS.values()]
    assert not any(r.passed for r in pool.run(jobs))
    by_status = pool.run([(h, s, None, p) for h, s, _, p in jobs])
    assert not any(r.passed for r in by_status)
    assert all("CandidateFailed" in r.stderr for r in by_status)


@pytest.mark.parametrize("value", [
    None, True, False, 0, -7, 3 ** 200, 1.5, -0.0, float("inf"), float("-inf"), "", "héllo\n:;",
    "\ud800", b"\x00\xff", [], (), (1,), [1, (2, [3.5, "x"])], {1, 2}, {"a": [1], (1, 2): None},
    {(): (1,)}, [[[[[]]]]]])
def test_the_wire_format_round_trips_plain_builtins_exactly(value):
  encoded = humaneval.CODEC["_sqlm_encode"](value)
  decoded = humaneval.CODEC["_sqlm_decode"](encoded)
  assert repr(decoded) == repr(value) and type(decoded) is type(value)


def test_the_wire_format_refuses_what_is_not_plain_builtins():
  encode, decode = humaneval.CODEC["_sqlm_encode"], humaneval.CODEC["_sqlm_decode"]
  assert math.isnan(decode(encode(float("nan"))))

  class Liar(int):
    pass

  for value in (Liar(1), [Liar(1)], object(), frozenset(), 1j, {1: print}, bytearray(b"x")):
    with pytest.raises(TypeError, match="not a plain builtin"):
      encode(value)
  deep = []
  for _ in range(100):
    deep = [deep]
  with pytest.raises(TypeError, match="nested"):
    encode(deep)
  for text in ("", "X", "i;", "i1 2;", "i__1;", "f1.0", "s5:abc", "l2:N", "S1:l0:", "d1:l0:N",
               "NN", "s99999999999999:", "b2:zz", "l" + "1:l" * 100 + "0:", "f1e5x;", "i0x1;"):
    with pytest.raises((ValueError, TypeError)):
      decode(text)


def test_read_completions_rejects_unknown_tasks_and_missing_keys(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text(json.dumps({"task_id": "HumanEval/999", "completion": ""}) + "\n")
  with pytest.raises(ValueError, match="unknown task_id"):
    humaneval.read_completions(str(path))
  path.write_text(json.dumps({"task_id": "HumanEval/0"}) + "\n")
  with pytest.raises(ValueError, match="needs 'task_id' and 'completion'"):
    humaneval.read_completions(str(path))


@needs_bwrap
def test_cli_scores_canonical_solutions_one_and_early_exits_zero(tmp_path):
  problems = humaneval.load_problems(limit=4)
  rows = [{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in problems]
  rows += [{"task_id": p["task_id"], "completion": "    return None\n"} for p in problems]
  (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  cheats = [{"task_id": p["task_id"], "completion": body}
            for p, body in zip(problems, EARLY_EXITS.values())]
  (tmp_path / "cheats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in cheats))

  def cli(name, *flags):
    out = subprocess.run([sys.executable, "-m", "sqlm_jax.evals.humaneval", "--completions",
                          str(tmp_path / name), "--workers", "2", *flags],
                         capture_output=True, text=True, cwd=REPO, check=True).stdout
    return json.loads(out)

  # Two samples per task, one right: pass@1 = 1/2, pass@2 = 1; pass@10 needs 10 samples a task.
  assert cli("mixed.jsonl", "--k", "1,2,10") == {"pass@1": 0.5, "pass@2": 1.0, "num_problems": 4,
                                                "num_samples": 8}
  assert cli("cheats.jsonl") == {"pass@1": 0.0, "num_problems": 4, "num_samples": 4}
