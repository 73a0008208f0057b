"""Per-run uids: a block of ids no account, subordinate range or directory service uses."""

from __future__ import annotations

import collections
import fcntl
import grp
import os
import pwd
import tempfile
import threading

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
                       "Set sqlm_jax.sandbox.uids.UID_RANGE to a range no account or service uses.")

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
