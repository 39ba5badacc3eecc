"""Orbax checkpoints of the whole training state, behind one small interface.

Asynchronous saves; keep the last N plus every K-th step; the state pytree (every network,
optimizer state, step and RNG) is restored straight into the target shardings of the *current*
mesh, so a run can resume on a different topology. A latest checkpoint that fails to restore is
reported and the previous one is used. Orbax writes each step to a temporary folder and renames it
when complete, so a crash mid-save leaves the earlier checkpoints untouched.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers as policies


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

  def save(self, step: int, state, meta: dict, *, force: bool = False) -> bool:
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    return self.manager.save(step, args=args, force=force)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_meta(self) -> dict | None:
    """The JSON metadata of the newest checkpoint (cheap: no arrays are read)."""
    for step in reversed(self.steps()):
      try:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
      except Exception as e:  # a damaged step: the full restore reports it
        logging.warning("metadata of checkpoint step %d is unreadable: %s", step, e)
    return None

  def restore(self, abstract_state):
    """Restores the newest readable checkpoint into ``abstract_state`` (ShapeDtypeStructs with
    shardings). Returns ``(step, state, meta)`` or None when there is no checkpoint."""
    for step in reversed(self.steps()):
      args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                meta=ocp.args.JsonRestore())
      try:
        restored = self.manager.restore(step, args=args)
      except Exception as e:  # a damaged step: say so and fall back to the previous one
        logging.error("checkpoint step %d in %s could not be restored (%s: %s); trying the "
                      "previous one.", step, self.directory, type(e).__name__, e)
        continue
      return step, restored.state, restored.meta
    if self.steps():
      raise RuntimeError(f"no checkpoint in {self.directory} could be restored "
                         f"(steps {self.steps()}); see the errors above.")
    return None

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree, shardings):
  """ShapeDtypeStructs carrying the target shardings, for topology-independent restores."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)
