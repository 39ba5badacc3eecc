"""Convert Wan's umT5 text encoder once into afd_jax's Orbax format.

    python -m afd_jax.tools.convert_umt5 SRC DST

SRC: ``models_t5_umt5-xxl-enc-bf16.pth`` (needs torch) or a Hugging Face ``UMT5EncoderModel``
folder. DST loads with ``umt5.from_pretrained(DST)`` without torch; ``embed_prompts --t5`` and
``build_teacher_store --t5`` take it.
"""

from __future__ import annotations

import time

from absl import logging

from afd_jax import errors
from afd_jax.models import umt5, umt5_checkpoint


def main(argv):
  if len(argv) != 3:
    raise errors.UserError("usage: python -m afd_jax.tools.convert_umt5 SRC DST")
  src, dst = argv[1], argv[2]
  t0 = time.perf_counter()
  try:
    encoder = umt5.from_pretrained(src, dtype="float32")
    out = umt5_checkpoint.save_converted(encoder, dst, source=src)
  except (FileExistsError, ImportError) as e:
    raise errors.UserError(str(e)) from e
  cfg = encoder.config
  logging.info("converted %s -> %s in %.1fs", src, out, time.perf_counter() - t0)
  print(f"converted {src} -> {out}: dim={cfg.dim} layers={cfg.num_layers} heads={cfg.num_heads} "
        f"vocab={cfg.vocab_size}")


if __name__ == "__main__":
  errors.run(main)
