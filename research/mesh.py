"""Device meshes for data-parallel training: the same code on one CPU, 8 fake CPU devices, or a GPU/TPU host."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def data_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over ``devices`` (default: every device of every process) named ``"data"``."""
  return Mesh(np.asarray(devices if devices is not None else jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array (parameters, optimizer state)."""
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
  """Split dimension ``batch_axis`` of the array across the data axis."""
  return NamedSharding(mesh, P(*([None] * batch_axis), DATA_AXIS))
