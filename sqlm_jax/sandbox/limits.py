"""What a run may use and what it reports: Limits, RunResult and the output comparison."""

from __future__ import annotations

import dataclasses
from typing import Optional

STATUSES = ("passed", "failed", "timeout", "crashed", "output_limit")

_KEEP_CHARS = 4096  # stdout/stderr kept in a result (the comparison sees everything read)


@dataclasses.dataclass(frozen=True)
class Limits:
  """Per-run resource limits. `cpu_s=None` means ceil(timeout_s)."""

  timeout_s: float = 5.0
  cpu_s: Optional[int] = None
  memory_bytes: int = 512 << 20  # RLIMIT_AS of each process
  # Everything one run holds (processes, /tmp, shared memory, memfds, kernel memory), enforced by
  # its memory cgroup where cgroups are available (cgroup_mode()).
  run_memory_bytes: int = 512 << 20
  # RLIMIT_NPROC, counting threads and the sandbox's init (and the cgroup's pids.max).
  max_processes: int = 8
  # CPUs' worth of time one run may use however many processes it forks (its cgroup's CPU
  # quota), so that one run cannot slow the runs beside it.
  cpus: float = 1.0
  file_size_bytes: int = 16 << 20  # RLIMIT_FSIZE; the private /tmp holds twice this
  output_bytes: int = 1 << 20  # stdout + stderr read before the run is killed as output_limit


DEFAULT_LIMITS = Limits()


@dataclasses.dataclass(frozen=True)
class RunResult:
  """What one run did. exit_code is -signal for a signal death, None when we killed it."""

  status: str  # one of STATUSES
  exit_code: Optional[int]
  stdout: str  # first _KEEP_CHARS characters
  stderr: str
  time_s: float

  @property
  def passed(self) -> bool:
    return self.status == "passed"


Job = tuple  # (program, stdin, expected_stdout or None[, peer]); see run()


def outputs_match(stdout: str, expected: str) -> bool:
  """Judge-style comparison: equal sequences of whitespace-separated tokens."""
  return stdout.split() == expected.split()
