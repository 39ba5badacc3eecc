"""Does a student's ball fall inside its chunks, or only between them? Its motion chunk by chunk,
over many rollouts (``python -m afd_jax.tools.fall_profile``).

``profile`` rolls the config's student out K times per training prompt and reads, per video and
chunk, ``eval.physics.chunk_profile`` (the second difference and velocity inside each chunk, the
drop at each chunk start), the teacher's videos of the same prompts alike; it summarises each per
chunk and correlates the second differences between the chunks of one rollout (near zero when
the in-chunk fall is drawn afresh in every chunk, not a trait of the rollout).
"""

from __future__ import annotations

import tempfile

import jax
import numpy as np
from jax.experimental import multihost_utils

from afd_jax import data as data_lib
from afd_jax import errors, methods, train
from afd_jax import mesh as mesh_lib
from afd_jax.eval import physics


def _summary(kinks: np.ndarray) -> dict:
  """Per chunk: mean, std, robust std (interquartile range / 1.349) and the fraction read."""
  seen = np.isfinite(kinks)
  per_chunk = [kinks[seen[:, c], c] for c in range(kinks.shape[1])]
  stat = lambda f: [float(f(v)) if len(v) else float("nan") for v in per_chunk]
  return {"mean": stat(np.mean), "std": stat(np.std),
          "robust_std": stat(lambda v: np.subtract(*np.percentile(v, [75, 25])) / 1.349),
          "read": seen.mean(0).tolist()}


def _summaries(profiles: list[dict]) -> dict:
  """``{quantity: _summary}`` over the videos' (first ball's) chunk profiles."""
  return {k: _summary(np.stack([p[k][0] for p in profiles])) for k in profiles[0]}


def _correlations(kinks: np.ndarray) -> dict:
  """Pearson correlation of two chunks' readings over the rollouts where both were read."""
  out = {}
  for a in range(kinks.shape[1]):
    for b in range(a + 1, kinks.shape[1]):
      both = np.isfinite(kinks[:, a]) & np.isfinite(kinks[:, b])
      ok = both.sum() > 2 and np.ptp(kinks[both, a]) > 0 and np.ptp(kinks[both, b]) > 0
      out[f"{a}-{b}"] = {"r": float(np.corrcoef(kinks[both, a], kinks[both, b])[0, 1])
                         if ok else float("nan"), "rollouts": int(both.sum())}
  return out


def profile(config, rollouts: int, batches: int, margin_px: float) -> dict:
  """The profile of ``config.model.checkpoint``'s rollouts and of the teacher (see the module)."""
  config.mode, config.method, config.afd.group_size = "train", "afd_oracle", rollouts
  if config.data.teacher != "physics" or config.physics.max_balls != 1:
    raise errors.UserError("fall_profile tracks one ball per video: it needs the physics teacher "
                           "with physics.max_balls=1 (e.g. configs/demo.py).")
  if config.rollout.chunk_frames < 3:
    raise errors.UserError(
        f"fall_profile reads the fall inside chunks, which needs rollout.chunk_frames >= 3 (got "
        f"{config.rollout.chunk_frames}: a frame-wise student's fall is read over whole videos "
        "by afd_jax.eval). Profile a chunk-wise student with --config.rollout.chunk_frames=3.")
  with tempfile.TemporaryDirectory() as workdir:
    t = train.Trainer(config, workdir)
    world, chunk = t.data.physics_world, config.rollout.chunk_frames
    sharding = mesh_lib.batch_sharding(t.mesh)
    rng = np.random.default_rng(config.seed)
    student, teacher = [], []
    with jax.set_mesh(t.mesh):
      for batch in range(batches):
        ids = rng.choice(t.pool.num_train, config.data.batch_size, replace=False)
        prompts = [t.pool.prompts[i] for i in np.repeat(ids, rollouts)]
        context = jax.make_array_from_process_local_data(
            sharding, data_lib.host_slice(np.asarray(t.data.embed(prompts))))
        key_noise, key_rollout = jax.random.split(jax.random.key(batch))
        x = t.fns.rollout(t.state["old"], t.fns.noise(key_noise, methods.rollout_rows(t.config)),
                          context, key_rollout, None, t.frozen["student"])
        x = np.asarray(multihost_utils.process_allgather(x, tiled=True))
        for latents, prompt in zip(x, prompts):
          student.append(physics.chunk_profile(t.data.encoder.decode(latents), prompt, world,
                                               chunk, margin_px))
        for i in ids:
          teacher.append(physics.chunk_profile(world.render(t.pool.prompts[i], batch),
                                               t.pool.prompts[i], world, chunk, margin_px))
  kinks = np.stack([p["kink"][0] for p in student])
  return {"student": _summaries(student), "teacher": _summaries(teacher),
          "student_kink_correlation": _correlations(kinks), "rollouts": len(student)}
