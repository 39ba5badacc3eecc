"""Does a video obey the physics its prompt asks for? Measured on tracked balls, in pixels/frame.

Per ball and axis, frame intervals where the ball may have touched a wall (floor, ceiling, side
walls) are *contacts*: the nearer end of the interval is within reach of the wall, reach being
half the local speed plus ``0.75 g`` plus ``tolerance_px`` (a bounce inside an interval needs
the ball to travel to the wall and back within it). Frames where the ball is not visible also
break the track. What is left are bounce-free segments, on which the ball should fly a parabola.

Five terms per ball, each clipped to [0, 1] (lower is better):

* ``accel_error``: ``|a_y - g| / g``, ``a_y`` one least-squares acceleration shared by all
  bounce-free vertical segments of >= 3 frames (each with its own position and velocity), ``g =
  prompt_g * H / fps**2`` in px/frame**2;
* ``accel_x_error``: ``|a_x| / g`` the same way on segments between side-wall contacts;
* ``bounce_error``: ``|e_hat - e| / e`` averaged over observed bounces: a contact between two
  segments where the ball arrives towards the wall and leaves away from it at >= ``MIN_IMPACT``
  frame heights/s; speeds at the wall are extrapolated from each segment's ends with the measured
  acceleration (``w**2 = u**2 + 2 a d``), ``e_hat = w_after / w_before``;
* ``penetration``: the fraction of tracked frames whose centre is more than ``tolerance_px``
  outside ``[r, 1 - r]`` (x up to width/height) on either axis;
* ``chunk_jump``: ``(mean J at chunk boundaries - mean J inside chunks) / g``, where ``J`` is
  the velocity kink of one frame interval, ``|v_k - (v_{k-1} + v_{k+1}) / 2|``, half the third
  difference of positions (zero on any parabola, whatever ``g``), on bounce-free frames where
  the ball touches no other; boundary intervals end at a frame that starts a chunk
  (``chunk_frames``, ``2 * chunk_frames``, ...), where a causal student can glitch.

A term with no evidence (no bounce seen, no boundary interval tracked) is 0, except the vertical
acceleration of a ball visible in at least ``MIN_VISIBLE`` of the frames: a correct video always
shows three bounce-free frames of it, so it counts 1 when it does not. A ball with no trace in a
fraction ``m`` of the frames (hidden right behind another ball does not count) enters every term
as ``m * 1 + (1 - m) * term``, and as all 1s when ``m > 1 - MIN_VISIBLE``: a missing ball costs
the maximum, never NaN. Per video::

    physics_error = mean over balls of (accel_error + accel_x_error + bounce_error
                                        + penetration + chunk_jump)        in [0, 5]

Beside the error, ``gravity_ratio`` reads the gravity a video shows: the measured vertical
acceleration over the prompt's (clipped to [0, 2], averaged over balls and over the videos where
it could be measured; NaN where no ball flew three frames). ``accel_error`` counts jitter and a
wrong value alike; ``gravity_ratio`` near 1 says the value is right, whatever the jitter.
``gravity_ratio_in_chunks`` reads it the same way from second differences inside chunks only:
a causal student that jumps down at every chunk boundary shows a larger ``gravity_ratio``
(the jumps fit a parabola's growing steps) but not a larger ``gravity_ratio_in_chunks``.
``fall_jitter`` says how far such a reading can be trusted: the standard deviation of those
in-chunk vertical second differences over ``g`` (0 on any parabola; NaN below two of them). A
ball that wobbles by a pixel from frame to frame shows no gravity inside chunks, only noise, and
as each ball's ratio is clipped to [0, 2] before averaging, a wobbling ball that does not
accelerate at all reads a positive ``gravity_ratio_in_chunks`` (about 0.3-0.6 for a reading
that scatters by 0.8-1.7 g).

Across videos, ``gravity_slope`` reads whether the gravity follows the prompt's word: the
least-squares slope of the measured vertical acceleration on the asked one (weak / normal /
strong), 1 when it does, 0 when every video falls alike whatever the word.

Teacher renders score about 0.02 (tracking noise); gravity scaled by 0.3 to 0.5 about 0.6, a
frozen video about 1, shuffled frames about 1.7, noise 5.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from afd_jax.eval import tracking
from afd_jax.teachers.physics import DIRECTIONS, PhysicsWorld, Scene

TERMS = ("accel_error", "accel_x_error", "bounce_error", "penetration", "chunk_jump")
RATIOS = ("gravity_ratio", "gravity_ratio_in_chunks")
READINGS = (*RATIOS, "fall_jitter")   # per ball, over g; means over the videos that show them
MIN_VISIBLE = 0.5   # a ball missing from more than half the frames gets the maximum error
MIN_IMPACT = 0.25   # frame heights/s: slower wall contacts are too noisy to read a restitution
_LAUNCH_JITTER = 0.3  # frame heights/s: a generous bound on the teacher's launch jitter


def _runs(clean: np.ndarray) -> list[tuple[int, int]]:
  """Frame ranges ``[start, stop)`` joined by consecutive clean intervals (>= 2 frames each)."""
  edges = np.diff(np.concatenate([[0], clean.astype(int), [0]]))
  return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) + 1))


def _contacts(p: np.ndarray, ok: np.ndarray, low: float, high: float, g: float,
              v_max: float, tolerance: float) -> np.ndarray:
  """``[T-1]`` bool: intervals in which the ball may have touched the wall at ``low``/``high``.

  Hitting the wall inside an interval at speed ``u`` and leaving at ``e * u`` keeps one end of
  the interval within ``u * e / (1 + e) <= u / 2`` of the wall; ``u`` is at most the fastest
  neighbouring interval (capped at what the prompt's physics allows) plus ``1.5 g``.
  """
  v = np.where(ok[1:] & ok[:-1], np.abs(np.diff(p)), 0.0)
  local = np.maximum.reduce([v, np.concatenate([[0.0], v[:-1]]), np.concatenate([v[1:], [0.0]])])
  reach = (np.minimum(local, v_max) + 1.5 * g) / 2 + tolerance
  d = np.where(ok, np.minimum(p - low, high - p), np.inf)
  return np.minimum(d[1:], d[:-1]) <= reach


def _shared_accel(p: np.ndarray, segments: list[tuple[int, int]]) -> tuple[float, int]:
  """Least-squares acceleration shared by all segments of >= 3 frames, each with its own
  offset and velocity; returns ``(a, number of second differences it rests on)``."""
  segments = [(i, j) for i, j in segments if j - i >= 3]
  if not segments:
    return 0.0, 0
  rows = sum(j - i for i, j in segments)
  design = np.zeros((rows, 1 + 2 * len(segments)))
  row = 0
  for s, (i, j) in enumerate(segments):
    t = np.arange(j - i, dtype=np.float64)
    design[row:row + len(t), 0] = 0.5 * t ** 2
    design[row:row + len(t), 1 + 2 * s] = 1.0
    design[row:row + len(t), 2 + 2 * s] = t
    row += len(t)
  target = np.concatenate([p[i:j] for i, j in segments])
  return float(np.linalg.lstsq(design, target, rcond=None)[0][0]), rows - 2 * len(segments)


def _in_chunks(segments: list[tuple[int, int]], chunk_frames: int) -> list[tuple[int, int]]:
  """The segments cut at chunk boundaries (frames ``chunk_frames``, ``2 * chunk_frames``, ...)."""
  return [(max(i, c), min(j, c + chunk_frames)) for i, j in segments
          for c in range(i - i % chunk_frames, j, chunk_frames)]


def _velocity(p: np.ndarray, a: float, segment: tuple[int, int], at: int) -> float:
  """Velocity at frame ``at`` of a segment (>= 2 frames) flying with acceleration ``a``."""
  t = np.arange(*segment, dtype=np.float64)
  return float(np.polyfit(t, p[segment[0]:segment[1]] - 0.5 * a * t ** 2, 1)[0] + a * at)


def _restitutions(p: np.ndarray, ok: np.ndarray, contact: np.ndarray,
                  segments: list[tuple[int, int]], a: float, low: float, high: float,
                  min_impact: float) -> list[float]:
  """``e_hat`` at every contact between two segments where the ball hits the wall and leaves."""
  out = []
  for before, after in zip(segments[:-1], segments[1:]):
    last, first = before[1] - 1, after[0]
    if not (ok[last:first + 1].all() and contact[last:first].all()):
      continue  # the gap is not one uninterrupted wall contact
    toward = 1.0 if high - max(p[last], p[first]) < min(p[last], p[first]) - low else -1.0
    wall = high if toward > 0 else low
    u_in = toward * _velocity(p, a, before, last)
    u_out = -toward * _velocity(p, a, after, first)
    w_in2 = u_in ** 2 + 2 * toward * a * abs(wall - p[last])
    if u_in <= 0 or w_in2 < min_impact ** 2:
      continue  # no impact to speak of (an apex or a slow graze near the wall)
    w_out2 = u_out ** 2 + 2 * toward * a * abs(wall - p[first]) if u_out > 0 else 0.0
    out.append(float(np.sqrt(max(w_out2, 0.0) / w_in2)))
  return out


def _chunk_jump(p: np.ndarray, ok: np.ndarray, contact: np.ndarray, chunk_frames: int) -> float:
  """Mean velocity kink on chunk-boundary intervals minus inside chunks, px/frame**2."""
  t = len(p)
  if t < 4:
    return 0.0
  kink = np.linalg.norm(p[3:] - 3 * p[2:-1] + 3 * p[1:-2] - p[:-3], axis=-1) / 2  # k = 1..T-3
  clean = ~contact & ok[1:] & ok[:-1]
  valid = clean[:-2] & clean[1:-1] & clean[2:]           # intervals k-1, k, k+1 bounce-free
  starts = np.arange(chunk_frames, t, chunk_frames) - 2  # interval k = start - 1, index k - 1
  boundary = np.zeros(t - 3, bool)
  boundary[starts[(starts >= 0) & (starts < t - 3)]] = True
  at, inside = valid & boundary, valid & ~boundary
  if not at.any() or not inside.any():
    return 0.0
  return float(kink[at].mean() - kink[inside].mean())


def _ball_terms(p: np.ndarray, ok: np.ndarray, overlap: np.ndarray, scene: Scene,
                size: tuple[int, int], world: PhysicsWorld, chunk_frames: int,
                tolerance: float) -> tuple[dict[str, float], int]:
  """The five terms (unclipped) and the number of bounces seen, for one ball's pixel track
  ``p [T, 2]`` over its visible frames ``ok [T]``; ``overlap`` frames (centres good to a third
  of a pixel there, not a hundredth) are left out of the chunk term's third differences."""
  h, w = size
  g = scene.g * h / world.fps ** 2
  r = world.radius * h
  launch = np.hypot(*DIRECTIONS[scene.direction]) + _LAUNCH_JITTER
  v_max = np.sqrt(launch ** 2 + 2 * scene.g) * h / world.fps
  walls = np.array([(r, w - r), (r, h - r)])
  accel, contacts, bounces, in_chunks, jitter = [0.0, 0.0], [], [], np.nan, np.nan
  for axis, (low, high) in enumerate(walls):
    contact = _contacts(p[:, axis], ok, low, high, g, v_max, tolerance)
    segments = _runs(ok[1:] & ok[:-1] & ~contact)
    if axis == 1:
      stretches = _in_chunks(segments, chunk_frames)
      a, seen = _shared_accel(p[:, axis], stretches)
      in_chunks = float(np.clip(a / g, 0.0, 2.0)) if seen else np.nan
      kinks = [np.diff(p[i:j, axis], 2) for i, j in stretches if j - i >= 3]
      kinks = np.concatenate(kinks) if kinks else np.zeros(0)
      jitter = float(np.std(kinks) / g) if len(kinks) >= 2 else np.nan
    accel[axis], used = _shared_accel(p[:, axis], segments)
    bounces += _restitutions(p[:, axis], ok, contact, segments,
                             accel[axis] if used else (0.0, g)[axis], low, high,
                             MIN_IMPACT * h / world.fps)
    if axis == 1 and not used and ok.mean() >= MIN_VISIBLE:
      accel[axis] = np.inf  # in plain view, yet no three frames of free flight: count it wrong
    elif not used:
      accel[axis] = (0.0, g)[axis]  # hidden behind other balls: nothing to judge
    contacts.append(contact)
  outside = np.maximum(walls[:, 0] - p, p - walls[:, 1]).max(-1)
  e = scene.restitution
  measured = np.isfinite(accel[1]) and used
  return {
      "gravity_ratio": float(np.clip(accel[1] / g, 0.0, 2.0)) if measured else np.nan,
      "gravity_ratio_in_chunks": in_chunks,
      "fall_jitter": jitter,
      "accel_error": abs(accel[1] - g) / g,
      "accel_x_error": abs(accel[0]) / g,
      "bounce_error": np.mean([abs(b - e) / e for b in bounces]) if bounces else 0.0,
      "penetration": np.mean(outside[ok] > tolerance) if ok.any() else 0.0,
      "chunk_jump": _chunk_jump(p, ok & ~overlap, contacts[0] | contacts[1], chunk_frames) / g,
  }, len(bounces)


def video_physics(video, prompt: str | Scene, world: PhysicsWorld = PhysicsWorld(),
                  chunk_frames: int = 3, tolerance_px: float = 0.5,
                  tracks: tracking.Tracks | None = None) -> dict[str, float]:
  """The five terms, ``physics_error`` and ``bounces`` (how many were observed) for one uint8
  video ``[T, H, W, 3]``. ``world`` gives the radius and fps (the size is the video's); pass
  ``tracks`` to reuse a ``tracking.track``."""
  video = tracking.check_video(video)
  scene = tracking.as_scene(prompt)
  if chunk_frames < 1:
    raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}.")
  tracks = tracking.track(video, scene, world.radius) if tracks is None else tracks
  h = video.shape[1]
  # Hidden behind another ball is not missing: only frames with no trace of the ball count.
  missing = 1.0 - (tracks.visible | tracks.overlap).mean(0)
  rows, bounces, ratios = [], 0, {k: [] for k in READINGS}
  for k in range(len(scene.colors)):
    if missing[k] > 1.0 - MIN_VISIBLE:
      rows.append(np.ones(len(TERMS)))
      continue
    terms, n = _ball_terms(tracks.centres[:, k] * h, tracks.visible[:, k], tracks.overlap[:, k],
                           scene, video.shape[1:3], world, chunk_frames, tolerance_px)
    bounces += n
    for name in READINGS:
      ratios[name].append(terms[name])
    rows.append(missing[k] + (1.0 - missing[k]) * np.clip([terms[t] for t in TERMS], 0.0, 1.0))
  out = dict(zip(TERMS, np.mean(rows, 0).tolist()))
  out["physics_error"] = float(sum(out[t] for t in TERMS))
  out["bounces"] = float(bounces)
  for k, values in ratios.items():
    out[k] = float(np.nanmean(values)) if values and not np.isnan(values).all() else np.nan
  return out


def chunk_profile(video, prompt: str | Scene, world: PhysicsWorld = PhysicsWorld(),
                  chunk_frames: int = 3, margin_px: float = 4.0,
                  tracks: tracking.Tracks | None = None) -> dict[str, np.ndarray]:
  """How each ball moves vertically, chunk by chunk (px and frames, downward positive), read only
  where it is visible and at least ``margin_px`` from the floor and ceiling (no bounce enters);
  NaN elsewhere. Unlike ``fall_jitter`` it keeps the chunks apart, so the chunks of one video can
  be compared and a fall inside chunks told from one made at chunk starts:

  * ``kink [balls, chunks]``: the second difference inside the chunk (mean over its interior
    frames): ``g = prompt_g * H / fps**2`` on any parabola;
  * ``velocity [balls, chunks]``: the mean first difference inside the chunk (a parabola's
    grows by ``chunk_frames * g`` from chunk to chunk);
  * ``drop [balls, chunks - 1]``: how much farther the ball moves from the last frame of a chunk
    to the first of the next than the mean of the two chunks' velocities: 0 on a parabola, the
    size of a jump where a causal student starts the next chunk off the track.
  """
  video = tracking.check_video(video)
  scene = tracking.as_scene(prompt)
  if chunk_frames < 3:
    raise ValueError(f"chunk_frames must be >= 3 for a second difference inside a chunk, got "
                     f"{chunk_frames}.")
  tracks = tracking.track(video, scene, world.radius) if tracks is None else tracks
  h = video.shape[1]
  r = world.radius * h
  y = (tracks.centres[..., 1] * h).T                                        # [balls, T]
  ok = (tracks.visible.T & (y >= r + margin_px) & (y <= h - r - margin_px))
  y = np.where(ok, y, np.nan)                                               # NaN spreads
  chunks = y.shape[1] // chunk_frames
  by_chunk = y[:, :chunks * chunk_frames].reshape(len(y), chunks, chunk_frames)
  velocity = np.diff(by_chunk, axis=-1).mean(-1)
  kink = np.diff(by_chunk, 2, axis=-1).mean(-1)
  step = by_chunk[:, 1:, 0] - by_chunk[:, :-1, -1]
  return {"kink": kink, "velocity": velocity,
          "drop": step - (velocity[:, :-1] + velocity[:, 1:]) / 2}


def evaluate(videos, prompts: Sequence[str], world: PhysicsWorld = PhysicsWorld(),
             chunk_frames: int = 3) -> tuple[list[dict[str, float]], dict[str, float]]:
  """Per-video dicts (``video_physics``) for uint8 ``[N, T, H, W, 3]`` and their means."""
  videos = tracking.check_videos(videos)
  if len(videos) != len(prompts):
    raise ValueError(f"{len(videos)} videos but {len(prompts)} prompts.")
  rows = [video_physics(v, p, world, chunk_frames) for v, p in zip(videos, prompts)]
  return rows, mean_rows(rows)


def gravity_slope(rows: Sequence[dict[str, float]], prompts: Sequence[str]) -> float:
  """Slope of the shown acceleration (``gravity_ratio * g``) on the prompt's ``g`` over the videos
  where it was measured; NaN unless they ask for at least two gravities."""
  g = np.array([tracking.as_scene(p).g for p in prompts])
  ratio = np.array([r["gravity_ratio"] for r in rows], np.float64)
  seen = np.isfinite(ratio)
  if len(np.unique(g[seen])) < 2:
    return float("nan")
  return float(np.polyfit(g[seen], ratio[seen] * g[seen], 1)[0])


def mean_rows(rows: Sequence[dict[str, float]]) -> dict[str, float]:
  """Per-key means of per-video dicts; the ``READINGS`` over the videos where they were measured
  (NaN when none was)."""
  out = {}
  for k in rows[0]:
    values = np.array([r[k] for r in rows], np.float64)
    out[k] = float(np.nanmean(values)) if k in READINGS and not np.isnan(values).all() \
        else float(np.mean(values))
  return out
