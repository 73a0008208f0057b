"""What hostile programs get out of the sandbox: socket buffers, CPU, HumanEval without solving.

  python benchmarks/sandbox_attacks.py [--problems 164]

(a) loopback TCP and UDP floods through `python -m sqlm_jax.sandbox` (the programs of
tests/test_sandbox.py): what the kernel queued for the run, and how far the host's MemAvailable
fell while it ran; (b) an honest CPU-bound run's wall time alone and beside a run that forks
spinners (as root, in a cpu cgroup that outweighs the machine's other processes, so that the two
runs are what is compared); (c) pass@1 through `python -m sqlm_jax.evals.humaneval` of completions that
do not solve: the cheats of tests/test_humaneval.py, `return None` and the canonical solutions.
Run it against another checkout's sandbox with PYTHONPATH=<checkout> (the programs stay these).
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import uuid

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import test_humaneval  # noqa: E402  (the attack programs)
import test_sandbox  # noqa: E402


def cli(module, *args, stdin=None):
  return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                        input=stdin, check=True, env=os.environ).stdout


def socket_flood(protocol):
  with tempfile.TemporaryDirectory() as tmp:
    program, stdin = pathlib.Path(tmp) / "flood.py", pathlib.Path(tmp) / "stdin.txt"
    program.write_text(test_sandbox.SOCKET_FLOOD)
    stdin.write_text(protocol + "\n")
    before = test_sandbox.available_memory()
    lowest, stop = [before], threading.Event()
    sampler = threading.Thread(target=lambda: [lowest.append(test_sandbox.available_memory())
                                               for _ in iter(lambda: stop.wait(0.05), True)])
    sampler.start()
    try:
      result = json.loads(cli("sqlm_jax.sandbox", str(program), "--stdin", str(stdin),
                              "--timeout", "10"))
    finally:
      stop.set()
      sampler.join()
  held = result["stdout"].split("held_mib")[-1].strip() or "-"
  print(f"{protocol} flood: {result['status']}, {held} MiB queued, host MemAvailable fell "
        f"{(before - min(lowest)) / 2 ** 30:.2f} GiB ({result['stderr'].strip()[-80:]})")


def cpu_share():
  if os.path.exists("/sys/fs/cgroup/cpu/cpu.shares"):
    root = ("/sys/fs/cgroup/cpu", "cpu.shares", "262144")  # v1
  elif "cpu" in open("/sys/fs/cgroup/cgroup.controllers").read().split():
    root = ("/sys/fs/cgroup", "cpu.weight", "10000")  # v2
  else:
    root = None
  if os.geteuid() != 0 or root is None:
    print("CPU: needs root and a cpu cgroup controller")
    return
  group = os.path.join(root[0], f"sqlm-bench-cpu-{uuid.uuid4().hex[:8]}")
  os.mkdir(group)
  try:
    with open(os.path.join(group, root[1]), "w") as f:
      f.write(root[2])
    out = subprocess.run(["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh",
                          sys.executable, "-c", test_sandbox.CPU_SHARE_PROBE],
                         capture_output=True, text=True, check=True).stdout
  finally:
    os.rmdir(group)
  alone, beside = json.loads(out)
  print(f"CPU: honest run alone {alone:.2f} s, beside a fork-spinner {beside:.2f} s "
        f"({beside / alone:.2f}x)")


def humaneval_cheats(problems):
  from sqlm_jax.evals import humaneval
  tasks = humaneval.load_problems(limit=problems)
  bodies = {"canonical solution": None, "return None": "    return None\n",
            **test_humaneval.CHEATS}
  with tempfile.TemporaryDirectory() as tmp:
    for name, body in bodies.items():
      path = pathlib.Path(tmp) / "samples.jsonl"
      path.write_text("".join(json.dumps({"task_id": p["task_id"], "completion": body if body
                                          is not None else p["canonical_solution"]}) + "\n"
                              for p in tasks))
      score = json.loads(cli("sqlm_jax.evals.humaneval", "--completions", str(path), "--k", "1"))
      print(f"HumanEval {name:30s} pass@1 = {score['pass@1']:.3f} ({len(tasks)} problems)")


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--problems", type=int, default=164)
  args = parser.parse_args()
  from sqlm_jax import sandbox
  print(f"sandbox: {sandbox.__file__}; load average {os.getloadavg()[0]:.1f}")
  for protocol in ("tcp", "udp"):
    socket_flood(protocol)
  cpu_share()
  humaneval_cheats(args.problems)


if __name__ == "__main__":
  main()
