"""Entry point: ``python -m afd_jax.main --config=configs/tiny.py --workdir=DIR``.

Multi-host: one process per host, started by ``launch/`` (or by hand with
``--coordinator_address=HOST:PORT --num_processes=N --process_id=I``); see ``distributed.py``.

Modes (``config.mode``): ``train`` runs ``config.method`` (afd, sft, afd_frozen_disc, pretrain;
see ``afd_jax/train.py``), resuming from ``DIR/checkpoints`` when present; ``rollout`` samples
videos from the causal student (random or loaded from ``config.model.checkpoint``) into
``DIR/samples`` with a ``DIR/rollout.json`` summary; ``experiment`` trains ``config.method`` from a
base student and evaluates base, trained student and teacher on held-out prompts into
``DIR/report.json`` (``configs/demo.py``; see ``afd_jax/experiment.py``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging
from flax import nnx
from ml_collections import config_flags

from afd_jax import distributed
from afd_jax import errors
from afd_jax import experiment
from afd_jax import lock
from afd_jax import methods
from afd_jax import rollout as rollout_lib
from afd_jax import state as state_lib
from afd_jax import train
from afd_jax import video

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Training/sampling config.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (on storage every host sees).",
                                required=True)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", "", "Multi-process runs: HOST:PORT of process 0 (auto-detected on "
    "Cloud TPU and SLURM).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Multi-process runs: process count.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "Multi-process runs: this process's index.")

MODES = ("train", "rollout", "experiment")


def log_environment():
  import flax
  import jaxlib
  import optax
  import orbax.checkpoint as ocp
  logging.info("jax %s, jaxlib %s, flax %s, optax %s, orbax %s", jax.__version__,
               jaxlib.__version__, flax.__version__, optax.__version__,
               getattr(ocp, "__version__", "?"))
  logging.info("process %d/%d, devices: %s", jax.process_index(), jax.process_count(), jax.devices())


def run_rollout(config, workdir: Path) -> dict:
  r = config.data
  rcfg = methods.rollout_config(config)
  rollout_lib.plan_cache(r.num_frames, rcfg)  # validates frames / window before compiling
  model = state_lib.build_student(config)
  cfg = model.config
  latent_shape = (r.num_frames, r.height, r.width, cfg.in_dim)
  model._check_latents(jnp.zeros((1, *latent_shape)), "rollout latents")

  key = jax.random.key(config.seed)
  k_noise, k_text, k_steps = jax.random.split(key, 3)
  noise = rollout_lib.sample_noise(k_noise, r.batch_size, latent_shape)
  context = jax.random.normal(k_text, (r.batch_size, r.text_length, cfg.text_dim), jnp.float32)
  graphdef, params = nnx.split(model)
  fn = rollout_lib.make_rollout(graphdef, rcfg)

  t0 = time.perf_counter()
  compiled = fn.lower(params, noise, context, k_steps).compile()
  compile_s = time.perf_counter() - t0
  logging.info("rollout compiled in %.1fs", compile_s)
  t0 = time.perf_counter()
  latents = jax.block_until_ready(compiled(params, noise, context, k_steps))
  run_s = time.perf_counter() - t0
  chunks = r.num_frames // rcfg.chunk_frames
  logging.info("rollout of %d videos x %d chunks x %d steps in %.2fs (%.1f chunks/s)",
               r.batch_size, chunks, len(rcfg.denoising_steps), run_s, r.batch_size * chunks / run_s)

  lat = np.asarray(latents)
  if not np.isfinite(lat).all():
    raise FloatingPointError("the rollout produced non-finite latents.")
  samples = workdir / "samples"
  if config.data.vae:  # real Wan latents: decode them and write what people watch
    from afd_jax import encoders
    vae = encoders.from_config(config.data, name="wan_vae")
    for i, v in enumerate(lat):
      video.write_mp4(vae.decode(v), samples / f"rollout_{i}.mp4", fps=config.output.fps)
    sample_path = samples / "rollout_0.mp4"
  else:
    frames = np.stack([video.latents_to_frames(v, upscale=config.output.upscale) for v in lat])
    sample_path = video.write_gif(video.tile(frames), samples / "rollout.gif",
                                  fps=config.output.fps)
  np.save(samples / "rollout_latents.npy", lat)
  summary = {"mode": "rollout", "model": cfg.architecture(), "latent_shape": list(lat.shape),
             "timesteps": [float(t) for t in rcfg.timesteps()], "compile_seconds": compile_s,
             "rollout_seconds": run_s, "video": str(sample_path),
             "latent_mean": float(lat.mean()), "latent_std": float(lat.std())}
  (workdir / "rollout.json").write_text(json.dumps(summary, indent=2))
  print(f"wrote {sample_path} ({lat.shape[0]} videos, {lat.shape[1]} latent frames) in "
        f"{run_s:.2f}s after a {compile_s:.1f}s compile; summary in {workdir / 'rollout.json'}")
  return summary


def main(argv):
  del argv
  config = _CONFIG.value
  if config.mode not in MODES:
    raise errors.UserError(f"config.mode={config.mode!r} is not one of {MODES}.")
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if jax.process_index() != 0:  # one voice: the other hosts log warnings and errors only
    logging.set_verbosity(logging.WARNING)
  workdir = Path(_WORKDIR.value)
  if workdir.exists() and not workdir.is_dir():
    raise errors.UserError(f"--workdir={workdir} is a file; give a folder (it is created if "
                           "missing).")
  if config.mode != "rollout":
    methods.validate(config)
  workdir.mkdir(parents=True, exist_ok=True)
  with lock.WorkdirLock(workdir):  # one run per workdir, refused before anything is built
    run(config, workdir)


def run(config, workdir: Path):
  log_environment()
  logging.info("config:\n%s", config)
  if config.mode == "rollout":
    run_rollout(config, workdir)
    return
  if config.mode == "experiment":
    experiment.run(config, workdir)
    return
  summary = train.run(config, workdir)
  if jax.process_index() == 0 and "nothing_to_do" not in summary:  # the trainer said why
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)}, indent=2))


if __name__ == "__main__":
  errors.run(main)
