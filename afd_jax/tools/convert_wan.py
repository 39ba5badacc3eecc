"""Convert any supported Wan2.1 transformer checkpoint once into afd_jax's Orbax format.

    python -m afd_jax.tools.convert_wan SRC DST [--pt_key generator_ema] [--num_heads 12]

SRC: an original Wan-AI or diffusers folder (or .safetensors file), a Self-Forcing / CausVid ``.pt``
(needs torch), or an already converted folder. DST loads with ``wan.from_pretrained(DST)`` without
torch, fast and directly into the requested shardings.
"""

from __future__ import annotations

import time

from absl import flags, logging

from afd_jax import errors
from afd_jax.models import wan
from afd_jax.models import wan_checkpoint

_PT_KEY = flags.DEFINE_string("pt_key", None, "State dict inside a .pt (default: generator_ema, "
                              "then generator, then model).")
_NUM_HEADS = flags.DEFINE_integer("num_heads", None, "Heads, for sources without a config.json "
                                  "whose width is not 128 x heads.")


def main(argv):
  if len(argv) != 3:
    raise errors.UserError("usage: python -m afd_jax.tools.convert_wan SRC DST")
  src, dst = argv[1], argv[2]
  t0 = time.perf_counter()
  model = wan.from_pretrained(src, pt_key=_PT_KEY.value, num_heads=_NUM_HEADS.value)
  out = wan_checkpoint.save_converted(model, dst, source=src)
  cfg = model.config
  logging.info("converted %s -> %s in %.1fs", src, out, time.perf_counter() - t0)
  print(f"converted {src} -> {out}: dim={cfg.dim} layers={cfg.num_layers} heads={cfg.num_heads} "
        f"ffn={cfg.ffn_dim}")


if __name__ == "__main__":
  errors.run(main)
