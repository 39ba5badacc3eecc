"""Low-rank adapters (LoRA) as a view of a network's parameters: ``W + (alpha / rank) A B`` for
every kernel whose path matches a target pattern, over one frozen base.

A view, not adapter modules: every network (the Wan student, the discriminator's trunk, scanned
or not) stays the module its checkpoints describe, and what the training state holds for it is
small: ``{"adapters": {...A, B...}, "train": {...}}``, where ``train`` holds the parameters that
are trained fully (the discriminator's readouts and head). The base is stored once, outside the
state, and shared by the student, its EMA, the old policy and the reference, which is the base
itself (adapters off, ``params=None``). ``B`` starts at zero, so a fresh adapter set is the base.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec

from afd_jax import errors

@dataclasses.dataclass(frozen=True)
class LoRA:
  """Which kernels get adapters (regular expressions searched in ``"/"``-joined parameter paths,
  such as ``blocks/self_attn/q/kernel``), their rank and alpha, and ``within``: when set, only
  paths under this top-level module get adapters, and every parameter outside it is trained fully
  (the discriminator: ``within="trunk"``)."""

  rank: int
  alpha: float
  targets: tuple[str, ...]
  within: str | None = None

  def __post_init__(self):
    if not isinstance(self.rank, int) or self.rank < 1:
      raise errors.UserError(f"lora rank must be a positive integer, got {self.rank!r}; set "
                             "model.lora_rank / disc.lora_rank (0 trains every parameter).")
    if not math.isfinite(self.alpha) or self.alpha <= 0:
      raise errors.UserError(f"lora alpha must be a finite number > 0, got {self.alpha!r}.")
    for t in self.targets:
      try:
        re.compile(t)
      except re.error as e:
        raise errors.UserError(f"lora target {t!r} is not a regular expression ({e}).") from e

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def from_config(section, within: str | None = None) -> LoRA | None:
  """The adapters a config section (``config.model``, or ``config.disc`` with ``within="trunk"``)
  asks for; None when its ``lora_rank`` is 0 (full fine-tuning)."""
  if not section.lora_rank:
    return None
  return LoRA(int(section.lora_rank), float(section.lora_alpha), tuple(section.lora_targets),
              within)


def _name(path) -> str:
  return "/".join(map(str, path))


def _flat(tree) -> dict:
  return traverse_util.flatten_dict(tree) if tree else {}


def _under(path, spec: LoRA) -> bool:
  return spec.within is None or path[0] == spec.within


def targets(params, spec: LoRA) -> list[tuple]:
  """Paths of the kernels that get adapters (at least two dimensions, under ``within``)."""
  found = [p for p, x in _flat(params).items()
           if _under(p, spec) and len(x.shape) >= 2
           and any(re.search(t, _name(p[1:] if spec.within else p)) for t in spec.targets)]
  if not found:
    raise errors.UserError(f"no parameter matches the lora targets {list(spec.targets)}; targets "
                           "are regular expressions over paths such as "
                           "'blocks/self_attn/q/kernel'.")
  return sorted(found, key=_name)


def frozen(params, spec: LoRA | None):
  """The base a view needs: every parameter not trained fully (None without adapters)."""
  if spec is None:
    return None
  return traverse_util.unflatten_dict({p: x for p, x in _flat(params).items() if _under(p, spec)})


def init(key, params, spec: LoRA) -> dict:
  """A fresh adapter set for ``params`` (arrays or shapes, traceable): ``A`` as PEFT draws it
  (uniform, bound ``1 / sqrt(fan_in)``), ``B`` zero, both in the kernel's dtype; and the
  parameters trained fully, copied from ``params``."""
  flat, adapters = _flat(params), {}
  for i, path in enumerate(targets(params, spec)):
    kernel = flat[path]
    *lead, fan_in, fan_out = kernel.shape
    bound = 1.0 / math.sqrt(fan_in)
    a = jax.random.uniform(jax.random.fold_in(key, i), (*lead, fan_in, spec.rank), jnp.float32,
                           -bound, bound)
    adapters[path + ("a",)] = a.astype(kernel.dtype)
    adapters[path + ("b",)] = jnp.zeros((*lead, spec.rank, fan_out), kernel.dtype)
  train = {p: x for p, x in flat.items() if not _under(p, spec)}
  return {"adapters": traverse_util.unflatten_dict(adapters),
          "train": traverse_util.unflatten_dict(train) if train else {}}


def view(base, params, spec: LoRA | None):
  """The network's full parameters: ``params`` itself without adapters; with them, the base plus
  each adapter's ``(alpha / rank) A B`` and the fully trained parameters. ``params=None`` is the
  base with the adapters off (the reference policy)."""
  if spec is None:
    return params
  if params is None:
    return base
  full = dict(_flat(base))
  full.update(_flat(params["train"]))
  adapters = _flat(params["adapters"])
  for path in {p[:-1] for p in adapters}:
    a, b = adapters[path + ("a",)], adapters[path + ("b",)]
    delta = jnp.einsum("...ir,...ro->...io", a, b, preferred_element_type=jnp.float32)
    full[path] = (full[path] + spec.scale * delta).astype(full[path].dtype)
  return traverse_util.unflatten_dict(full)


def shardings(param_sh, abstract_params, spec: LoRA, mesh) -> dict:
  """Shardings of an adapter set, from its kernels': ``A`` (``[..., in, rank]``) keeps the
  kernel's input axes and ``B`` (``[..., rank, out]``) its output axes; each rank axis takes the
  kernel's other axes where they divide the rank (else it is whole), so neither factor is
  replicated under FSDP. Fully trained parameters keep theirs."""
  flat_sh, shapes = _flat(param_sh), _flat(abstract_params)
  size = lambda entry: math.prod(mesh.shape[a] for a in
                                 ((entry,) if isinstance(entry, str) else entry or ()))
  fits = lambda entry: entry if spec.rank % size(entry) == 0 else None
  adapters = {}
  for path in targets(abstract_params, spec):
    s = tuple(flat_sh[path].spec) + (None,) * (len(shapes[path].shape) - len(flat_sh[path].spec))
    *lead, fan_in, fan_out = s
    adapters[path + ("a",)] = NamedSharding(mesh, PartitionSpec(*lead, fan_in, fits(fan_out)))
    adapters[path + ("b",)] = NamedSharding(mesh, PartitionSpec(*lead, fits(fan_in), fan_out))
  train = {p: s for p, s in flat_sh.items() if not _under(p, spec)}
  return {"adapters": traverse_util.unflatten_dict(adapters),
          "train": traverse_util.unflatten_dict(train) if train else {}}


def logical_names(names, abstract_params, spec: LoRA) -> dict:
  """Logical axis names of an adapter set: both factors carry their kernel's names (the rank axis
  of ``A`` the output's, of ``B`` the input's), as ``shardings`` places them."""
  flat = _flat(names)
  adapters = {}
  for path in targets(abstract_params, spec):
    adapters[path + ("a",)] = adapters[path + ("b",)] = flat[path]
  train = {p: n for p, n in flat.items() if not _under(p, spec)}
  return {"adapters": traverse_util.unflatten_dict(adapters),
          "train": traverse_util.unflatten_dict(train) if train else {}}


def fingerprint(base) -> jax.Array:
  """``[leaves, 2]`` float32: each base parameter's sum and sum of squares, in path order. Saved
  with the adapters, compared on resume (to a relative 1e-4: sums depend on the sharding), so a
  checkpoint's adapters are never applied to another base."""
  leaves = [x for _, x in sorted(_flat(base).items(), key=lambda kv: _name(kv[0]))]
  return jnp.stack([jnp.stack([jnp.sum(x, dtype=jnp.float32),
                               jnp.sum(jnp.square(x.astype(jnp.float32)))]) for x in leaves])


def same_base(saved, current) -> bool:
  saved, current = np.asarray(saved), np.asarray(current)
  return saved.shape == current.shape and bool(np.allclose(saved, current, rtol=1e-4, atol=1e-6))
