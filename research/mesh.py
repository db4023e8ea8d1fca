"""Named device meshes: the same code on one CPU, 8 fake CPU devices, a GPU/TPU host or several hosts.

Training meshes have up to three named axes, MaxText's: ``data`` (replicas of the parameters, the batch split over
them), ``fsdp`` (the batch split over it too, and parameters and optimizer state sharded over it, ZeRO-3 style) and
``tensor`` (weights split along their heads / MLP width). ``--mesh data=2,fsdp=4`` names the axes' sizes, whose
product is the device count (``-1`` takes what is left); axes not named have size 1. A mesh spans every device of
every process (``jax.devices()``), so a multi-host run only adds ``jax.distributed.initialize()``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both


def parse_mesh(spec: str) -> dict[str, int]:
  """``"data=2,fsdp=4"`` -> {"data": 2, "fsdp": 4}; sizes are positive or -1 (the rest), names from MESH_AXES.

  Raises ``ValueError`` with a one-line message."""
  sizes: dict[str, int] = {}
  for item in (s.strip() for s in spec.split(",")):
    name, eq, size = item.partition("=")
    if not eq or name not in MESH_AXES:
      raise ValueError(f"must look like data=2,fsdp=4 with axes among {', '.join(MESH_AXES)} (got {spec!r})")
    if name in sizes:
      raise ValueError(f"names axis {name!r} twice (got {spec!r})")
    try:
      sizes[name] = int(size)
    except ValueError:
      raise ValueError(f"axis {name} needs an integer size (got {size!r})") from None
    if sizes[name] < 1 and sizes[name] != -1:
      raise ValueError(f"axis {name} needs a positive size or -1 (got {sizes[name]})")
  if list(sizes.values()).count(-1) > 1:
    raise ValueError(f"only one axis may take the remaining devices with -1 (got {spec!r})")
  return sizes


def mesh_shape(spec: str, num_devices: int) -> dict[str, int]:
  """Every axis of MESH_AXES with its size for ``num_devices`` devices; ``ValueError`` if the product differs."""
  sizes = parse_mesh(spec)
  known = math.prod(s for s in sizes.values() if s != -1)
  if -1 in sizes.values():
    if num_devices % known:
      raise ValueError(f"--mesh {spec}: the named sizes ({known}) do not divide the {num_devices} devices")
    sizes = {k: (num_devices // known if v == -1 else v) for k, v in sizes.items()}
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(f"--mesh {spec}: the axis sizes multiply to {math.prod(sizes.values())}, but there are "
                     f"{num_devices} devices")
  return {axis: sizes.get(axis, 1) for axis in MESH_AXES}


def named_mesh(spec: str = "data=-1", devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over ``devices`` (default: every device of every process) shaped by ``spec``."""
  devices = list(devices) if devices is not None else jax.devices()
  shape = mesh_shape(spec, len(devices))
  return Mesh(np.asarray(devices).reshape(tuple(shape.values())), tuple(shape))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array."""
  return NamedSharding(mesh, P())


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """The mesh axes a batch dimension is split over (``data`` and ``fsdp`` where present)."""
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_sharded(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
  """Split dimension ``batch_axis`` of the array across the mesh's batch axes."""
  return NamedSharding(mesh, P(*([None] * batch_axis), batch_axes(mesh)))


def put_global(array: np.ndarray | jax.Array, sharding: jax.sharding.Sharding) -> jax.Array:
  """A global array from a host value every process holds in full; each process places only its own shards (works
  across hosts, where ``jax.device_put`` of a host value onto a global sharding does not)."""
  host = np.asarray(jax.device_get(array))
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
