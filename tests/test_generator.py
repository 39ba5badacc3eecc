"""The generator losses of the baselines (``gan``) and of base distillation (``dmd``): gradient
only through each chunk's exit denoising step, the cached clean history stopped (Self-Forcing)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from afd_jax import flow
from afd_jax import losses
from afd_jax import rollout as R
from afd_jax import steps
from afd_jax.models import discriminator as D
from conftest import randomize

CFG = steps.AFDConfig(rollout_timesteps=tuple(float(t) for t in R.RolloutConfig().timesteps()))
F = 3


@pytest.fixture(scope="module")
def rollout_batch(tiny_model):
  rng = np.random.default_rng(11)
  noise = jnp.asarray(rng.standard_normal((2, 6, 4, 6, 16)), jnp.float32)
  context = jnp.asarray(rng.standard_normal((2, 7, tiny_model.config.text_dim)), jnp.float32)
  graphdef, params = nnx.split(tiny_model)
  exit_step = jnp.asarray(2)
  clean, inputs = R.make_rollout(graphdef, R.RolloutConfig(), exit_inputs=True)(
      params, noise, context, jax.random.key(4), exit_step)
  return graphdef, params, clean, inputs, context, exit_step, noise


def _cached_exit_estimate(graphdef, params, inputs, exit_step, clean, context):
  """The same estimate through the KV-cache path the rollout itself takes: chunk by chunk, the
  cache filled from the rollout's clean output under stop-gradient."""
  model = nnx.merge(graphdef, params)
  text = model.text_kv(context)
  sigma = steps.exit_sigma(CFG, exit_step)
  cache, out = None, []
  for start in range(0, clean.shape[1], F):
    chunk = slice(start, start + F)
    v, _ = model.forward_cached(inputs[:, chunk], jnp.full((2,), sigma * 1000.0), text, cache,
                                start)
    out.append(flow.x0_from_velocity(inputs[:, chunk], v, sigma))
    _, kv = model.forward_cached(jax.lax.stop_gradient(clean[:, chunk]), jnp.zeros((2,)), text,
                                 cache, start)
    kv = jax.tree.map(jax.lax.stop_gradient, kv)
    cache = kv if cache is None else jax.tree.map(lambda a, b: jnp.concatenate([a, b], 2),
                                                  cache, kv)
  return jnp.concatenate(out, 1)


def test_exit_estimate_recomputes_the_rollout_and_only_its_exit_step_has_gradient(rollout_batch):
  graphdef, params, clean, inputs, context, exit_step, noise = rollout_batch
  est = jax.jit(lambda p: steps.exit_estimate(graphdef, CFG, p, inputs, exit_step, clean,
                                              context))
  np.testing.assert_allclose(est(params), clean, atol=2e-5)    # the rollout's own output

  weights = jnp.asarray(np.random.default_rng(0).standard_normal(clean.shape), jnp.float32)
  loss = lambda fn: jax.jit(jax.grad(lambda p: jnp.sum(weights * fn(p))))(params)
  ours = loss(est)
  cached = loss(lambda p: _cached_exit_estimate(graphdef, p, inputs, exit_step, clean, context))
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(cached)):   # float32 rounding of two
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(jnp.abs(b).max()))   # orders

  # Backpropagating through the whole rollout (every step and the cache) is something else.
  whole = loss(lambda p: R.rollout(nnx.merge(graphdef, p), noise, context, jax.random.key(4),
                                   R.RolloutConfig(), exit_step=exit_step))
  assert max(float(jnp.max(jnp.abs(a - b))) for a, b in
             zip(jax.tree.leaves(ours), jax.tree.leaves(whole))) > 1e-3


def test_gan_step_follows_the_relativistic_score_through_the_exit_step(tiny_model,
                                                                      rollout_batch):
  graphdef, params, clean, inputs, context, exit_step, _ = rollout_batch
  disc = randomize(D.init(tiny_model, D.DiscriminatorConfig((0, 1), 96)), seed=4)
  dgraph, dparams = nnx.split(disc)
  teacher = clean + 0.5
  tx = optax.sgd(1.0)
  student = {"params": params, "opt": tx.init(params), "ema": params}
  values = {}
  for jitter in (0.0, 0.2):   # with colour augmentation: each video its own gains, in the loss
    cfg = steps.AFDConfig(rollout_timesteps=CFG.rollout_timesteps, disc_tau_max=0.0,
                          disc_color_jitter=jitter)
    step = jax.jit(steps.make_gan_step(graphdef, dgraph, tx, cfg))
    new, metrics = step(student, dparams, inputs, clean, teacher, context, exit_step,
                        jax.random.key(0), 0)
    gains = steps.color_gains(jax.random.key(0), 2, jitter)
    jittered = (lambda x, side: steps.apply_gains(x, gains[:, side])) if jitter else (
        lambda x, side: x)

    def expected(p):
      d = nnx.merge(dgraph, dparams)
      x0 = steps.exit_estimate(graphdef, cfg, p, inputs, exit_step, clean, context)
      zero = jnp.zeros((2,))
      return losses.relativistic_generator_loss(d(jittered(teacher, 0), zero, context),
                                                d(jittered(x0, 1), zero, context))

    value, grads = jax.jit(jax.value_and_grad(expected))(params)
    np.testing.assert_allclose(metrics["gan/generator_loss"], value, rtol=1e-5)
    for p, g, n in zip(jax.tree.leaves(params), jax.tree.leaves(grads),
                       jax.tree.leaves(new["params"])):
      np.testing.assert_allclose(n, p - g, rtol=1e-4, atol=1e-6)   # SGD(1): exactly that gradient
    values[jitter] = float(value)
  assert values[0.0] != values[0.2]   # the gains reach the loss


def test_dmd_gradient_vanishes_when_the_critic_equals_the_real_score(rollout_batch):
  graphdef, params, clean, inputs, context, exit_step, _ = rollout_batch
  tx = optax.sgd(1.0)
  student = {"params": params, "opt": tx.init(params), "ema": params}
  step = jax.jit(steps.make_dmd_step(graphdef, tx, CFG))
  _, same = step(student, params, params, inputs, clean, context, exit_step, jax.random.key(0), 0)
  assert float(same["student/grad_norm"]) == 0.0
  other = jax.tree.map(lambda x: x * 1.01, params)
  _, apart = step(student, other, params, inputs, clean, context, exit_step, jax.random.key(0), 0)
  assert float(apart["student/grad_norm"]) > 0.0 and float(apart["dmd/gradient"]) > 0.0


def test_dmd_guidance_pulls_toward_the_conditional_score_only_where_the_prompt_matters(
    rollout_batch):
  """With the critic equal to the real score, only guidance leaves a gradient: the guided real
  estimate ``u + g (c - u)`` differs from the critic's ``c`` by ``(g - 1)(c - u)``, which is zero
  under the empty prompt."""
  graphdef, params, clean, inputs, context, exit_step, _ = rollout_batch
  tx = optax.sgd(1.0)
  student = {"params": params, "opt": tx.init(params), "ema": params}
  guided = jax.jit(steps.make_dmd_step(graphdef, tx, steps.AFDConfig(
      rollout_timesteps=CFG.rollout_timesteps, dmd_guidance=3.0)))
  run = lambda ctx: guided(student, params, params, inputs, clean, ctx, exit_step,
                           jax.random.key(0), 0)[1]
  assert float(run(context)["student/grad_norm"]) > 0.0
  assert float(run(jnp.zeros_like(context))["student/grad_norm"]) == 0.0
