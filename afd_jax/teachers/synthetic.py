"""An in-memory synthetic teacher for tests and tiny runs.

Each prompt owns a smooth travelling wave per channel (its frequencies, phases and speed are drawn
from the prompt id), plus a little per-(prompt, seed) texture, plus a constant ``offset`` on
``offset_channel``: one visible property a student can be measured against without any
discriminator.
"""

from __future__ import annotations

import numpy as np

from afd_jax import data as data_lib


class SyntheticTeacher:
  def __init__(self, latent_shape, offset: float = 1.0, offset_channel: int = 0,
               texture: float = 0.1, world_seed: int = 1234):
    self.latent_shape = tuple(latent_shape)
    self.offset, self.offset_channel, self.texture = offset, offset_channel, texture
    self.world_seed = world_seed

  def _video(self, prompt_id: int, seed: int) -> np.ndarray:
    f, h, w, c = self.latent_shape
    rng = np.random.default_rng([self.world_seed, int(prompt_id)])
    freq = rng.uniform(0.3, 1.2, (2, c))
    phase = rng.uniform(0, 2 * np.pi, c)
    speed = rng.uniform(-0.6, 0.6, c)
    t, y, x = np.meshgrid(np.arange(f), np.arange(h), np.arange(w), indexing="ij")
    wave = np.sin(freq[0] * y[..., None] + freq[1] * x[..., None] + speed * t[..., None] + phase)
    texture = np.random.default_rng([self.world_seed, int(prompt_id), int(seed)]).standard_normal(
        (f, h, w, c))
    video = wave + self.texture * texture
    video[..., self.offset_channel] += self.offset
    return video.astype(np.float32)

  def latents(self, prompt_ids, step: int, draw: int = 0) -> np.ndarray:
    """``[B, F, H, W, C]``: a fresh texture every step (and every draw of a step)."""
    seed = step + data_lib.DRAW_STRIDE * draw
    return np.stack([self._video(p, seed) for p in np.asarray(prompt_ids)])
