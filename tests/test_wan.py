import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from afd_jax.models import wan
from conftest import jitted, rel_l2


@pytest.fixture(scope="module")
def fwd(tiny_model):
  return jitted(tiny_model)


def test_shapes_dtypes_and_nonzero_output(fwd, inputs):
  latents, context = inputs
  v = fwd(latents, jnp.array([937.5, 250.0]), context)
  assert v.shape == latents.shape and v.dtype == jnp.float32
  assert float(jnp.abs(v).mean()) > 1e-2


def test_batch_timesteps_equal_constant_per_frame_timesteps(tiny_model, fwd, inputs):
  latents, context = inputs
  t = jnp.array([937.5, 250.0])
  np.testing.assert_allclose(fwd(latents, t, context),
                             fwd(latents, jnp.repeat(t[:, None], 6, 1), context), atol=1e-6)


def test_per_frame_timesteps_modulate_their_own_frames(tiny_model, fwd, inputs):
  latents, context = inputs
  t = jnp.full((2, 6), 500.0)
  base = fwd(latents, t, context, attention="block_causal", chunk_frames=3)
  moved = fwd(latents, t.at[:, 4].set(900.0), context, attention="block_causal",
                     chunk_frames=3)
  np.testing.assert_allclose(moved[:, :3], base[:, :3], atol=1e-6)  # earlier chunk unaffected
  assert float(jnp.abs(moved[:, 3:] - base[:, 3:]).max()) > 1e-3


def test_block_causal_chunks_ignore_the_future(tiny_model, fwd, inputs):
  latents, context = inputs
  t = jnp.array([500.0, 500.0])
  full = fwd(latents, t, context, attention="block_causal", chunk_frames=3)
  prefix = fwd(latents[:, :3], t, context)
  np.testing.assert_allclose(full[:, :3], prefix, atol=1e-5)
  one_chunk = fwd(latents, t, context, attention="block_causal", chunk_frames=6)
  np.testing.assert_allclose(one_chunk, fwd(latents, t, context), atol=1e-6)


def test_teacher_forcing_equals_block_causal_with_clean_context(tiny_model, fwd, inputs):
  noisy, context = inputs
  clean = jax.random.normal(jax.random.key(7), noisy.shape)
  t = jnp.array([[937.5] * 3 + [625.0] * 3, [833.3] * 3 + [1000.0] * 3])
  tf = fwd(noisy, t, context, attention="teacher_forcing", chunk_frames=3,
                  clean_latents=clean)
  for chunk in range(2):
    s = slice(3 * chunk, 3 * chunk + 3)
    x = jnp.concatenate([clean[:, :3 * chunk], noisy[:, s]], 1)
    tt = jnp.concatenate([jnp.zeros((2, 3 * chunk)), t[:, s]], 1)
    ref = fwd(x, tt, context, attention="block_causal", chunk_frames=3)
    np.testing.assert_allclose(tf[:, s], ref[:, s], atol=1e-5)


def test_kv_cache_forward_equals_block_causal(tiny_model, fwd, inputs):
  latents, context = inputs
  text = jitted(tiny_model, "text_kv")(context)
  cached = jitted(tiny_model, "forward_cached")
  t = jnp.array([625.0, 937.5])
  _, kv0 = cached(latents[:, :3], jnp.zeros(2), text, None, 0)
  v1, _ = cached(latents[:, 3:], t, text, kv0, 3)
  tt = jnp.concatenate([jnp.zeros((2, 3)), jnp.repeat(t[:, None], 3, 1)], 1)
  ref = fwd(latents, tt, context, attention="block_causal", chunk_frames=3)
  np.testing.assert_allclose(v1, ref[:, 3:], atol=1e-5)


def test_precomputed_text_kv_equals_context(tiny_model, fwd, inputs):
  latents, context = inputs
  t = jnp.array([500.0, 10.0])
  np.testing.assert_allclose(fwd(latents, t, text_kv=tiny_model.text_kv(context)),
                             fwd(latents, t, context), atol=1e-6)


def test_short_contexts_are_zero_padded_to_text_len_as_wan_does(tiny_model, fwd, inputs):
  """7 of text_len = 16 rows given: the model pads with zero rows that still take part in
  cross-attention, so the output is that of the explicitly padded context and not that of
  attending to the given rows alone (the published model's convention). The nine padding rows are
  kept as one key that counts nine times."""
  latents, context = inputs
  t = jnp.array([500.0, 10.0])
  padded = jnp.pad(context, ((0, 0), (0, tiny_model.config.text_len - context.shape[1]), (0, 0)))
  short = fwd(latents, t, context)
  np.testing.assert_allclose(short, fwd(latents, t, padded), rtol=1e-5, atol=1e-6)
  assert tiny_model.text_kv(context).k.shape[2] == context.shape[1] + 1
  assert tiny_model.text_kv(padded).k.shape[2] == tiny_model.config.text_len
  alone = tiny_model.config.replace(text_len=context.shape[1])
  graphdef, state = nnx.split(tiny_model)
  unpadded = nnx.merge(nnx.graphdef(wan.abstract(alone)), state)(latents, t, context)
  assert float(jnp.abs(unpadded - short).max()) > 1e-3
  with pytest.raises(ValueError, match="more than the model's text_len=16"):
    tiny_model.text_kv(jnp.zeros((2, 17, tiny_model.config.text_dim)))


def _loss_and_grads(model, cfg, latents, context):
  graphdef = nnx.graphdef(wan.abstract(cfg))
  t = jnp.array([500.0, 700.0])
  loss = lambda s: jnp.mean(nnx.merge(graphdef, s)(latents, t, context) ** 2)
  return jax.jit(jax.value_and_grad(loss))(nnx.state(model))


@pytest.fixture(scope="module")
def reference_grads(tiny_model, inputs):
  return _loss_and_grads(tiny_model, tiny_model.config, *inputs)


@pytest.mark.parametrize("overrides", [dict(scan_layers=False), dict(remat_policy="full"),
                                       dict(remat_policy="dots", scan_layers=False)])
def test_scan_loop_and_remat_agree_with_gradients(tiny_model, inputs, reference_grads, overrides):
  l0, g0 = reference_grads
  l1, g1 = _loss_and_grads(tiny_model, tiny_model.config.replace(**overrides), *inputs)
  np.testing.assert_allclose(l0, l1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_bfloat16_compute_tracks_float32(tiny_model, fwd, inputs):
  latents, context = inputs
  graphdef, state = nnx.split(tiny_model)
  bf16 = nnx.merge(nnx.graphdef(wan.abstract(tiny_model.config.replace(dtype="bfloat16"))), state)
  t = jnp.array([500.0, 700.0])
  assert rel_l2(bf16(latents, t, context), fwd(latents, t, context)) < 3e-2


def test_every_parameter_has_logical_axes(tiny_model):
  specs = nnx.get_partition_spec(nnx.state(tiny_model))
  for path, var in nnx.to_flat_state(nnx.state(tiny_model)):
    names = var.get_metadata().get("out_sharding")
    assert names is not None and len(names) == var[...].ndim, path
    if path[0] == "blocks":
      assert names[0] == "layers", path
  assert specs is not None


def test_presets_have_the_published_parameter_counts():
  count = lambda cfg: sum(x.size for x in jax.tree.leaves(nnx.state(wan.abstract(cfg))))
  assert count(wan.preset("1.3b")) == 1_418_996_800
  assert count(wan.preset("14b")) == 14_288_491_584


def test_bad_inputs_are_named(tiny_model, inputs):
  latents, context = inputs
  t = jnp.array([500.0, 500.0])
  with pytest.raises(ValueError, match="not a multiple of chunk_frames=4"):
    tiny_model(latents, t, context, attention="block_causal", chunk_frames=4)
  with pytest.raises(ValueError, match="not divisible by the patch size"):
    tiny_model(latents[:, :, :3], t, context)
  with pytest.raises(ValueError, match="channels"):
    tiny_model(latents[..., :4], t, context)
  with pytest.raises(ValueError, match="timesteps must be"):
    tiny_model(latents, jnp.zeros((2, 5)), context)
  with pytest.raises(ValueError, match="context must be"):
    tiny_model(latents, t, context[..., :5])
  with pytest.raises(ValueError, match="needs chunk_frames"):
    tiny_model(latents, t, context, attention="block_causal")
  with pytest.raises(ValueError, match="clean_latents"):
    tiny_model(latents, t, context, attention="teacher_forcing", chunk_frames=3)
  with pytest.raises(ValueError, match="multiples of chunk_frames"):
    tiny_model(latents, t, context, attention="block_causal", chunk_frames=3, window_frames=4)
  with pytest.raises(ValueError, match="invalid WanConfig"):
    wan.WanConfig(dim=100, num_heads=3)
  with pytest.raises(ValueError, match="unknown Wan preset"):
    wan.preset("7b")


def test_cached_context_equals_two_copy_teacher_forcing(tiny_model, fwd, inputs):
  noisy, context = inputs
  clean = jax.random.normal(jax.random.key(8), noisy.shape)
  t = jnp.array([[937.5] * 3 + [625.0] * 3, [833.3] * 3 + [1000.0] * 3])
  text = jitted(tiny_model, "text_kv")(context)
  ctx_kv = jitted(tiny_model, "context_kv")(clean, 3, text)
  cached = jitted(tiny_model, "forward_with_context")(noisy, t, ctx_kv, 3, text)
  two_copy = fwd(noisy, t, context, attention="teacher_forcing", chunk_frames=3, clean_latents=clean)
  np.testing.assert_allclose(cached, two_copy, atol=1e-5)
