"""Running untrusted, model-written Python programs: one isolated, resource-limited process each.

With bubblewrap (`apt-get install bubblewrap`) every run gets:
- its own mount, PID, network, IPC and UTS namespaces: an empty root holding only /usr (and the
  interpreter's standard library) read-only, a private /proc, a minimal /dev, and a fresh
  size-limited tmpfs /tmp as its working directory. Host files (the project, /root, /etc)
  are not there to read or write; the network namespace has no route out.
- an unprivileged uid with no capabilities, no_new_privs and a scrubbed environment. Started
  as root, bwrap only builds the namespaces and each run drops to a fresh uid of its own, with a
  seccomp filter that refuses new user namespaces; started as another user, the run keeps that
  uid inside a user namespace that may not create further ones.
- rlimits on CPU time, address space, processes, file size and core dumps, a wall-clock
  timeout and an output cap; when any is hit the whole PID namespace is killed, so even a
  daemonised grandchild dies with it.

Without bubblewrap `run` refuses unless the caller opts into a weaker mode
(`allow_unsandboxed=True`), which keeps the rlimits, the uid drop (when root), a new session,
a fresh temporary cwd, a scrubbed environment and, where `unshare` works, private network and
PID namespaces, but shows the program the host filesystem.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import json
import math
import os
import platform
import queue
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import sysconfig
import tempfile
import time
from typing import Optional, Sequence

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
  # RLIMIT_NPROC, counting threads and the sandbox's init. Total memory can reach
  # max_processes * memory_bytes, so keep both modest.
  max_processes: int = 8
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


Job = tuple  # (program, stdin, expected_stdout or None)


def outputs_match(stdout: str, expected: str) -> bool:
  """Judge-style comparison: equal sequences of whitespace-separated tokens."""
  return stdout.split() == expected.split()


# The first code the sandboxed interpreter runs: set the limits, drop to the run's uid (when
# started as root), then execute the program as __main__ in this same process, which saves a
# second interpreter start and keeps setuid's no-exec path immune to RLIMIT_NPROC.
_WRAPPER = r"""
import os, resource, sys
uid, cpu, mem, nproc, fsize, fd = map(int, sys.argv[1:7])
with os.fdopen(fd, "rb") as f:
  source = f.read()
for what, soft, hard in ((resource.RLIMIT_CPU, cpu, cpu + 1), (resource.RLIMIT_AS, mem, mem),
                         (resource.RLIMIT_NPROC, nproc, nproc), (resource.RLIMIT_CORE, 0, 0),
                         (resource.RLIMIT_FSIZE, fsize, fsize), (resource.RLIMIT_NOFILE, 256, 256)):
  resource.setrlimit(what, (soft, hard))
with open("main.py", "wb") as f:
  f.write(source)
if os.getuid() == 0:
  os.setgroups([])
  os.setresgid(uid, uid, uid)
  os.setresuid(uid, uid, uid)
main = type(sys)("__main__")
main.__file__ = "main.py"
sys.modules["__main__"] = main
sys.argv = ["main.py"]
exec(compile(source, "main.py", "exec"), main.__dict__)
"""


# ------------------------------------------------------------------------------------------
# uids: RLIMIT_NPROC counts every process of a uid, so concurrent runs sharing one uid would let
# a fork bomb in one starve the others. Each live run therefore gets its own uid.

_UID_BASE = 200_000 + (os.getpid() % 4096) * 256
_free_uids: "queue.SimpleQueue[int]" = queue.SimpleQueue()
for _uid in range(_UID_BASE, _UID_BASE + 256):
  _free_uids.put(_uid)


# ------------------------------------------------------------------------------------------
# seccomp: as root, bwrap cannot both drop to an unprivileged uid and use --disable-userns, so a
# small filter refuses unshare(), clone(CLONE_NEWUSER) and clone3 (libc falls back to clone).

_SECCOMP_ARCH = {  # machine: (AUDIT_ARCH, unshare, clone, clone3, x32 bit)
    "x86_64": (0xC000003E, 272, 56, 435, 0x40000000),
    "aarch64": (0xC00000B7, 97, 220, 435, 0),
}


def _seccomp_program() -> Optional[bytes]:
  """Classic BPF for seccomp, or None on an architecture not in _SECCOMP_ARCH."""
  if platform.machine() not in _SECCOMP_ARCH:
    return None
  arch, nr_unshare, nr_clone, nr_clone3, x32 = _SECCOMP_ARCH[platform.machine()]
  ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
  allow, eperm, enosys = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38
  clone_newuser = 0x10000000
  insns = [
      (ld, 0, 0, 4),  # 0: arch
      (jeq, 1, 0, arch),  # 1: native arch? -> 3
      (ret, 0, 0, enosys),  # 2: other ABIs (i386 via int 0x80) are refused
      (ld, 0, 0, 0),  # 3: syscall number
      (jge, 0, 1, x32) if x32 else (jeq, 0, 1, 0xFFFFFFFF),  # 4: x32 ABI -> refuse
      (ret, 0, 0, enosys),  # 5
      (jeq, 0, 1, nr_unshare),  # 6
      (ret, 0, 0, eperm),  # 7
      (jeq, 0, 1, nr_clone3),  # 8
      (ret, 0, 0, enosys),  # 9
      (jeq, 1, 0, nr_clone),  # 10: clone -> 12
      (ret, 0, 0, allow),  # 11
      (ld, 0, 0, 16),  # 12: low 32 bits of clone's flags
      (jset, 0, 1, clone_newuser),  # 13
      (ret, 0, 0, eperm),  # 14
      (ret, 0, 0, allow),  # 15
  ]
  return b"".join(struct.pack("=HBBI", *insn) for insn in insns)


_SECCOMP = _seccomp_program()


# ------------------------------------------------------------------------------------------
# Command lines.


def _readonly_binds() -> list[str]:
  """bwrap arguments for /usr, the merged-/usr links, and the interpreter if it lives elsewhere."""
  args = ["--ro-bind", "/usr", "/usr"]
  for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64"):
    if os.path.islink(top):
      args += ["--symlink", os.readlink(top), top]
    elif os.path.isdir(top):
      args += ["--ro-bind", top, top]
  stdlib = sysconfig.get_path("stdlib")
  libpython = os.path.join(sysconfig.get_config_var("LIBDIR") or "",
                           sysconfig.get_config_var("INSTSONAME") or "")
  made = set()
  for path in (PYTHON, stdlib, libpython):
    if os.path.exists(path) and not path.startswith("/usr/"):
      # bwrap would copy the host's modes onto the directories it creates (/root is 0700), which
      # would hide the interpreter from the unprivileged uid: create them world-searchable.
      parents, parent = [], os.path.dirname(path)
      while parent not in ("/", "") and parent not in made:
        parents.insert(0, parent)
        parent = os.path.dirname(parent)
      for parent in parents:
        args += ["--perms", "0755", "--dir", parent]
      made.update(parents)
      args += ["--ro-bind", path, path]
  if os.path.isdir(os.path.join(stdlib, "site-packages")):
    args += ["--tmpfs", os.path.join(stdlib, "site-packages")]  # hide host packages
  return args


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
  return tuple([bwrap, *isolation, "--die-with-parent", "--new-session", "--hostname", "sandbox",
                *_readonly_binds(), "--proc", "/proc", "--dev", "/dev",
                "--size", str(tmp_bytes), "--perms", "1777", "--tmpfs", "/tmp", "--chdir", "/tmp",
                "--clearenv", *[a for k, v in _ENV.items() for a in ("--setenv", k, v)]])


@functools.lru_cache(maxsize=None)
def _bwrap_problem(bwrap: str) -> Optional[str]:
  """None when bwrap can build a sandbox here, else why not (checked once per path)."""
  if not os.access(bwrap, os.X_OK):
    return f"bubblewrap was not found at {bwrap!r}"
  try:
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


# ------------------------------------------------------------------------------------------
# One run.


def run(program: str, stdin: str = "", expected: Optional[str] = None,
        limits: Limits = DEFAULT_LIMITS, allow_unsandboxed: bool = False) -> RunResult:
  """Runs `program` on `stdin` in a fresh sandbox.

  expected: the stdout it should print; then exit 0 plus matching tokens is "passed", exit 0
    with other output "failed". Without it, exit 0 is "passed". A non-zero exit or a signal is
    "crashed"; running past the wall or CPU limit "timeout"; printing more than
    limits.output_bytes "output_limit".
  """
  sandboxed = check_available(allow_unsandboxed)
  uid = _free_uids.get()
  cpu_s = limits.cpu_s if limits.cpu_s is not None else max(1, math.ceil(limits.timeout_s))
  tmpdir = None
  fds = []
  try:
    source_fd = _memfd("program", program.encode())
    stdin_fd = _memfd("stdin", stdin.encode())
    fds += [source_fd, stdin_fd]
    wrapper = [PYTHON, "-I", "-S", "-c", _WRAPPER, str(uid), str(cpu_s), str(limits.memory_bytes),
               str(limits.max_processes), str(limits.file_size_bytes), str(source_fd)]
    if sandboxed:
      prefix = list(_bwrap_prefix(BWRAP_PATH, 2 * limits.file_size_bytes))
      if _SECCOMP is not None and os.geteuid() == 0:
        seccomp_r, seccomp_w = os.pipe()
        os.write(seccomp_w, _SECCOMP)
        os.close(seccomp_w)
        fds.append(seccomp_r)
        prefix += ["--seccomp", str(seccomp_r)]
      cmd, cwd = prefix + wrapper, "/"
    else:
      tmpdir = tempfile.mkdtemp(prefix="sandbox-")
      if os.geteuid() == 0:
        os.chown(tmpdir, uid, uid)
      cmd, cwd = list(_unshare_flags(UNSHARE_PATH)) + wrapper, tmpdir
    return _execute(cmd, cwd, stdin_fd, fds, expected, limits, sandboxed)
  finally:
    for fd in fds:
      os.close(fd)
    if tmpdir is not None:
      shutil.rmtree(tmpdir, ignore_errors=True)
    _free_uids.put(uid)


def _memfd(name: str, data: bytes) -> int:
  fd = os.memfd_create(name)
  os.write(fd, data)
  os.lseek(fd, 0, os.SEEK_SET)
  return fd


def _execute(cmd, cwd, stdin_fd, fds, expected, limits, sandboxed) -> RunResult:
  start = time.monotonic()
  deadline = start + limits.timeout_s
  try:
    proc = subprocess.Popen(cmd, stdin=stdin_fd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            pass_fds=[fd for fd in fds if fd != stdin_fd], cwd=cwd, env=_ENV,
                            start_new_session=True)
  except OSError as e:
    return RunResult("crashed", None, "", f"could not start the sandbox: {e}",
                     time.monotonic() - start)
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

  stdout = out.decode(errors="replace")
  stderr = err.decode(errors="replace")
  rc = proc.returncode
  if killed_for is not None:
    status, exit_code = killed_for, None
  else:
    # bwrap's init reports a signal death as 128 + signal; Popen as -signal.
    sig = -rc if rc < 0 else (rc - 128 if sandboxed and rc > 128 else 0)
    exit_code = -sig if sig else rc
    if sig in (signal.SIGXCPU, signal.SIGKILL):
      status = "timeout"  # the CPU rlimit's soft then hard signal
    elif rc != 0:
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
      program, stdin, expected = job
      return run(program, stdin, expected, self.limits, self.allow_unsandboxed)

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
  parser.add_argument("program", help="path of the Python program to run")
  parser.add_argument("--stdin", help="file whose contents are the program's stdin")
  parser.add_argument("--expected", help="file holding the expected stdout")
  parser.add_argument("--timeout", type=float, default=DEFAULT_LIMITS.timeout_s,
                      help="wall-clock limit in seconds")
  parser.add_argument("--unsafe-no-bwrap", action="store_true",
                      help="without bubblewrap, run with rlimits only (host files visible)")
  args = parser.parse_args(argv)
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
