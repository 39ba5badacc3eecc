"""Sampling the causal student without training (``--config.mode=rollout``): the rollout the
trainer uses, on the text embeddings of the configured teacher's held-out prompts (the same
prompts evaluation uses), timed, written as videos people can watch."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from afd_jax import methods
from afd_jax import rollout as rollout_lib
from afd_jax import state as state_lib
from afd_jax import teachers
from afd_jax import video


def prompt_batch(config, student_cfg, workdir):
  """``(ids, prompt texts, embeddings [B, L, text_dim])``: the teacher's held-out prompts, as
  evaluation picks them, cycled to ``data.batch_size``."""
  pool = teachers.from_config(config, student_cfg, workdir).pool
  ids = np.resize(pool.eval_ids(pool.num_eval or config.data.batch_size), config.data.batch_size)
  return ids, [pool.prompts[i] for i in ids], jnp.asarray(pool.embeddings[ids], jnp.float32)


def run(config, workdir: Path) -> dict:
  """Samples ``data.batch_size`` videos, prints where they are and returns the summary."""
  r = config.data
  rcfg = methods.rollout_config(config)
  rollout_lib.plan_cache(r.num_frames, rcfg)  # validates frames / window before compiling
  model = state_lib.build_student(config)
  cfg = model.config
  latent_shape = (r.num_frames, r.height, r.width, cfg.in_dim)
  model._check_latents(jnp.zeros((1, *latent_shape)), "rollout latents")

  ids, prompts, context = prompt_batch(config, cfg, workdir)
  k_noise, k_steps = jax.random.split(jax.random.key(config.seed))
  noise = rollout_lib.sample_noise(k_noise, len(ids), latent_shape)
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
             "prompts": prompts,
             "timesteps": [float(t) for t in rcfg.timesteps()], "compile_seconds": compile_s,
             "rollout_seconds": run_s, "video": str(sample_path),
             "latent_mean": float(lat.mean()), "latent_std": float(lat.std())}
  (workdir / "rollout.json").write_text(json.dumps(summary, indent=2))
  print(f"wrote {sample_path} ({lat.shape[0]} videos, {lat.shape[1]} latent frames) in "
        f"{run_s:.2f}s after a {compile_s:.1f}s compile; summary in {workdir / 'rollout.json'}")
  return summary
