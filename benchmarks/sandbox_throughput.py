"""Programs per second through SandboxPool, against plain unsandboxed subprocesses.

  python benchmarks/sandbox_throughput.py [--programs 200] [--workers N] [--humaneval 0]

(a) a trivial program run once; (b) a typical solution (sum a line of integers) run against 5
tests, as the coding topic does; (c) with --humaneval P, HumanEval samples: the canonical
solutions of the first P problems through sqlm_jax.evals.humaneval.score (no plain baseline).
The plain baseline starts the same interpreter with the same
flags and the same number of threads, without bubblewrap, rlimits or the uid drop, so the ratio
is the sandbox's own cost. As root with a cpuacct (cgroup v1) or cpu (v2) controller, it also
reports the CPU time each run costs, summed over every process it starts (bubblewrap, the
sandbox's init, supervisor and program): unlike programs/s, that figure does not fall when other
jobs load the machine.
"""

import argparse
import concurrent.futures
import os
import platform
import subprocess
import time

from sqlm_jax import sandbox

TRIVIAL = "print('ok')\n"
SOLUTION = "import sys\nprint(sum(map(int, sys.stdin.readline().split())))\n"
TESTS = [(" ".join(str(i * j) for j in range(1, 6)) + "\n", str(15 * i)) for i in range(5)]


def plain_run(job):
  program, stdin, expected = job
  out = subprocess.run([sandbox.PYTHON, "-I", "-S", "-c", program], input=stdin.encode(),
                       capture_output=True, timeout=10).stdout.decode()
  return expected is None or sandbox.outputs_match(out, expected)


class CpuMeter:
  """CPU time of this process and everything it starts, from a cgroup it moves itself into."""

  def __init__(self):
    self.file, self.scale, self.home = None, 0.0, None
    for own in open("/proc/self/cgroup"):
      _, controllers, path = own.rstrip("\n").split(":", 2)
      for root, file, scale, wanted in (
          ("/sys/fs/cgroup/cpuacct", "cpuacct.usage", 1e-9, "cpuacct"),  # v1, nanoseconds
          ("/sys/fs/cgroup", "cpu.stat", 1e-6, "")):  # v2, usage_usec
        if (wanted in controllers.split(",") if wanted else controllers == "") and \
            os.path.exists(os.path.join(root + path, file)):
          group = os.path.join(root + path, f"sandbox-benchmark-{os.getpid()}")
          try:
            os.mkdir(group)
            with open(os.path.join(group, "cgroup.procs"), "w") as f:
              f.write(str(os.getpid()))
          except OSError:
            continue
          self.file, self.scale, self.home = os.path.join(group, file), scale, root + path
          return

  def seconds(self):
    if self.file is None:
      return float("nan")
    text = open(self.file).read()
    return self.scale * int(text.split("usage_usec")[1].split()[0] if "usage_usec" in text
                            else text)

  def close(self):
    if self.file is not None:
      with open(os.path.join(self.home, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
      for _ in range(50):
        try:
          os.rmdir(os.path.dirname(self.file))
          break
        except OSError:
          time.sleep(0.1)


def timed(fn, jobs, meter):
  start, cpu = time.perf_counter(), meter.seconds()
  ok = fn(jobs)
  return time.perf_counter() - start, meter.seconds() - cpu, ok


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--programs", type=int, default=200)
  parser.add_argument("--workers", type=int, default=None, help="default: os.cpu_count()")
  parser.add_argument("--humaneval", type=int, default=0,
                      help="also score the canonical solutions of this many HumanEval problems")
  args = parser.parse_args()
  workers = args.workers or os.cpu_count()
  cases = {
      "trivial program, 1 run each": [(TRIVIAL, "", "ok")] * args.programs,
      "sum-of-integers solution, 5 tests each": [(SOLUTION, i, o) for _ in range(args.programs)
                                                 for i, o in TESTS],
  }
  print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; workers={workers}; "
        f"programs={args.programs}; bwrap={sandbox.isolation.BWRAP_PATH}; "
        f"load average {os.getloadavg()[0]:.1f}; sandbox memory: {sandbox.cgroup_mode()}")
  meter = CpuMeter()
  with sandbox.SandboxPool(workers) as pool, \
      concurrent.futures.ThreadPoolExecutor(workers) as plain_pool:
    pool.run(cases["trivial program, 1 run each"][:workers * 2])  # warm-up
    for name, jobs in cases.items():
      runs_per_program = len(jobs) // args.programs
      t_box, cpu_box, ok_box = timed(lambda j: all(r.passed for r in pool.run(j)), jobs, meter)
      t_plain, cpu_plain, ok_plain = timed(lambda j: all(plain_pool.map(plain_run, j)), jobs,
                                           meter)
      assert ok_box and ok_plain, f"{name}: some run did not pass"
      print(f"{name}:")
      print(f"  sandboxed: {args.programs / t_box:7.1f} programs/s "
            f"({len(jobs) / t_box:6.1f} runs/s, {1000 * t_box / len(jobs) * workers:5.1f} ms/run "
            f"per worker)")
      print(f"  plain:     {args.programs / t_plain:7.1f} programs/s "
            f"({len(jobs) / t_plain:6.1f} runs/s)")
      print(f"  overhead:  sandboxed takes {t_box / t_plain:.2f}x the plain time "
            f"({runs_per_program} run(s) per program)")
      print(f"  CPU time:  {1000 * cpu_box / len(jobs):5.1f} ms/run sandboxed, "
            f"{1000 * cpu_plain / len(jobs):5.1f} ms/run plain")
    if args.humaneval:
      from sqlm_jax.evals import humaneval
      problems = humaneval.load_problems(limit=args.humaneval)
      samples = [[p["canonical_solution"]] for p in problems]
      t_box, cpu_box, score = timed(lambda s: humaneval.score(problems, s, pool), samples, meter)
      assert score["pass@1"] == 1.0, score
      print(f"HumanEval canonical solutions, {len(problems)} problems:")
      print(f"  sandboxed: {len(problems) / t_box:7.1f} samples/s "
            f"({1000 * t_box / len(problems) * workers:5.1f} ms/sample per worker)")
      print(f"  CPU time:  {1000 * cpu_box / len(problems):5.1f} ms/sample")
  meter.close()


if __name__ == "__main__":
  main()
