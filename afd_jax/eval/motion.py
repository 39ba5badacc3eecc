"""How much does a video move, and does it move like the teacher? Measured on tracked balls.

"SFT loses motion" is the paper's first finding (VBench dynamic degree 91.7 -> 44.4 for
Self-Forcing); these metrics make it measurable in the physics world without any learned model:

* ``speed`` (per video, frame heights per second): the mean distance a prompt's ball travels
  between consecutive frames in which it is visible, averaged over balls; 0 when no ball is seen
  in two consecutive frames (nothing visibly moves);
* ``dynamic_degree`` (higher is better, the teacher's is about 1): the fraction of videos whose
  ``speed`` exceeds a threshold calibrated on teacher videos, ``DYNAMIC_FRACTION`` times their
  ``DYNAMIC_QUANTILE`` quantile (VBench's dynamic degree asks the same yes/no question of optical
  flow with a fixed threshold);
* ``speed_ratio`` (1 is the teacher's): the videos' mean ``speed`` over the teacher's on the same
  prompts (videos and references paired by index; a ratio of means, so a still video counts as
  0 without making it infinite or undefined);
* ``temporal_flickering`` (higher is steadier, 1 for a still video): VBench's formula exactly,
  ``(255 - mean_t mean|frame_{t+1} - frame_t|) / 255`` per video, averaged. VBench applies it to
  static scenes; here every scene moves, so it also falls with honest motion and is read
  against the teacher's value.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from afd_jax.eval import tracking
from afd_jax.teachers.physics import PhysicsWorld, Scene

DYNAMIC_QUANTILE = 0.05   # the slowest teacher videos ...
DYNAMIC_FRACTION = 0.5    # ... at half speed still count as moving


def video_speed(video, prompt: str | Scene, world: PhysicsWorld = PhysicsWorld(),
                tracks: tracking.Tracks | None = None) -> float:
  """Mean ball speed of one uint8 video ``[T, H, W, 3]`` in frame heights per second."""
  video = tracking.check_video(video)
  tracks = tracking.track(video, prompt, world.radius) if tracks is None else tracks
  step = np.linalg.norm(np.diff(tracks.centres, axis=0), axis=-1)        # [T-1, K] frame heights
  seen = tracks.visible[1:] & tracks.visible[:-1]
  per_ball = [step[seen[:, k], k].mean() if seen[:, k].any() else 0.0
              for k in range(step.shape[1])]
  return float(np.mean(per_ball) * world.fps)


def temporal_flickering(video) -> float:
  """VBench's temporal flickering score of one uint8 video ``[T, H, W, 3]``."""
  frames = tracking.check_video(video).astype(np.float32)
  mae = np.abs(frames[1:] - frames[:-1]).mean(axis=(1, 2, 3))
  return float((255.0 - mae.mean()) / 255.0)


def dynamic_threshold(reference_speeds) -> float:
  """The speed above which a video counts as dynamic, from teacher videos' speeds."""
  return DYNAMIC_FRACTION * float(np.quantile(np.asarray(reference_speeds), DYNAMIC_QUANTILE))


def evaluate(videos, prompts: Sequence[str], world: PhysicsWorld = PhysicsWorld(), *,
             reference=None, reference_prompts: Sequence[str] | None = None,
             speeds=None) -> dict[str, float]:
  """Motion metrics of uint8 videos ``[N, T, H, W, 3]``, one per prompt.

  ``reference``: teacher videos ``[M, T, H, W, 3]`` of ``reference_prompts`` (default
  ``prompts``); they calibrate ``dynamic_degree`` and, when paired by index with ``videos``
  (M == N), give ``speed_ratio``. Without them only ``speed`` and ``temporal_flickering``.
  ``speeds`` reuses per-video speeds already measured (``video_speed``)."""
  videos = tracking.check_videos(videos)
  if len(videos) != len(prompts):
    raise ValueError(f"{len(videos)} videos but {len(prompts)} prompts.")
  if speeds is None:
    speeds = [video_speed(v, p, world) for v, p in zip(videos, prompts)]
  speeds = np.asarray(speeds, np.float64)
  out = {"speed": float(speeds.mean()),
         "temporal_flickering": float(np.mean([temporal_flickering(v) for v in videos]))}
  if reference is None:
    return out
  reference = tracking.check_videos(reference)
  reference_prompts = prompts if reference_prompts is None else reference_prompts
  if len(reference) != len(reference_prompts):
    raise ValueError(f"{len(reference)} reference videos but {len(reference_prompts)} prompts.")
  ref = np.array([video_speed(v, p, world) for v, p in zip(reference, reference_prompts)])
  out["dynamic_degree"] = float(np.mean(speeds > dynamic_threshold(ref)))
  if len(reference) == len(videos) and list(reference_prompts) == list(prompts):
    out["speed_ratio"] = float(speeds.mean() / max(ref.mean(), 1e-6))
  return out
