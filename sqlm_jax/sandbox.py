"""Running untrusted, model-written Python programs: one isolated, resource-limited process each.

With bubblewrap (`apt-get install bubblewrap`) every run gets:
- its own mount, PID, network, IPC, UTS and cgroup namespaces: an empty root holding only the
  interpreter, its standard library and the shared libraries these load (resolved once, as `ldd`
  lists them), read-only; a private /proc with the host's kernel command line and keys hidden,
  whose pid 1 is the sandbox's own supervisor (so no /proc file shows bubblewrap's command line);
  a /dev of null, zero, full, random, urandom, the fd links and a small /dev/shm (no terminals);
  and a fresh size-limited tmpfs /tmp as its working directory. The network namespace has no
  route out.
- an unprivileged uid of its own (from a range no account, subordinate-id range or directory
  service uses), no capabilities, no_new_privs, a fresh anonymous session keyring (the
  launcher's keyring is out of reach) and a scrubbed environment.
- a seccomp allowlist (`sqlm_jax/seccomp.py`): what CPython and its standard library use, with
  socket() limited to AF_UNIX/AF_INET/AF_INET6 (AF_UNIX alone where no cgroup bounds socket
  buffers); keyring calls, io_uring, userfaultfd, ptrace, bpf, mount, new namespaces, page-cache
  probes and the rest fail.
- no core dumps: it runs non-dumpable with RLIMIT_CORE at 1 byte (too small for a core file, and
  the value at which the kernel starts no core_pattern helper), which seccomp keeps it from
  changing.
- rlimits on CPU time, address space, processes and file size, a wall-clock timeout and an
  output cap, and where cgroups can be created (`cgroup_mode()`), cgroups of its own: a memory
  limit counting everything the run holds (processes, /tmp, SysV shared memory, memfds, kernel
  memory and, on cgroup v2, socket buffers; v1 bounds those by memory.kmem.tcp), a pids limit
  and a CPU quota (`Limits.cpus`), so that a run forking spinners cannot slow the runs beside
  it. Without cgroups, SysV shared memory, memfds and IP sockets are refused (and the IPC
  namespace's shm sysctls are 0), so the per-process RLIMIT_AS and the tmpfs sizes bound what a
  run holds. When a limit is hit the whole sandbox is killed, so even a daemonised grandchild
  dies with it; on a host out of memory, sandboxed processes are the kernel's first choice to
  kill (oom_score_adj 1000), not the trainer. `describe()` says which bounds this machine gives.

The supervisor (pid 1 inside, still root, so the program cannot signal or trace it) reports the
program's raw wait status, so `sys.exit(137)` is exit code 137 and a SIGKILL is -9. A run may have
a peer (`run(peer=...)`): a second program under another uid, joined to the first by two pipes
only, which HumanEval uses to keep the test harness out of the completion's reach.

Without bubblewrap `run` refuses unless the caller opts into a weaker mode
(`allow_unsandboxed=True`), which keeps the rlimits, the seccomp filter, the cgroups, the uid
drop (when root), a new session, a fresh temporary cwd, a scrubbed environment and, where
`unshare` works, private network and PID namespaces, but shows the program the host filesystem.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import concurrent.futures
import dataclasses
import errno
import fcntl
import functools
import grp
import itertools
import json
import math
import os
import pwd
import selectors
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from typing import Optional, Sequence

from sqlm_jax import seccomp

BWRAP_PATH = shutil.which("bwrap") or "/usr/bin/bwrap"
UNSHARE_PATH = shutil.which("unshare") or "/usr/bin/unshare"
# The interpreter the programs run under: this one, resolved out of any virtualenv; started with
# -I -S it ignores PYTHON* variables, the user site and site-packages.
PYTHON = os.path.realpath(sys.executable)
STATUSES = ("passed", "failed", "timeout", "crashed", "output_limit")

_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp"}
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


# The first code the sandboxed interpreter runs, as the sandbox's pid 1. Still privileged, it joins
# the run's cgroups, makes itself the host's first choice for the out-of-memory killer, turns off
# SysV shared memory where no cgroup counts it, sets the rlimits (a core limit of 1 byte: too small
# for a core file, and the value at which the kernel starts no core_pattern helper) and replaces
# the inherited session keyring with a fresh anonymous one. It then forks the program (and, for a
# run with a peer, the peer): each child drops to its uid, makes itself non-dumpable, installs the
# seccomp filter and executes its source as __main__ in this same process, which saves a second
# interpreter start. The parent stays root, reaps every process of the sandbox and reports the
# program's wait status; when it exits, the kernel kills whatever is left in the PID namespace.
# A child reads its own source only after the fork, so a peer never holds the program's source.
# _ctypes (not ctypes, ~10 ms to import) reaches keyctl/prctl.
_WRAPPER = r"""
import os, resource, sys, _ctypes
(uid, peer_uid, cpu, mem, nproc, fsize, source_fd, peer_fd, filter_fd, status_fd, nr_keyctl,
 no_shm) = map(int, sys.argv[1:13])
for fd in map(int, filter(None, sys.argv[13].split(","))):
  os.write(fd, b"0")  # cgroup.procs of the run's cgroups, opened by the launcher
  os.close(fd)
def put(path, text):
  try:
    with open(path, "w") as f:
      f.write(text)
  except OSError:
    pass
put("/proc/self/oom_score_adj", "1000")
for name in ("shmmax", "shmall", "shmmni") if no_shm else ():
  put("/proc/sys/kernel/" + name, "0")  # this run's own IPC namespace
with os.fdopen(filter_fd, "rb") as f:
  bpf = f.read()
for what, soft, hard in ((resource.RLIMIT_CPU, cpu, cpu + 1), (resource.RLIMIT_AS, mem, mem),
                         (resource.RLIMIT_NPROC, nproc, nproc), (resource.RLIMIT_CORE, 1, 1),
                         (resource.RLIMIT_FSIZE, fsize, fsize), (resource.RLIMIT_NOFILE, 256, 256)):
  resource.setrlimit(what, (soft, hard))
class Long(_ctypes._SimpleCData):
  _type_ = "l"
class Char(_ctypes._SimpleCData):
  _type_ = "c"
class Libc:
  _handle = _ctypes.dlopen(None)
class Function(_ctypes.CFuncPtr):
  _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
  _restype_ = Long
def call(name, *args):
  result = Function((name, Libc))(*map(Long, args))
  if result == -1:
    raise OSError(_ctypes.get_errno(), f"{name}{args}: {os.strerror(_ctypes.get_errno())}")
try:
  call("syscall", nr_keyctl, 1, 0)  # KEYCTL_JOIN_SESSION_KEYRING, anonymous
except OSError as e:
  if e.errno != 38:  # ENOSYS: a kernel without keyrings
    raise
call("prctl", 4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0 (the uid is the program's own without root)
# A peer talks to the program over two pipes: requests (program -> peer) and replies.
channel = (*os.pipe(), *os.pipe()) if peer_fd >= 0 else ()
def start(uid, source_fd, name, argv, keep, drop):
  pid = os.fork()
  if pid:
    return pid
  os.close(status_fd)
  for fd in drop:
    os.close(fd)
  with os.fdopen(source_fd, "rb") as f:
    source = f.read()
  if not keep:  # a peer reads and writes only its channel (stderr stays, for its tracebacks)
    null = os.open("/dev/null", os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
  if os.getuid() == 0:
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
  call("prctl", 4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: no /proc/<pid>/mem, fd or core for others
  code = buffer(bpf)
  fprog = buffer((len(bpf) // 8).to_bytes(2, "little") + bytes(6)
                 + _ctypes.addressof(code).to_bytes(8, "little"))
  call("prctl", 38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
  call("prctl", 22, 2, _ctypes.addressof(fprog), 0, 0)  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
  main = type(sys)("__main__")
  main.__file__ = name
  main.__loader__ = Source(source.decode(errors="replace"))  # tracebacks show its lines
  sys.excepthook = Source.excepthook
  sys.modules["__main__"] = main
  sys.argv = [name, *map(str, argv)]
  exec(compile(source, name, "exec"), main.__dict__)
  sys.exit()
def buffer(data):
  array = type("Array", (_ctypes.Array,), {"_type_": Char, "_length_": len(data)})
  return array.from_buffer_copy(data)
class Source:
  def __init__(self, text):
    self.text = text
  def get_source(self, name):
    return self.text
  @staticmethod
  def excepthook(*exc_info):  # Python's, which reads lines through __loader__ (the C one cannot)
    __import__("traceback").print_exception(*exc_info)
sources = [source_fd] + ([peer_fd] if channel else [])
pid = start(uid, source_fd, "main.py", channel[1:3], True,
            [fd for fd in sources + list(channel) if fd not in (source_fd, *channel[1:3])])
peer = channel and start(peer_uid, peer_fd, "peer.py", channel[::3], False,
                         [fd for fd in sources + list(channel) if fd not in (peer_fd, *channel[::3])])
for fd in sources + list(channel):
  os.close(fd)
while True:  # as pid 1, every orphan of the sandbox is this process's child to reap
  done, status, usage = os.wait4(-1, 0)
  if done == pid:
    break
if peer:
  try:
    os.kill(peer, 9)
  except OSError:
    pass
os.write(status_fd, b"%d %.3f" % (status, usage.ru_utime + usage.ru_stime))
os._exit(0)
"""


# ------------------------------------------------------------------------------------------
# uids. RLIMIT_NPROC counts every process of a uid, so concurrent runs sharing one uid would let
# a fork bomb in one starve the others: each live run gets its own uid. They come from above the
# ranges SSSD, FreeIPA and Active Directory id mapping hand out (up to 2,000,200,000) and below
# systemd's foreign-uid range and 2^31; a launcher claims a block by a lock file (so concurrent
# launchers never share uids), checks it against passwd, group, /etc/subuid and /etc/subgid, and
# hands its uids out in order. A uid is reused only once the block is used up, after its run's
# processes are gone (its cgroup removed), and only under the seccomp filter (run() requires it),
# which refuses every keyring call: a run cannot create a key, so no keyring of that uid exists
# to reach the next run.

UID_RANGE = (2_000_200_000, 2_147_352_576)
UID_BLOCK = 1 << 16
_KNOWN_ID_RANGES = (  # (first, end): ids other software hands out
    (0, 65_536),  # system and login accounts, nobody, systemd's dynamic users
    (100_000, 200_000),  # the usual start of /etc/subuid allocations
    (200_000, 2_000_200_000),  # SSSD / FreeIPA / Active Directory id mapping
    (2_147_352_576, 2_147_418_112),  # systemd's foreign uids
    (2_147_483_648, 4_294_967_296),  # >= 2^31: mishandled by some tools
)


def _subordinate_ranges(path: str) -> list[tuple[int, int]]:
  ranges = []
  try:
    for line in open(path):
      fields = line.strip().split(":")
      if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit():
        ranges.append((int(fields[1]), int(fields[1]) + int(fields[2])))
  except OSError:
    pass
  return ranges


def uid_range_conflicts(first: int, end: int) -> list[str]:
  """What on this system already uses ids in [first, end); [] when the range is free."""
  found = []
  overlaps = lambda lo, hi: lo < end and first < hi
  found += [f"user {p.pw_name} (uid {p.pw_uid})" for p in pwd.getpwall()
            if first <= p.pw_uid < end]
  found += [f"group {g.gr_name} (gid {g.gr_gid})" for g in grp.getgrall()
            if first <= g.gr_gid < end]
  for path in ("/etc/subuid", "/etc/subgid"):
    found += [f"{path} range {lo}-{hi - 1}" for lo, hi in _subordinate_ranges(path)
              if overlaps(lo, hi)]
  found += [f"reserved range {lo}-{hi - 1}" for lo, hi in _KNOWN_ID_RANGES if overlaps(lo, hi)]
  return found


class _Uids:
  """This process's block of per-run uids: new ones in order, then finished ones, oldest first."""

  def __init__(self):
    self._lock = threading.Lock()
    self._lock_file = None
    self.block = None  # range of this process's uids
    self._next = 0
    self._finished = collections.deque()

  def _claim_block(self):
    lock_dir = "/run/lock" if os.access("/run/lock", os.W_OK) else tempfile.gettempdir()
    blocks = (UID_RANGE[1] - UID_RANGE[0]) // UID_BLOCK
    for i in range(blocks):  # the lowest free block, so lock files stay few
      first = UID_RANGE[0] + i * UID_BLOCK
      if uid_range_conflicts(first, first + UID_BLOCK):
        continue
      try:
        fd = os.open(os.path.join(lock_dir, f"sqlm-sandbox-uids-{first}.lock"),
                     os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
      except OSError:
        continue
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError:
        os.close(fd)
        continue
      if self._lock_file is not None:
        os.close(self._lock_file)
      self._lock_file, self.block, self._next = fd, range(first, first + UID_BLOCK), first
      return
    raise RuntimeError(f"No free block of {UID_BLOCK} sandbox uids in {UID_RANGE}: each is used "
                       "by this system (uid_range_conflicts) or locked by another launcher. "
                       "Set sandbox.UID_RANGE to a range no account or service uses.")

  def take(self) -> int:
    with self._lock:
      if self.block is None or (self._next == self.block.stop and not self._finished):
        self._claim_block()
      if self._next < self.block.stop:
        self._next += 1
        return self._next - 1
      return self._finished.popleft()

  def give_back(self, uid: int):
    if uid in self.block:
      self._finished.append(uid)


_uids = _Uids()


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


# ------------------------------------------------------------------------------------------
# Command lines.


def _elf_interpreter(path: str) -> Optional[str]:
  """The dynamic loader an ELF executable names (PT_INTERP), or None."""
  with open(path, "rb") as f:
    head = f.read(64)
    if head[:4] != b"\x7fELF" or head[4] != 2:  # 64-bit only
      return None
    order = "little" if head[5] == 1 else "big"
    phoff = int.from_bytes(head[32:40], order)
    phentsize, phnum = int.from_bytes(head[54:56], order), int.from_bytes(head[56:58], order)
    for i in range(phnum):
      f.seek(phoff + i * phentsize)
      entry = f.read(phentsize)
      if int.from_bytes(entry[0:4], order) == 3:  # PT_INTERP
        f.seek(int.from_bytes(entry[8:16], order))
        return f.read(int.from_bytes(entry[32:40], order)).rstrip(b"\0").decode()
  return None


def _system_library_dir() -> Optional[str]:
  """The directory the C library was loaded from (e.g. /usr/lib/x86_64-linux-gnu)."""
  for line in open("/proc/self/maps"):
    path = line.split(maxsplit=5)[-1].strip()
    if os.path.basename(path).startswith(("libc.so", "libc-", "ld-musl")):
      return os.path.dirname(os.path.realpath(path))
  return None


def _shared_libraries(loader: Optional[str], objects: Sequence[str]) -> list[str]:
  """The shared libraries `objects` load, as `ldd` lists them (the dynamic loader's --list)."""
  if loader is None:
    return []
  found = set()
  for path in objects:
    try:
      listing = subprocess.run([loader, "--list", path], capture_output=True, text=True,
                               timeout=30, env={})
    except (OSError, subprocess.TimeoutExpired):
      continue
    for line in listing.stdout.splitlines():  # "libz.so.1 => /lib/.../libz.so.1 (0x...)"
      words = [w for w in line.split() if w.startswith("/")]
      if words and os.path.isfile(words[0]):
        found.add(words[0])
  return sorted(found)


def _expose(path: str, args: list[str], made: set[str], bound: set[str]):
  """Adds bwrap arguments showing host `path` read-only at the same place, with the symlinks on
  the way recreated and parent directories world-searchable (bwrap would copy the host's modes,
  and /root is 0700)."""
  parts, current = path.strip("/").split("/"), "/"
  while parts:
    step = os.path.join(current, parts.pop(0))
    if os.path.islink(step):
      target = os.readlink(step)
      if step not in made and not _under(step, bound):  # a bound directory holds its own
        _make_parents(step, args, made)
        args += ["--symlink", target, step]
        made.add(step)
      parts = os.path.normpath(os.path.join(current, target)).strip("/").split("/") + parts
      current = "/"
    else:
      current = step
  if not _under(current, bound):
    _make_parents(current, args, made)
    args += ["--ro-bind", current, current]
    made.add(current)
    bound.add(current)


def _under(path: str, directories) -> bool:
  return any(path == d or path.startswith(d + "/") for d in directories)


def _symlink_chain(path: str) -> list[str]:
  """`path`, each symlink it resolves through and where it ends, as _expose walks them."""
  chain, parts, current = [path], path.strip("/").split("/"), "/"
  while parts:
    step = os.path.join(current, parts.pop(0))
    if os.path.islink(step):
      chain.append(step)
      parts = os.path.normpath(os.path.join(current, os.readlink(step))).strip("/").split(
          "/") + parts
      current = "/"
    else:
      current = step
  return chain + [current]


def _make_parents(path: str, args: list[str], made: set[str]):
  parents, parent = [], os.path.dirname(path)
  while parent not in ("/", "") and parent not in made:
    parents.insert(0, parent)
    parent = os.path.dirname(parent)
  for parent in parents:
    args += ["--perms", "0755", "--dir", parent]
  made.update(parents)


def _readonly_binds() -> list[str]:
  """bwrap arguments for the interpreter, its standard library, libpython, the loader and the
  shared libraries these and the standard library's extension modules load; not /usr as a whole
  (no /usr/local, /usr/share, /usr/bin) nor the system library directory."""
  # The base installation's paths: inside a virtualenv, "platstdlib" would be the venv's own lib
  # directory (its site-packages, and a path into the project that made it).
  base = {"base": sys.base_prefix, "platbase": sys.base_exec_prefix,
          "installed_base": sys.base_prefix, "installed_platbase": sys.base_exec_prefix}
  stdlib = sysconfig.get_path("stdlib", vars=base)
  libpython = os.path.join(sysconfig.get_config_var("LIBDIR") or "",
                           sysconfig.get_config_var("INSTSONAME") or "")
  dynload = [p for p in sys.path if p.endswith("lib-dynload")]
  paths = [PYTHON, stdlib, sysconfig.get_path("platstdlib", vars=base), *dynload, libpython,
           _elf_interpreter(PYTHON)]
  args, made, bound = [], set(), set()
  stand_ins, single = _library_dirs(tuple(filter(None, paths)), tuple(dynload))
  for directory, stand_in in stand_ins:
    _make_parents(directory, args, made)
    args += ["--ro-bind", stand_in, directory]
    made.add(directory)
    bound.add(directory)
  paths += single
  # Directories first, so a file inside one is not bound a second time.
  for path in sorted(filter(None, set(paths)), key=lambda p: (not os.path.isdir(p), p)):
    if os.path.exists(path):
      _expose(path, args, made, bound)
  for packages in ("site-packages", "dist-packages"):
    if os.path.isdir(os.path.join(stdlib, packages)):
      args += ["--tmpfs", os.path.join(stdlib, packages)]  # hide host packages
  return args


# What a run's /proc would otherwise tell about the host: its kernel's command line and config,
# and its keys. (The sandbox's pid 1 is the wrapper, not bwrap, so no process inside shows bwrap's
# command line; /proc/1/cmdline is hidden all the same.)
_HIDDEN_PROC = ("/proc/cmdline", "/proc/config.gz", "/proc/keys", "/proc/key-users",
                "/proc/1/cmdline")

# /dev holds only these device nodes (bound from the host), the fd/stdin/stdout/stderr links and
# a small /dev/shm: no terminals (ptmx, pts, tty, console), which are a host-wide pool.
_DEVICES = ("null", "zero", "full", "random", "urandom")


@functools.lru_cache(maxsize=None)
def _host_files() -> str:
  """A directory of this launcher's own (removed at exit) holding what runs are shown in place of
  host files: an empty file to bind over what /proc should not show, and the shared libraries."""
  directory = tempfile.mkdtemp(prefix="sqlm-sandbox-")
  os.chmod(directory, 0o755)
  atexit.register(shutil.rmtree, directory, True)
  return directory


def _empty_file() -> str:
  return os.path.join(_host_files(), "empty")


_library_copies: dict[str, tuple[tuple[str, str], ...]] = {}  # stand-in: ((name, host file), ...)


@functools.lru_cache(maxsize=None)
def _library_dirs(bound_paths: tuple[str, ...],
                  skip: tuple[str, ...]) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
  """The shared libraries the interpreter and the standard library's extension modules load (as
  `ldd` lists them), arranged for few mounts: ((host directory, stand-in), ...) and the
  libraries left to bind one by one. A stand-in holds only the libraries of its directory (hard
  links, or copies across filesystems) and is bound over it: one mount, however many libraries.
  Directories holding one of `bound_paths` (libpython's, beside the standard library) keep
  their libraries bound one by one; those under `skip` (lib-dynload) are bound whole."""
  extensions = [os.path.join(d, name) for d in skip if os.path.isdir(d)
                for name in sorted(os.listdir(d)) if name.endswith(".so")]
  loader = _elf_interpreter(PYTHON)
  groups, single = {}, []
  libraries = _shared_libraries(loader, [PYTHON, *extensions])
  if not libraries:  # the loader listed nothing (a static interpreter, another libc): the C
    return (), tuple(filter(None, (_system_library_dir(), loader)))  # library's whole directory
  for path in libraries + [loader] * bool(loader):
    chain = _symlink_chain(path)
    steps = [(os.path.dirname(step), os.path.basename(step)) for step in chain[1:]
             if not os.path.isdir(step)]  # the file and the file links on the way to it
    if any(_under(directory, skip) or any(_under(p, [directory]) for p in bound_paths
                                          if p not in chain) for directory, _ in steps):
      single.append(path)
      continue
    for directory, name in steps:
      groups.setdefault(directory, {})[name] = chain[-1]
  stand_ins = []
  for i, (directory, names) in enumerate(sorted(groups.items())):
    stand_in = os.path.join(_host_files(), f"lib-{i}")
    _library_copies[stand_in] = tuple(sorted(names.items()))
    stand_ins.append((directory, stand_in))
  _ensure_host_files()
  return tuple(stand_ins), tuple(single)


_host_files_lock = threading.Lock()


def _ensure_host_files():
  """Creates what _host_files() holds, again after a /tmp cleaner removed it."""
  path = _empty_file()
  if os.path.exists(path) and all(map(os.path.isdir, _library_copies)):
    return
  with _host_files_lock:
    _make_host_files()


def _make_host_files():
  path = _empty_file()
  if not os.path.exists(path):
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    with open(path, "wb"):
      pass
    os.chmod(path, 0o444)
  for stand_in, files in _library_copies.items():
    if os.path.isdir(stand_in):
      continue
    os.makedirs(stand_in + ".new", mode=0o755, exist_ok=True)
    for name, host_file in files:
      target = os.path.join(stand_in + ".new", name)
      if not os.path.exists(target):
        try:
          os.link(host_file, target)
        except OSError:
          shutil.copy2(host_file, target)
    os.chmod(stand_in + ".new", 0o755)
    os.rename(stand_in + ".new", stand_in)  # complete before any run binds it


@functools.lru_cache(maxsize=None)
def _bwrap_prefix(bwrap: str, tmp_bytes: int) -> tuple[str, ...]:
  if os.geteuid() == 0:
    # Root creates the namespaces (no user namespace: it would map the run's uid back to root,
    # and RLIMIT_NPROC is not enforced for root); the wrapper then drops to the run's uid.
    isolation = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
                 "--unshare-cgroup-try", "--cap-drop", "ALL",
                 "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
  else:
    isolation = ["--unshare-all", "--unshare-user", "--disable-userns"]
  hidden = []
  for path in _HIDDEN_PROC:
    if path.startswith("/proc/1/") or os.path.exists(path):
      hidden += ["--ro-bind", _empty_file(), path]
  dev = ["--perms", "0755", "--tmpfs", "/dev"]
  for name in _DEVICES:
    dev += ["--dev-bind", f"/dev/{name}", f"/dev/{name}"]
  for link, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                       ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
    dev += ["--symlink", target, f"/dev/{link}"]
  return tuple([bwrap, *isolation, "--as-pid-1", "--die-with-parent", "--new-session",
                "--hostname", "sandbox", *_readonly_binds(), "--proc", "/proc", *hidden, *dev,
                "--size", str(4 << 20), "--perms", "1777", "--tmpfs",
                "/dev/shm",
                "--size", str(tmp_bytes), "--perms", "1777", "--tmpfs", "/tmp", "--chdir", "/tmp",
                "--clearenv", *[a for k, v in _ENV.items() for a in ("--setenv", k, v)]])


@functools.lru_cache(maxsize=None)
def _bwrap_problem(bwrap: str) -> Optional[str]:
  """None when bwrap can build a sandbox here, else why not (checked once per path)."""
  if not os.access(bwrap, os.X_OK):
    return f"bubblewrap was not found at {bwrap!r}"
  try:
    _ensure_host_files()
    probe = subprocess.run([*_bwrap_prefix(bwrap, 1 << 20), PYTHON, "-I", "-S", "-c", "pass"],
                           capture_output=True, env=_ENV, timeout=30)
  except (OSError, subprocess.TimeoutExpired) as e:
    return f"bubblewrap at {bwrap!r} could not start: {e}"
  if probe.returncode != 0:
    return f"bubblewrap at {bwrap!r} failed: {probe.stderr.decode(errors='replace').strip()}"
  return None


@functools.lru_cache(maxsize=None)
def _unshare_flags(unshare: str) -> tuple[str, ...]:
  """The strongest `unshare` prefix that works here (weak mode), or () if none does."""
  for flags in (("--net", "--pid", "--fork", "--kill-child"), ("--net",)):
    try:
      if subprocess.run([unshare, *flags, "true"], capture_output=True, timeout=10).returncode == 0:
        return (unshare, *flags)
    except (OSError, subprocess.TimeoutExpired):
      pass
  return ()


def check_available(allow_unsandboxed: bool = False) -> bool:
  """True when bubblewrap works; raises unless it does or the caller accepts the weak mode."""
  problem = _bwrap_problem(BWRAP_PATH)
  if problem is None:
    return True
  if allow_unsandboxed:
    return False
  raise RuntimeError(
      f"Refusing to run untrusted code: {problem}. Install bubblewrap "
      "(`apt-get install bubblewrap`), or accept a weaker sandbox that shows the program the host "
      "filesystem with allow_unsandboxed=True (CLI: --unsafe-no-bwrap).")


def describe() -> dict:
  """What this process's runs get: which memory, socket and CPU bounds, seccomp, uid range."""
  sockets = _socket_memory()
  return {"bubblewrap": _bwrap_problem(BWRAP_PATH) or "works",
          "memory": (f"{cgroup_mode()}: one memory cgroup per run (Limits.run_memory_bytes)"
                     if _cgroup_parents() else
                     "none: no cgroup can be created here; SysV shared memory and memfds are "
                     "refused, each process is bounded by RLIMIT_AS"),
          "sockets": {"v2": "counted in the run's memory.max (cgroup v2)",
                      "v1": "AF_INET/AF_INET6 buffers bounded by the run's "
                            "memory.kmem.tcp.limit_in_bytes (cgroup v1, Limits.run_memory_bytes "
                            "/ 4, beside the memory limit)",
                      "refused": "AF_INET/AF_INET6 sockets refused by seccomp: no cgroup here "
                                 "can bound their buffers; AF_UNIX only"}[sockets],
          "cpu": ("a CPU quota per run (Limits.cpus)" if _has_cpu_quota() else
                  "none: no cpu cgroup controller here; a run that forks spinning processes "
                  "slows the runs beside it (RLIMIT_CPU still bounds each process)"),
          "seccomp": "allowlist" if seccomp.supported() else "none (unknown architecture)",
          "uids": f"{UID_RANGE[0]}-{UID_RANGE[1] - 1}, blocks of {UID_BLOCK}"
                  if os.geteuid() == 0 else f"the launcher's ({os.geteuid()})"}


@functools.lru_cache(maxsize=None)
def _filter(shared_memory: bool, inet_sockets: bool) -> bytes:
  return seccomp.program(shared_memory, inet_sockets)


# ------------------------------------------------------------------------------------------
# One run.


def run(program: str, stdin: str = "", expected: Optional[str] = None,
        limits: Limits = DEFAULT_LIMITS, allow_unsandboxed: bool = False,
        peer: Optional[str] = None) -> RunResult:
  """Runs `program` on `stdin` in a fresh sandbox.

  expected: the stdout it should print; then exit 0 plus matching tokens is "passed", exit 0
    with other output "failed". Without it, exit 0 is "passed". A non-zero exit or a signal is
    "crashed"; running past the wall or CPU limit "timeout"; printing more than
    limits.output_bytes "output_limit".
  peer: source of a second program run beside `program` in the same sandbox, under a uid of its
    own where the launcher is root (both non-dumpable, so neither can read, write, trace or, with
    its own uid, signal the other), with /dev/null as stdin and stdout (its stderr joins the
    run's). The two talk over two pipes, the only descriptors they share: `program` gets
    sys.argv == ["main.py", request_write_fd, reply_read_fd], the peer ["peer.py",
    request_read_fd, reply_write_fd]. The verdict is `program`'s alone; the peer is killed when
    `program` exits.
  """
  sandboxed = check_available(allow_unsandboxed)
  if not seccomp.supported():
    raise RuntimeError(f"No seccomp filter for this machine ({os.uname().machine}); "
                       "sqlm_jax.seccomp has tables for x86_64 and aarch64.")
  root = os.geteuid() == 0  # only root drops each run to a uid of its own
  uid = _uids.take() if root else os.geteuid()
  peer_uid = (_uids.take() if root else uid) if peer is not None else uid
  cpu_s = limits.cpu_s if limits.cpu_s is not None else max(1, math.ceil(limits.timeout_s))
  tmpdir, fds, cgroup_dirs, status_r = None, [], [], None
  cgroups_gone = True
  try:
    cgroup_dirs, cgroup_fds = _make_run_cgroups(limits) if _cgroup_parents() else ([], [])
    fds += cgroup_fds
    source_fd = _memfd("program", program.encode())
    fds.append(source_fd)
    peer_fd = _memfd("peer", peer.encode()) if peer is not None else -1
    fds += [peer_fd] if peer is not None else []
    stdin_fd = _memfd("stdin", stdin.encode())
    filter_fd = _memfd("filter", _filter(bool(cgroup_dirs), _socket_memory() != "refused"))
    status_r, status_w = os.pipe()
    fds += [stdin_fd, filter_fd, status_w]
    no_shm = int(sandboxed and not cgroup_dirs)
    wrapper = [PYTHON, "-I", "-S", "-c", _WRAPPER, str(uid), str(peer_uid), str(cpu_s),
               str(limits.memory_bytes), str(limits.max_processes), str(limits.file_size_bytes),
               str(source_fd), str(peer_fd), str(filter_fd), str(status_w),
               str(seccomp.NUMBERS[os.uname().machine]["keyctl"]), str(no_shm),
               ",".join(map(str, cgroup_fds))]
    if sandboxed:
      _ensure_host_files()
      cmd, cwd = list(_bwrap_prefix(BWRAP_PATH, 2 * limits.file_size_bytes)) + wrapper, "/"
    else:
      tmpdir = tempfile.mkdtemp(prefix="sandbox-")
      if os.geteuid() == 0:
        os.chown(tmpdir, uid, uid)
      if peer is not None:
        os.chmod(tmpdir, 0o1777)
      cmd, cwd = list(_unshare_flags(UNSHARE_PATH)) + wrapper, tmpdir
    result = _execute(cmd, cwd, stdin_fd, fds, status_r, expected, limits, cpu_s)
    if result.exit_code == -signal.SIGKILL and _oom_kills(cgroup_dirs):
      result = dataclasses.replace(result, status="crashed", stderr=result.stderr + (
          f"\nsandbox: killed by the run's memory limit ({limits.run_memory_bytes} bytes)"))
    return result
  finally:
    for fd in fds:  # left open only when the sandbox did not start
      os.close(fd)
    if status_r is not None:
      os.close(status_r)
    if tmpdir is not None:
      shutil.rmtree(tmpdir, ignore_errors=True)
    if cgroup_dirs:
      cgroups_gone = _remove_run_cgroups(cgroup_dirs)
    if root and cgroups_gone:  # a uid whose processes may still live is never handed out again
      _uids.give_back(uid)
      if peer is not None:
        _uids.give_back(peer_uid)


def _memfd(name: str, data: bytes) -> int:
  fd = os.memfd_create(name)
  os.write(fd, data)
  os.lseek(fd, 0, os.SEEK_SET)
  return fd


def _execute(cmd, cwd, stdin_fd, fds, status_r, expected, limits, cpu_s) -> RunResult:
  """Runs `cmd`, passing it `fds` (closed here once it has them)."""
  start = time.monotonic()
  deadline = start + limits.timeout_s
  try:
    proc = subprocess.Popen(cmd, stdin=stdin_fd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            pass_fds=[fd for fd in fds if fd != stdin_fd], cwd=cwd,
                            env=_ENV, start_new_session=True)
  except OSError as e:
    return RunResult("crashed", None, "", f"could not start the sandbox: {e}",
                     time.monotonic() - start)
  while fds:  # the sandbox holds its own copies; the status pipe must reach EOF
    os.close(fds.pop())
  out, err, killed_for = bytearray(), bytearray(), None
  with selectors.DefaultSelector() as sel:
    sel.register(proc.stdout, selectors.EVENT_READ, out)
    sel.register(proc.stderr, selectors.EVENT_READ, err)
    while sel.get_map() and killed_for is None:
      remaining = deadline - time.monotonic()
      if remaining <= 0:
        killed_for = "timeout"
        break
      for key, _ in sel.select(remaining):
        chunk = os.read(key.fd, 65536)
        if not chunk:
          sel.unregister(key.fileobj)
        key.data.extend(chunk)
        if len(out) + len(err) > limits.output_bytes:
          killed_for = "output_limit"
  if killed_for is None and not _wait_unreaped(proc.pid, deadline):
    killed_for = "timeout"
  # Kill before reaping: the unreaped leader keeps its process group id from being reused.
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass
  proc.wait()
  proc.stdout.close()
  proc.stderr.close()
  elapsed = time.monotonic() - start
  report = os.read(status_r, 64).split() if killed_for is None else []

  stdout = out.decode(errors="replace")
  stderr = err.decode(errors="replace")
  if killed_for is not None:
    status, exit_code = killed_for, None
  elif len(report) != 2:
    # No report: the sandbox could not be built, or the supervisor was killed.
    status, exit_code = "crashed", None
    stderr += f"\nsandbox: no exit status reported (launcher exit code {proc.returncode})"
  else:
    exit_code = os.waitstatus_to_exitcode(int(report[0]))
    used_cpu_s = float(report[1])
    if exit_code == -signal.SIGXCPU or (exit_code == -signal.SIGKILL and used_cpu_s >= cpu_s):
      status = "timeout"  # the CPU rlimit's soft then hard signal
    elif exit_code != 0:
      status = "crashed"
    elif expected is None or outputs_match(stdout, expected):
      status = "passed"
    else:
      status = "failed"
  return RunResult(status, exit_code, stdout[:_KEEP_CHARS], stderr[:_KEEP_CHARS], elapsed)


def _wait_unreaped(pid: int, deadline: float) -> bool:
  """Waits until `pid` exits or the deadline passes, leaving it a zombie; True if it exited."""
  delay = 0.0005
  while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is None:
    if time.monotonic() >= deadline:
      return False
    time.sleep(delay)
    delay = min(delay * 2, 0.02)
  return True


# ------------------------------------------------------------------------------------------
# Many runs.


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


# ------------------------------------------------------------------------------------------
# CLI: python -m sqlm_jax.sandbox PROGRAM.py [--stdin FILE] [--timeout S] [--expected FILE]


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m sqlm_jax.sandbox",
      description="Run one program in the sandbox exactly as training does; print JSON.")
  parser.add_argument("program", nargs="?", help="path of the Python program to run")
  parser.add_argument("--stdin", help="file whose contents are the program's stdin")
  parser.add_argument("--expected", help="file holding the expected stdout")
  parser.add_argument("--timeout", type=float, default=DEFAULT_LIMITS.timeout_s,
                      help="wall-clock limit in seconds")
  parser.add_argument("--unsafe-no-bwrap", action="store_true",
                      help="without bubblewrap, run with rlimits only (host files visible)")
  parser.add_argument("--describe", action="store_true",
                      help="print which isolation this machine gives (memory mode, seccomp, uids)")
  args = parser.parse_args(argv)
  if args.describe:
    print(json.dumps(describe(), indent=2))
    return 0
  if args.program is None:
    parser.error("give a PROGRAM to run, or --describe")
  read = lambda path: open(path, encoding="utf-8").read() if path else None
  try:
    result = run(read(args.program), read(args.stdin) or "", read(args.expected),
                 dataclasses.replace(DEFAULT_LIMITS, timeout_s=args.timeout),
                 allow_unsandboxed=args.unsafe_no_bwrap)
  except RuntimeError as e:
    print(e, file=sys.stderr)
    return 2
  print(json.dumps(dataclasses.asdict(result), indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
