"""Tiny CPU config: a random 2-layer Wan student rolled out chunk by chunk in seconds.

The README's first command and the tests use it. Override anything from the command line, e.g.
``--config.rollout.num_frames=21 --config.model.preset=small``.
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.mode = "rollout"

  config.model = ml_collections.ConfigDict()
  config.model.preset = "tiny"        # afd_jax.models.wan.PRESETS, used when checkpoint is empty
  config.model.checkpoint = ""        # any layout wan.from_pretrained reads
  config.model.dtype = "float32"
  config.model.attention_kernel = "auto"
  config.model.scan_layers = True
  config.model.remat_policy = "none"

  config.rollout = ml_collections.ConfigDict()
  config.rollout.batch_size = 2
  config.rollout.num_frames = 9       # latent frames
  config.rollout.height = 8           # latent height
  config.rollout.width = 12           # latent width
  config.rollout.chunk_frames = 3
  config.rollout.denoising_steps = (1000.0, 750.0, 500.0, 250.0)
  config.rollout.shift = 5.0
  config.rollout.window_frames = 0    # 0: global attention over the whole video
  config.rollout.sink_frames = 0
  config.rollout.text_length = 16     # random prompt embeddings for a random student

  config.output = ml_collections.ConfigDict()
  config.output.fps = 8.0
  config.output.upscale = 8
  return config
