"""Device mesh from the config and parameter shardings from logical axis names.

Parameters carry logical names (``embed``, ``mlp``, ``heads``, ``layers``, ...); a small rules
table in the config maps them to mesh axes (e.g. ``embed -> fsdp``). Batches are split over
``data`` x ``fsdp``.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx, traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp")
BATCH = ("data", "fsdp")


def make_mesh(num_devices: int = 0, data: int = -1, fsdp: int = 1) -> Mesh:
  """``num_devices`` 0 uses every device; one of ``data``/``fsdp`` may be -1 (the rest)."""
  devices = jax.devices()
  n = num_devices or len(devices)
  if n > len(devices):
    raise ValueError(f"mesh.num_devices={n} but only {len(devices)} devices are visible.")
  sizes = [data, fsdp]
  if sizes.count(-1) > 1:
    raise ValueError("only one of mesh.data / mesh.fsdp may be -1.")
  known = math.prod(s for s in sizes if s != -1)
  if known <= 0 or n % known:
    raise ValueError(f"mesh data={data} x fsdp={fsdp} does not divide {n} devices "
                     f"({n} % {known} = {n % max(known, 1)}); pick sizes whose product is {n}.")
  sizes = [n // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != n:
    raise ValueError(f"mesh data={sizes[0]} x fsdp={sizes[1]} = {math.prod(sizes)} devices, but "
                     f"{n} are in use; set mesh.num_devices={math.prod(sizes)} or change the sizes.")
  return Mesh(np.array(devices[:n]).reshape(sizes), AXES)


def param_shardings(abstract_state: nnx.State, mesh: Mesh, rules) -> dict:
  """A pure dict of NamedShardings for an NNX state, refusing dims the mesh axis does not divide."""
  rules = dict(rules)

  def one(path, var):
    names = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
    axes = tuple(rules.get(n) for n in names)
    for dim, axis, name in zip(var.shape, axes, names):
      if axis is not None and dim % mesh.shape[axis]:
        raise ValueError(f"parameter {'/'.join(map(str, path))} has {name}={dim}, not divisible "
                         f"by mesh axis {axis}={mesh.shape[axis]}; change the mesh or the rule "
                         f"for {name!r}.")
    return NamedSharding(mesh, P(*axes))

  return traverse_util.unflatten_dict(
      {path: one(path, var) for path, var in nnx.to_flat_state(abstract_state)})


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
