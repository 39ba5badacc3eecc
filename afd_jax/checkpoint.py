"""Orbax checkpoints of the whole training state, behind one small interface.

Asynchronous saves; keep the last N plus every K-th step; the state pytree (every network,
optimizer state, step and RNG) is restored straight into the target shardings of the *current*
mesh, so a run can resume on a different topology. Orbax writes each step to a temporary folder
and renames it when complete, so a crash mid-save leaves the earlier checkpoints untouched. A
step that fails to restore, or holds a non-finite value, is moved aside into
``checkpoints_damaged/`` (kept for inspection, said where) and the previous one is used, so the
resumed run can write that step again. A failed save (a full disk) is one clear error naming the
step; the steps saved before it stay usable.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from afd_jax.errors import UserError


class CheckpointError(UserError):
  """A checkpoint could not be written or none could be read."""


class Checkpointer:
  def __init__(self, directory, *, keep_last: int = 3, keep_every: int = 0):
    keep = [policies.LatestN(keep_last)]
    if keep_every:
      keep.append(policies.EveryNSteps(keep_every))
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=True, create=True,
        preservation_policy=policies.AnyPreservationPolicy(keep))
    self.directory = Path(directory).absolute()
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self._pending = None  # the step of the last asynchronous save, until it is known written

  def save(self, step: int, state, meta: dict, *, force: bool = False) -> bool:
    """Starts an asynchronous save of ``state`` (which must be finite: see ``nonfinite``)."""
    self._check_pending()
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    try:
      saved = self.manager.save(step, args=args, force=force)
    except Exception as e:  # noqa: BLE001 (disk full, permissions, ...): one line, no cascade
      raise self._save_error(step, e) from None
    self._pending = step if saved else self._pending
    return saved

  def _check_pending(self):
    """Raises the error of the previous asynchronous save, naming its step."""
    if self._pending is None:
      return
    step, self._pending = self._pending, None
    try:
      self.manager.check_for_errors()
    except Exception as e:  # noqa: BLE001
      raise self._save_error(step, e) from None

  def _save_error(self, step: int, e: Exception) -> CheckpointError:
    good = [s for s in self.steps() if s != step]
    return CheckpointError(
        f"saving checkpoint step {step} to {self.directory} failed ({type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''}); the earlier checkpoints "
        f"({good or 'none'}) are intact. Free space (or fix the folder) and rerun to resume.")

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_meta(self) -> dict | None:
    """The JSON metadata of the newest checkpoint (cheap: no arrays are read)."""
    for step in reversed(self.steps()):
      try:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
      except Exception as e:  # noqa: BLE001 (a damaged step: the full restore reports it)
        logging.warning("metadata of checkpoint step %d is unreadable: %s", step, e)
    return None

  def restore(self, abstract_state):
    """Restores the newest readable, finite checkpoint into ``abstract_state``
    (ShapeDtypeStructs with shardings). Returns ``(step, state, meta)`` or None when there is no
    checkpoint. Damaged steps are moved aside."""
    for step in reversed(self.steps()):
      args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                meta=ocp.args.JsonRestore())
      try:
        restored = self.manager.restore(step, args=args)
      except Exception as e:  # noqa: BLE001 (a damaged step)
        self._move_aside(step, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        continue
      bad = nonfinite(restored.state)
      if bad:
        self._move_aside(step, f"non-finite values in {', '.join(bad[:3])}")
        continue
      return step, restored.state, restored.meta
    if self.damaged_dir.exists() and any(self.damaged_dir.iterdir()):
      raise CheckpointError(f"no checkpoint in {self.directory} could be restored; the damaged "
                            f"ones are in {self.damaged_dir}. Use a new --workdir to start over.")
    return None

  @property
  def damaged_dir(self) -> Path:
    return self.directory.parent / f"{self.directory.name}_damaged"

  def _move_aside(self, step: int, why: str):
    """Renames a damaged step out of Orbax's sight (process 0; every process reloads)."""
    target = self.damaged_dir / str(step)
    if target.exists():
      target = self.damaged_dir / f"{step}.{time.strftime('%Y%m%d-%H%M%S')}"
    if jax.process_index() == 0:
      target.parent.mkdir(parents=True, exist_ok=True)
      shutil.move(str(self.directory / str(step)), str(target))
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"afd_jax_checkpoint_aside_{step}")
    self.manager.reload()
    logging.error("checkpoint step %d in %s is damaged (%s); moved it to %s and resuming from the "
                  "previous one.", step, self.directory, why, target)

  def wait(self):
    self.manager.wait_until_finished()
    self._check_pending()

  def close(self):
    """Waits for the last save; its failure is raised (one line) after the manager is closed."""
    try:
      self.wait()
    finally:
      self.manager.close()


def has_checkpoints(directory) -> bool:
  """Whether ``directory`` holds any step (cheap: a listing; whether it restores is another
  matter)."""
  directory = Path(directory)
  return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def nonfinite(tree) -> list[str]:
  """Key paths of the floating-point leaves of ``tree`` holding a NaN or an infinity (host arrays
  checked on the host, device arrays where they live)."""
  leaves = [(p, x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
            if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)]
  on_device = [i for i, (_, x) in enumerate(leaves) if isinstance(x, jax.Array)]
  ok = [bool(np.isfinite(x).all()) if not isinstance(x, jax.Array) else True for _, x in leaves]
  if on_device:
    for i, flag in zip(on_device, np.asarray(_finite_flags([leaves[i][1] for i in on_device]))):
      ok[i] = bool(flag)
  return [jax.tree_util.keystr(p) for (p, _), good in zip(leaves, ok) if not good]


@jax.jit
def _finite_flags(leaves):
  return jnp.stack([jnp.isfinite(x).all() for x in leaves])


def abstract_like(tree, shardings):
  """ShapeDtypeStructs carrying the target shardings, for topology-independent restores."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)
