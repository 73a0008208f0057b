"""Cgroups of each run: memory, pids and CPU bounds, created under the launcher's own cgroup."""

from __future__ import annotations

import atexit
import errno
import functools
import itertools
import os
import signal
import time
from typing import Sequence

from sqlm_jax.sandbox.limits import DEFAULT_LIMITS, Limits

# ------------------------------------------------------------------------------------------
# Memory cgroups: one per run, under a directory this process creates in its own cgroup (so the
# run's limits nest inside whatever limits the launcher itself runs under). The sandboxed wrapper
# joins it through cgroup.procs descriptors opened here, before any program code runs.

_run_ids = itertools.count()
_leftover_cgroups: list[str] = []


def _cgroup_mounts():
  """(version, mount point, options) of this process's cgroup filesystems."""
  for line in open("/proc/self/mountinfo"):
    left, right = line.split(" - ", 1)
    fstype, _, options = right.split()[:3]
    if fstype in ("cgroup", "cgroup2"):
      mount = left.split()[4].replace("\\040", " ")
      yield ("v2" if fstype == "cgroup2" else "v1"), mount, set(options.split(","))


def _own_cgroups() -> dict[str, str]:
  """{controllers of a hierarchy ('' for v2): this process's path in it}."""
  own = {}
  for line in open("/proc/self/cgroup"):
    _, controllers, path = line.rstrip("\n").split(":", 2)
    own[controllers] = path
  return own


@functools.lru_cache(maxsize=None)
def _cgroup_parents() -> tuple[tuple[str, str, str], ...]:
  """((controller, version, directory), ...) under which runs get their cgroups; () if none can.

  SQLM_SANDBOX_CGROUPS=0 in the environment chooses the no-cgroup mode on purpose.
  """
  if os.environ.get("SQLM_SANDBOX_CGROUPS", "1") == "0":
    return ()
  try:
    own = _own_cgroups()
    found = {}
    for version, mount, options in _cgroup_mounts():
      for controller in ("memory", "pids", "cpu"):
        if controller in found:
          continue
        if version == "v2":
          base = mount + own.get("", "/")
          if controller in open(os.path.join(base, "cgroup.controllers")).read().split():
            found[controller] = (version, base)
        elif controller in options:
          path = next(p for k, p in own.items() if controller in k.split(","))
          found[controller] = (version, mount + path)
  except (OSError, StopIteration, ValueError):
    return ()
  if "memory" not in found:
    return ()
  parents = []
  for controller, (version, base) in found.items():
    parent = os.path.join(base, f"sqlm-sandbox-{os.getpid()}")
    try:
      if version == "v2":
        _enable_controller(base, controller)
      os.makedirs(parent, exist_ok=True)
      atexit.register(_remove_cgroup, parent, 1.0)
      if version == "v2":
        _enable_controller(parent, controller)
      if controller == "cpu":
        # All runs share this group: against the host's other processes it weighs as much as
        # one busy process per CPU (a pool's default), as the runs did before it existed.
        weight = ("cpu.weight", 100 * (os.cpu_count() or 1)) if version == "v2" else (
            "cpu.shares", 1024 * (os.cpu_count() or 1))
        with open(os.path.join(parent, weight[0]), "w") as f:
          f.write(str(min(weight[1], 10_000 if version == "v2" else 262_144)))
    except OSError:
      if controller == "memory":
        return ()
      continue  # no pids (cpu) controller: RLIMIT_NPROC still bounds processes (no quota)
    parents.append((controller, version, parent))
  return tuple(parents)


def _enable_controller(directory: str, controller: str):
  path = os.path.join(directory, "cgroup.subtree_control")
  if controller not in open(path).read().split():
    with open(path, "w") as f:
      f.write(f"+{controller}")


def cgroup_mode() -> str:
  """'cgroup v2', 'cgroup v1' or 'none': how run memory is bounded in this process."""
  versions = sorted({version for _, version, _ in _cgroup_parents()})
  return f"cgroup {'+'.join(versions)}" if versions else "none"


def _cgroup_settings(controller: str, version: str, limits: Limits):
  """(file, value, required) for one run's cgroup."""
  memory = str(limits.run_memory_bytes)
  if controller == "pids":
    return [("pids.max", str(limits.max_processes + 2), True)]  # + the supervisor and a peer
  if controller == "cpu":
    quota = str(max(1000, round(limits.cpus * _CPU_PERIOD_US)))
    if version == "v2":
      return [("cpu.max", f"{quota} {_CPU_PERIOD_US}", True)]
    return [("cpu.cfs_period_us", str(_CPU_PERIOD_US), True), ("cpu.cfs_quota_us", quota, True)]
  if version == "v2":  # v2 charges socket buffers to memory.max
    return [("memory.max", memory, True), ("memory.swap.max", "0", False)]
  # v1 counts kernel memory in memory.limit_in_bytes too; the kmem limit is set where the kernel
  # still takes one, and memsw keeps swap from extending the limit. Socket buffers have a counter
  # of their own (memory.kmem.tcp, charged for TCP and UDP alike), unlimited unless set: where it
  # cannot be set, _socket_memory() has seccomp refuse IP sockets instead.
  return [("memory.limit_in_bytes", memory, True), ("memory.memsw.limit_in_bytes", memory, False),
          ("memory.kmem.limit_in_bytes", memory, False),
          ("memory.kmem.tcp.limit_in_bytes", str(_socket_bytes(limits)), _socket_memory() == "v1")]


_CPU_PERIOD_US = 100_000


def _socket_bytes(limits: Limits) -> int:
  """Socket buffers one run may hold on cgroup v1, beside Limits.run_memory_bytes."""
  return limits.run_memory_bytes // 4


@functools.lru_cache(maxsize=None)
def _socket_memory() -> str:
  """How a run's socket buffers are bounded: 'v2' (memory.max counts them), 'v1' (a
  memory.kmem.tcp limit of their own) or 'refused' (no cgroup can bound them: seccomp refuses
  AF_INET and AF_INET6 sockets; AF_UNIX buffers are charged as ordinary kernel memory)."""
  memory = [(version, parent) for controller, version, parent in _cgroup_parents()
            if controller == "memory"]
  if not memory:
    return "refused"
  version, parent = memory[0]
  if version == "v2":
    return "v2"
  probe = os.path.join(parent, "socket-probe")
  try:
    os.makedirs(probe, exist_ok=True)
    with open(os.path.join(probe, "memory.kmem.tcp.limit_in_bytes"), "w") as f:
      f.write(str(DEFAULT_LIMITS.run_memory_bytes))
    return "v1"
  except OSError:
    return "refused"
  finally:
    _remove_cgroup(probe, 1.0)


def _has_cpu_quota() -> bool:
  return any(controller == "cpu" for controller, _, _ in _cgroup_parents())


def _make_run_cgroups(limits: Limits) -> tuple[list[str], list[int]]:
  """Creates one run's cgroups; returns their directories and open cgroup.procs descriptors."""
  name = f"run-{next(_run_ids)}"
  dirs, fds = [], []
  try:
    for controller, version, parent in _cgroup_parents():
      directory = os.path.join(parent, name)
      if directory not in dirs:
        os.mkdir(directory)
        dirs.append(directory)
        fds.append(os.open(os.path.join(directory, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC))
      for file, value, required in _cgroup_settings(controller, version, limits):
        try:
          with open(os.path.join(directory, file), "w") as f:
            f.write(value)
        except OSError:
          if required:
            raise
  except OSError:
    for fd in fds:
      os.close(fd)
    for directory in dirs:
      _remove_cgroup(directory, 1.0)
    raise
  return dirs, fds


def _oom_kills(dirs: Sequence[str]) -> int:
  """How many processes the run's memory limit killed (v1 memory.oom_control, v2 memory.events)."""
  kills = 0
  for directory in dirs:
    for file in ("memory.events", "memory.oom_control"):
      try:
        for line in open(os.path.join(directory, file)):
          if line.startswith("oom_kill "):
            kills += int(line.split()[1])
      except OSError:
        pass
  return kills


def _remove_cgroup(directory: str, wait_s: float) -> bool:
  """Kills what is left in a run's cgroup and removes it; False if it is still busy."""
  deadline = time.monotonic() + wait_s
  delay = 0.001
  while True:
    try:
      os.rmdir(directory)
      return True
    except FileNotFoundError:
      return True
    except OSError as e:
      if e.errno != errno.EBUSY or time.monotonic() > deadline:
        return False
    try:  # v2 kills the whole cgroup at once; v1 one pid at a time, all of them the run's
      with open(os.path.join(directory, "cgroup.kill"), "w") as f:
        f.write("1")
    except OSError:
      try:
        for pid in open(os.path.join(directory, "cgroup.procs")).read().split():
          os.kill(int(pid), signal.SIGKILL)
      except OSError:
        pass
    time.sleep(delay)
    delay = min(2 * delay, 0.02)


def _remove_run_cgroups(dirs: Sequence[str]) -> bool:
  global _leftover_cgroups
  if _leftover_cgroups:
    _leftover_cgroups = [d for d in _leftover_cgroups if not _remove_cgroup(d, 0)]
  busy = [d for d in dirs if not _remove_cgroup(d, 2.0)]
  _leftover_cgroups += busy
  return not busy
