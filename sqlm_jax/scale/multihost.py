"""What the processes of a multi-process run must agree on, decided once and shared.

Every process runs the same loop (selfplay.train) and must take the same branches and build
the same batches, or their collectives stop matching. So:
  - process 0 decides what the control flow depends on (resume or start, which step, whether a
    config change is refused) and `from_process_0` hands its answer, or its error, to all;
  - a stop signal seen by any process stops all of them at the same step (`any_process`);
  - host-side results that shape a batch (parsed proposals, extracted answers, rewards, sandbox
    results) are computed on process 0 and broadcast (`from_process_0`);
  - the workdir must be storage that every process sees (a shared mount): checked at
    start with a marker that process 0 writes and every process reads (`check_shared_workdir`);
  - every process runs the same code and packages (`check_same_software`): another tokenizer or
    parser version on one worker would change its shapes and hang its collectives.
With one process every function here is the identity (or a plain call).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import pickle
import uuid
from typing import Any, Callable

import jax
import numpy as np
from etils import epath

# Written by process 0 into the workdir at every start; every process must read it back.
MARKER = ".sqlm_jax_shared_workdir"


class MultihostError(ValueError):
  """Processes that cannot run together (a workdir they do not share, different software);
  the message names what differs."""


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
  Read and written through etils.epath, as the checkpoints are, so gs:// paths work alike.

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
  # Also the barrier: the marker is written before anyone reads it.
  token, first_workdir = from_process_0((token, workdir))
  try:
    seen = path.read_text().strip() == token
  except OSError:
    seen = False
  missing = [i for i, ok in enumerate(flags(seen)) if not ok]
  if missing:
    given = "" if workdir == first_workdir else f" (this process, {jax.process_index()}, was " \
        f"given --workdir={workdir})"
    raise MultihostError(
        f"--workdir={first_workdir} is not shared by the run's {jax.process_count()} processes"
        f"{given}: process{'es' if len(missing) > 1 else ''} {', '.join(map(str, missing))} "
        f"cannot read the marker {MARKER} that process 0 wrote there. A multi-process run "
        "needs one workdir that every process sees at the same path: a shared mount (NFS, "
        "Filestore, a GCS bucket mounted with gcsfuse), passed identically to every process.")


# Packages whose version changes what a process computes or how it talks to the others.
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "transformers",
            "tokenizers", "ml_collections")


def software() -> dict[str, str]:
  """This process's package versions and a digest of sqlm_jax's own source files."""
  versions = {}
  for name in PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = "not installed"
  digest = hashlib.sha256()
  root = os.path.dirname(os.path.abspath(__file__))
  for folder, dirs, files in sorted(os.walk(root)):
    dirs.sort()
    for name in sorted(f for f in files if f.endswith(".py")):
      path = os.path.join(folder, name)
      digest.update(os.path.relpath(path, root).encode() + open(path, "rb").read())
  versions["sqlm_jax source"] = digest.hexdigest()[:12]
  return versions


def check_same_software() -> None:
  """Refuses, on every process, a run whose processes differ in code or package versions."""
  if not is_multiprocess():
    return
  mine, first = software(), from_process_0(software())
  differ = [f"{name} {mine[name]} (process 0: {first.get(name)})" for name in mine
            if mine[name] != first.get(name)]
  bad = [i for i, ok in enumerate(flags(not differ)) if not ok]
  if bad:
    here = f"; here (process {jax.process_index()}): {', '.join(differ)}" if differ else ""
    raise MultihostError(
        f"The run's processes do not run the same software: "
        f"{'processes' if len(bad) > 1 else 'process'} {', '.join(map(str, bad))} "
        f"{'differ' if len(bad) > 1 else 'differs'} from process 0"
        f"{here}. Install every worker from one commit or wheel (launch/tpu_pod.sh copies one "
        "checkout to all workers).")
