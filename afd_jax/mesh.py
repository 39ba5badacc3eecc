"""The device mesh, parameter shardings from logical axis names, and activation shardings.

Mesh axes: ``data`` (pure data parallel), ``fsdp`` (data parallel with sharded parameters and
optimizer states), ``context`` (sequence parallel: attention queries, the KV cache and the residual
stream split over video tokens) and ``tensor`` (attention heads and FFN hidden units). Batches are
split over ``data`` x ``fsdp``.

Parameters carry logical names (``embed``, ``mlp``, ``heads``, ``layers``, ...); the config's
rules table maps them to mesh axes (e.g. ``embed -> fsdp``, ``heads -> tensor``). Activations are
constrained by their role (batch, tokens, heads) to whichever of those axes the current mesh has,
so model code runs unchanged on one device or on a pod.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import optax
from flax import nnx, traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from afd_jax import errors

AXES = ("data", "fsdp", "context", "tensor")
BATCH = ("data", "fsdp")


def make_mesh(num_devices: int = 0, data: int = -1, fsdp: int = 1, context: int = 1,
              tensor: int = 1) -> Mesh:
  """``num_devices`` 0 uses every device; one axis size may be -1 (whatever the others leave)."""
  devices = jax.devices()
  n = num_devices or len(devices)
  if n > len(devices):
    raise errors.UserError(f"mesh.num_devices={n} but only {len(devices)} devices are visible.")
  sizes = {"data": data, "fsdp": fsdp, "context": context, "tensor": tensor}
  shown = " x ".join(f"{k}={v}" for k, v in sizes.items())
  if list(sizes.values()).count(-1) > 1:
    raise errors.UserError(f"mesh {shown}: only one axis size may be -1.")
  if any(v == 0 or v < -1 for v in sizes.values()):
    raise errors.UserError(f"mesh {shown}: axis sizes must be positive (or one of them -1).")
  known = math.prod(v for v in sizes.values() if v != -1)
  if n % known:
    raise errors.UserError(f"mesh {shown}: the fixed axes hold {known} devices, which does not divide "
                     f"the {n} devices in use ({n} % {known} = {n % known}); pick sizes whose "
                     f"product is {n} or divides it with one axis at -1.")
  sizes = {k: n // known if v == -1 else v for k, v in sizes.items()}
  if math.prod(sizes.values()) != n:
    raise errors.UserError(f"mesh {shown} = {math.prod(sizes.values())} devices, but {n} are in use; "
                     f"set mesh.num_devices={math.prod(sizes.values())} or change the sizes.")
  return Mesh(np.array(devices[:n]).reshape(tuple(sizes.values())), AXES)


def mesh_from_config(config) -> Mesh:
  m = config.mesh
  return make_mesh(m.num_devices, m.data, m.fsdp, m.context, m.tensor)


# ----------------------------------------------------------------------------------------------
# Parameters: logical names -> mesh axes.


def check_rules(rules) -> dict:
  """``((logical, mesh axis | tuple of axes | None), ...)`` -> dict, refusing unknown mesh axes."""
  table = {}
  for rule in (rules.items() if isinstance(rules, dict) else rules):
    if len(rule) != 2:
      raise errors.UserError(f"logical rule {rule!r} must be a (logical name, mesh axis) pair.")
    name, axes = rule
    for axis in (axes if isinstance(axes, (tuple, list)) else (axes,)):
      if axis is not None and axis not in AXES:
        raise errors.UserError(f"logical rule {name!r} -> {axis!r}: {axis!r} is not a mesh axis "
                         f"{AXES}; fix config.logical_rules.")
    table[name] = tuple(axes) if isinstance(axes, list) else axes
  return table


def spec_for(names, shape, mesh: Mesh, rules, what: str = "array") -> P:
  """The PartitionSpec of an array with logical axis ``names``; an error names the dimension a
  mesh axis does not divide, or two dimensions asking for the same mesh axis."""
  table = check_rules(rules)
  spec, used = [], {}
  for dim, name in zip(shape, names):
    axes = table.get(name)
    group = axes if isinstance(axes, tuple) else (axes,) if axes else ()
    for axis in group:
      if axis in used:
        raise errors.UserError(f"{what}: logical axes {used[axis]!r} and {name!r} both map to mesh axis "
                         f"{axis!r}; a mesh axis shards one dimension. Fix config.logical_rules.")
      used[axis] = name
    size = math.prod(mesh.shape[a] for a in group)
    if dim % size:
      raise errors.UserError(f"{what} has {name}={dim}, not divisible by mesh axes {group} of size "
                       f"{size}; change the mesh or the rule for {name!r}.")
    spec.append(axes)
  return P(*spec)


def param_shardings(abstract_state: nnx.State, mesh: Mesh, rules) -> dict:
  """A pure dict of NamedShardings for an NNX state, from each variable's logical names."""
  table = check_rules(rules)

  def one(path, var):
    names = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
    what = "parameter " + "/".join(map(str, path))
    return NamedSharding(mesh, spec_for(names, var.shape, mesh, table, what))

  return traverse_util.unflatten_dict(
      {path: one(path, var) for path, var in nnx.to_flat_state(abstract_state)})


def logical_names(abstract_state: nnx.State) -> dict:
  """The logical axis names of every variable, as a pure dict (for tests and the planner)."""
  return traverse_util.unflatten_dict(
      {path: tuple(var.get_metadata().get("out_sharding") or (None,) * len(var.shape))
       for path, var in nnx.to_flat_state(abstract_state)})


def opt_state_shardings(tx: optax.GradientTransformation, abstract_params, param_sh, mesh: Mesh):
  """Optimizer-state shardings: every parameter-shaped leaf (Adam's moments, wherever a chain,
  mask or multi-transform nests them) takes its parameter's sharding; counts and flags are
  replicated. A leaf is matched by the trailing dict keys of its path and its shape."""
  flat = traverse_util.flatten_dict(param_sh)
  shapes = traverse_util.flatten_dict(jax.tree.map(lambda x: x.shape, abstract_params,
                                                   is_leaf=lambda x: hasattr(x, "shape")))

  def one(path, leaf):
    keys = []
    for entry in reversed(path):
      if not isinstance(entry, jax.tree_util.DictKey):
        break
      keys.append(entry.key)
    keys = tuple(reversed(keys))
    if keys in flat and shapes[keys] == leaf.shape:
      return flat[keys]
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(one, jax.eval_shape(tx.init, abstract_params))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# ----------------------------------------------------------------------------------------------
# Activations: roles -> the axes of the mesh in context (``jax.set_mesh``).


def current_mesh():
  """The abstract mesh set by ``jax.set_mesh`` (None outside one, or for a single device)."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty or mesh.size == 1 else mesh


def axis_size(mesh, axis: str) -> int:
  return dict(zip(mesh.axis_names, mesh.axis_sizes)).get(axis, 1) if mesh is not None else 1


def role_spec(mesh, shape, roles) -> P:
  """PartitionSpec for ``roles`` per dimension (``batch``, ``tokens``, ``heads`` or None). A role
  whose axes do not divide the dimension stays unsharded (e.g. the discriminator's single query)."""
  axes = {"batch": BATCH, "tokens": ("context",), "heads": ("tensor",)}
  spec = []
  for dim, role in zip(shape, roles):
    group = tuple(a for a in axes.get(role, ()) if axis_size(mesh, a) > 1)
    size = math.prod(axis_size(mesh, a) for a in group)
    spec.append(None if not group or dim % size else group if len(group) > 1 else group[0])
  return P(*spec)


def constrain(x, roles):
  """``with_sharding_constraint`` by role on the current mesh; a no-op without one."""
  mesh = current_mesh()
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, role_spec(mesh, x.shape, roles))
