"""The smallest AFD run that still has every part (two chunks, KV cache, discriminator, NFT):
one block, two denoising steps, two NFT passes. ``--config=tests/small_config.py`` for
subprocess runs; ``get_config(**{"mesh.data": 2})`` in-process."""

from configs import tiny


def get_config(**overrides):
  c = tiny.get_config()
  c.model.overrides.num_layers = 1
  c.disc.readout_layers = (0,)
  c.rollout.denoising_steps = (1000.0, 500.0)
  c.afd.nft_passes = 2
  c.afd.ema_start = 0
  c.data.num_frames = 6          # two chunks: the KV cache and the causal layouts are exercised
  c.mesh.num_devices = 1
  return override(c, **overrides)


def override(c, **overrides):
  """Sets dotted config fields: ``override(c, **{"mesh.data": 2})``."""
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c
