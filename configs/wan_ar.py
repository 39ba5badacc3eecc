"""AFD on the real thing: a Wan2.1-T2V-1.3B causal student (Self-Forcing / CausVid) at 832x480,
81 frames (21 latent frames, 7 chunks of 3), distilled from a black-box teacher's videos.

Defaults follow ``shared/reference/afd_method.md`` section 7. The paths must exist: the run stops at
start, before anything compiles, naming each missing path and the command that produces it:

    python -m afd_jax.tools.convert_wan /ckpt/self_forcing_dmd.pt checkpoints/student_1.3b
    python -m afd_jax.tools.convert_wan /ckpt/Wan2.1-T2V-1.3B checkpoints/wan_1.3b
    python -m afd_jax.tools.convert_wan_vae /ckpt/Wan2.1-T2V-1.3B/Wan2.1_VAE.pth checkpoints/wan_vae
    python -m afd_jax.tools.convert_umt5 /ckpt/Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth \
        checkpoints/umt5_xxl
    python -m afd_jax.tools.build_teacher_store --prompts P.jsonl --videos DIR --out STORE \
        --encoder wan_vae --vae checkpoints/wan_vae --num_frames 81 --height 480 --width 832 \
        --text_embeddings umt5 --t5 checkpoints/umt5_xxl --tokenizer /ckpt/Wan2.1-T2V-1.3B/google/umt5-xxl

and the run takes the store with ``--config.data.store=STORE`` (the README shows the whole path from
text to a generated MP4).

The VAE decodes evaluation samples (teacher above student, one MP4 per prompt in
``WORKDIR/samples/step_N/``) and ``--config.mode=rollout`` samples.
"""

from configs import tiny


def get_config():
  c = tiny.get_config()
  c.model.preset = "1.3b"
  c.model.checkpoint = "checkpoints/student_1.3b"   # converted causal student (convert_wan)
  c.model.dtype = "bfloat16"
  c.model.remat_policy = "full"    # "dots" holds about 3x the activations (afd_jax.tools.plan)

  c.disc.checkpoint = "checkpoints/wan_1.3b"        # bidirectional Wan2.1-T2V-1.3B trunk
  c.disc.readout_layers = (13, 21, 29)
  c.disc.readout_ffn_dim = 8192

  c.data.teacher = "store"                          # a teacher store (build_teacher_store)
  c.data.vae = "checkpoints/wan_vae"                # Wan2.1 VAE (convert_wan_vae): decodes samples
  c.data.num_prompts = 0                            # taken from the store
  c.data.text_length = 512
  c.data.batch_size = 64
  c.data.num_frames = 21
  c.data.height = 60
  c.data.width = 104

  c.afd.ema_start = 200
  c.afd.disc_warmup_steps = 100
  c.optim.student.lr = 2e-6
  c.optim.disc.lr = 2e-6

  c.output.fps = 16.0                               # Wan2.1's frame rate

  c.train.num_steps = 1000
  c.train.micro_batches = 8    # one video per device per micro-batch on 8 devices (fsdp=8)
  c.train.log_every = 1
  c.train.checkpoint_every = 25
  c.train.keep_every = 100

  # 52 GB of fp32 training state (student, EMA, Adam, old, reference, discriminator): shard it
  # over every chip; launch/README.md has a mesh per TPU slice and GPU node, sized with
  # `python -m afd_jax.tools.plan`.
  c.mesh.data = 1
  c.mesh.fsdp = -1
  return c
