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
- a seccomp allowlist (`seccomp.py`): what CPython and its standard library use, with
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

Modules, by layer: limits (Limits, RunResult), uids (per-run uids), cgroups (per-run cgroups),
seccomp (the allowlist), isolation (bubblewrap's command line, check_available, describe),
supervisor (the sandbox's pid 1), launch (one run), pool (SandboxPool), cli (`python -m`). The
names below are re-exported. The settings are not, so that setting one cannot silently miss:
change them in the module that reads them (sqlm_jax.sandbox.isolation.BWRAP_PATH and
UNSHARE_PATH, sqlm_jax.sandbox.uids.UID_RANGE and UID_BLOCK).
"""

from sqlm_jax.sandbox.cgroups import cgroup_mode
from sqlm_jax.sandbox.cli import main
from sqlm_jax.sandbox.isolation import PYTHON, check_available, describe
from sqlm_jax.sandbox.launch import run
from sqlm_jax.sandbox.limits import (DEFAULT_LIMITS, STATUSES, Job, Limits, RunResult,
                                     outputs_match)
from sqlm_jax.sandbox.pool import SandboxPool
from sqlm_jax.sandbox.uids import uid_range_conflicts

__all__ = ["DEFAULT_LIMITS", "Job", "Limits", "PYTHON", "RunResult", "STATUSES", "SandboxPool",
           "cgroup_mode", "check_available", "describe", "main", "outputs_match", "run",
           "uid_range_conflicts"]
