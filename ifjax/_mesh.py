"""Device meshes for training, and host data placed on them (one process or many).

Shared by :mod:`ifjax.train` (which re-exports these names); see its docstring.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ifjax._errors import IfjaxError


class TrainingError(IfjaxError, ValueError):
  """Bad input to the training functions: empty data, a batch or mesh that does not fit, ..."""


def shardings(mesh: Mesh, data_axis: str = "data", model_axis: str | None = None):
  """``(state sharding, batch sharding)`` of :func:`make_step` on ``mesh``."""
  missing = [a for a in (data_axis, model_axis) if a is not None and a not in mesh.axis_names]
  if missing:
    raise TrainingError(f"the mesh has axes {mesh.axis_names}, not {missing}")
  if model_axis is None:
    return NamedSharding(mesh, P()), NamedSharding(mesh, P(data_axis))
  return NamedSharding(mesh, P(model_axis)), NamedSharding(mesh, P(model_axis, data_axis))


def _check_batch(images, labels, mesh: Mesh, data_axis: str, model_axis: str | None):
  lead = 2 if model_axis else 1
  if np.shape(images)[:lead] != np.shape(labels)[:lead]:
    raise TrainingError(f"images {np.shape(images)} and labels {np.shape(labels)} disagree on the batch axes")
  batch = np.shape(images)[lead - 1]
  if batch % mesh.shape[data_axis]:
    raise TrainingError(f"a batch of {batch} cannot be split evenly over mesh axis {data_axis!r} of size "
                        f"{mesh.shape[data_axis]}")
  if model_axis and np.shape(images)[0] % mesh.shape[model_axis]:
    raise TrainingError(f"{np.shape(images)[0]} models cannot be split over mesh axis {model_axis!r} of size "
                        f"{mesh.shape[model_axis]}")


def make_mesh(shape: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
  """A mesh ``{axis: size}`` over ``devices`` (default ``jax.devices()``, all processes), checked to fit.

  >>> dict(make_mesh({"data": 1}).shape)
  {'data': 1}
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = list(shape.values())
  if not sizes or any(not isinstance(s, int) or s < 1 for s in sizes):
    raise TrainingError(f"mesh axis sizes must be positive ints, got {dict(shape)}")
  need = math.prod(sizes)
  if need != len(devices):
    hint = (" (on CPU, simulate more with XLA_FLAGS=--xla_force_host_platform_device_count=N set before jax is "
            "imported)") if need > len(devices) else ""
    raise TrainingError(f"a mesh of shape {dict(shape)} needs {need} devices, but {len(devices)} are given{hint}")
  return Mesh(np.asarray(devices, dtype=object).reshape(sizes), tuple(shape))


def shard(tree: Any, sharding: NamedSharding | None) -> Any:
  """Host arrays -> global arrays with ``sharding``. Every process passes the same global values and
  keeps only the shards its own devices hold, so the same call works on one host and many."""
  if sharding is None:
    return jax.tree_util.tree_map(jnp.asarray, tree)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def one(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree_util.tree_map(one, tree)
