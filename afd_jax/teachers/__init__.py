"""Black-box teachers: prompts (and a seed) in, clean latent videos out. Nothing else is asked of
a teacher: no scores, no intermediate states, no schedule."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Teacher(Protocol):
  latent_shape: tuple[int, int, int, int]  # (F, H, W, C)

  def __call__(self, prompt_ids: np.ndarray, seed: int) -> np.ndarray:
    """Clean latents ``[B, F, H, W, C]`` (float32) for the prompts; deterministic per seed."""
