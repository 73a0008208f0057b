"""The sandbox's isolation: bubblewrap's command line (read-only binds of the interpreter and the
libraries it loads, host files shown in their place, /proc and /dev), the weak mode's `unshare`,
and what this machine gives (check_available, describe)."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from typing import Optional, Sequence

from sqlm_jax.sandbox import seccomp, uids
from sqlm_jax.sandbox.cgroups import _cgroup_parents, _has_cpu_quota, _socket_memory, cgroup_mode

BWRAP_PATH = shutil.which("bwrap") or "/usr/bin/bwrap"
UNSHARE_PATH = shutil.which("unshare") or "/usr/bin/unshare"
# The interpreter the programs run under: this one, resolved out of any virtualenv; started with
# -I -S it ignores PYTHON* variables, the user site and site-packages.
PYTHON = os.path.realpath(sys.executable)

_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp"}


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
          "uids": f"{uids.UID_RANGE[0]}-{uids.UID_RANGE[1] - 1}, blocks of {uids.UID_BLOCK}"
                  if os.geteuid() == 0 else f"the launcher's ({os.geteuid()})"}
