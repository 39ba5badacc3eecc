"""A built-in black-box teacher: balls moving under gravity, bouncing off the floor and walls.

Prompts come from a small grammar that fixes what physics a video must show::

    "two red and blue balls thrown left, strong gravity, very bouncy"
     count colours             direction  gravity         bounciness

``parse_prompt`` turns a prompt back into a ``Scene``; ``PhysicsTeacher`` renders it
deterministically per ``(prompt, seed)`` (the seed places the balls and jitters their launch).
``PhysicsWorld`` is the simulator with knobs that make it *wrong* on purpose (``gravity_range``,
``restitution_range`` scale the prompt's physics per video): the demo pretrains its base student
on such a world, so the student knows the teacher's world only imperfectly. ``TextEncoder`` is a
tiny deterministic text encoder for any prompt, standing in for umT5 in CPU-sized runs.

Units: positions in frame heights (0 at the top, 1 at the floor), time in seconds, gravity in
frame heights per second squared. Balls do not collide with each other.
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib
from collections.abc import Sequence

import numpy as np

from afd_jax import errors

COLORS = {"red": (235, 45, 45), "green": (40, 205, 60), "blue": (60, 100, 245),
          "yellow": (240, 225, 40), "magenta": (225, 55, 225), "cyan": (40, 225, 235),
          "white": (245, 245, 245)}
GRAVITY = {"weak": 0.4, "normal": 0.8, "strong": 1.6}
BOUNCINESS = {"soft": 0.45, "bouncy": 0.7, "very bouncy": 0.9}
# Launch velocity (vx, vy) in frame heights per second; negative vy is upward.
DIRECTIONS = {"dropped": (0.0, 0.0), "thrown up": (0.0, -0.7), "thrown left": (-0.6, -0.35),
              "thrown right": (0.6, -0.35)}
COUNTS = {"one": 1, "two": 2, "three": 3}

_PROMPT = re.compile(
    r"^(?P<count>one|two|three) (?P<colors>[a-z ,]+?) balls? (?P<direction>dropped|thrown up|"
    r"thrown left|thrown right), (?P<gravity>weak|normal|strong) gravity, "
    r"(?P<bounce>soft|bouncy|very bouncy)$")


@dataclasses.dataclass(frozen=True)
class Scene:
  """What a prompt asks for."""

  colors: tuple[str, ...]
  direction: str
  gravity: str
  bounciness: str

  @property
  def g(self) -> float:
    return GRAVITY[self.gravity]

  @property
  def restitution(self) -> float:
    return BOUNCINESS[self.bounciness]

  def rgb(self) -> np.ndarray:
    return np.array([COLORS[c] for c in self.colors], np.uint8)

  def prompt(self) -> str:
    n = len(self.colors)
    count = {v: k for k, v in COUNTS.items()}[n]
    colors = (self.colors[0] if n == 1 else
              ", ".join(self.colors[:-1]) + " and " + self.colors[-1])
    return (f"{count} {colors} ball{'s' if n > 1 else ''} {self.direction}, {self.gravity} "
            f"gravity, {self.bounciness}")


def parse_prompt(prompt: str) -> Scene:
  """The inverse of ``Scene.prompt``; a prompt outside the grammar raises with the grammar."""
  m = _PROMPT.match(prompt.strip().lower())
  colors = tuple(c for c in re.split(r", | and ", m.group("colors"))) if m else ()
  if not m or any(c not in COLORS for c in colors) or len(colors) != COUNTS[m.group("count")] \
      or len(set(colors)) != len(colors):
    raise errors.UserError(
        f"prompt {prompt!r} is not in the physics grammar: '<one|two|three> <distinct colours "
        f"from {sorted(COLORS)}> ball(s) <{'|'.join(DIRECTIONS)}>, <{'|'.join(GRAVITY)}> gravity, "
        f"<{'|'.join(BOUNCINESS)}>', e.g. 'two red and blue balls thrown left, strong gravity, "
        "very bouncy'.")
  return Scene(colors, m.group("direction"), m.group("gravity"), m.group("bounce"))


def sample_prompts(n: int, seed: int = 0, max_balls: int = 3,
                   gravities: Sequence[str] = tuple(GRAVITY)) -> list[str]:
  """``n`` distinct prompts drawn from the grammar (with at most ``max_balls`` balls, and only the
  ``gravities`` words), reproducibly."""
  rng = np.random.default_rng([seed, 31])
  names = sorted(COLORS)
  gravities = list(gravities)
  if not gravities or not set(gravities) <= set(GRAVITY) or len(set(gravities)) < len(gravities):
    raise errors.UserError(f"gravity words {gravities} must be distinct words of {list(GRAVITY)}.")
  combos = sum(math.comb(len(names), k) for k in range(1, max_balls + 1)) * len(DIRECTIONS) \
      * len(gravities) * len(BOUNCINESS)
  if not 1 <= max_balls <= 3 or n > combos:
    raise errors.UserError(f"{n} distinct prompts with 1..{max_balls} balls and gravity "
                           f"{gravities} requested; the grammar has {combos} (max_balls must be "
                           "1, 2 or 3).")
  out, seen = [], set()
  while len(out) < n:
    k = int(rng.integers(1, max_balls + 1))
    scene = Scene(tuple(rng.choice(names, k, replace=False)),
                  list(DIRECTIONS)[rng.integers(len(DIRECTIONS))],
                  gravities[rng.integers(len(gravities))],
                  list(BOUNCINESS)[rng.integers(len(BOUNCINESS))])
    if scene.prompt() not in seen:
      seen.add(scene.prompt())
      out.append(scene.prompt())
  return out


def stable_hash(text: str) -> int:
  """A platform- and process-independent hash (Python's ``hash`` is salted per process)."""
  return zlib.crc32(text.encode("utf-8"))


@dataclasses.dataclass(frozen=True)
class PhysicsWorld:
  """The simulator and renderer.

  ``gravity_range`` / ``restitution_range`` scale the prompt's gravity and bounciness by a factor
  drawn per video; ``(1, 1)`` is the true world.
  """

  size: int = 32
  num_frames: int = 12
  fps: float = 8.0
  radius: float = 0.1
  gravity_range: tuple[float, float] = (1.0, 1.0)
  restitution_range: tuple[float, float] = (1.0, 1.0)
  substeps: int = 32
  world_seed: int = 2026

  def _rng(self, prompt: str, seed: int) -> np.random.Generator:
    return np.random.default_rng([self.world_seed, stable_hash(prompt), int(seed)])

  def simulate(self, prompt: str, seed: int) -> np.ndarray:
    """Ball centres ``[T, balls, 2]`` as (x, y) in frame heights, one row per frame."""
    scene = parse_prompt(prompt)
    rng = self._rng(prompt, seed)
    n, r = len(scene.colors), self.radius
    g = scene.g * rng.uniform(*self.gravity_range)
    e = min(scene.restitution * rng.uniform(*self.restitution_range), 1.0)
    pos = np.stack([rng.uniform(0.25, 0.75, n), rng.uniform(0.15, 0.4, n)], -1)
    vel = np.asarray(DIRECTIONS[scene.direction], np.float64) + rng.normal(0.0, 0.08, (n, 2))
    h = 1.0 / (self.fps * self.substeps)
    out = np.empty((self.num_frames, n, 2))
    for frame in range(self.num_frames):
      out[frame] = pos
      for _ in range(self.substeps):
        vel[:, 1] += g * h
        pos = pos + vel * h
        for axis, low, high in ((0, r, 1.0 - r), (1, r, 1.0 - r)):
          below, above = pos[:, axis] < low, pos[:, axis] > high
          pos[below, axis] = 2 * low - pos[below, axis]
          pos[above, axis] = 2 * high - pos[above, axis]
          vel[below, axis] = e * np.abs(vel[below, axis])
          vel[above, axis] = -e * np.abs(vel[above, axis])
    return out

  def render(self, prompt: str, seed: int) -> np.ndarray:
    """uint8 video ``[T, size, size, 3]``: anti-aliased balls on black."""
    centres = self.simulate(prompt, seed) * self.size
    rgb = parse_prompt(prompt).rgb().astype(np.float32)
    pix = np.arange(self.size) + 0.5
    video = np.zeros((self.num_frames, self.size, self.size, 3), np.float32)
    radius = self.radius * self.size
    for ball in range(centres.shape[1]):
      x, y = centres[:, ball, 0], centres[:, ball, 1]
      d = np.sqrt((pix[None, None, :] - x[:, None, None]) ** 2
                  + (pix[None, :, None] - y[:, None, None]) ** 2)
      alpha = np.clip(radius + 0.5 - d, 0.0, 1.0)[..., None]
      video = video * (1.0 - alpha) + rgb[ball] * alpha
    return np.round(video).astype(np.uint8)


class PhysicsTeacher:
  """Prompts (and a seed) in, finished videos out: ``uint8 [B, T, H, W, 3]``."""

  def __init__(self, world: PhysicsWorld = PhysicsWorld()):
    self.world = world

  @property
  def video_shape(self) -> tuple[int, int, int, int]:
    w = self.world
    return (w.num_frames, w.size, w.size, 3)

  def __call__(self, prompts: Sequence[str], seed: int) -> np.ndarray:
    return np.stack([self.world.render(p, seed) for p in prompts])


class TextEncoder:
  """A tiny deterministic text encoder: hashed word embeddings plus sinusoidal positions, zero
  beyond the prompt's length (as umT5 contexts are). Any text works; no weights to ship."""

  def __init__(self, dim: int = 32, length: int = 16, vocab: int = 4096, seed: int = 7):
    self.dim, self.length, self.vocab = dim, length, vocab
    self._table = np.random.default_rng(seed).standard_normal((vocab, dim)).astype(np.float32)
    pos = np.arange(length)[:, None] / 10000 ** (np.arange(0, dim, 2)[None] / dim)
    self._positions = np.zeros((length, dim), np.float32)
    self._positions[:, 0::2], self._positions[:, 1::2] = np.sin(pos), np.cos(pos[:, :dim // 2])

  def tokens(self, prompt: str) -> list[int]:
    words = re.findall(r"[a-z0-9]+|[^\sa-z0-9]", prompt.lower())
    if len(words) > self.length:
      raise errors.UserError(f"prompt {prompt!r} has {len(words)} tokens; the text encoder takes "
                       f"{self.length}. Raise data.text_length.")
    return [stable_hash(w) % self.vocab for w in words]

  def __call__(self, prompts: Sequence[str]) -> np.ndarray:
    """``[N, length, dim]`` float32."""
    out = np.zeros((len(prompts), self.length, self.dim), np.float32)
    for i, p in enumerate(prompts):
      ids = self.tokens(p)
      out[i, :len(ids)] = self._table[ids] + 0.5 * self._positions[:len(ids)]
    return out
