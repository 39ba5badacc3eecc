"""The compile-only planner: per-device memory and FLOPs for a target mesh, nothing allocated."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from afd_jax import mesh as mesh_lib
from afd_jax import state as state_lib
from afd_jax.tools import plan
from small_config import get_config

ROOT = Path(__file__).resolve().parents[1]


def _state_bytes(mesh_axes, method="afd") -> tuple[int, int]:
  """(bytes per device, bytes in all) of the abstract state on a mesh of 8 devices."""
  mesh = mesh_lib.make_mesh(8, **mesh_axes)
  _, state = state_lib.build_state(get_config(method=method), mesh, abstract=True)
  leaves = jax.tree.leaves(state)
  per_device = sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize for x in leaves)
  return per_device, sum(x.size * x.dtype.itemsize for x in leaves)


def test_abstract_state_is_sharded_not_allocated():
  replicated, total = _state_bytes({"data": 8})
  sharded, total_too = _state_bytes({"data": 1, "fsdp": 8})
  assert replicated == total == total_too
  assert sharded < total / 6  # nearly everything carries an fsdp-sharded embed axis


def test_plan_cli_reports_memory_and_flops_per_device(tmp_path):
  """The CLI emulates 8 devices itself (``--devices``), compiles every step of a run for a 2 x 4
  mesh from abstract state, and prints and writes the plan (``pretrain``: two programs; the AFD
  programs are lowered below and compiled sharded in test_mesh)."""
  out = tmp_path / "plan.json"
  run = subprocess.run(
      [sys.executable, "-m", "afd_jax.tools.plan", "--config=tests/small_config.py", "--devices=8",
       "--config.method=pretrain", "--config.data.num_frames=3", "--config.mesh.num_devices=8",
       "--config.mesh.data=2",
       "--config.mesh.fsdp=4", "--hbm_gib=0.001", f"--out={out}"],
      cwd=ROOT, capture_output=True, text=True)
  assert run.returncode == 0, run.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["devices"] == 8 and report["attention_kernel"] == "blockwise"  # flash stand-in
  assert report["mesh"] == {"data": 2, "fsdp": 4, "context": 1, "tensor": 1}
  per_device, _ = _state_bytes({"data": 2, "fsdp": 4}, method="pretrain")  # frame count: no matter
  assert report["state_bytes_per_device"] == per_device
  assert set(report["steps"]) == {"fm"}
  fm = report["steps"]["fm"]
  assert fm["flops"] > 0 and fm["peak"] >= per_device and fm["temporaries"] > 0
  assert fm["donated"] > 0  # the student state is updated in place
  assert "| fm |" in run.stdout and "DOES NOT FIT" in run.stdout


def test_plan_lowers_every_afd_step_from_abstract_state():
  c = get_config(**{"mesh.num_devices": 8, "mesh.data": 2, "mesh.fsdp": 4})
  mesh = mesh_lib.mesh_from_config(c)
  nets, state = state_lib.build_state(c, mesh, abstract=True)
  programs = plan.step_inputs(c, nets, state, mesh, (6, 4, 6, 16))
  assert set(programs) == {"rollout", "disc", "student"}   # advantage and old policy folded in
  with jax.set_mesh(mesh):
    for name, (fn, args) in programs.items():
      text = fn.lower(*args).as_text()
      assert "sharding" in text, name
  # A per-chunk discriminator: the student step takes one r per (rollout, chunk).
  c = get_config(**{"mesh.num_devices": 8, "mesh.data": 2, "mesh.fsdp": 4, "disc.per_chunk": True})
  nets, state = state_lib.build_state(c, mesh, abstract=True)
  fn, args = plan.step_inputs(c, nets, state, mesh, (6, 4, 6, 16))["student"]
  assert args[5].shape == (8, 2)
  with jax.set_mesh(mesh):
    fn.lower(*args)


@pytest.mark.parametrize("method", ["afd", "gan", "dmd"])
def test_lora_plans_adapters_over_one_base_and_holds_less(method, tmp_path):
  """With adapters the state holds adapter sets (no reference copy) and the plan counts the
  frozen bases; every step of the method lowers against the abstract bases."""
  overrides = {"mesh.num_devices": 8, "mesh.data": 2, "mesh.fsdp": 4, "method": method}
  if method == "dmd":  # dmd distils a score model: any checkpoint (only its config is read)
    from afd_jax.models import wan, wan_checkpoint
    overrides["model.checkpoint"] = str(wan_checkpoint.save_converted(
        wan.init(wan.preset("tiny", num_layers=1)), tmp_path / "base"))
  full = get_config(**overrides)
  lora = get_config(**overrides, **{"model.lora_rank": 2, "disc.lora_rank": 2})
  mesh = mesh_lib.mesh_from_config(full)
  _, full_state = state_lib.build_state(full, mesh, abstract=True)
  nets, state = state_lib.build_state(lora, mesh, abstract=True)
  assert "ref" not in state and ("ref" in full_state) == (method != "gan")
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(nets.frozen))
  size = lambda t: sum(x.size for x in jax.tree.leaves(t))
  assert size(state) + size(nets.frozen) < 0.6 * size(full_state)
  programs = plan.step_inputs(lora, nets, state, mesh, (6, 4, 6, 16))
  with jax.set_mesh(mesh):
    for name, (fn, args) in programs.items():
      assert "sharding" in fn.lower(*args).as_text(), name


def test_plan_refuses_a_mesh_the_model_does_not_divide(tmp_path):
  run = subprocess.run(
      [sys.executable, "-m", "afd_jax.tools.plan", "--config=tests/small_config.py", "--devices=8",
       "--config.mesh.num_devices=8", "--config.mesh.data=1", "--config.mesh.tensor=8"],
      cwd=ROOT, capture_output=True, text=True)
  assert run.returncode == 2 and "Traceback" not in run.stderr
  assert "mesh.tensor=8 does not divide the 4 attention heads" in run.stderr
  zero = subprocess.run([sys.executable, "-m", "afd_jax.tools.plan",
                         "--config=tests/small_config.py", "--devices=0"],
                        cwd=ROOT, capture_output=True, text=True)
  assert zero.returncode == 2 and zero.stderr.strip() == (
      "afd_jax: --devices=0 must be a positive number of chips (the target's).")


def test_plan_leaves_the_callers_config_alone(monkeypatch):
  """A checkpoint missing on the planning machine is planned with the preset's architecture and
  the CPU's stand-in kernel, on a copy: the caller's config is unchanged."""
  seen = []

  def stop(config, mesh, abstract):
    seen.append((config.disc.checkpoint, config.model.attention_kernel))
    raise StopIteration

  monkeypatch.setattr(state_lib, "build_state", stop)
  c = get_config(**{"disc.checkpoint": "/not/here", "model.attention_kernel": "auto"})
  try:
    plan.plan(c)
  except StopIteration:
    pass
  assert seen == [("", "blockwise")]
  assert (c.disc.checkpoint, c.model.attention_kernel) == ("/not/here", "auto")
