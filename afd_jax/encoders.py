"""Latent encoders: pixel videos in, student latents out (and back, to watch them).

A teacher returns finished videos; the student works on latents. The encoder between them is
pluggable: ``PixelEncoder`` (an exact space-to-depth rearrangement, for the built-in physics
demo) and ``WanVAEEncoder`` (the Wan2.1 VAE, for real Wan students). Both sides agree on
channel-last layouts: pixels ``[T, H, W, 3]`` uint8, latents ``[F, h, w, C]`` float32. ``spec``
is what a teacher store records to rebuild the encoder (``make(**spec)``).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Protocol

import einops
import numpy as np

from afd_jax import errors


class LatentEncoder(Protocol):
  name: str
  spatial_stride: int  # pixels per latent, in height and width

  @property
  def spec(self) -> dict[str, Any]:
    """JSON-able ``make`` arguments that rebuild this encoder."""

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
      raise errors.UserError(f"PixelEncoder patch must be >= 1, got {patch}.")
    self.patch = self.spatial_stride = patch

  @property
  def spec(self):
    return {"name": self.name, "patch": self.patch}

  def latent_shape(self, video_shape):
    t, h, w, c = video_shape
    p = self.patch
    if c != 3 or h % p or w % p:
      raise errors.UserError(f"video shape {tuple(video_shape)} cannot be encoded: need RGB frames "
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
      raise errors.UserError(f"latents {latents.shape} are not [F, h, w, {3 * self.patch ** 2}] "
                       f"pixel-encoder latents (patch {self.patch}).")
    x = einops.rearrange(latents, "t h w (p1 p2 c) -> t (h p1) (w p2) c", p1=self.patch,
                         p2=self.patch, c=3)
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


class WanVAEEncoder:
  """The Wan2.1 VAE: ``1 + 4k`` frames of ``H x W`` -> ``1 + k`` normalised latent frames of
  ``H/8 x W/8 x 16`` (the posterior mean), and back (clamped to [-1, 1], then uint8).

  ``vae`` is a checkpoint in any layout ``wan_vae_checkpoint.load`` reads; it is loaded on first
  use. ``chunk`` latent frames are processed at a time (0: the whole video); ``tile`` > 0 cuts
  frames larger than ``tile`` pixels into tiles every ``tile_stride`` (default 3/4 of ``tile``).
  """

  name = "wan_vae"

  def __init__(self, vae: str, chunk: int = 1, tile: int = 0, tile_stride: int = 0,
               dtype: str = "float32"):
    from afd_jax.models import wan_vae, wan_vae_checkpoint
    if not vae or not Path(vae).exists():
      raise errors.MissingInput(
          f"Wan VAE checkpoint {vae!r} does not exist: set it (--vae, config.data.vae) to "
          f"{wan_vae_checkpoint.ORIGINAL_FILE}, a diffusers vae/ folder or a folder made by "
          f"`{wan_vae_checkpoint.CONVERT}`.")
    self.path = str(Path(vae).absolute())
    self.chunk, self.dtype = chunk, dtype
    self.tiling = wan_vae.Tiling(tile, tile_stride or tile // 4 * 3) if tile else None
    self.config = wan_vae_checkpoint.load_config(self.path, dtype=dtype)
    if self.tiling:
      self.tiling.check(self.config.spatial_stride)
    self.spatial_stride = self.config.spatial_stride

  @property
  def spec(self):
    return {"name": self.name, "vae": self.path, "chunk": self.chunk,
            "tile": self.tiling.size if self.tiling else 0,
            "tile_stride": self.tiling.stride if self.tiling else 0, "dtype": self.dtype}

  @functools.cached_property
  def vae(self):
    from afd_jax.models import wan_vae_checkpoint
    return wan_vae_checkpoint.load(self.path, dtype=self.dtype)

  def latent_shape(self, video_shape):
    t, h, w, c = video_shape
    if c != 3:
      raise errors.UserError(f"video shape {tuple(video_shape)} is not RGB frames [T, H, W, 3].")
    return (*self.config.latent_shape(t, h, w), self.config.z_dim)

  def encode(self, frames):
    from afd_jax.models import wan_vae
    frames = np.asarray(frames)
    self.latent_shape(frames.shape)
    x = wan_vae.encode(self.vae, wan_vae.to_pixels(frames)[None], chunk=self.chunk,
                       tiling=self.tiling)
    return np.asarray(x[0], np.float32)

  def decode(self, latents):
    from afd_jax.models import wan_vae
    latents = np.asarray(latents, np.float32)
    if latents.ndim != 4 or latents.shape[-1] != self.config.z_dim:
      raise errors.UserError(f"latents {latents.shape} are not [F, h, w, {self.config.z_dim}] Wan VAE "
                       "latents.")
    x = wan_vae.decode(self.vae, latents[None], chunk=self.chunk, tiling=self.tiling)
    return wan_vae.to_uint8(x[0])


ENCODERS = {"pixels": PixelEncoder, "wan_vae": WanVAEEncoder}


def make(name: str, **kwargs) -> LatentEncoder:
  if name not in ENCODERS:
    raise errors.UserError(f"unknown latent encoder {name!r}; choose one of {sorted(ENCODERS)}.")
  return ENCODERS[name](**kwargs)


def from_options(name: str, *, patch: int = 4, vae: str | None = None, vae_chunk: int = 1,
                 vae_tile: int = 0) -> LatentEncoder:
  """Encoder ``name`` from the options of every encoder (config fields, CLI flags): each takes
  its own."""
  if name == "wan_vae":
    return WanVAEEncoder(vae, chunk=vae_chunk, tile=vae_tile)
  return make(name, patch=patch)


def from_config(data, name: str | None = None) -> LatentEncoder:
  """The encoder ``config.data`` names (or ``name``), with its options (``encoder_patch``,
  ``vae``, ``vae_chunk``, ``vae_tile``)."""
  return from_options(name or data.encoder, patch=data.encoder_patch, vae=data.vae,
                      vae_chunk=data.vae_chunk, vae_tile=data.vae_tile)
