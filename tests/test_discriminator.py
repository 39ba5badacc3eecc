import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from afd_jax.models import discriminator as D
from afd_jax.models import wan
from conftest import jitted, randomize

CFG = D.DiscriminatorConfig(readout_layers=(1, 0), readout_ffn_dim=96)


@pytest.fixture(scope="module")
def disc(tiny_model):
  return randomize(D.init(tiny_model, CFG, seed=1), seed=3)


def test_logits_depend_on_video_and_prompt(disc, inputs):
  latents, context = inputs
  fwd = jitted(disc)
  t = jnp.zeros(2)
  logits = fwd(latents, t, context)
  assert logits.shape == (2,) and logits.dtype == jnp.float32
  assert float(jnp.abs(fwd(latents * 0.5, t, context) - logits).max()) > 1e-4
  assert float(jnp.abs(fwd(latents, t, context[::-1]) - logits).max()) > 1e-4


def test_a_motion_discriminator_reads_only_what_changes_between_frames(tiny_model, inputs):
  """``input="motion"``: adding one still image to every frame (a background, a brightness)
  leaves the logits as they were, and so does shifting the whole video by one constant, while
  moving one frame changes them; the frame discriminator sees the still image."""
  latents, context = inputs
  motion = jitted(randomize(D.init(tiny_model, D.DiscriminatorConfig((1, 0), 96, input="motion"),
                                   seed=1), seed=3))
  t = jnp.array([0.0, 200.0])
  still = jax.random.normal(jax.random.key(5), latents[:, :1].shape)
  logits = motion(latents, t, context)
  np.testing.assert_allclose(motion(latents + still, t, context), logits, atol=1e-5)
  np.testing.assert_allclose(motion(latents - 0.3, t, context), logits, atol=1e-5)
  assert float(jnp.abs(motion(latents.at[:, 2].add(0.5), t, context) - logits).min()) > 1e-4
  video = jitted(randomize(D.init(tiny_model, D.DiscriminatorConfig((1, 0), 96), seed=1), seed=3))
  moved = video(latents + still, t, context) - video(latents, t, context)
  assert float(jnp.abs(moved).min()) > 1e-4
  with pytest.raises(ValueError, match="disc input 'flow' is not one of"):
    D.init(tiny_model, D.DiscriminatorConfig((0,), 96, input="flow"))


def test_a_coarse_discriminator_reads_where_things_are_not_their_looks(tiny_model, inputs):
  """``input="coarse"``: a per-channel gain and offset of one video (up to the standardisation's
  epsilon), or texture that averages out inside a pooled cell, leaves its logit as it was;
  moving content from one cell to another changes it."""
  latents, context = inputs
  coarse = jitted(randomize(D.init(tiny_model, D.DiscriminatorConfig((1, 0), 96, input="coarse"),
                                   seed=1), seed=3))
  t = jnp.array([0.0, 200.0])
  logits = coarse(latents, t, context)
  gain = (jnp.array([1.3, 0.7])[:, None, None, None, None]
          * jnp.linspace(0.8, 1.2, latents.shape[-1]))
  np.testing.assert_allclose(coarse(latents * gain - 0.4, t, context), logits, atol=1e-3)  # eps
  checker = jnp.array([[1.0, -1.0], [-1.0, 1.0]])
  texture = jnp.tile(checker, (latents.shape[2] // 2, latents.shape[3] // 2))[None, None, ..., None]
  np.testing.assert_allclose(coarse(latents + 0.5 * texture, t, context), logits, atol=1e-4)
  moved = latents.at[:, 1, :2, :2].add(1.0).at[:, 1, 2:, 2:4].add(-1.0)
  assert float(jnp.abs(coarse(moved, t, context) - logits).min()) > 1e-4
  with pytest.raises(ValueError, match="coarse_pool=4 does not divide the 4x6 latent grid"):
    coarse_4 = D.init(tiny_model, D.DiscriminatorConfig((1, 0), 96, input="coarse", coarse_pool=4))
    coarse_4(latents, t, context)
  with pytest.raises(ValueError, match="no per-chunk logits"):
    D.init(tiny_model, D.DiscriminatorConfig((0,), 96, input="coarse", chunk_frames=3))


def test_a_per_chunk_discriminator_judges_each_prefix_by_itself(tiny_model, inputs):
  """``chunk_frames=3`` (two chunks here): one logit per chunk, chunk c's computed from frames
  < 3 (c + 1) alone (equal to the logit of that prefix given as the whole video), so changing
  the second chunk moves the second logit only."""
  latents, context = inputs
  disc = randomize(D.init(tiny_model, D.DiscriminatorConfig((1, 0), 96, chunk_frames=3), seed=1),
                   seed=3)
  fwd = jitted(disc)
  t = jnp.array([0.0, 200.0])
  logits = fwd(latents, t, context)
  assert logits.shape == (2, 2) and logits.dtype == jnp.float32
  np.testing.assert_allclose(fwd(latents[:, :3], t, context)[:, 0], logits[:, 0], atol=1e-5)
  moved = fwd(latents.at[:, 4].add(1.0), t, context) - logits
  assert float(jnp.abs(moved[:, 0]).max()) == 0.0 and float(jnp.abs(moved[:, 1]).min()) > 1e-4
  with pytest.raises(ValueError, match="not a multiple of chunk_frames=4"):
    D.init(tiny_model, D.DiscriminatorConfig((0,), 96, chunk_frames=4))(latents, t, context)


def test_features_are_the_trunk_hidden_states(tiny_model, inputs):
  """The last-block feature pushed through the output head reproduces the model's forward."""
  latents, context = inputs
  t = jnp.array([300.0, 800.0])

  def via_features(model):
    h = model.features(latents, t, context, (model.config.num_layers - 1,))[0]
    e, _ = model._time(jnp.repeat(t[:, None], 6, 1))
    out = model.head(h.reshape(2, 6, -1, model.config.dim), e)
    return model._unpatchify(out, (6, 2, 3))

  np.testing.assert_allclose(jitted(tiny_model, "__call__")(latents, t, context),
                             jax.jit(lambda: via_features(tiny_model))(), atol=1e-5)


def test_frozen_lower_blocks_get_no_gradient(tiny_model, inputs):
  latents, context = inputs
  disc = randomize(D.init(tiny_model, D.DiscriminatorConfig((1,), 96, freeze_below=1)), seed=2)
  graphdef, state = nnx.split(disc)
  grads = jax.jit(jax.grad(lambda s: nnx.merge(graphdef, s)(latents, jnp.zeros(2), context).sum()))(
      state)
  block_grads = grads["trunk"]["blocks"]["ffn_in"]["kernel"][...]
  assert float(jnp.abs(block_grads[0]).max()) == 0.0      # block 0 frozen
  assert float(jnp.abs(block_grads[1]).max()) > 0.0       # block 1 trains
  assert float(jnp.abs(grads["trunk"]["patch_embedding"]["kernel"][...]).max()) == 0.0
  for name in ("registers", "head_hidden", "readouts"):
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads[name])) > 0.0


def test_bad_readout_configs_are_refused(tiny_model):
  with pytest.raises(ValueError, match="readout_layers"):
    D.init(tiny_model, D.DiscriminatorConfig((2,)))
  with pytest.raises(ValueError, match="freeze_below"):
    D.init(tiny_model, D.DiscriminatorConfig((0,), freeze_below=1))
  with pytest.raises(ValueError, match="feature layers"):
    tiny_model.features(jnp.zeros((1, 3, 4, 6, 16)), jnp.zeros(1), jnp.zeros((1, 2, 32)), ())


def test_full_size_readout_matches_the_reference_parameter_count():
  trunk = wan.abstract(wan.preset("1.3b"))
  disc = nnx.eval_shape(lambda: D.Discriminator(trunk, D.DiscriminatorConfig(), rngs=nnx.Rngs(0)))
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  state = nnx.state(disc)
  readout = count(state["readouts"][0])
  assert abs(readout - 34.6e6) / 34.6e6 < 0.01                 # afd_method.md 6.4: ~34.6 M each
  head = count(state["head_norm"]) + count(state["head_hidden"]) + count(state["head_out"])
  assert abs(head - 7.1e6) / 7.1e6 < 0.01                       # ~7.1 M
