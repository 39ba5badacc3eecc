"""LoRA (``afd_jax/lora.py``): adapter sets over one frozen base for the student (its EMA, the old
policy; the reference is the base) and the discriminator's trunk (readouts and head trained
fully); merged exports that ``wan.from_pretrained`` and diffusers read; resume. Sharded LoRA
steps: test_mesh.py; planning both ways: test_plan.py."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

from afd_jax import errors
from afd_jax import lora as lora_lib
from afd_jax import mesh as mesh_lib
from afd_jax import state as state_lib
from afd_jax import steps
from afd_jax import train
from afd_jax.models import wan, wan_checkpoint
from conftest import jitted, randomize, rel_l2
from small_config import get_config


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """A pretrained-looking one-layer student (every parameter non-zero, the head included, so
  adapters get a gradient), as a converted checkpoint."""
  model = randomize(wan.init(wan.preset("tiny", num_layers=1)), seed=3, scale=0.2)
  return wan_checkpoint.save_converted(model, tmp_path_factory.mktemp("lora") / "base"), model


def lora_config(path, **overrides):
  """Two steps with a high student lr and no EMA lag, so exports differ visibly from the base;
  every run here shares these compiled programs."""
  return get_config(**{"model.checkpoint": str(path), "model.lora_rank": 4,
                       "disc.lora_rank": 4, "train.num_steps": 2, "train.checkpoint_every": 2,
                       "afd.ema_decay": 0.0, "optim.student.lr": 1e-2, **overrides})


def _pure(model):
  return jax.device_get(nnx.to_pure_dict(nnx.state(model)))


def test_fresh_adapters_are_the_base_and_adapters_off_is_the_reference(base, inputs):
  path, model = base
  config = lora_config(path)
  nets, state = state_lib.build_state(config, mesh_lib.mesh_from_config(config))
  assert "ref" not in state                        # the reference is the base, adapters off
  spec, frozen = nets.lora["student"], nets.frozen["student"]
  adapters = state["student"]["params"]["adapters"]
  q = adapters["blocks"]["self_attn"]["q"]["kernel"]
  assert q["a"].shape == (1, 64, 4) and q["b"].shape == (1, 4, 64)
  assert not np.any(np.asarray(q["b"])) and state["student"]["params"]["train"] == {}
  assert set(adapters["blocks"]) == {"self_attn", "cross_attn", "ffn_in", "ffn_out"}
  assert "kernel" not in adapters.get("head", {})  # only the targets have adapters

  latents, context = inputs
  t = jnp.array([900.0, 300.0])
  run = lambda p: jax.jit(lambda p: steps.merged(nets.student_graph, spec, frozen, p)(
      latents, t, context))(p)
  reference = jitted(model)(latents, t, context)
  # Fresh adapters give the base's weights bit for bit; forwards agree to float32 rounding (each
  # is its own compiled program).
  jax.tree.map(np.testing.assert_array_equal, lora_lib.view(frozen, state["student"]["params"],
                                                            spec), frozen)
  assert rel_l2(run(None), reference) < 1e-6
  assert rel_l2(run(state["student"]["params"]), reference) < 1e-6

  # A non-zero adapter is W + (alpha / rank) A B on its kernel and nothing else.
  trained = jax.tree.map(lambda x: x, state["student"]["params"])
  b = jax.random.normal(jax.random.key(0), q["b"].shape)
  trained["adapters"]["blocks"]["self_attn"]["q"]["kernel"]["b"] = b
  full = lora_lib.view(frozen, trained, spec)
  want = frozen["blocks"]["self_attn"]["q"]["kernel"] + spec.scale * jnp.einsum(
      "lir,lro->lio", q["a"], b)
  np.testing.assert_allclose(full["blocks"]["self_attn"]["q"]["kernel"], want, rtol=1e-6)
  changed = [k for k, x in traverse_util.flatten_dict(full).items()
             if not np.array_equal(x, traverse_util.flatten_dict(frozen)[k])]
  assert changed == [("blocks", "self_attn", "q", "kernel")]
  assert rel_l2(run(trained), reference) > 1e-3


@pytest.fixture(scope="module")
def trained(tmp_path_factory, base):
  """A two-step LoRA run, with copies of its state and bases from before it."""
  trainer = train.Trainer(lora_config(base[0]), tmp_path_factory.mktemp("trained"))
  before = jax.device_get(trainer.state), jax.device_get(trainer.frozen)
  return trainer, before, trainer.run()


def test_a_lora_run_trains_only_adapters_readouts_and_head(trained, base):
  _, model = base
  trainer, (before, base_before), summary = trained
  after = jax.device_get(trainer.state)

  # The bases are the checkpoint's weights, untouched; the student's base is the model itself.
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(trainer.frozen), base_before)
  jax.tree.map(np.testing.assert_array_equal, trainer.frozen["student"], _pure(model))
  assert "trunk" in trainer.frozen["disc"] and "readouts" not in trainer.frozen["disc"]

  student, disc = after["student"]["params"], after["disc"]["params"]
  moved = lambda a, b: any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a),
                                                                   jax.tree.leaves(b)))
  assert moved(student["adapters"], before["student"]["params"]["adapters"])
  assert np.any(student["adapters"]["blocks"]["ffn_in"]["kernel"]["b"])
  assert moved(disc["adapters"], before["disc"]["params"]["adapters"])
  assert set(disc["train"]) >= {"readouts", "head_out", "registers"}
  assert moved(disc["train"]["readouts"], before["disc"]["params"]["train"]["readouts"])
  assert moved(after["old"], before["old"])
  # Adam holds moments of the trained parameters only: a small fraction of the base.
  size = lambda t: sum(x.size for x in jax.tree.leaves(t))
  assert size(student) < 0.3 * size(trainer.frozen["student"])
  mu = [s for s in jax.tree.leaves(after["student"]["opt"], is_leaf=lambda x: hasattr(x, "mu"))
        if hasattr(s, "mu")][0].mu
  assert jax.tree.structure(mu) == jax.tree.structure(student)
  assert int(after["step"]) == 2 and "state_digest" in summary


def test_a_lora_run_resumes_bit_identically_and_only_on_its_base(tmp_path, base):
  path, _ = base
  straight = train.Trainer(lora_config(path, **{"train.num_steps": 4}), tmp_path / "a").run()
  train.Trainer(lora_config(path), tmp_path / "b").run()
  resumed = train.Trainer(lora_config(path, **{"train.num_steps": 4}), tmp_path / "b").run()
  assert resumed["state_digest"] == straight["state_digest"]

  other = randomize(wan.init(wan.preset("tiny", num_layers=1)), seed=4, scale=0.2)
  other_path = wan_checkpoint.save_converted(other, tmp_path / "other_base")
  with pytest.raises(errors.UserError, match="trained on another base"):
    train.Trainer(lora_config(other_path, **{"train.num_steps": 6}), tmp_path / "b").run()
  with pytest.raises(errors.UserError, match=r"model.lora \(rank, alpha, targets\): \[4"):
    train.Trainer(lora_config(path, **{"train.num_steps": 6, "model.lora_rank": 8}),
                  tmp_path / "b").run()


def test_merged_exports_equal_the_adapted_model(trained, tmp_path):
  torch = pytest.importorskip("torch")
  transformer_wan = pytest.importorskip("diffusers.models.transformers.transformer_wan")

  trained = trained[0]
  rng = np.random.default_rng(0)
  latents = rng.standard_normal((2, 6, 4, 6, 16)).astype(np.float32)
  context = rng.standard_normal((2, 9, 32)).astype(np.float32)
  t = np.array([900.0, 250.0], np.float32)
  adapted = steps.merged(trained.student_graph, trained.nets.lora["student"],
                         trained.frozen["student"], trained.state["student"]["ema"])
  want = jitted(adapted)(latents, t, context)
  base = wan.from_pretrained(trained.config.model.checkpoint)
  assert rel_l2(want, jitted(base)(latents, t, context)) > 1e-3   # the adapters changed it

  converted = wan.from_pretrained(trained.export(tmp_path / "converted"))
  np.testing.assert_array_equal(jitted(converted)(latents, t, context), want)
  folder = trained.export(tmp_path / "diffusers", "diffusers")
  assert json.loads((folder / "config.json").read_text())["_class_name"] == "WanTransformer3DModel"
  ours = wan.from_pretrained(folder)
  assert ours.config.architecture() == adapted.config.architecture()
  np.testing.assert_array_equal(jitted(ours)(latents, t, context), want)
  reference = transformer_wan.WanTransformer3DModel.from_pretrained(folder).eval()
  assert reference.dtype == torch.float32
  padded = np.pad(context, ((0, 0), (0, ours.config.text_len - 9), (0, 0)))  # Wan's convention
  with torch.no_grad():
    got = reference(torch.from_numpy(latents).permute(0, 4, 1, 2, 3), timestep=torch.from_numpy(t),
                    encoder_hidden_states=torch.from_numpy(padded)).sample
  got = got.permute(0, 2, 3, 4, 1).numpy()
  assert rel_l2(got, want) < 1e-4, rel_l2(got, want)


@pytest.mark.parametrize("key,value,message", [
    ("model.lora_rank", -1, "lora_rank=-1 must be an integer >= 0"),
    ("disc.lora_alpha", 0.0, "disc.lora_alpha=0.0 must be > 0"),
    ("disc.freeze_below", 1, "freeze_below and config.disc.lora_rank"),
    ("model.lora_targets", ("nothing_matches$",), "no parameter matches the lora targets"),
    ("model.lora_targets", ("(unclosed",), "is not a regular expression"),
    ("train.export_format", "pt", "export_format='pt' must be"),
])
def test_lora_config_errors_name_the_field(tmp_path, base, key, value, message):
  with pytest.raises(errors.UserError, match=message.replace("(", r"\(").replace("[", r"\[")):
    train.Trainer(lora_config(base[0], **{key: value}), tmp_path)


def test_adapters_shard_like_their_kernels_under_fsdp(base):
  """``A`` keeps its kernel's input axes and ``B`` its output axes; each rank axis takes the other
  side's axes where they divide the rank, so neither factor is replicated under FSDP."""
  from jax.sharding import PartitionSpec as P
  for rank, fsdp_rank in ((4, "fsdp"), (3, None)):
    c = lora_config(base[0], **{"mesh.num_devices": 8, "mesh.data": 2, "mesh.fsdp": 4,
                                "model.lora_rank": rank})
    nets, _ = state_lib.build_state(c, mesh_lib.mesh_from_config(c), abstract=True)
    attn = nets.state_sharding["student"]["params"]["adapters"]["blocks"]["self_attn"]
    q, o = attn["q"]["kernel"], attn["o"]["kernel"]   # embed -> heads, heads -> embed
    assert q["a"].spec == P(None, "fsdp", "tensor") and q["b"].spec == P(None, fsdp_rank, "tensor")
    assert o["a"].spec == P(None, "tensor", fsdp_rank) and o["b"].spec == P(None, "tensor", "fsdp")
    assert nets.logical_names["student"]["adapters"]["blocks"]["self_attn"]["q"]["kernel"]["b"] \
        == ("layers", "embed", "heads")
