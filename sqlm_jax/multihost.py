"""What the processes of a multi-process run must agree on, decided once and shared.

Every process runs the same loop (selfplay.train) and must take the same branches and build
the same batches, or their collectives stop matching. So:
  - process 0 decides what the control flow depends on (resume or start, which step, whether a
    config change is refused) and `from_process_0` hands its answer, or its error, to all;
  - a stop signal seen by any process stops all of them at the same step (`any_process`);
  - host-side results that shape a batch (parsed proposals, extracted answers, rewards, sandbox
    results) are computed on process 0 and broadcast (`from_process_0`);
  - the workdir must be storage that every process sees (a shared mount or gs://): checked at
    start with a marker that process 0 writes and every process reads (`check_shared_workdir`).
With one process every function here is the identity (or a plain call).
"""

from __future__ import annotations

import pickle
import uuid
from typing import Any, Callable

import jax
import numpy as np
from etils import epath

# Written by process 0 into the workdir at every start; every process must read it back.
MARKER = ".sqlm_jax_shared_workdir"


class WorkdirError(ValueError):
  """A workdir that the processes of a run do not share; the message names it."""


def is_multiprocess() -> bool:
  return jax.process_count() > 1


def from_process_0(value: Any) -> Any:
  """Process 0's `value` (any picklable object) on every process; every process must call it at
  the same point (the others' `value` is ignored). The bytes are padded to a power of two so
  that a few broadcast programs serve a whole run."""
  if not is_multiprocess():
    return value
  from jax.experimental import multihost_utils
  payload = pickle.dumps(value) if jax.process_index() == 0 else b""
  size = int(multihost_utils.broadcast_one_to_all(np.int32(len(payload))))
  buffer = np.zeros(max(64, 1 << (size - 1).bit_length()), np.uint8)
  buffer[:len(payload)] = np.frombuffer(payload, np.uint8)
  buffer = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
  return value if jax.process_index() == 0 else pickle.loads(buffer[:size].tobytes())


def on_process_0(fn: Callable[..., Any], *args) -> Any:
  """fn(*args) run on process 0 alone (it must use no collective); its result on every
  process, or its exception raised on every process, so that a refusal stops all of them with
  one message. For decisions (resume, refusals) and for host work that shapes a batch."""
  if not is_multiprocess():
    return fn(*args)
  outcome = None
  if jax.process_index() == 0:
    try:
      outcome = ("value", fn(*args))
    except Exception as error:  # noqa: BLE001 - any refusal is handed to every process
      try:
        pickle.dumps(error)
      except Exception:  # noqa: BLE001
        error = RuntimeError(f"{type(error).__name__}: {error}")
      outcome = ("error", error)
  kind, value = from_process_0(outcome)
  if kind == "error":
    raise value
  return value


def flags(flag: bool) -> np.ndarray:
  """Every process's flag, indexed by process."""
  if not is_multiprocess():
    return np.array([bool(flag)])
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(np.array(bool(flag)))).reshape(-1)


def any_process(flag: bool) -> bool:
  """True when any process's flag is (a stop signal stops every process at the same step)."""
  return bool(flags(flag).any())


def barrier(name: str) -> None:
  if is_multiprocess():
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def check_shared_workdir(workdir: str) -> None:
  """Refuses, on every process, a workdir that some process cannot see (a local disk per host).

  Process 0 writes a fresh token into WORKDIR/.sqlm_jax_shared_workdir; each process reads it
  back. One round of collectives, so a bad workdir ends the run at start with one message
  instead of processes resuming from different checkpoints and never meeting again.
  """
  if not is_multiprocess():
    return
  path = epath.Path(workdir) / MARKER
  token = None
  if jax.process_index() == 0:
    token = uuid.uuid4().hex
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(token)
  token = from_process_0(token)  # Also the barrier: the marker is written before anyone reads.
  try:
    seen = path.read_text().strip() == token
  except OSError:
    seen = False
  missing = [i for i, ok in enumerate(flags(seen)) if not ok]
  if missing:
    raise WorkdirError(
        f"--workdir={workdir} is not shared by the run's {jax.process_count()} processes: "
        f"process{'es' if len(missing) > 1 else ''} {', '.join(map(str, missing))} cannot read "
        f"the marker {path} that process 0 wrote there. A multi-process run needs one workdir "
        "that every process sees: a gs:// path or a shared mount (NFS, Filestore), passed "
        "identically to every process.")
