"""Seccomp filters for sandboxed programs: an allowlist of the system calls CPython and its standard
library make, with socket() limited to AF_UNIX, AF_INET and AF_INET6 (AF_UNIX alone where no
cgroup bounds a run's socket buffers).

Everything else fails with ENOSYS (so libc falls back from newer calls such as clone3, as it
does on older kernels); among what is refused are the kernel keyring (add_key, keyctl,
request_key), io_uring, userfaultfd, ptrace, bpf, perf_event_open, mount, namespaces (unshare,
setns, clone with CLONE_NEW* flags), modify_ldt, netlink, packet and AF_VSOCK sockets, and what
would undo the sandbox's core-dump settings (prctl(PR_SET_DUMPABLE), changing RLIMIT_CORE) or
probe the host's page cache (mincore, cachestat, preadv2/pwritev2 with RWF_NOWAIT).
"""

from __future__ import annotations

import platform
from typing import Optional

AF_UNIX, AF_INET, AF_INET6 = 1, 2, 10
SOCKET_FAMILIES = (AF_UNIX, AF_INET, AF_INET6)

ALLOWED = tuple("""
    read write futex mmap munmap mprotect brk madvise mremap close lseek fstat newfstatat statx
    openat open readlink readlinkat getdents64 getdents ioctl fcntl rt_sigaction rt_sigprocmask
    rt_sigreturn clock_gettime clock_getres clock_nanosleep nanosleep gettimeofday time
    readv writev pread64 pwrite64 preadv pwritev close_range creat stat lstat
    access faccessat faccessat2 mkdir mkdirat rmdir unlink unlinkat rename renameat renameat2
    link linkat symlink symlinkat chmod fchmod fchmodat truncate ftruncate fsync fdatasync
    fallocate getcwd chdir fchdir dup dup2 dup3 pipe pipe2 select pselect6 poll ppoll
    epoll_create epoll_create1 epoll_ctl epoll_wait epoll_pwait epoll_pwait2 eventfd eventfd2
    utime utimes utimensat futimesat umask statfs fstatfs flock sendfile copy_file_range splice
    tee fadvise64 getxattr lgetxattr fgetxattr listxattr llistxattr flistxattr msync membarrier
    exit exit_group getpid getppid gettid getuid geteuid getgid getegid getresuid
    getresgid getgroups getpgrp getpgid getsid setsid setpgid fork vfork execve wait4 waitid
    kill tgkill tkill rt_sigpending rt_sigtimedwait rt_sigsuspend sigaltstack pause times
    getrusage getrlimit sched_yield sched_getaffinity sched_setaffinity
    sched_getparam sched_getscheduler sched_get_priority_max sched_get_priority_min getpriority
    setpriority uname sysinfo getrandom set_robust_list get_robust_list set_tid_address rseq
    arch_prctl capget getcpu alarm setitimer getitimer timer_create timer_settime
    timer_gettime timer_getoverrun timer_delete timerfd_create timerfd_settime timerfd_gettime
    signalfd signalfd4 restart_syscall pidfd_open pidfd_send_signal
    bind listen accept accept4 connect getsockname getpeername sendto recvfrom sendmsg recvmsg
    sendmmsg recvmmsg shutdown setsockopt getsockopt
""".split())
# Memory a run holds outside its address space. Allowed only where the run's memory cgroup
# counts it; otherwise refused, so the per-process RLIMIT_AS bounds what a run can hold.
SHARED_MEMORY = ("shmget", "shmat", "shmdt", "shmctl", "memfd_create")
# Refused with EPERM rather than ENOSYS: what a program may try on purpose.
REFUSED = ("unshare", "keyctl", "add_key", "request_key")

# machine: (AUDIT_ARCH, first x32 syscall number or None)
_ARCH = {"x86_64": (0xC000003E, 0x40000000), "aarch64": (0xC00000B7, None)}
# Syscall numbers from the kernel headers (asm/unistd_64.h, asm-generic/unistd.h); a name
# missing on an architecture (aarch64 has no open, fork, poll ...) does not exist there.
NUMBERS = {
    "x86_64": {
        "read": 0, "write": 1, "readv": 19, "writev": 20, "pread64": 17, "pwrite64": 18,
        "preadv": 295, "pwritev": 296, "preadv2": 327, "pwritev2": 328, "open": 2, "openat":
        257, "close": 3, "close_range": 436, "creat": 85, "lseek": 8, "stat": 4, "fstat": 5,
        "lstat": 6, "newfstatat": 262, "statx": 332, "access": 21, "faccessat": 269,
        "faccessat2": 439, "getdents": 78, "getdents64": 217, "readlink": 89, "readlinkat": 267,
        "mkdir": 83, "mkdirat": 258, "rmdir": 84, "unlink": 87, "unlinkat": 263, "rename": 82,
        "renameat": 264, "renameat2": 316, "link": 86, "linkat": 265, "symlink": 88,
        "symlinkat": 266, "chmod": 90, "fchmod": 91, "fchmodat": 268, "truncate": 76,
        "ftruncate": 77, "fsync": 74, "fdatasync": 75, "fallocate": 285, "getcwd": 79, "chdir":
        80, "fchdir": 81, "dup": 32, "dup2": 33, "dup3": 292, "fcntl": 72, "ioctl": 16, "pipe":
        22, "pipe2": 293, "select": 23, "pselect6": 270, "poll": 7, "ppoll": 271,
        "epoll_create": 213, "epoll_create1": 291, "epoll_ctl": 233, "epoll_wait": 232,
        "epoll_pwait": 281, "epoll_pwait2": 441, "eventfd": 284, "eventfd2": 290, "utime": 132,
        "utimes": 235, "utimensat": 280, "futimesat": 261, "umask": 95, "statfs": 137,
        "fstatfs": 138, "flock": 73, "sendfile": 40, "copy_file_range": 326, "splice": 275,
        "tee": 276, "fadvise64": 221, "getxattr": 191, "lgetxattr": 192, "fgetxattr": 193,
        "listxattr": 194, "llistxattr": 195, "flistxattr": 196, "mmap": 9, "munmap": 11,
        "mprotect": 10, "mremap": 25, "brk": 12, "madvise": 28, "msync": 26, "mincore": 27,
        "membarrier": 324, "exit": 60, "exit_group": 231, "getpid": 39, "getppid": 110,
        "gettid": 186, "getuid": 102, "geteuid": 107, "getgid": 104, "getegid": 108,
        "getresuid": 118, "getresgid": 120, "getgroups": 115, "getpgrp": 111, "getpgid": 121,
        "getsid": 124, "setsid": 112, "setpgid": 109, "clone": 56, "fork": 57, "vfork": 58,
        "execve": 59, "wait4": 61, "waitid": 247, "kill": 62, "tgkill": 234, "tkill": 200,
        "rt_sigaction": 13, "rt_sigprocmask": 14, "rt_sigreturn": 15, "rt_sigpending": 127,
        "rt_sigtimedwait": 128, "rt_sigsuspend": 130, "sigaltstack": 131, "pause": 34,
        "nanosleep": 35, "clock_nanosleep": 230, "clock_gettime": 228, "clock_getres": 229,
        "gettimeofday": 96, "time": 201, "times": 100, "getrusage": 98, "getrlimit": 97,
        "setrlimit": 160, "prlimit64": 302, "sched_yield": 24, "sched_getaffinity": 204,
        "sched_setaffinity": 203, "sched_getparam": 143, "sched_getscheduler": 145,
        "sched_get_priority_max": 146, "sched_get_priority_min": 147, "getpriority": 140,
        "setpriority": 141, "uname": 63, "sysinfo": 99, "getrandom": 318, "futex": 202,
        "set_robust_list": 273, "get_robust_list": 274, "set_tid_address": 218, "rseq": 334,
        "arch_prctl": 158, "prctl": 157, "capget": 125, "getcpu": 309, "alarm": 37, "setitimer":
        38, "getitimer": 36, "timer_create": 222, "timer_settime": 223, "timer_gettime": 224,
        "timer_getoverrun": 225, "timer_delete": 226, "timerfd_create": 283, "timerfd_settime":
        286, "timerfd_gettime": 287, "signalfd": 282, "signalfd4": 289, "restart_syscall": 219,
        "pidfd_open": 434, "pidfd_send_signal": 424, "socket": 41, "socketpair": 53, "bind": 49,
        "listen": 50, "accept": 43, "accept4": 288, "connect": 42, "getsockname": 51,
        "getpeername": 52, "sendto": 44, "recvfrom": 45, "sendmsg": 46, "recvmsg": 47,
        "sendmmsg": 307, "recvmmsg": 299, "shutdown": 48, "setsockopt": 54, "getsockopt": 55,
        "shmget": 29, "shmat": 30, "shmdt": 67, "shmctl": 31, "memfd_create": 319, "unshare":
        272, "clone3": 435, "keyctl": 250, "add_key": 248, "request_key": 249, "io_uring_setup":
        425, "userfaultfd": 323, "modify_ldt": 154
    },
    "aarch64": {
        "read": 63, "write": 64, "readv": 65, "writev": 66, "pread64": 67, "pwrite64": 68,
        "preadv": 69, "pwritev": 70, "preadv2": 286, "pwritev2": 287, "openat": 56, "close": 57,
        "close_range": 436, "lseek": 62, "fstat": 80, "newfstatat": 79, "statx": 291,
        "faccessat": 48, "faccessat2": 439, "getdents64": 61, "readlinkat": 78, "mkdirat": 34,
        "unlinkat": 35, "renameat": 38, "renameat2": 276, "linkat": 37, "symlinkat": 36,
        "fchmod": 52, "fchmodat": 53, "truncate": 45, "ftruncate": 46, "fsync": 82, "fdatasync":
        83, "fallocate": 47, "getcwd": 17, "chdir": 49, "fchdir": 50, "dup": 23, "dup3": 24,
        "fcntl": 25, "ioctl": 29, "pipe2": 59, "pselect6": 72, "ppoll": 73, "epoll_create1": 20,
        "epoll_ctl": 21, "epoll_pwait": 22, "epoll_pwait2": 441, "eventfd2": 19, "utimensat":
        88, "umask": 166, "statfs": 43, "fstatfs": 44, "flock": 32, "sendfile": 71,
        "copy_file_range": 285, "splice": 76, "tee": 77, "fadvise64": 223, "getxattr": 8,
        "lgetxattr": 9, "fgetxattr": 10, "listxattr": 11, "llistxattr": 12, "flistxattr": 13,
        "mmap": 222, "munmap": 215, "mprotect": 226, "mremap": 216, "brk": 214, "madvise": 233,
        "msync": 227, "mincore": 232, "membarrier": 283, "exit": 93, "exit_group": 94, "getpid":
        172, "getppid": 173, "gettid": 178, "getuid": 174, "geteuid": 175, "getgid": 176,
        "getegid": 177, "getresuid": 148, "getresgid": 150, "getgroups": 158, "getpgid": 155,
        "getsid": 156, "setsid": 157, "setpgid": 154, "clone": 220, "execve": 221, "wait4": 260,
        "waitid": 95, "kill": 129, "tgkill": 131, "tkill": 130, "rt_sigaction": 134,
        "rt_sigprocmask": 135, "rt_sigreturn": 139, "rt_sigpending": 136, "rt_sigtimedwait":
        137, "rt_sigsuspend": 133, "sigaltstack": 132, "nanosleep": 101, "clock_nanosleep": 115,
        "clock_gettime": 113, "clock_getres": 114, "gettimeofday": 169, "times": 153,
        "getrusage": 165, "getrlimit": 163, "setrlimit": 164, "prlimit64": 261, "sched_yield":
        124, "sched_getaffinity": 123, "sched_setaffinity": 122, "sched_getparam": 121,
        "sched_getscheduler": 120, "sched_get_priority_max": 125, "sched_get_priority_min": 126,
        "getpriority": 141, "setpriority": 140, "uname": 160, "sysinfo": 179, "getrandom": 278,
        "futex": 98, "set_robust_list": 99, "get_robust_list": 100, "set_tid_address": 96,
        "rseq": 293, "prctl": 167, "capget": 90, "getcpu": 168, "setitimer": 103, "getitimer":
        102, "timer_create": 107, "timer_settime": 110, "timer_gettime": 108,
        "timer_getoverrun": 109, "timer_delete": 111, "timerfd_create": 85, "timerfd_settime":
        86, "timerfd_gettime": 87, "signalfd4": 74, "restart_syscall": 128, "pidfd_open": 434,
        "pidfd_send_signal": 424, "socket": 198, "socketpair": 199, "bind": 200, "listen": 201,
        "accept": 202, "accept4": 242, "connect": 203, "getsockname": 204, "getpeername": 205,
        "sendto": 206, "recvfrom": 207, "sendmsg": 211, "recvmsg": 212, "sendmmsg": 269,
        "recvmmsg": 243, "shutdown": 210, "setsockopt": 208, "getsockopt": 209, "shmget": 194,
        "shmat": 196, "shmdt": 197, "shmctl": 195, "memfd_create": 279, "unshare": 97, "clone3":
        435, "keyctl": 219, "add_key": 217, "request_key": 218, "io_uring_setup": 425,
        "userfaultfd": 282
    },
}
# CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET (clone() cannot ask for
# CLONE_NEWTIME: that bit belongs to its exit-signal byte).
_CLONE_NEW_NAMESPACES = 0x7E020000

PR_SET_DUMPABLE, RLIMIT_CORE, RWF_NOWAIT = 4, 4, 0x8  # the same on x86_64 and aarch64

_LD, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
_ALLOW = 0x7FFF0000
_ERRNO = 0x00050000
_EPERM, _ENOSYS, _EOPNOTSUPP, _EAFNOSUPPORT = 1, 38, 95, 97
_NR, _ARCH_OFFSET = 0, 4  # offsets in struct seccomp_data


def _arg(i: int, high: bool = False) -> int:
  """Offset of the low (or high) 32 bits of args[i] in struct seccomp_data (little-endian)."""
  return 16 + 8 * i + 4 * high


def supported(machine: Optional[str] = None) -> bool:
  return (machine or platform.machine()) in _ARCH


def program(shared_memory: bool, inet_sockets: bool = True,
            machine: Optional[str] = None) -> bytes:
  """Classic BPF (struct sock_filter[]) for seccomp; raises on an architecture without tables.

  shared_memory: allow SysV shared memory and memfd_create (only where a memory cgroup
    counts them).
  inet_sockets: allow AF_INET and AF_INET6 sockets (only where a cgroup bounds the memory their
    buffers hold; the network namespace has no route out either way).
  """
  machine = machine or platform.machine()
  if machine not in _ARCH:
    raise ValueError(f"no seccomp tables for machine {machine!r}; known: {sorted(_ARCH)}")
  arch, x32 = _ARCH[machine]
  nr = NUMBERS[machine]
  insns = [(_LD, 0, 0, _ARCH_OFFSET), (_JEQ, 1, 0, arch), (_RET, 0, 0, _ERRNO | _ENOSYS),
           (_LD, 0, 0, _NR)]
  if x32 is not None:  # the x32 ABI shares the arch value: refuse its syscall numbers
    insns += [(_JGE, 0, 1, x32), (_RET, 0, 0, _ERRNO | _ENOSYS)]
  # socket(family, ...): only local and (where allowed) IP families (no netlink, packet,
  # AF_VSOCK ...).
  if inet_sockets:
    insns += [(_JEQ, 0, 6, nr["socket"]), (_LD, 0, 0, _arg(0)),
              (_JEQ, 2, 0, AF_UNIX), (_JEQ, 1, 0, AF_INET), (_JEQ, 0, 1, AF_INET6),
              (_RET, 0, 0, _ALLOW), (_RET, 0, 0, _ERRNO | _EAFNOSUPPORT)]
  else:
    insns += [(_JEQ, 0, 4, nr["socket"]), (_LD, 0, 0, _arg(0)), (_JEQ, 0, 1, AF_UNIX),
              (_RET, 0, 0, _ALLOW), (_RET, 0, 0, _ERRNO | _EAFNOSUPPORT)]
  insns += [(_JEQ, 0, 4, nr["socketpair"]), (_LD, 0, 0, _arg(0)), (_JEQ, 0, 1, AF_UNIX),
            (_RET, 0, 0, _ALLOW), (_RET, 0, 0, _ERRNO | _EAFNOSUPPORT)]
  # clone(flags, ...): threads and processes, but no new namespaces.
  insns += [(_JEQ, 0, 4, nr["clone"]), (_LD, 0, 0, _arg(0)), (_JSET, 0, 1, _CLONE_NEW_NAMESPACES),
            (_RET, 0, 0, _ERRNO | _EPERM), (_RET, 0, 0, _ALLOW)]
  # The sandbox runs programs non-dumpable with RLIMIT_CORE at 1 byte (no core file, no
  # core_pattern helper): neither may change. Reading limits stays (getrlimit is prlimit64 with
  # no new limit).
  insns += [(_JEQ, 0, 4, nr["prctl"]), (_LD, 0, 0, _arg(0)), (_JEQ, 0, 1, PR_SET_DUMPABLE),
            (_RET, 0, 0, _ERRNO | _EPERM), (_RET, 0, 0, _ALLOW)]
  if "setrlimit" in nr:
    insns += [(_JEQ, 0, 4, nr["setrlimit"]), (_LD, 0, 0, _arg(0)), (_JEQ, 0, 1, RLIMIT_CORE),
              (_RET, 0, 0, _ERRNO | _EPERM), (_RET, 0, 0, _ALLOW)]
  # prlimit64(pid, resource, new_limit, old_limit): refused for RLIMIT_CORE with a new limit.
  insns += [(_JEQ, 0, 8, nr["prlimit64"]), (_LD, 0, 0, _arg(1)), (_JEQ, 0, 5, RLIMIT_CORE),
            (_LD, 0, 0, _arg(2)), (_JEQ, 0, 2, 0), (_LD, 0, 0, _arg(2, high=True)),
            (_JEQ, 1, 0, 0), (_RET, 0, 0, _ERRNO | _EPERM), (_RET, 0, 0, _ALLOW)]
  # preadv2/pwritev2(fd, iov, iovcnt, pos_l, pos_h, flags): RWF_NOWAIT would tell whether a host
  # file's pages are cached.
  for name in ("preadv2", "pwritev2"):
    insns += [(_JEQ, 0, 4, nr[name]), (_LD, 0, 0, _arg(5)), (_JSET, 0, 1, RWF_NOWAIT),
              (_RET, 0, 0, _ERRNO | _EOPNOTSUPP), (_RET, 0, 0, _ALLOW)]
  for name in REFUSED:
    insns += [(_JEQ, 0, 1, nr[name]), (_RET, 0, 0, _ERRNO | _EPERM)]
  allowed = ALLOWED + (SHARED_MEMORY if shared_memory else ())
  for name in allowed:
    if name in nr:
      insns += [(_JEQ, 0, 1, nr[name]), (_RET, 0, 0, _ALLOW)]
  insns.append((_RET, 0, 0, _ERRNO | _ENOSYS))
  return b"".join(code.to_bytes(2, "little") + bytes([jt, jf]) + k.to_bytes(4, "little")
                  for code, jt, jf, k in insns)
