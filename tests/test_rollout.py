import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from afd_jax import flow
from afd_jax import rollout as R
from conftest import jitted

B = 2


def _run(model, cfg, frames, seed=0):
  rng = np.random.default_rng(seed)
  noise = jnp.asarray(rng.standard_normal((B, frames, 4, 6, 16)), jnp.float32)
  context = jnp.asarray(rng.standard_normal((B, 7, model.config.text_dim)), jnp.float32)
  graphdef, state = nnx.split(model)
  fn = R.make_rollout(graphdef, cfg, return_intermediates=True)
  latents, inter = fn(state, noise, context, jax.random.key(seed))
  return fn, (state, noise, context), latents, inter


def _assert_matches_full_forward(model, cfg, latents, inter, **window):
  """Every step of every chunk equals a full-sequence block-causal forward whose history is the
  committed clean output at t = 0 (wan_reference.md section 8.4)."""
  fwd = jitted(model)
  ts = cfg.timesteps()
  f = cfg.chunk_frames
  for step, t in enumerate(ts):
    for chunk in range(latents.shape[1] // f):
      s = slice(chunk * f, chunk * f + f)
      x = jnp.concatenate([latents[:, :chunk * f], inter["inputs"][step][:, s]], 1)
      tt = jnp.concatenate([jnp.zeros((B, chunk * f)), jnp.full((B, f), t)], 1)
      ref = fwd(x, tt, inter["context"], attention="block_causal", chunk_frames=f, **window)
      np.testing.assert_allclose(inter["velocities"][step][:, s], ref[:, s], atol=2e-5)


def test_rollout_equals_block_causal_forward_chunk_by_chunk(tiny_model):
  cfg = R.RolloutConfig()
  fn, args, latents, inter = _run(tiny_model, cfg, 9)
  inter["context"] = args[2]
  assert latents.shape == (B, 9, 4, 6, 16) and np.isfinite(np.asarray(latents)).all()
  _assert_matches_full_forward(tiny_model, cfg, latents, inter)
  # The first input of each chunk is the initial noise; the output is the last clean estimate.
  np.testing.assert_array_equal(inter["inputs"][0], args[1])
  s_last = flow.timestep_to_sigma(cfg.timesteps()[-1])
  np.testing.assert_allclose(
      latents, flow.x0_from_velocity(inter["inputs"][-1], inter["velocities"][-1], s_last),
      atol=1e-6)


def test_rolling_window_cache_equals_windowed_block_causal(tiny_model):
  cfg = R.RolloutConfig(window_frames=12, sink_frames=3)
  plan = R.plan_cache(18, cfg)
  # 3 sink frames + a 6-frame ring that wraps: chunk 3 overwrites chunk 1's slot.
  assert plan.capacity_frames == 9 and plan.writes == (0, 3, 6, 3, 6, None)
  fn, args, latents, inter = _run(tiny_model, cfg, 18)
  inter["context"] = args[2]
  _assert_matches_full_forward(tiny_model, cfg, latents, inter, window_frames=12, sink_frames=3)


def test_rollout_compiles_once(tiny_model):
  cfg = R.RolloutConfig()
  fn, (state, noise, context), first, _ = _run(tiny_model, cfg, 9)
  second, _ = fn(state, noise + 1.0, context * 2.0, jax.random.key(7))
  assert fn._cache_size() == 1
  assert not np.allclose(first, second)


def test_fresh_noise_between_steps_comes_from_the_key(tiny_model):
  cfg = R.RolloutConfig()
  fn, (state, noise, context), first, _ = _run(tiny_model, cfg, 9)
  again, _ = fn(state, noise, context, jax.random.key(0))
  other, _ = fn(state, noise, context, jax.random.key(1))
  np.testing.assert_array_equal(first, again)
  assert not np.allclose(first, other)


def test_micro_batched_rollout_samples_each_slice_with_its_own_key(tiny_model):
  """``micro_batches=2``: slice j (rows j, j + 2, ...) is the rollout of those rows under the j-th
  split of the key, sampled one slice after the other."""
  graphdef, state = nnx.split(tiny_model)
  cfg = R.RolloutConfig(denoising_steps=(1000.0, 500.0))
  rng = np.random.default_rng(0)
  noise = jnp.asarray(rng.standard_normal((4, 6, 4, 6, 16)), jnp.float32)
  context = jnp.asarray(rng.standard_normal((4, 7, 32)), jnp.float32)
  key = jax.random.key(3)
  got = R.make_rollout(graphdef, cfg, micro_batches=2)(state, noise, context, key)
  one = R.make_rollout(graphdef, cfg)
  for j, k in enumerate(jax.random.split(key, 2)):
    np.testing.assert_allclose(got[j::2], one(state, noise[j::2], context[j::2], k), atol=1e-5)
  with pytest.raises(ValueError, match="return_intermediates needs micro_batches=1"):
    R.make_rollout(graphdef, cfg, return_intermediates=True, micro_batches=2)


def test_cache_plans_and_bad_configs():
  plan = R.plan_cache(21, R.RolloutConfig())
  assert plan.capacity_frames == 18 and plan.reads == (0, 3, 6, 9, 12, 15, 18)
  assert plan.writes[-1] is None
  assert R.plan_cache(21, R.RolloutConfig(commit_last_chunk=True)).capacity_frames == 21
  with pytest.raises(ValueError, match="multiple of chunk_frames"):
    R.plan_cache(10, R.RolloutConfig())
  with pytest.raises(ValueError, match="window_frames"):
    R.plan_cache(21, R.RolloutConfig(window_frames=7))
  with pytest.raises(ValueError, match="sink_frames only"):
    R.plan_cache(21, R.RolloutConfig(sink_frames=3))
  np.testing.assert_allclose(R.RolloutConfig().timesteps(), [1000, 937.5, 833.3333, 625], rtol=1e-6)


def test_ode_sampler_takes_deterministic_euler_steps(tiny_model):
  """``sampler="ode"``: each step's input is the previous input plus (s_next - s) v, the same
  block-causal velocities as the renoise sampler, and the key plays no part."""
  cfg = R.RolloutConfig(denoising_steps=(1000.0, 750.0, 500.0, 250.0), shift=1.0, sampler="ode")
  fn, args, latents, inter = _run(tiny_model, cfg, 6)
  inter["context"] = args[2]
  _assert_matches_full_forward(tiny_model, cfg, latents, inter)
  sig = flow.timestep_to_sigma(cfg.timesteps())
  for q in range(len(sig) - 1):
    np.testing.assert_allclose(inter["inputs"][q + 1], inter["inputs"][q] + (sig[q + 1] - sig[q])
                               * inter["velocities"][q], atol=1e-6)
  other, _ = fn(args[0], args[1], args[2], jax.random.key(5))
  np.testing.assert_array_equal(latents, other)
  with pytest.raises(ValueError, match="sampler"):
    R.RolloutConfig(sampler="heun")


def test_training_rollout_ends_chunks_at_the_exit_step(tiny_model):
  """``exit_step`` q: every chunk's output is its clean estimate at step q, later chunks see it as
  history, and the returned inputs are the model inputs of step q."""
  cfg = R.RolloutConfig()
  rng = np.random.default_rng(3)
  noise = jnp.asarray(rng.standard_normal((B, 6, 4, 6, 16)), jnp.float32)
  context = jnp.asarray(rng.standard_normal((B, 7, tiny_model.config.text_dim)), jnp.float32)
  graphdef, state = nnx.split(tiny_model)
  train = R.make_rollout(graphdef, cfg, exit_inputs=True)
  full = R.make_rollout(graphdef, cfg, return_intermediates=True)
  key = jax.random.key(1)
  latents, inter = full(state, noise, context, key)
  last, inputs = train(state, noise, context, key, jnp.asarray(3))
  np.testing.assert_array_equal(last, latents)                   # q = last: the inference rollout
  np.testing.assert_array_equal(inputs, inter["inputs"][3])
  first, inputs0 = train(state, noise, context, key, jnp.asarray(0))
  np.testing.assert_array_equal(inputs0[:, :3], noise[:, :3])     # chunk 0 starts from the noise
  s0 = flow.timestep_to_sigma(cfg.timesteps()[0])
  np.testing.assert_allclose(first[:, :3], flow.x0_from_velocity(
      noise[:, :3], inter["velocities"][0][:, :3], s0), atol=1e-6)
  assert not np.allclose(first[:, 3:], latents[:, 3:])            # chunk 1 saw another history


@pytest.mark.parametrize("window", [{}, {"window_frames": 12, "sink_frames": 3}])
def test_scanned_chunks_equal_the_unrolled_rollout(tiny_model, window):
  """Chunks under lax.scan (dynamic cache slices, attention stopping at the written length) give
  today's unrolled rollout: latents, every step's inputs and velocities, and a training rollout's
  exit step; global and rolling-window caches (the ring wraps at 18 frames)."""
  cfg = R.RolloutConfig(**window)
  _, args, latents, inter = _run(tiny_model, cfg, 18)
  graphdef, _ = nnx.split(tiny_model)
  unrolled = R.make_rollout(graphdef, R.RolloutConfig(scan_chunks=False, **window),
                            return_intermediates=True)
  want, want_inter = unrolled(*args, jax.random.key(0))
  np.testing.assert_allclose(latents, want, atol=2e-5)
  for name in ("inputs", "velocities"):
    np.testing.assert_allclose(inter[name], want_inter[name], atol=2e-5)
  exits = [R.make_rollout(graphdef, R.RolloutConfig(scan_chunks=scan, **window), exit_inputs=True)
           for scan in (True, False)]
  for a, b in zip(*(fn(*args, jax.random.key(1), jnp.int32(1)) for fn in exits)):
    np.testing.assert_allclose(a, b, atol=2e-5)
