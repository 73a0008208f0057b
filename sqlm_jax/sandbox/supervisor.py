"""The sandbox's pid 1: the Python source the sandboxed interpreter runs first (`python -c`)."""

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
