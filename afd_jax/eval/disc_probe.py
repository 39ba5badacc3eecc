"""What does a discriminator read? Probes on the physics teacher's held-out videos.

Under each held-out prompt, each probe scores the teacher's video of that prompt against other
videos, and reports how often the discriminator prefers the true one (ties count half; 0.5 is
blind). Videos are ranked under one prompt because that is all AFD uses: its advantages are
centred per prompt.

* ``<field>_word``: the teacher's videos of the prompt with one word changed to each other value
  (``gravity``, ``bounciness``, ``direction``; ``color``: the first ball's, to the next two
  colours not in the scene). With every value used, an unconditional preference (say, for
  faster falls) scores about 0.5, and only a score that checks the video against the word
  scores high;
* ``half_gravity`` / ``half_bounce``: the same scene (same launch) with half the gravity / half
  the restitution: does it see the physics at all?
* ``dimmed``: the same video 8 % darker: does it rank looks?

A discriminator blind to the physics words cannot teach the prompt's gravity, however well it
tells teacher from student.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from afd_jax.teachers.physics import (BOUNCINESS, COLORS, DIRECTIONS, GRAVITY, PhysicsWorld,
                                      parse_prompt)

WORDS = {"gravity": list(GRAVITY), "bounciness": list(BOUNCINESS), "direction": list(DIRECTIONS)}
DIMMED = 0.92


def other_words(prompt: str, field: str) -> list[str]:
  """The prompt with ``field`` (``gravity``, ``bounciness``, ``direction``) set to each other
  value of the grammar, or (``color``) its first ball's colour set to the next two colours, in
  the grammar's order, that are not in the scene."""
  scene = parse_prompt(prompt)
  if field == "color":
    names = list(COLORS)
    start = names.index(scene.colors[0])
    free = [c for c in names[start + 1:] + names[:start] if c not in scene.colors]
    return [dataclasses.replace(scene, colors=(c, *scene.colors[1:])).prompt() for c in free[:2]]
  return [dataclasses.replace(scene, **{field: v}).prompt() for v in WORDS[field]
          if v != getattr(scene, field)]


def preference(mine, theirs) -> float:
  """How often logits ``mine`` beat ``theirs`` row by row (ties count half; 0.5 is blind)."""
  mine, theirs = np.asarray(mine, np.float64), np.asarray(theirs, np.float64)
  return float(np.mean((mine > theirs) + 0.5 * (mine == theirs)))


def probe(logits: Callable[[np.ndarray, Sequence[str]], np.ndarray], prompts: Sequence[str],
          world: PhysicsWorld, seed: int) -> dict[str, float]:
  """``{probe: fraction of (prompt, other video) pairs where the discriminator prefers the
  prompt's own video}``.

  ``logits(videos, prompts)``: ``D`` of uint8 videos ``[N, T, H, W, 3]`` under ``prompts``, with
  the same noise for the same row whatever the videos (both members of a pair sit in the same
  row of two calls, so they differ only in what the probe changed)."""
  prompts = list(prompts)
  truth = np.stack([world.render(p, seed) for p in prompts])
  scored = {}   # the true videos' logits per row layout: probes with one layout share them

  def preferred(rows: list[int], others: np.ndarray) -> float:
    under = [prompts[i] for i in rows]
    if tuple(rows) not in scored:
      scored[tuple(rows)] = np.asarray(logits(truth[rows], under), np.float64)
    mine = scored[tuple(rows)]
    return preference(mine, logits(others, under))

  out = {}
  for field in (*WORDS, "color"):
    pairs = [(i, q) for i, p in enumerate(prompts) for q in other_words(p, field)]
    out[f"{field}_word"] = preferred([i for i, _ in pairs],
                                     np.stack([world.render(q, seed) for _, q in pairs]))
  every = list(range(len(prompts)))
  for name, changed in (("half_gravity", {"gravity_range": (0.5, 0.5)}),
                        ("half_bounce", {"restitution_range": (0.5, 0.5)})):
    altered = dataclasses.replace(world, **changed)
    out[name] = preferred(every, np.stack([altered.render(p, seed) for p in prompts]))
  out["dimmed"] = preferred(every, np.round(truth * DIMMED).astype(np.uint8))
  return out
