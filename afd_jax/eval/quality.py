"""Does a video show what the prompt names, cleanly? Object count, colour and edge sharpness.

Per video (``video_quality``), from the tracks of ``tracking.track``:

* ``count_error`` (lower is better, in objects per frame): how far the number of blobs
  (``tracking.blob_count``, whatever their colour, so extra objects count as much as missing
  ones) falls outside what the prompt's balls allow: at least one blob per group of touching
  balls, at most one per ball (a ball hidden behind another without a trace allows none);
* ``visibility`` (higher is better, 1 at best): the fraction of frames each ball is seen (or
  hidden right behind another), averaged over balls;
* ``color_error`` (lower is better, 0 at best): ``min(|gain - 1|, 1)`` per ball and frame, where
  ``gain`` is the least-squares scale of the ideal anti-aliased disc at the tracked centre that
  best explains the ball's colour weights (pixels lit by another ball left out, so occlusion does
  not count); 1 for a ball that is gone, frames where it is hidden skipped. A dimmed, off-hue
  (beyond ``tracking.FULL_DEG``), shrunken or blurred ball raises it;
* ``hue_error`` (lower is better, degrees): the mean hue angle between matched pixels and the
  prompt's colour, over visible balls (0 to ``tracking.MAX_DEG``, the latter when none is seen);
* ``sharpness`` (higher is better): the mean gradient magnitude of the ball's colour weights on
  its rim (within a pixel of radius ``r``, pixels of another ball left out), over visible balls,
  0 when none is seen. A teacher ball's one-pixel anti-aliased edge gives about 0.47; blur and
  dimming lower it. Compare systems with ``sharpness / teacher sharpness`` (``report.evaluate``
  does, given reference videos).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from afd_jax.eval import tracking
from afd_jax.teachers.physics import PhysicsWorld, Scene

KEYS = ("count_error", "visibility", "color_error", "hue_error", "sharpness")


def _groups(touching: np.ndarray, counted: np.ndarray) -> np.ndarray:
  """``[T]`` connected groups among the counted balls of each frame (``touching [T, K, K]``)."""
  k = touching.shape[-1]
  reach = (touching | np.eye(k, dtype=bool)) & counted[:, :, None] & counted[:, None]
  for _ in range(k):
    reach = (reach.astype(int) @ reach.astype(int)) > 0
  size = reach.sum(-1)
  return np.where(counted, 1.0 / np.maximum(size, 1), 0.0).sum(-1).round().astype(int)


def video_quality(video, prompt: str | Scene, world: PhysicsWorld = PhysicsWorld(),
                  tracks: tracking.Tracks | None = None) -> dict[str, float]:
  """``KEYS`` for one uint8 video ``[T, H, W, 3]``; ``world`` gives the ball radius. Pass
  ``tracks`` to reuse a ``tracking.track``."""
  video = tracking.check_video(video)
  scene = tracking.as_scene(prompt)
  tracks = tracking.track(video, scene, world.radius) if tracks is None else tracks
  h, w = video.shape[1:3]
  r = world.radius * h
  # Blobs allowed per frame: a ball hidden without a trace makes none.
  counted = ~(tracks.overlap & ~tracks.touching.any(-1))
  blobs = tracking.blob_count(video)
  short = _groups(tracks.touching, counted) - blobs
  extra = blobs - counted.sum(-1)
  # The ideal disc at each visible ball's centre, against its weights where no other ball is.
  centres = np.where(tracks.visible[..., None], tracks.centres * h, -1e6)
  px, py = np.arange(w) + 0.5, np.arange(h) + 0.5
  d = np.sqrt((px - centres[..., 0, None, None]) ** 2
              + (py[:, None] - centres[..., 1, None, None]) ** 2)         # [T, K, H, W]
  weights = np.moveaxis(tracks.maps.weights, -1, 1)
  own = ~np.moveaxis(tracks.maps.foreign, -1, 1)
  ideal = np.clip(r + 0.5 - d, 0.0, 1.0) * own
  gain = (ideal * weights).sum((-2, -1)) / np.maximum((ideal ** 2).sum((-2, -1)), 1e-6)
  gain_error = np.where(tracks.visible, np.minimum(np.abs(gain - 1.0), 1.0), 1.0)
  matched = (d <= r + 1.0) * weights
  degrees = np.moveaxis(tracks.maps.degrees, -1, 1)
  hue = (matched * degrees).sum((-2, -1)) / np.maximum(matched.sum((-2, -1)), 1e-6)
  rim = (np.abs(d - r) <= 1.0) & own
  grad = np.hypot(*np.gradient(weights, axis=(-2, -1)))
  sharp = (grad * rim).sum((-2, -1)) / np.maximum(rim.sum((-2, -1)), 1)
  seen = tracks.visible
  hidden = tracks.overlap & ~seen
  return {
      "count_error": float(np.maximum(np.maximum(short, extra), 0).mean()),
      "visibility": float((seen | tracks.overlap).mean()),
      "color_error": float(gain_error[~hidden].mean()) if (~hidden).any() else 0.0,
      "hue_error": float(hue[seen].mean()) if seen.any() else tracking.MAX_DEG,
      "sharpness": float(sharp[seen].mean()) if seen.any() else 0.0,
  }


def evaluate(videos, prompts: Sequence[str], world: PhysicsWorld = PhysicsWorld()
             ) -> tuple[list[dict[str, float]], dict[str, float]]:
  """Per-video dicts (``video_quality``) for uint8 ``[N, T, H, W, 3]`` and their means."""
  videos = tracking.check_videos(videos)
  if len(videos) != len(prompts):
    raise ValueError(f"{len(videos)} videos but {len(prompts)} prompts.")
  rows = [video_quality(v, p, world) for v, p in zip(videos, prompts)]
  return rows, {k: float(np.mean([r[k] for r in rows])) for k in KEYS}
