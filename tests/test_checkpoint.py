"""Checkpoints: damaged or non-finite steps are moved aside (kept) so the run continues past them;
a failed save is one error naming the step while the earlier steps stay usable."""

import errno

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from afd_jax import checkpoint as ckpt_lib


def _state(value):
  return {"w": jnp.full((3,), value, jnp.float32), "step": jnp.asarray(1, jnp.int32)}


def _abstract():
  return {"w": ocp.utils.to_shape_dtype_struct(_state(0.0)["w"]),
          "step": ocp.utils.to_shape_dtype_struct(_state(0.0)["step"])}


def test_a_nonfinite_step_is_moved_aside_and_the_previous_one_restored(tmp_path):
  ckpt = ckpt_lib.Checkpointer(tmp_path / "checkpoints")
  ckpt.save(1, _state(1.0), {"step": 1})
  ckpt.save(2, _state(np.nan), {"step": 2})
  ckpt.close()
  ckpt = ckpt_lib.Checkpointer(tmp_path / "checkpoints")
  step, state, _ = ckpt.restore(_abstract())
  assert step == 1 and float(state["w"][0]) == 1.0
  assert ckpt.steps() == [1]
  assert (tmp_path / "checkpoints_damaged" / "2").is_dir()  # kept for inspection
  ckpt.save(2, _state(2.0), {"step": 2})                      # the step can be written again
  ckpt.close()


def test_nonfinite_names_the_leaves():
  tree = {"a": np.array([1.0, np.nan]), "b": {"c": jnp.array([np.inf])}, "d": jnp.ones(2),
          "i": np.array([1])}
  assert ckpt_lib.nonfinite(tree) == ["['a']", "['b']['c']"]


def test_a_failed_save_is_one_error_naming_the_step(tmp_path, monkeypatch):
  ckpt = ckpt_lib.Checkpointer(tmp_path / "checkpoints")
  ckpt.save(1, _state(1.0), {"step": 1})
  ckpt.wait()

  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(ckpt.manager, "save", full)
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    ckpt.save(2, _state(2.0), {"step": 2})
  message = str(e.value)
  assert "step 2" in message and "No space left" in message and "[1]" in message
  assert "\n" not in message
  monkeypatch.undo()
  ckpt.close()
  step, state, _ = ckpt_lib.Checkpointer(tmp_path / "checkpoints").restore(_abstract())
  assert step == 1 and float(state["w"][0]) == 1.0


def test_a_failed_background_save_is_reported_with_its_step(tmp_path, monkeypatch):
  ckpt = ckpt_lib.Checkpointer(tmp_path / "checkpoints")
  ckpt.save(1, _state(1.0), {"step": 1})

  def failed():
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(ckpt.manager, "check_for_errors", failed)
  with pytest.raises(ckpt_lib.CheckpointError, match="saving checkpoint step 1 .*No space"):
    ckpt.close()
