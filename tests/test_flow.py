import jax
import jax.numpy as jnp
import numpy as np
import pytest

from afd_jax import flow


def test_warped_self_forcing_schedule():
  np.testing.assert_allclose(flow.warped_timesteps([1000, 750, 500, 250], 5.0),
                             [1000.0, 937.5, 833.3333, 625.0], rtol=1e-6)
  assert flow.warped_timesteps([1000, 0], 5.0)[-1] == 0.0


def test_noising_velocity_and_x0_are_consistent():
  k1, k2 = jax.random.split(jax.random.key(0))
  x0 = jax.random.normal(k1, (2, 3, 4, 4, 2))
  eps = jax.random.normal(k2, x0.shape)
  sigma = jnp.array([[0.2, 0.5, 0.9], [1.0, 0.0, 0.3]])  # per frame
  xt = flow.add_noise(x0, eps, sigma)
  np.testing.assert_allclose(xt[0, 1], 0.5 * x0[0, 1] + 0.5 * eps[0, 1], rtol=1e-6)
  np.testing.assert_allclose(xt[1, 0], eps[1, 0])
  v = flow.velocity_target(x0, eps)
  np.testing.assert_allclose(flow.x0_from_velocity(xt, v, sigma), x0, atol=1e-5)
  np.testing.assert_allclose(flow.noise_from_velocity(xt, v, sigma), eps, atol=1e-5)


def test_shift_is_monotone_and_fixes_endpoints():
  s = np.linspace(0, 1, 11)
  out = flow.shift_sigma(s, 5.0)
  assert out[0] == 0 and out[-1] == 1 and np.all(np.diff(out) > 0) and np.all(out >= s)


@pytest.mark.parametrize("steps", [[], [250, 500], [1200, 500], [1000, 1000]])
def test_bad_step_lists_are_refused(steps):
  with pytest.raises(ValueError, match="denoising steps"):
    flow.warped_timesteps(steps, 5.0)
