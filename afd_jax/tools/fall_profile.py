"""Does a student's ball fall inside its chunks, or only between them? Its motion chunk by chunk.

    python -m afd_jax.tools.fall_profile --checkpoint=afd_jax/assets/physics_base

Rolls the checkpoint out ``--rollouts`` times on each of ``--batches`` batches of the config's
training prompts (the demo's world and sampler, ``--config``), tracks the ball in every video and
reads, away from the floor and ceiling, its vertical second difference and velocity inside each
chunk and its drop at each chunk start (``afd_jax.eval.physics.chunk_profile``); the teacher's
videos of the same prompts alike. It prints the mean and spread of each per chunk for the student
and the teacher (on the teacher's parabolas: ``g`` px / frame**2, a velocity growing by
``chunk_frames * g`` per chunk, no drop), and the correlation of the second differences between
the chunks of one rollout: near zero when the in-chunk fall is drawn afresh in every chunk, not a
trait of the rollout.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # configs/, run from anywhere

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from afd_jax import data as data_lib  # noqa: E402
from afd_jax import errors, methods, train  # noqa: E402
from afd_jax import mesh as mesh_lib  # noqa: E402
from afd_jax.eval import physics  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "The physics world, "
                                          "sampler and text encoder the checkpoint was made for.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "", "A Wan checkpoint (default: the config's "
                                  "model.checkpoint).")
_ROLLOUTS = flags.DEFINE_integer("rollouts", 8, "Rollouts per prompt.")
_BATCHES = flags.DEFINE_integer("batches", 4, "Batches of config.data.batch_size prompts.")
_MARGIN = flags.DEFINE_float("margin_px", 4.0, "Readings this close to the floor or ceiling are "
                             "left out.")
_OUT = flags.DEFINE_string("out", "", "Write the profile here as JSON (optional).")


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


def run(config, rollouts: int, batches: int, margin_px: float) -> dict:
  """The profile of ``config.model.checkpoint``'s rollouts and of the teacher (see the module)."""
  config.mode, config.method, config.afd.group_size = "train", "afd_oracle", rollouts
  if config.data.teacher != "physics" or config.physics.max_balls != 1:
    raise errors.UserError("fall_profile tracks one ball per video: it needs the physics teacher "
                           "with physics.max_balls=1 (e.g. configs/demo.py).")
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


def main(argv):
  del argv
  config = _CONFIG.value
  if _CHECKPOINT.value:
    config.model.checkpoint = _CHECKPOINT.value
  if not config.model.checkpoint or not Path(config.model.checkpoint).exists():
    raise errors.MissingInput(f"checkpoint {config.model.checkpoint!r} does not exist; pass "
                              "--checkpoint=PATH (a Wan checkpoint, e.g. "
                              "afd_jax/assets/physics_base).")
  profile = run(config, _ROLLOUTS.value, _BATCHES.value, _MARGIN.value)
  print(f"{'per chunk (px, frames)':28s}{'mean':>24s}{'std':>24s}{'robust std':>24s}")
  for quantity in profile["student"]:
    for who in ("student", "teacher"):
      row = profile[who][quantity]
      cells = ["/".join(f"{v:.2f}" for v in row[k]) for k in ("mean", "std", "robust_std")]
      print(f"{quantity + ', ' + who:28s}" + "".join(f"{c:>24s}" for c in cells))
  print("student kink, chunk-to-chunk correlation: " + ", ".join(
      f"{k}: {v['r']:.2f} ({v['rollouts']})" for k, v in profile["student_kink_correlation"].items()))
  if _OUT.value:
    Path(_OUT.value).parent.mkdir(parents=True, exist_ok=True)
    Path(_OUT.value).write_text(json.dumps(profile, indent=1) + "\n")


if __name__ == "__main__":
  errors.run(main)
