"""Turning latent videos into files people can watch.

Until a VAE is configured, latents are shown directly: three latent channels as RGB, each scaled
by its own robust range and upsampled with nearest neighbours so structure stays visible.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def latents_to_frames(latents, channels=(0, 1, 2), upscale: int = 8) -> np.ndarray:
  """``[F, H, W, C]`` latents -> ``[F, H*upscale, W*upscale, 3]`` uint8 frames."""
  x = np.asarray(latents, np.float32)[..., list(channels)]
  lo = np.percentile(x, 1, axis=(0, 1, 2), keepdims=True)
  hi = np.percentile(x, 99, axis=(0, 1, 2), keepdims=True)
  x = np.clip((x - lo) / np.maximum(hi - lo, 1e-6), 0.0, 1.0)
  x = x.repeat(upscale, axis=1).repeat(upscale, axis=2)
  return (x * 255).round().astype(np.uint8)


def write_gif(frames: np.ndarray, path, fps: float = 8.0) -> Path:
  """Writes ``[F, H, W, 3]`` uint8 frames as a looping GIF."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  images = [Image.fromarray(f) for f in frames]
  images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
  return path


def tile(videos: np.ndarray, pad: int = 2) -> np.ndarray:
  """``[N, F, H, W, 3]`` -> one ``[F, H, N*(W+pad)-pad, 3]`` video, side by side."""
  n, f, h, w, c = videos.shape
  out = np.full((f, h, n * (w + pad) - pad, c), 255, np.uint8)
  for i in range(n):
    out[:, :, i * (w + pad):i * (w + pad) + w] = videos[i]
  return out
