"""The device mesh, the logical-axis -> mesh-axis rules, and placing arrays on them.

A run's devices form one `jax.sharding.Mesh` with three axes, sized by the config:
  data    pure data parallelism: each group of devices holds whole parameters;
  fsdp    batch rows *and* parameters split (ZeRO-3 style: weights are gathered per layer);
  tensor  heads, MLP width and vocabulary split (Megatron style).
Every array names its dimensions with logical axes (`embed`, `heads`, `batch`, ...; the
model's parameter leaves carry them from their definition), and `RULES` maps each logical axis
to mesh axes, as jax-llm-examples' `ShardingRules` does. A dimension that its mesh axes do not
divide (a vocabulary of 15, two KV heads over tensor=4) is replicated instead, logged once.

`Layout` is that pair (mesh, rules): frozen and hashable, so jitted code can take it as a
static argument. Multi-process runs (TPU pods, GPU clusters) start with `initialize`, which
calls `jax.distributed.initialize`; after it, the mesh spans every process's devices, host
arrays are placed with `Layout.put` (each process contributes its own shards) and read back
with `to_host`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Optional, Sequence

import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes (a name, a tuple of names, or None = replicated). Parameters use
# the model's axis names; activations, batches and KV caches add `batch`, `seq`, `cache_seq`.
RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "layers": None,
    "seq": None,
    "cache_seq": None,
}

_logged: set[str] = set()


def _log_once(message: str) -> None:
  if message not in _logged:
    _logged.add(message)
    logging.info(message)


class MeshError(ValueError):
  """A mesh shape that cannot be built from the devices at hand."""


def mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) with a single -1 replaced by what the other two leave."""
  sizes = (int(data), int(fsdp), int(tensor))
  named = f"mesh.data={sizes[0]}, mesh.fsdp={sizes[1]}, mesh.tensor={sizes[2]}"
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise MeshError(f"{named}: each must be a positive integer, and at most one may be -1 (take "
                    f"the remaining devices); there are {num_devices} devices.")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise MeshError(f"{named}: {known} does not divide the {num_devices} devices; choose sizes "
                      "whose product divides the device count.")
    sizes = tuple(num_devices // known if s == -1 else s for s in sizes)
  if math.prod(sizes) != num_devices:
    raise MeshError(f"{named}: the product {math.prod(sizes)} must equal the {num_devices} "
                    "devices; set one of them to -1 to take the remaining devices.")
  return sizes


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices: Optional[Sequence[Any]] = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: every device of every process)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(data, fsdp, tensor, len(devices))
  try:  # Topology-aware order on TPUs (and a plain reshape elsewhere).
    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.array(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


@functools.lru_cache(maxsize=None)
def default_layout() -> "Layout":
  """One device (this process's first): what code without a mesh of its own runs on."""
  return Layout(make_mesh(1, 1, 1, devices=jax.local_devices()[:1]))


def rules_from_config(overrides=None) -> tuple[tuple[str, Any], ...]:
  """RULES with config overrides ("data,fsdp" -> ("data", "fsdp"), "" -> None), as a tuple."""
  rules = dict(RULES)
  for name, value in dict(overrides or {}).items():
    if value is None or value == "":
      rules[name] = None
      continue
    axes = tuple(a.strip() for a in str(value).split(",") if a.strip())
    bad = [a for a in axes if a not in MESH_AXES]
    if bad:
      raise MeshError(f"mesh.rules.{name}={value!r}: {bad[0]!r} is not a mesh axis; use one or "
                      f"more of {', '.join(MESH_AXES)} separated by commas, or '' to replicate.")
    rules[name] = axes[0] if len(axes) == 1 else axes
  return tuple(sorted(rules.items()))


@dataclasses.dataclass(frozen=True)
class Layout:
  """A mesh plus the logical-axis rules: how every array of a run is laid out."""

  mesh: Mesh
  rules: tuple[tuple[str, Any], ...] = tuple(sorted(RULES.items()))

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  @property
  def batch_shards(self) -> int:
    """How many ways a batch dimension is split."""
    axes = dict(self.rules).get("batch") or ()
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(self.mesh.shape[a] for a in axes)

  def spec(self, logical_axes: Sequence[Optional[str]], shape: Sequence[int]) -> P:
    """The PartitionSpec of an array with these logical axes; non-dividing dims replicated."""
    rules, used, out = dict(self.rules), set(), []
    for name, dim in zip(logical_axes, shape):
      axes = rules.get(name) if name is not None else None
      axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
      axes = tuple(a for a in axes if a not in used and self.mesh.shape[a] > 1)
      size = math.prod(self.mesh.shape[a] for a in axes)
      if axes and dim % size:
        _log_once(f"Replicating a dimension of size {dim} (logical axis {name!r}): mesh axes "
                  f"{axes} of size {size} do not divide it.")
        axes = ()
      used.update(axes)
      out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)

  def sharding(self, logical_axes, shape) -> NamedSharding:
    return NamedSharding(self.mesh, self.spec(logical_axes, shape))

  def constrain(self, x: jax.Array, logical_axes) -> jax.Array:
    """Inside jit: pins x's layout (activations, caches), so XLA need not guess it."""
    return jax.lax.with_sharding_constraint(x, self.sharding(logical_axes, x.shape))

  def put(self, x, logical_axes) -> jax.Array:
    """A host array (identical on every process) as a global array sharded by logical axes."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, self.sharding(logical_axes, x.shape),
                                        lambda index: x[index])

  def put_batch(self, tree):
    """Host arrays whose first axis is the batch: rows split over the batch axes."""
    return jax.tree.map(lambda x: self.put(x, ("batch",) + (None,) * (np.ndim(x) - 1)), tree)

  def tree_shardings(self, logical_tree, shape_tree):
    """NamedShardings for a tree of arrays (or ShapeDtypeStructs) given their logical axes."""
    return jax.tree.map(lambda spec, s: self.sharding(tuple(spec), s.shape), logical_tree,
                        shape_tree, is_leaf=lambda x: isinstance(x, P))


def param_shardings(layout: Layout, model_config, per_layer: bool = False) -> Any:
  """NamedShardings of the model's parameter tree, from its leaves' logical axis names.

  per_layer: of the tree split into one tree per layer (`transformer.split_layers`).
  """
  from sqlm_jax.models import transformer
  shapes = jax.eval_shape(lambda: transformer.init_params(model_config, jax.random.key(0)))
  stacked = layout.tree_shardings(transformer.param_logical_axes(model_config), shapes)
  if not per_layer:
    return stacked
  layer = jax.tree.map(lambda s: NamedSharding(s.mesh, P(*s.spec[1:])), stacked["layers"])
  return {**stacked, "layers": (layer,) * model_config.num_layers}


def like_params(optimizer, params_shardings, state_shapes, replicated) -> Any:
  """Shardings of an optax state: each per-parameter leaf (Adam's moments) like its parameter,
  everything else (step counts) replicated."""
  import optax
  return optax.tree_utils.tree_map_params(
      optimizer, lambda _, sharding: sharding, state_shapes, params_shardings,
      transform_non_params=lambda _: replicated)


def to_host(x) -> np.ndarray:
  """A global array as one numpy array on this host (gathered across processes if needed)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def bytes_per_device(shapes, shardings) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs laid out by `shardings`."""
  total = 0
  for s, sharding in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings)):
    shard = sharding.shard_shape(s.shape)
    total += math.prod(shard) * np.dtype(s.dtype).itemsize
  return total


# ---- Several processes ------------------------------------------------------------------------


_CLUSTER_VARIABLES = ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
                      "TPU_WORKER_HOSTNAMES")


def initialize(mesh_config) -> None:
  """Joins the processes of a multi-host run with `jax.distributed.initialize`, if it is one.

  mesh.distributed: "off" (one process), "on" (always: TPU pods and clusters detected by JAX,
  or the coordinator fields), "auto" (on when mesh.coordinator is set or the environment
  shows a cluster: JAX_COORDINATOR_ADDRESS, several SLURM / Open MPI tasks, several TPU
  workers). CPU processes talk through gloo collectives.
  """
  mode = mesh_config.get("distributed", "auto")
  if mode == "off" or jax.distributed.is_initialized():
    return
  coordinator = mesh_config.get("coordinator", "")
  if mode == "auto" and not coordinator and not _cluster_in_environment():
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {}
  if coordinator:
    kwargs = dict(coordinator_address=coordinator,
                  num_processes=int(mesh_config.get("num_processes", 0)) or None,
                  process_id=(int(mesh_config.get("process_id", -1))
                              if int(mesh_config.get("process_id", -1)) >= 0 else None))
  jax.distributed.initialize(**kwargs)
  logging.info("Process %d of %d, %d local of %d devices.", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def use_compile_cache(directory: str) -> None:
  """Turns on XLA's persistent compilation cache in `directory` ("" = off), so a rerun, a
  resumed run or another sweep arm loads the programs a previous one compiled."""
  if not directory:
    return
  os.makedirs(directory, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", directory)
  # Every program: a step's dozen programs each take under a second on a tiny model but add up.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _cluster_in_environment() -> bool:
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return True
  for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    if env.get(name, "1").isdigit() and int(env.get(name, "1")) > 1:
      return True
  return "," in env.get("TPU_WORKER_HOSTNAMES", "")


def is_writer() -> bool:
  """Only process 0 writes logs, samples, dashboards and exports."""
  return jax.process_index() == 0
