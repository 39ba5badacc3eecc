"""Meshes from the config, parameter shardings from the rules table, and sharded AFD steps that
match the single-device steps on 8 fake CPU devices (data x fsdp, context and tensor meshes)."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from afd_jax import mesh as mesh_lib
from afd_jax import methods
from afd_jax import state as state_lib
from afd_jax import train
from afd_jax.models import wan
from conftest import assert_same_run
from small_config import get_config as config


def test_make_mesh_fills_minus_one_and_shows_the_arithmetic():
  mesh = mesh_lib.make_mesh(8, data=-1, fsdp=2, context=2)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "context": 2, "tensor": 1}
  with pytest.raises(ValueError, match=r"hold 3 devices.*8 % 3 = 2"):
    mesh_lib.make_mesh(8, data=-1, fsdp=3)
  with pytest.raises(ValueError, match="= 4 devices, but 8 are in use"):
    mesh_lib.make_mesh(8, data=2, fsdp=2)
  with pytest.raises(ValueError, match="only one axis size may be -1"):
    mesh_lib.make_mesh(8, data=-1, fsdp=-1)
  with pytest.raises(ValueError, match="only 8 devices are visible"):
    mesh_lib.make_mesh(16)


def test_rules_errors_name_the_parameter_and_the_fix():
  mesh = mesh_lib.make_mesh(8, data=1, fsdp=8)
  with pytest.raises(ValueError, match=r"'embed' -> 'model': 'model' is not a mesh axis"):
    mesh_lib.check_rules((("embed", "model"),))
  with pytest.raises(ValueError, match=r"has embed=12, not divisible by mesh axes \('fsdp',\) of "
                                       r"size 8"):
    mesh_lib.spec_for(("embed",), (12,), mesh, (("embed", "fsdp"),), "parameter w")
  with pytest.raises(ValueError, match="'embed' and 'mlp' both map to mesh axis 'fsdp'"):
    mesh_lib.spec_for(("embed", "mlp"), (8, 8), mesh, (("embed", "fsdp"), ("mlp", "fsdp")))
  assert mesh_lib.spec_for(("layers", "embed", "mlp"), (2, 8, 16), mesh,
                           (("embed", ("data", "fsdp")),)) == P(None, ("data", "fsdp"), None)
  # A model dimension the mesh cannot split is refused when the trainer builds its state.
  with pytest.raises(ValueError, match=r"parameter blocks/ffn_in/\w+ has mlp=100, not "
                                       r"divisible by mesh axes \('fsdp',\) of size 8"):
    state_lib.build_state(config(logical_rules=(("mlp", "fsdp"),),
                                 **{"model.overrides.ffn_dim": 100}), mesh, abstract=True)
  tiny = wan.preset("tiny")
  with pytest.raises(ValueError, match=r"micro_batches=3: .* batch_size=8 is not divisible by 1 x 3"):
    methods.check_divisibility(config(**{"train.micro_batches": 3}), mesh_lib.make_mesh(1), tiny)
  with pytest.raises(ValueError, match="mesh.context=4 does not divide the 18 tokens"):
    methods.check_divisibility(config(), mesh_lib.make_mesh(8, data=2, context=4), tiny)
  with pytest.raises(ValueError, match="mesh.tensor=8 does not divide the 4 attention heads"):
    methods.check_divisibility(config(), mesh_lib.make_mesh(8, data=1, tensor=8), tiny)
  with pytest.raises(ValueError, match="batch_size=4 is not divisible by the 8 data x fsdp"):
    methods.check_divisibility(config(**{"data.batch_size": 4}), mesh_lib.make_mesh(8), tiny)


def test_every_parameter_and_moment_carries_its_rules_sharding():
  c = config(method="afd")
  mesh = mesh_lib.make_mesh(8, data=2, fsdp=2, tensor=2)
  nets, state = state_lib.build_state(c, mesh)
  rules = mesh_lib.check_rules(c.logical_rules)
  checked = 0
  for net, trees in (("student", ("params", "ema", "old", "ref")), ("disc", ("params",))):
    flat_names = jax.tree_util.tree_flatten_with_path(
        nets.logical_names[net], is_leaf=lambda x: isinstance(x, tuple))[0]
    for path, names in flat_names:
      keys = tuple(k.key for k in path)
      for where in trees:
        root = state[where] if where in ("old", "ref") else state[net][where]
        leaf = root
        for k in keys:
          leaf = leaf[k]
        assert leaf.sharding.spec == mesh_lib.spec_for(names, leaf.shape, mesh, rules), keys
        checked += 1
    adam = state[net]["opt"].inner_state
    moments = [s for s in jax.tree.leaves(adam, is_leaf=lambda x: hasattr(x, "mu"))
               if hasattr(s, "mu")]
    assert moments
    for m in moments:  # Adam's moments are sharded exactly like their parameters
      for path, mu in jax.tree_util.tree_flatten_with_path(m.mu)[0]:
        param = state[net]["params"]
        for k in path:
          param = param[k.key]
        assert mu.sharding == param.sharding
        checked += 1
  kernel = state["student"]["params"]["blocks"]["ffn_in"]["kernel"]
  assert kernel.sharding.spec == P(None, "fsdp", "tensor")
  assert kernel.addressable_shards[0].data.shape == (1, 32, 64)
  assert checked > 100


def _two_iterations(c, workdir):
  trainer = train.Trainer(c, workdir)
  with jax.set_mesh(trainer.mesh):
    metrics = [trainer._iteration(step, trainer._host_batch(step)) for step in range(2)]
  return jax.device_get(trainer.state), jax.device_get(metrics)


@pytest.fixture(scope="module")
def single_device(tmp_path_factory):
  return _two_iterations(config(), tmp_path_factory.mktemp("one"))


@pytest.mark.parametrize("axes", [{"data": 8}, {"data": 2, "fsdp": 4},
                                  {"data": 2, "context": 2, "tensor": 2}],
                         ids=["8x1", "2x4", "context2-tensor2"])
def test_sharded_afd_steps_match_one_device(single_device, axes, tmp_path):
  """Two full AFD iterations (rollout with KV cache, discriminator, advantage, NFT student step,
  old-policy update) on a mesh of 8 devices against one device."""
  c = config(**{"mesh.num_devices": 8, "mesh.data": 1, **{f"mesh.{k}": v for k, v in axes.items()}})
  ref_state, ref_metrics = single_device
  state, metrics = _two_iterations(c, tmp_path)
  for x, y in zip(ref_metrics, metrics):
    for key in ("disc/bt_loss", "nft/loss", "reg/loss", "student/loss", "adv/raw_std"):
      if key in x:
        np.testing.assert_allclose(y[key], x[key], rtol=2e-4, atol=1e-6, err_msg=key)
  assert_same_run(ref_state, state, c)


def test_sharded_per_chunk_discriminator_matches_one_device(tmp_path):
  """``disc.per_chunk``: the block-causal trunk and the ``[B, chunks]`` advantages, sequence-
  sharded over the context axis and parameter-sharded over tensor, against one device."""
  per_chunk = {"disc.per_chunk": True}
  ref_state, ref_metrics = _two_iterations(config(**per_chunk), tmp_path / "one")
  c = config(**per_chunk, **{"mesh.num_devices": 8, "mesh.data": 2, "mesh.context": 2,
                             "mesh.tensor": 2})
  state, metrics = _two_iterations(c, tmp_path / "eight")
  for x, y in zip(ref_metrics, metrics):
    for key in ("disc/bt_loss", "nft/loss", "student/loss", "adv/raw_std"):
      np.testing.assert_allclose(y[key], x[key], rtol=2e-4, atol=1e-6, err_msg=key)
  assert_same_run(ref_state, state, c)


def test_sharded_lora_steps_match_one_device(tmp_path):
  """LoRA on the student and the discriminator's trunk: adapters sharded from their kernels'
  rules (A on the input axes, B on the output axis), the frozen bases by theirs."""
  from afd_jax.models import wan_checkpoint
  from conftest import randomize
  base = randomize(wan.init(wan.preset("tiny", num_layers=1)), seed=3, scale=0.2)
  lora = {"model.checkpoint": str(wan_checkpoint.save_converted(base, tmp_path / "base")),
          "model.lora_rank": 4, "disc.lora_rank": 4}
  ref_state, ref_metrics = _two_iterations(config(**lora), tmp_path / "one")
  c = config(**lora, **{"mesh.num_devices": 8, "mesh.data": 2, "mesh.fsdp": 4})
  state, metrics = _two_iterations(c, tmp_path / "eight")
  for x, y in zip(ref_metrics, metrics):
    for key in ("disc/bt_loss", "nft/loss", "student/loss", "student/grad_norm"):
      np.testing.assert_allclose(y[key], x[key], rtol=2e-4, atol=1e-6, err_msg=key)
  assert ref_metrics[-1]["student/grad_norm"] > 0
  b = state["student"]["params"]["adapters"]["blocks"]["ffn_in"]["kernel"]["b"]
  assert np.any(np.asarray(b))
  assert_same_run(ref_state, state, c)
