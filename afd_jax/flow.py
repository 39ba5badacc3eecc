"""Rectified-flow conventions shared by Wan, Self-Forcing and DiffusionNFT.

``x_s = (1 - s) x0 + s eps``; the network predicts the velocity ``eps - x0``; the model timestep
is ``t = 1000 s`` (a float, e.g. 937.5). All functions broadcast ``sigma`` against the latents, so a
per-frame ``sigma [B, F]`` noises each frame of ``[B, F, H, W, C]`` latents at its own level.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

NUM_TRAIN_TIMESTEPS = 1000


def _expand(sigma, x):
  sigma = jnp.asarray(sigma, jnp.float32)
  return sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim))


def add_noise(x0, noise, sigma):
  """``x_s = (1 - s) x0 + s eps``."""
  s = _expand(sigma, x0)
  return ((1.0 - s) * x0 + s * noise).astype(x0.dtype)


def velocity_target(x0, noise):
  """Flow-matching regression target ``eps - x0``."""
  return noise - x0


def x0_from_velocity(x_t, velocity, sigma):
  """Clean-sample estimate ``x0 = x_s - s v``."""
  return (x_t - _expand(sigma, x_t) * velocity).astype(x_t.dtype)


def noise_from_velocity(x_t, velocity, sigma):
  """Noise estimate ``eps = x_s + (1 - s) v``."""
  return (x_t + (1.0 - _expand(sigma, x_t)) * velocity).astype(x_t.dtype)


def shift_sigma(s, shift: float):
  """Timestep shift ``sigma = psi s / (1 + (psi - 1) s)`` (Wan / SD3)."""
  return shift * s / (1.0 + (shift - 1.0) * s)


def timestep_to_sigma(t):
  return jnp.asarray(t, jnp.float32) / NUM_TRAIN_TIMESTEPS


def warped_timesteps(steps: Sequence[float], shift: float) -> np.ndarray:
  """Self-Forcing's ``warp_denoising_step``: nominal timestep ``t`` maps to the shifted grid entry
  ``1000 - t``, i.e. ``1000 * shift_sigma(t / 1000)``. ``[1000, 750, 500, 250]`` with shift 5 gives
  ``[1000, 937.5, 833.33, 625]``; 0 stays 0."""
  steps = np.asarray(steps, np.float64)
  if steps.ndim != 1 or steps.size == 0:
    raise ValueError(f"denoising steps must be a non-empty list, got {steps!r}.")
  if np.any(steps < 0) or np.any(steps > NUM_TRAIN_TIMESTEPS) or np.any(np.diff(steps) >= 0):
    raise ValueError(f"denoising steps must decrease strictly within [0, 1000], got {list(steps)}.")
  return (NUM_TRAIN_TIMESTEPS * shift_sigma(steps / NUM_TRAIN_TIMESTEPS, shift)).astype(np.float32)
