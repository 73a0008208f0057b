"""One run: its cgroups, uids and seccomp filter, the sandbox's command line, and reading its
output and the supervisor's report under the wall-clock and output limits."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import selectors
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Optional

from sqlm_jax.sandbox import isolation, seccomp
from sqlm_jax.sandbox.cgroups import (_cgroup_parents, _make_run_cgroups, _oom_kills,
                                      _remove_run_cgroups, _socket_memory)
from sqlm_jax.sandbox.isolation import (PYTHON, _ENV, _bwrap_prefix, _ensure_host_files,
                                        _unshare_flags, check_available)
from sqlm_jax.sandbox.limits import _KEEP_CHARS, DEFAULT_LIMITS, Limits, RunResult, outputs_match
from sqlm_jax.sandbox.supervisor import _WRAPPER
from sqlm_jax.sandbox.uids import _uids

# isolation.BWRAP_PATH and UNSHARE_PATH are read through their module, so that a path set there
# reaches run() as well as check_available().


# The seccomp program a run installs, built once per choice.
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
                       "sqlm_jax.sandbox.seccomp has tables for x86_64 and aarch64.")
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
      prefix = _bwrap_prefix(isolation.BWRAP_PATH, 2 * limits.file_size_bytes)
      cmd, cwd = list(prefix) + wrapper, "/"
    else:
      tmpdir = tempfile.mkdtemp(prefix="sandbox-")
      if os.geteuid() == 0:
        os.chown(tmpdir, uid, uid)
      if peer is not None:
        os.chmod(tmpdir, 0o1777)
      cmd, cwd = list(_unshare_flags(isolation.UNSHARE_PATH)) + wrapper, tmpdir
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
