"""Evaluation without any discriminator: the student on held-out prompts, scored against the
teacher's videos by ``afd_jax.eval`` (or the synthetic teacher's property), with sample videos
people can watch. Built from the rollout and noise functions, the way big_vision's evaluators take
a predict function, so the trainer, ``experiment.py`` and tools share it."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from afd_jax import data as data_lib
from afd_jax import mesh as mesh_lib
from afd_jax import methods
from afd_jax import video

SEED = 10**6  # evaluation noise and teacher samples: never used by training


class Evaluator:
  def __init__(self, config, data, rollout: Callable, noise: Callable, mesh, workdir):
    """``rollout(params, noise, context, key)`` and ``noise(key, rows)`` are the trainer's
    compiled programs; ``data`` its ``teachers.TeacherData``."""
    self.config, self.data, self.pool = config, data, data.pool
    self.rollout, self.noise = rollout, noise
    self.mesh, self.batch_sharding = mesh, mesh_lib.batch_sharding(mesh)
    self.batch_size, self.rows = config.data.batch_size, methods.rollout_rows(config)
    self.workdir = Path(workdir)

  def sample(self, params, ids, seed: int) -> np.ndarray:
    """Student rollouts ``[len(ids), F, h, w, C]`` (numpy, on every host) for global prompt
    ``ids``, in batches of the training rollout's rows (its compiled program): methods with as
    many rollouts per iteration (``batch_size x afd.group_size``) see the same noise."""
    n = self.rows
    padded = np.concatenate([ids, np.repeat(ids[-1:], -len(ids) % n)])
    out = []
    with jax.set_mesh(self.mesh):
      for i in range(0, len(padded), n):
        context = jax.make_array_from_process_local_data(
            self.batch_sharding, data_lib.host_slice(self.pool.embeddings[padded[i:i + n]]))
        noise = self.noise(jax.random.fold_in(jax.random.key(seed), i), n)
        x = self.rollout(params, noise, context, jax.random.key(seed + 1 + i))
        out.append(np.asarray(multihost_utils.process_allgather(x, tiled=True)))
    return np.concatenate(out)[:len(ids)]

  def eval_ids(self) -> np.ndarray:
    """The held-out prompts evaluation uses (never trained on)."""
    return self.pool.eval_ids(self.pool.num_eval or self.batch_size)

  def student_videos(self, params, ids, seed: int) -> np.ndarray:
    """Rollouts as the teacher's kind of video: uint8 pixels for video teachers, else latents."""
    x = self.sample(params, ids, seed)
    return x if self.data.encoder is None else np.stack([self.data.encoder.decode(v) for v in x])

  def teacher_videos(self, ids, seed: int) -> np.ndarray:
    """The true-world teacher's videos (pixels), or synthetic latents."""
    if self.data.encoder is None:
      return self.data.source.latents(ids, seed)
    return self.data.reference(ids, seed)

  def score(self, videos, ids, reference) -> dict:
    """Metrics of ``videos`` for prompts ``ids`` against teacher ``reference`` videos, with no
    discriminator involved: ``afd_jax.eval`` on pixels, or the synthetic teacher's property."""
    if self.data.encoder is None:
      ch = self.data.source.offset_channel
      student, teacher = float(videos[..., ch].mean()), float(reference[..., ch].mean())
      return {"property_gap": abs(student - teacher), "student_property": student,
              "teacher_property": teacher}
    from afd_jax.eval import frechet, report as eval_report
    if self.data.physics_world is None:  # prompts outside the physics grammar: distribution only
      return {"frechet_distance": frechet.video_frechet(videos, reference)}
    return eval_report.evaluate(videos, [self.pool.prompts[i] for i in ids], reference=reference,
                                world=self.data.physics_world,
                                chunk_frames=self.config.rollout.chunk_frames)

  def viewable(self, videos) -> np.ndarray:
    """uint8 ``[N, T, H, W, 3]`` frames at a watchable size."""
    up = self.config.output.upscale
    if self.data.encoder is None:
      return np.stack([video.latents_to_frames(v, upscale=up) for v in videos])
    up = max(1, up // self.data.encoder.spatial_stride)
    return videos.repeat(up, axis=2).repeat(up, axis=3)

  def write_samples(self, step: int, ids, teacher, student) -> Path:
    """Teacher above student: full-size VAE videos as one MP4 per prompt (``output.max_videos``
    of them), small ones as one GIF of the whole batch side by side."""
    fps = self.config.output.fps
    if getattr(self.data.encoder, "name", None) == "wan_vae":
      folder = self.workdir / "samples" / f"step_{step:06d}"
      for i in range(min(len(ids), self.config.output.max_videos)):
        line = np.full((teacher.shape[1], 2, *teacher.shape[3:]), 255, np.uint8)
        video.write_mp4(np.concatenate([teacher[i], line, student[i]], axis=1),
                        folder / f"prompt_{ids[i]}.mp4", fps=fps)
      return folder
    n = self.batch_size
    grid = np.concatenate([video.tile(self.viewable(x[:n])) for x in (teacher, student)], 1)
    return video.write_gif(grid, self.workdir / "samples" / f"step_{step:06d}.gif", fps=fps)

  def evaluate(self, params, step: int, write: bool = True) -> dict:
    """The student ``params`` on held-out prompts; process 0 writes sample videos (top: teacher,
    bottom: student)."""
    ids = self.eval_ids()
    teacher = self.teacher_videos(ids, SEED)
    student = self.student_videos(params, ids, self.config.seed + SEED)
    out = {f"eval/{k}": v for k, v in self.score(student, ids, teacher).items()}
    if write and jax.process_index() == 0:
      path = self.write_samples(step, ids, teacher, student)
      out["samples"] = str(path)
      logging.info("samples (top: teacher, bottom: student EMA) in %s", path)
    return out
