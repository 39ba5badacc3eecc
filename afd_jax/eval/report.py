"""Comparing systems (``base`` student, ``afd`` student, ``teacher``) on held-out prompts.

``evaluate`` turns one system's videos into scalar metrics (``physics_error`` and
``frechet_distance`` headline, their parts beside them); ``format_table`` lays several systems
side by side; ``sample_grid`` makes one video of everyone's samples (write it with
``afd_jax.video.write_gif``); ``plot_curves`` draws metric curves from ``metrics.jsonl``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from afd_jax import errors
from afd_jax.eval import frechet, motion, physics, quality, tracking
from afd_jax.teachers.physics import PhysicsWorld

# Every metric ``evaluate`` returns, in table order, with the direction that is better.
BETTER = {
    "physics_error": "lower", "frechet_distance": "lower",
    "accel_error": "lower", "gravity_ratio": "one", "gravity_ratio_in_chunks": "one",
    "fall_jitter": "lower",
    "gravity_slope": "one", "accel_x_error": "lower", "bounce_error": "lower",
    "penetration": "lower", "chunk_jump": "lower",
    "count_error": "lower", "visibility": "higher", "color_error": "lower",
    "hue_error": "lower", "sharpness": "higher", "sharpness_ratio": "higher",
    "dynamic_degree": "higher", "speed_ratio": "one", "speed": "info",
    "temporal_flickering": "info", "bounces": "info",
}


def evaluate(videos, prompts: Sequence[str], *, reference=None,
             reference_prompts: Sequence[str] | None = None,
             world: PhysicsWorld = PhysicsWorld(), chunk_frames: int = 3) -> dict[str, float]:
  """Mean metrics of uint8 videos ``[N, T, H, W, 3]``, one per prompt (keys: ``BETTER``).

  ``reference``: teacher videos ``[M, T, H, W, 3]`` (other seeds) for ``frechet_distance`` and,
  given their prompts (``reference_prompts``, or ``prompts`` when M == N),
  ``sharpness_ratio`` = sharpness / the reference's, ``dynamic_degree`` and ``speed_ratio``
  (``motion``); these keys are absent without a reference.
  ``world`` gives the ball radius and fps; ``chunk_frames`` the student's chunk length.
  """
  videos = tracking.check_videos(videos)
  if len(videos) != len(prompts):
    raise errors.UserError(f"{len(videos)} videos but {len(prompts)} prompts.")
  rows = [_video_metrics(v, p, world, chunk_frames) for v, p in zip(videos, prompts)]
  out = physics.mean_rows(rows)
  out["gravity_slope"] = physics.gravity_slope(rows, prompts)
  if reference is not None:
    reference = tracking.check_videos(reference)
    out["frechet_distance"] = frechet.video_frechet(videos, reference)
    if reference_prompts is None and len(reference) == len(prompts):
      reference_prompts = prompts
  speeds = [r["speed"] for r in rows]
  known = reference_prompts is not None   # reference speeds need the reference's prompts
  out.update(motion.evaluate(videos, prompts, world, speeds=speeds,
                             reference=reference if known else None,
                             reference_prompts=reference_prompts))
  if reference_prompts is not None:
    teacher = quality.evaluate(reference, reference_prompts, world)[1]["sharpness"]
    out["sharpness_ratio"] = out["sharpness"] / max(teacher, 1e-6)
  return {k: out[k] for k in BETTER if k in out}


def _video_metrics(video, prompt: str, world: PhysicsWorld, chunk_frames: int) -> dict:
  tracks = tracking.track(video, prompt, world.radius)
  return (physics.video_physics(video, prompt, world, chunk_frames, tracks=tracks)
          | quality.video_quality(video, prompt, world, tracks=tracks)
          | {"speed": motion.video_speed(video, prompt, world, tracks=tracks)})


def format_table(report: Mapping[str, Mapping[str, float]]) -> str:
  """A plain-text table: one row per metric (``BETTER`` order, then any others) that some system
  measured (not NaN: a frame-wise student has no in-chunk readings), one column per system;
  ``*`` marks the best system on each row that has a direction."""
  systems = list(report)
  if not systems:
    raise errors.UserError("format_table needs at least one system's metrics.")
  present = {k for metrics in report.values() for k in metrics}
  keys = [k for k in BETTER if k in present] + sorted(present - set(BETTER))
  rows = [["metric", "better", *systems]]
  for key in keys:
    values = [report[s].get(key) for s in systems]
    better = BETTER.get(key, "")
    known = [v for v in values if v is not None and not np.isnan(v)]
    if not known:
      continue
    best = ({"lower": min, "higher": max}[better](known) if better in ("lower", "higher")
            else min(known, key=lambda v: abs(v - 1.0)) if better == "one" else None)
    cells = ["-" if v is None else f"{v:.4g}" + ("*" if len(known) > 1 and v == best else "")
             for v in values]
    rows.append([key, better, *cells])
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in
                     enumerate(zip(r, widths))).rstrip() for r in rows]
  lines.insert(1, "-" * len(lines[0]))
  return "\n".join(lines)


def sample_grid(videos_by_system: Mapping[str, np.ndarray], pad: int = 2,
                scale: int = 1) -> np.ndarray:
  """One uint8 video ``[T, H', W', 3]``: a row per system (dict order, its name in a label strip
  on the left), a column per prompt (index order), ``pad`` grey pixels between tiles; ``scale``
  enlarges tiles by pixel repetition. All systems need the same ``[N, T, H, W, 3]`` shape."""
  if not videos_by_system:
    raise errors.UserError("sample_grid needs at least one system.")
  arrays = {name: tracking.check_videos(v) for name, v in videos_by_system.items()}
  shapes = {name: v.shape for name, v in arrays.items()}
  if len(set(shapes.values())) != 1:
    raise errors.UserError(f"every system needs the same [N, T, H, W, 3] videos, got {shapes}.")
  n, t, h, w, _ = next(iter(shapes.values()))
  h, w = h * scale, w * scale
  font = ImageFont.load_default()
  probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  label = max(probe.textbbox((0, 0), name, font=font)[2] for name in arrays) + 2 * pad + 2
  rows = len(arrays)
  grid = np.full((t, rows * (h + pad) + pad, label + n * (w + pad) + pad, 3), 96, np.uint8)
  strip = Image.new("RGB", (label, grid.shape[1]), (96, 96, 96))
  draw = ImageDraw.Draw(strip)
  for i, (name, videos) in enumerate(arrays.items()):
    top = pad + i * (h + pad)
    box = draw.textbbox((0, 0), name, font=font)
    draw.text((pad, top + (h - box[3]) // 2), name, fill=(255, 255, 255), font=font)
    tiles = videos.repeat(scale, axis=2).repeat(scale, axis=3)
    for j in range(n):
      left = label + pad + j * (w + pad)
      grid[:, top:top + h, left:left + w] = tiles[j]
  grid[:, :, :label] = np.asarray(strip)
  return grid


def _records(source) -> list[dict]:
  if isinstance(source, (str, Path)):
    with open(source, encoding="utf-8") as f:
      return [json.loads(line) for line in f if line.strip()]
  return list(source)


def plot_curves(source, keys: Sequence[str], out_png, x: str = "step") -> Path:
  """Metric curves as a PNG, one panel per key, against ``x``.

  ``source``: a ``metrics.jsonl`` path or a list of dicts (one run), or a dict ``{label: path or
  list}`` to overlay runs. Records without the key are skipped; a key no record has raises.
  """
  runs = ({str(k): _records(v) for k, v in source.items()} if isinstance(source, Mapping)
          else {"": _records(source)})
  seen = {k for records in runs.values() for r in records for k in r}
  missing = [k for k in keys if k not in seen]
  if not keys or missing:
    raise errors.UserError(f"no record has keys {missing or '(none given)'}; available: "
                     f"{sorted(seen - {x})}.")
  fig = Figure(figsize=(6.0, 2.2 * len(keys)), layout="constrained")
  for i, key in enumerate(keys):
    ax = fig.add_subplot(len(keys), 1, i + 1)
    for label, records in runs.items():
      points = sorted((r[x], r[key]) for r in records if key in r and x in r)
      if points:
        ax.plot(*zip(*points), marker=".", label=label or None)
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    if len(runs) > 1:
      ax.legend(fontsize="small")
  ax.set_xlabel(x)
  out_png = Path(out_png)
  out_png.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out_png, dpi=100)
  return out_png
