"""Many runs at once: a pool of worker threads, each driving one sandboxed run at a time."""

from __future__ import annotations

import concurrent.futures
import os
from typing import Optional, Sequence

from sqlm_jax.sandbox.isolation import check_available
from sqlm_jax.sandbox.launch import run
from sqlm_jax.sandbox.limits import DEFAULT_LIMITS, Job, Limits, RunResult


class SandboxPool:
  """Runs many (program, stdin, expected) jobs concurrently; results come back in job order.

  Holds the worker threads; each thread drives one sandboxed process at a time, so `workers`
  bounds how many programs run at once (default: one per CPU).
  """

  def __init__(self, workers: Optional[int] = None, limits: Limits = DEFAULT_LIMITS,
               allow_unsandboxed: bool = False):
    if workers is not None and workers < 1:
      raise ValueError(f"SandboxPool needs at least one worker, got workers={workers}.")
    self.sandboxed = check_available(allow_unsandboxed)  # fail here, not inside a worker
    self.workers = workers or os.cpu_count() or 1
    self.limits = limits
    self.allow_unsandboxed = allow_unsandboxed
    self._executor = concurrent.futures.ThreadPoolExecutor(self.workers,
                                                           thread_name_prefix="sandbox")

  def run(self, jobs: Sequence[Job]) -> list[RunResult]:
    def one(job):
      program, stdin, expected, *peer = job
      return run(program, stdin, expected, self.limits, self.allow_unsandboxed, *peer)

    return list(self._executor.map(one, jobs))

  def close(self):
    self._executor.shutdown(wait=True)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
