"""Finding the prompt's balls in pixels, so that metrics need no discriminator and no ground truth.

A pixel counts towards a colour by how much of that colour it holds: its projection onto the ray
from black through the colour (``alpha``, 1 for the full colour, 0.5 for a half-covered
anti-aliased edge or a dim generated pixel) times how well its hue matches (the angle between the
pixel and the colour, soft: full weight within ``FULL_DEG``, none beyond ``MAX_DEG``). A pixel
only ever counts towards its nearest palette colour, so white, yellow and cyan (28 degrees apart)
or blue and cyan (22) never share pixels. Dimming keeps pixels on the colour's ray with less
alpha; blur spreads the same alpha wider. Bright pixels far from the ray are *foreign*: another
ball, or two colours mixed at an edge.

Each ball is found at the peak of its weights smoothed by a disc of the ball's size. Its *mass*
is the weight within ``2 r + 1.5`` px of the peak over the disc area ``pi r**2`` (1 for a whole
ball, however blurred). Its centre is the anti-aliased disc (edge ramp 1 to 4 px, for blur) that
best fits its weights, foreign pixels and pixels next to other balls left out, so occluded and
touching balls stay centred on their own discs: about 0.01 px from the truth on teacher renders
for a ball on its own, 0.02 px on average (under 0.4 px at worst) when balls overlap. Centres
are in frame heights, ``(x, y)`` with ``y`` down and pixel centres at ``(i + 0.5) / H``, as
``PhysicsWorld.simulate``.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np
from scipy import ndimage

from afd_jax.teachers.physics import COLORS, Scene, parse_prompt

FULL_DEG = 6.0   # hue within this many degrees of a palette colour: full weight
MAX_DEG = 15.0   # beyond this: no weight (the closest palette pair, blue/cyan, is 22 apart)
MIN_MASS = 0.3   # a ball is visible when at least this fraction of its disc is matched
MIN_FILL = 0.3   # ... and its fitted disc is at least this full on average
TRACE_MASS = 0.003  # below this, nothing of the ball is there at all
MIN_SUPPORT = 0.05  # fraction of a disc that must stay in view to fit it away from its neighbours
EDGE_WIDTHS = (1.0, 2.0, 3.0, 4.0)  # px: the disc model's edge ramp, sharp to blurred
FOREIGN = 25.5     # RGB distance from the colour's ray beyond which a pixel is something else
_PALETTE = np.array(list(COLORS.values()), np.float32)
_NAMES = list(COLORS)


def check_video(video) -> np.ndarray:
  """The video as uint8 ``[T, H, W, 3]``; anything else raises, naming what was expected."""
  video = np.asarray(video)
  if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
    raise ValueError(f"expected a uint8 video [T, H, W, 3], got {video.dtype} {video.shape}.")
  return video


def check_videos(videos) -> np.ndarray:
  """A batch as uint8 ``[N, T, H, W, 3]``; anything else raises, naming what was expected."""
  videos = np.asarray(videos)
  if videos.dtype != np.uint8 or videos.ndim != 5 or videos.shape[-1] != 3:
    raise ValueError(f"expected uint8 videos [N, T, H, W, 3], got {videos.dtype} "
                     f"{videos.shape}.")
  return videos


def as_scene(prompt: str | Scene) -> Scene:
  return parse_prompt(prompt) if isinstance(prompt, str) else prompt


class ColorMaps(NamedTuple):
  """Per-pixel maps ``[T, H, W, K]`` for K named colours."""

  weights: np.ndarray  # alpha times the soft hue match, in [0, 1]; 0 unless the nearest colour
  degrees: np.ndarray  # the pixel's hue angle to each colour
  foreign: np.ndarray  # bool: lit by something else (another ball, a colour mix at an edge)


def color_maps(video, colors) -> ColorMaps:
  """How much of each named colour every pixel holds (see the module docstring)."""
  video = check_video(video).astype(np.float32)
  unknown = [c for c in colors if c not in COLORS]
  if unknown:
    raise ValueError(f"unknown colours {unknown}; the palette is {_NAMES}.")
  norm = np.linalg.norm(video, axis=-1, keepdims=True)
  palette_norm = np.linalg.norm(_PALETTE, axis=-1)
  cos = (video @ _PALETTE.T) / np.maximum(norm * palette_norm, 1e-6)
  degrees = np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))        # [T, H, W, palette]
  nearest = degrees.argmin(-1)
  index = np.array([_NAMES.index(c) for c in colors])
  alpha = np.clip((video @ _PALETTE[index].T) / palette_norm[index] ** 2, 0.0, 1.0)
  hue = np.clip((MAX_DEG - degrees[..., index]) / (MAX_DEG - FULL_DEG), 0.0, 1.0)
  weights = alpha * hue * (nearest[..., None] == index)
  residual = np.linalg.norm(video[..., None, :] - alpha[..., None] * _PALETTE[index], axis=-1)
  foreign = (weights == 0) & (residual > FOREIGN)
  return ColorMaps(weights.astype(np.float32), degrees[..., index], foreign)


@dataclasses.dataclass(frozen=True)
class Tracks:
  """One video's balls, in the prompt's colour order.

  ``centres [T, K, 2]`` (x, y) in frame heights, NaN where the ball is not visible (sub-pixel:
  the disc fit of ``_fit_centres``); ``mass [T, K]`` the matched colour near the ball as a share
  of a whole disc; ``visible [T, K]``: mass >= ``MIN_MASS`` packed into a disc at least
  ``MIN_FILL`` full; ``touching [T, K, K]``: two balls (at least one visible, the other perhaps
  only a trace behind it) within a pixel or two of each other; ``overlap [T, K]``: the ball
  touches another, or is lost right next to a frame where it did (hidden behind it), so its
  absence may be occlusion and its mass partial; ``maps`` the colour maps it came from.
  """

  centres: np.ndarray
  mass: np.ndarray
  visible: np.ndarray
  touching: np.ndarray
  overlap: np.ndarray
  maps: ColorMaps


def _fit_centres(maps: ColorMaps, peak: np.ndarray, start: np.ndarray, r: float,
                 reach: float, spans: tuple[tuple[float, float], ...],
                 avoid: np.ndarray | None = None,
                 width: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Sub-pixel centres ``[T, K, 2]`` (pixels): the anti-aliased disc that best matches each
  ball's weights within ``reach`` of its ``peak``, by a coarse-to-fine grid search around
  ``start`` (``spans``: (half-width, step) per level) on a crop around the peak.

  Pixels lit by anything else are ignored, so a ball half hidden behind another is centred on its
  own disc (a centroid would follow its crescent). ``avoid [T, K, 2]`` (NaN: absent) also drops
  every pixel within ``r + 1`` of another ball's centre, where edge pixels mix two colours and
  the single-disc model is wrong (dropping pixels the model gets right biases nothing), unless
  that leaves less than ``MIN_SUPPORT`` of the disc to fit.
  """
  t, h, w, k = maps.weights.shape
  half = int(np.ceil(reach))
  pad = ((0, 0), (half, half), (half, half), (0, 0))
  corner = np.floor(peak).astype(int)                                     # crop's top-left
  offsets = np.arange(2 * half + 1)
  rows = (corner[..., 1, None] + offsets)[:, :, :, None]                  # [T, K, P, 1]
  cols = (corner[..., 0, None] + offsets)[:, :, None, :]                  # [T, K, 1, P]
  frames, balls = np.arange(t)[:, None, None, None], np.arange(k)[None, :, None, None]
  target = np.pad(maps.weights, pad)[frames, rows, cols, balls]           # [T, K, P, P]
  keep = np.pad(~maps.foreign, pad)[frames, rows, cols, balls]
  px = (corner[..., 0, None] - half + offsets + 0.5).astype(np.float32)   # [T, K, P] pixels
  py = (corner[..., 1, None] - half + offsets + 0.5).astype(np.float32)
  keep &= ((px[:, :, None, :] - peak[..., 0, None, None]) ** 2
           + (py[:, :, :, None] - peak[..., 1, None, None]) ** 2) <= reach ** 2
  if avoid is not None:
    d2 = ((px[:, :, None, None, :] - avoid[:, None, :, 0, None, None]) ** 2
          + (py[:, :, None, :, None] - avoid[:, None, :, 1, None, None]) ** 2)  # [T,K,J,P,P]
    near = ((d2 <= (r + 1.0) ** 2) & ~np.eye(k, dtype=bool)[None, :, :, None, None]).any(2)
    own = ((px[:, :, None, :] - start[..., 0, None, None]) ** 2
           + (py[:, :, :, None] - start[..., 1, None, None]) ** 2) <= r * r
    support = (keep & own & ~near).sum((-2, -1)) / (np.pi * r * r)        # NaN compares False
    keep &= ~near | (support < MIN_SUPPORT)[..., None, None]
  target, keep = target[:, :, None], keep[:, :, None]                     # [T, K, 1, P, P]
  centre = start.astype(np.float32)
  for span, step in spans:
    grid = np.arange(-span, span + step / 2, step, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid, grid), -1).reshape(-1, 2)           # [C, 2]
    cand = centre[:, :, None] + grid                                      # [T, K, C, 2]
    d = np.sqrt((px[:, :, None, None, :] - cand[..., 0, None, None]) ** 2
                + (py[:, :, None, :, None] - cand[..., 1, None, None]) ** 2)  # [T, K, C, P, P]
    widths = EDGE_WIDTHS if width is None else [width[..., None, None, None]]
    losses = np.stack([np.where(keep, (target - np.clip((r + s / 2 - d) / s, 0.0, 1.0)) ** 2,
                                0.0).sum((-2, -1)) for s in widths], -1)   # [T, K, C, S]
    best = losses.reshape(t, k, -1).argmin(-1)
    if width is None:
      width = np.asarray(EDGE_WIDTHS, np.float32)[best % len(EDGE_WIDTHS)]
    centre = np.take_along_axis(cand, (best // len(widths))[..., None, None], 2)[:, :, 0]
  return centre, width


def track(video, prompt: str | Scene, radius: float = 0.1) -> Tracks:
  """Tracks every ball the prompt names; ``radius`` in frame heights (``PhysicsWorld.radius``)."""
  video = check_video(video)
  scene = as_scene(prompt)
  t, h, w, _ = video.shape
  maps = color_maps(video, scene.colors)
  r = radius * h
  # Locate: the peak of the weights smoothed by a disc of the ball's size.
  k = int(np.ceil(r))
  grid = np.arange(-k, k + 1)
  disc = (grid[:, None] ** 2 + grid[None, :] ** 2 <= r * r).astype(np.float32)
  score = ndimage.convolve(maps.weights, disc[None, :, :, None], mode="constant")
  flat = score.reshape(t, h * w, -1).argmax(1)                      # [T, K]
  peak = np.stack([flat % w, flat // w], -1) + 0.5                  # (x, y) in pixels
  # Measure inside a window that holds the whole ball (and a blurred halo) around the peak.
  reach = 2 * r + 1.5
  px, py = np.arange(w) + 0.5, np.arange(h) + 0.5
  window = ((px - peak[..., 0, None, None]) ** 2
            + (py[:, None] - peak[..., 1, None, None]) ** 2) <= reach ** 2   # [T, K, H, W]
  inside = np.where(window, np.moveaxis(maps.weights, -1, 1), 0.0)
  total = inside.sum((-2, -1))
  mass = total / (np.pi * r * r)
  with np.errstate(invalid="ignore", divide="ignore"):
    centroid = np.stack([(inside.sum(-2) * px).sum(-1), (inside.sum(-1) * py).sum(-1)],
                        -1) / total[..., None]
  start = np.where((mass >= MIN_MASS)[..., None], centroid, peak)
  centres, width = _fit_centres(maps, peak, start, r, reach, ((3.0, 1.0), (1.0, 0.25)))
  # Visible: enough of the colour, and packed into a disc (scattered noise fills none).
  disc = ((px - centres[..., 0, None, None]) ** 2
          + (py[:, None] - centres[..., 1, None, None]) ** 2) <= r * r       # [T, K, H, W]
  fill = (np.where(disc, np.moveaxis(maps.weights, -1, 1), 0.0).sum((-2, -1))
          / np.maximum(disc.sum((-2, -1)), 1))                          # 0 off the frame
  visible = (mass >= MIN_MASS) & (fill >= MIN_FILL)
  # A hidden ball is where its trace is (the mixed pixels at the edge of the ball in front).
  present = mass >= TRACE_MASS
  located = np.where(visible[..., None], centres,
                     np.where(present[..., None], centroid, np.nan))
  centres = _fit_centres(maps, peak, centres, r, reach, ((0.5, 0.1), (0.1, 0.02)), located,
                         width)[0] / h
  gap = np.linalg.norm(located[:, :, None] - located[:, None], axis=-1)       # [T, K, K] px
  touching = ((gap < 2 * r + 2.0) & present[:, :, None] & present[:, None]
              & (visible[:, :, None] | visible[:, None]) & ~np.eye(len(scene.colors), dtype=bool))
  overlap = touching.any(-1)
  # Lost without a trace right next to a frame where it touched another ball: hidden behind it.
  beside = np.zeros_like(overlap)
  beside[1:] |= overlap[:-1]
  beside[:-1] |= overlap[1:]
  overlap |= ~visible & beside
  centres = np.where(visible[..., None], centres, np.nan)
  return Tracks(centres, mass, visible, touching, overlap, maps)


def blob_count(video, threshold: int = 64, min_pixels: int = 4) -> np.ndarray:
  """``[T]`` connected components per frame, whatever their colour: pixels whose brightest
  channel reaches ``threshold`` (a quarter of a ball's edge ramp and up, so faint edges do not
  bridge neighbours), 4-connected, blobs below ``min_pixels`` ignored as noise."""
  video = check_video(video)
  mask = video.max(-1) >= threshold
  structure = np.zeros((3, 3, 3), bool)
  structure[1] = ndimage.generate_binary_structure(2, 1)             # never across frames
  labels, n = ndimage.label(mask, structure)
  sizes = np.bincount(labels.ravel(), minlength=n + 1)
  frame_of = np.zeros(n + 1, int)
  frame_of[labels.ravel()] = np.repeat(np.arange(len(video)), mask[0].size)  # one frame each
  frame_of = frame_of[1:]
  keep = sizes[1:] >= min_pixels
  return np.bincount(frame_of[keep], minlength=len(video))
