"""Fréchet distance between a system's videos and the teacher's, on features of a fixed network.

FVD-style, but tiny and self-contained: no pretrained I3D to download. The feature extractor is
a *fixed random* 3D convolutional network: its input is each frame's RGB in [0, 1] and the change
from the previous frame (6 channels, so motion is seen from the first layer), then three strided
3x3x3 spatio-temporal convolutions with ReLU (32, 64, 64 channels), He-initialised from
``numpy.random.default_rng(FEATURE_SEED)``, each globally average-pooled: ``FEATURE_DIM`` = 160
features. Every machine computes the same network (float64 numpy, weights from one seed); the
numbers are comparable between runs of this module only, never with published FVDs.

The distance between the Gaussians fitted to two feature sets is
``|mu_a - mu_b|**2 + tr(S_a + S_b - 2 (S_a S_b)**0.5)``. With few samples the covariances are
singular, so ``eps * I`` is added to both; the matrix square root's numerical imaginary part is
dropped. Like every Fréchet distance it is biased upward for small sample sets: compare systems
with the same number of samples against the same reference. It sees appearance (colour, blur,
noise) and coarse motion (frozen, shuffled frames); a subtly wrong gravity barely moves it at a
few dozen samples: that is ``physics.py``'s job.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy import linalg

from afd_jax.eval import tracking

FEATURE_SEED = 20260
# (output channels, temporal stride, spatial stride) of each 3x3x3 convolution.
LAYERS = ((32, 1, 2), (64, 2, 2), (64, 2, 2))
FEATURE_DIM = sum(c for c, _, _ in LAYERS)
# Larger frames are average-pooled by the smallest integer factor that brings their longer side to
# at most this (480x832 Wan videos: 7x, to 68x118), which keeps features of full-size videos
# within memory; the demo's small videos pass unchanged.
MAX_SIDE = 128


def _network() -> list[np.ndarray]:
  """The fixed weights, ``[C_in, 3, 3, 3, C_out]`` per layer."""
  rng = np.random.default_rng(FEATURE_SEED)
  weights, c_in = [], 6
  for c_out, _, _ in LAYERS:
    fan_in = c_in * 27
    weights.append(rng.standard_normal((c_in, 3, 3, 3, c_out)) * np.sqrt(2.0 / fan_in))
    c_in = c_out
  return weights


_WEIGHTS = _network()


def _conv(x: np.ndarray, w: np.ndarray, t_stride: int, s_stride: int) -> np.ndarray:
  """``[N, T, H, W, C]`` -> ReLU of a 3x3x3 convolution, zero 'same' padding, then strides."""
  x = np.pad(x, ((0, 0), (1, 1), (1, 1), (1, 1), (0, 0)))
  patches = sliding_window_view(x, (3, 3, 3), axis=(1, 2, 3))[:, ::t_stride, ::s_stride,
                                                                 ::s_stride]
  n, t, h, wd = patches.shape[:4]
  out = patches.reshape(n * t * h * wd, -1) @ w.reshape(-1, w.shape[-1])   # (C, 3, 3, 3) order
  return np.maximum(out, 0.0).reshape(n, t, h, wd, -1)


def features(videos, batch: int = 16) -> np.ndarray:
  """uint8 ``[N, T, H, W, 3]`` (T, H, W >= 3) -> float64 ``[N, FEATURE_DIM]`` (frames larger
  than ``MAX_SIDE`` average-pooled first)."""
  videos = tracking.check_videos(videos)
  if min(videos.shape[1:4]) < 3:
    raise ValueError(f"videos {videos.shape} are too small for the feature network: need at "
                     "least 3 frames of 3x3 pixels.")
  factor = -(-max(videos.shape[2:4]) // MAX_SIDE)
  out = []
  for start in range(0, len(videos), batch):
    x = videos[start:start + batch].astype(np.float64) / 255.0
    if factor > 1:
      n, t, h, w, c = x.shape
      h, w = h // factor * factor, w // factor * factor
      x = x[:, :, :h, :w].reshape(n, t, h // factor, factor, w // factor, factor, c).mean((3, 5))
    x = np.concatenate([x, np.diff(x, axis=1, prepend=x[:, :1])], -1)
    pooled = []
    for w, (_, t_stride, s_stride) in zip(_WEIGHTS, LAYERS):
      x = _conv(x, w, t_stride, s_stride)
      pooled.append(x.mean((1, 2, 3)))
    out.append(np.concatenate(pooled, -1))
  return np.concatenate(out)


def frechet_distance(a: np.ndarray, b: np.ndarray, eps: float = 1e-6) -> float:
  """Fréchet distance between Gaussians fitted to feature rows ``a [N, D]`` and ``b [M, D]``."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
    raise ValueError(f"need two feature sets [N, D] and [M, D] with N, M >= 2, got {a.shape} "
                     f"and {b.shape}.")
  eye = eps * np.eye(a.shape[1])
  cov_a, cov_b = np.cov(a, rowvar=False) + eye, np.cov(b, rowvar=False) + eye
  root = linalg.sqrtm(cov_a @ cov_b)
  mean = np.sum((a.mean(0) - b.mean(0)) ** 2)
  return float(max(mean + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(root).real, 0.0))


def video_frechet(videos, reference) -> float:
  """The Fréchet distance between two video sets (uint8 ``[N, T, H, W, 3]``, same T, H, W)."""
  videos, reference = tracking.check_videos(videos), tracking.check_videos(reference)
  if videos.shape[1:] != reference.shape[1:]:
    raise ValueError(f"videos {videos.shape[1:]} and reference {reference.shape[1:]} differ in "
                     "[T, H, W, 3].")
  return frechet_distance(features(videos), features(reference))
