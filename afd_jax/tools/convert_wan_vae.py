"""Convert the Wan2.1 VAE once into afd_jax's Orbax format.

    python -m afd_jax.tools.convert_wan_vae SRC DST

SRC: ``Wan2.1_VAE.pth`` (needs torch) or the Wan-AI model folder that holds it, a diffusers
``AutoencoderKLWan`` folder (or pipeline root with ``vae/``), or a ``.safetensors`` file. DST loads
with ``wan_vae_checkpoint.load(DST)`` without torch, and is what ``config.data.vae`` and
``build_teacher_store --vae`` take.
"""

from __future__ import annotations

import time

from absl import logging

from afd_jax import errors
from afd_jax.models import wan_vae_checkpoint


def main(argv):
  if len(argv) != 3:
    raise errors.UserError("usage: python -m afd_jax.tools.convert_wan_vae SRC DST")
  src, dst = argv[1], argv[2]
  t0 = time.perf_counter()
  try:
    vae = wan_vae_checkpoint.load(src)
    out = wan_vae_checkpoint.save_converted(vae, dst, source=src)
  except (FileExistsError, ImportError) as e:
    raise errors.UserError(str(e)) from e
  cfg = vae.config
  logging.info("converted %s -> %s in %.1fs", src, out, time.perf_counter() - t0)
  print(f"converted {src} -> {out}: base_dim={cfg.base_dim} z_dim={cfg.z_dim} "
        f"dim_mult={list(cfg.dim_mult)} stride {cfg.temporal_stride}x{cfg.spatial_stride}")


if __name__ == "__main__":
  errors.run(main)
