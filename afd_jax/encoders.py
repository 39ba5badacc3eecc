"""Latent encoders: pixel videos in, student latents out (and back, to watch them).

A teacher returns finished videos; the student works on latents. The encoder between them is
pluggable: ``PixelEncoder`` (an exact space-to-depth rearrangement, for the built-in physics
demo) now, the Wan VAE later. Both sides agree on channel-last layouts: pixels ``[T, H, W, 3]``
uint8, latents ``[F, h, w, C]`` float32.
"""

from __future__ import annotations

from typing import Protocol

import einops
import numpy as np


class LatentEncoder(Protocol):
  name: str

  def latent_shape(self, video_shape: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """``(T, H, W, 3)`` -> ``(F, h, w, C)``; raises ValueError for a shape it cannot encode."""

  def encode(self, frames: np.ndarray) -> np.ndarray:
    """uint8 ``[T, H, W, 3]`` -> float32 latents ``[F, h, w, C]``."""

  def decode(self, latents: np.ndarray) -> np.ndarray:
    """float latents ``[F, h, w, C]`` -> uint8 ``[T, H, W, 3]``."""


class PixelEncoder:
  """Pixels as latents: ``patch x patch`` pixel blocks become channels, values in [-1, 1].

  Lossless up to uint8 rounding, so a student working on these latents works on the pixels
  themselves (``C = 3 * patch**2``, one latent frame per video frame).
  """

  name = "pixels"

  def __init__(self, patch: int = 4):
    if patch < 1:
      raise ValueError(f"PixelEncoder patch must be >= 1, got {patch}.")
    self.patch = patch

  def latent_shape(self, video_shape):
    t, h, w, c = video_shape
    p = self.patch
    if c != 3 or h % p or w % p:
      raise ValueError(f"video shape {tuple(video_shape)} cannot be encoded: need RGB frames "
                       f"with height and width divisible by the encoder patch {p}.")
    return (t, h // p, w // p, 3 * p * p)

  def encode(self, frames):
    frames = np.asarray(frames)
    self.latent_shape(frames.shape)
    x = frames.astype(np.float32) / 127.5 - 1.0
    return einops.rearrange(x, "t (h p1) (w p2) c -> t h w (p1 p2 c)", p1=self.patch,
                            p2=self.patch)

  def decode(self, latents):
    latents = np.asarray(latents, np.float32)
    if latents.ndim != 4 or latents.shape[-1] != 3 * self.patch ** 2:
      raise ValueError(f"latents {latents.shape} are not [F, h, w, {3 * self.patch ** 2}] "
                       f"pixel-encoder latents (patch {self.patch}).")
    x = einops.rearrange(latents, "t h w (p1 p2 c) -> t (h p1) (w p2) c", p1=self.patch,
                         p2=self.patch, c=3)
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


ENCODERS = {"pixels": PixelEncoder}


def make(name: str, **kwargs) -> LatentEncoder:
  if name not in ENCODERS:
    raise ValueError(f"unknown latent encoder {name!r}; choose one of {sorted(ENCODERS)} "
                     "(the Wan VAE encoder arrives with its own issue).")
  return ENCODERS[name](**kwargs)
