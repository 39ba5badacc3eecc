"""Tiny CPU config: AFD on a random 2-layer Wan student against the synthetic teacher.

Used by the README's first command and the tests; a run takes seconds to a few minutes on 2 CPU
cores. ``--config.mode=rollout`` only samples the student. Override anything from the command
line, e.g. ``--config.method=sft --config.train.num_steps=50``.
"""

import ml_collections
from ml_collections import config_dict


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.mode = "train"                     # train | rollout
  c.method = "afd"                     # afd | afd_frozen_disc | afd_oracle | gan | sft | dmd | pretrain

  c.model = ml_collections.ConfigDict()
  c.model.preset = "tiny"              # afd_jax.models.wan.PRESETS, used when checkpoint is empty
  c.model.checkpoint = ""              # any layout wan.from_pretrained reads
  c.model.dtype = "float32"
  c.model.attention_kernel = "auto"
  c.model.scan_layers = True
  c.model.remat_policy = "none"
  # > 0: train low-rank adapters of this rank over the frozen base (afd_jax/lora.py); the EMA, the
  # old policy and the reference share that base. Targets: regexes over parameter paths.
  c.model.lora_rank = 0
  c.model.lora_alpha = 32.0
  c.model.lora_targets = (r"(self_attn|cross_attn)/[qkvo]/kernel$", r"ffn_(in|out)/kernel$")
  # WanConfig architecture fields over the preset (random init); None keeps the preset's value.
  c.model.overrides = ml_collections.ConfigDict(
      {**{k: config_dict.placeholder(int) for k in ("dim", "ffn_dim", "num_heads", "num_layers",
                                                    "in_dim", "out_dim", "freq_dim", "text_dim",
                                                    "text_len")},
       "patch_size": config_dict.placeholder(tuple), "eps": config_dict.placeholder(float),
       "qk_norm": config_dict.placeholder(bool), "cross_attn_norm": config_dict.placeholder(bool)})

  c.disc = ml_collections.ConfigDict()
  c.disc.checkpoint = ""               # trunk weights; empty: a copy of the student
  c.disc.readout_layers = (0, 1)
  c.disc.readout_ffn_dim = 128
  c.disc.freeze_below = 0
  c.disc.lora_rank = 0                 # > 0: trunk tuned by adapters; readouts, head train fully
  c.disc.lora_alpha = 256.0
  c.disc.lora_targets = (r"(self_attn|cross_attn)/[qkvo]/kernel$", r"ffn_(in|out)/kernel$")
  c.disc.loss = "bt"                   # bt (prompt-paired Bradley-Terry) | gan (unpaired)
  c.disc.mismatch_weight = 0.0         # > 0: also rank teacher videos above the nearest other
                                       # prompt's under their own prompt (0: the paper's recipe)
  c.disc.input = "video"               # video | motion: the frame-to-frame change (what moves) |
                                       # coarse: standardised per channel, pooled over cells
  c.disc.coarse_pool = 2               # input=coarse: latent cells averaged per side
  c.disc.per_chunk = False             # True: block-causal trunk, one logit per chunk prefix and a
                                       # per-chunk advantage (afd_method.md 6.6; False: the paper's)

  c.rollout = ml_collections.ConfigDict()
  c.rollout.chunk_frames = 3
  c.rollout.denoising_steps = (1000.0, 750.0, 500.0, 250.0)
  c.rollout.shift = 5.0
  c.rollout.window_frames = 0          # 0: global attention over the whole video
  c.rollout.sink_frames = 0
  c.rollout.sampler = "renoise"        # renoise (Self-Forcing, distilled) | ode (plain FM students)
  c.rollout.scan_chunks = True         # chunks under lax.scan: compile time flat in video length

  c.data = ml_collections.ConfigDict()
  c.data.teacher = "synthetic"         # synthetic | physics | store | callable | http
  c.data.teacher_offset = 1.0          # the synthetic teacher's visible property
  c.data.teacher_samples = 0           # teacher videos per prompt (the budget); 0: new every step
  c.data.store = ""                    # teacher store (build_teacher_store --out)
  c.data.teacher_url = ""              # http: POST {"prompts", "seed"} -> .npy videos
  c.data.teacher_callable = ""         # callable: "module:function(prompts, seed) -> videos"
  c.data.teacher_timeout_s = 600.0     # http: seconds one request may take before it is an error
  c.data.teacher_cache = ""            # online teachers' cache; empty: WORKDIR/teacher_cache
  c.data.prompts = ""                  # online teachers: .txt / .jsonl prompts
  c.data.encoder = "pixels"            # video -> latents (video teachers): pixels | wan_vae
  c.data.encoder_patch = 4
  c.data.vae = ""                      # Wan VAE checkpoint (any layout; convert_wan_vae): encodes
                                       # for wan_vae, decodes store and rollout samples to MP4
  c.data.vae_chunk = 1                 # latent frames per VAE step (0: whole video at once)
  c.data.vae_tile = 0                  # >0: spatial tiles of this many pixels (large frames)
  c.data.prompt_seed = 0               # physics: which grammar prompts
  c.data.num_prompts = 64              # training prompts
  c.data.num_eval_prompts = 8          # held-out prompts (evaluation, samples)
  c.data.text_length = 16              # the tiny preset's text_len (shorter contexts are zero-padded)
  c.data.text_encoder = "tiny"         # physics / online teachers' prompts: tiny | umt5 (Wan's)
  c.data.t5 = ""                       # umt5: the encoder (Wan .pth, HF folder, converted)
  c.data.tokenizer = ""                # umt5: the google/umt5-xxl tokenizer folder
  c.data.batch_size = 8
  c.data.num_frames = 6                # latent frames
  c.data.height = 4                    # latent height
  c.data.width = 6                     # latent width

  c.afd = ml_collections.ConfigDict()
  c.afd.beta = 1.0
  c.afd.a_max = 5.0
  c.afd.adv_mode = "all"
  c.afd.group_size = 1
  c.afd.reg_weight = 1e-4
  c.afd.nft_passes = 4
  c.afd.nft_levels = "rollout"
  c.afd.disc_tau_max = 0.1
  c.afd.disc_tau_min = 0.0             # noise augmentation tau ~ U[min, max], shared in a pair
  c.afd.disc_color_jitter = 0.0        # > 0 (pixel latents): each video the discriminator sees
                                       # gets its own RGB gains exp(U[-a, a])
  c.afd.group_pairs = "own"            # K > 1: own (each rollout its teacher draw and noise) |
                                       # shared (a prompt's K pairs: one draw, one noise)
  c.afd.score_tau = -1.0               # >= 0: advantages from the pre-update logits at this noise
                                       # level, one draw per prompt; -1: the training draw's
  c.afd.r1_weight = 0.0
  c.afd.r2_weight = 0.0
  c.afd.penalty_sigma = 0.01
  c.afd.ema_decay = 0.99
  c.afd.ema_start = 0
  c.afd.old_decay_type = 1
  c.afd.disc_lead_steps = 0            # the first iterations train only the discriminator (its
                                       # head start on the starting student's rollouts)
  c.afd.disc_steps = 1                 # discriminator updates per iteration, on the iteration's
                                       # pairs (fresh noise augmentation each); the advantage
                                       # is always the first's pre-update score
  c.afd.student_steps = 1              # NFT updates per iteration on its rollouts (DiffusionNFT's
                                       # inner epochs), each with fresh noise; the old policy
                                       # moves once, after them. > 1 wants momentum
                                       # (optim.student.b1): without it the demo's frames go blank
  c.afd.disc_warmup_steps = 10         # afd_frozen_disc: discriminator trains only this long
  c.afd.nft_branches = "both"          # both | positive (reward-weighted FM, no negative branch)
  c.afd.exit_step = "random"           # gan, dmd: the rollout step losses backpropagate through
  c.afd.oracle_score = "physics_error"  # afd_oracle ranks rollouts by this (one of its terms,
                                       # gravity_gap / gravity_gap_in_chunks, fall_jitter)
  c.afd.oracle_noise = 0.0              # afd_oracle: Gaussian noise on its score, in units of the
                                       # within-prompt spread (ranking correlation ~1/sqrt(1+n^2))

  c.dmd = ml_collections.ConfigDict()  # distribution matching (method=dmd: distilling a base)
  c.dmd.critic_ratio = 5               # critic updates per student update (Self-Forcing: 5)
  c.dmd.sigma_range = (0.02, 0.98)     # noise levels (before the rollout shift) scores compare at
  c.dmd.guidance_scale = 1.0           # the real score's classifier-free guidance (Self-Forcing: 3)

  c.pretrain = ml_collections.ConfigDict()  # flow matching on videos (method=pretrain, sft)
  c.pretrain.text_dropout = 0.0        # fraction of videos trained on the empty prompt (for CFG)

  c.optim = ml_collections.ConfigDict()
  for name, lr in (("student", 3e-4), ("disc", 1e-3), ("critic", 3e-4)):
    o = ml_collections.ConfigDict()
    o.lr, o.b1, o.b2, o.weight_decay, o.eps, o.grad_clip, o.warmup_steps = (
        lr, 0.0, 0.999, 0.01, 1e-8, 10.0, 0)
    o.decay_steps = 0                  # > 0: cosine decay to 0 at this step (pretraining)
    c.optim[name] = o
  c.optim.disc.head_lr_multiplier = 1.0  # readouts and head learn at lr x this

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 20
  c.train.log_every = 1
  c.train.checkpoint_every = 10
  c.train.keep_last = 3
  c.train.keep_every = 0
  c.train.max_nonfinite = 5
  c.train.micro_batches = 1            # gradient accumulation: the batch in this many slices
  c.train.eval_every = 0               # evaluate held-out prompts every N steps (0: at the end)
  c.train.export = ""                  # write the EMA student here at the end (adapters merged)
  c.train.export_format = "converted"  # converted (Orbax, convert_wan's) | diffusers (safetensors)

  c.mesh = ml_collections.ConfigDict()   # axis sizes; one may be -1 (the devices left over)
  c.mesh.num_devices = 0               # 0: all visible devices
  c.mesh.data = -1                     # batch split, parameters replicated
  c.mesh.fsdp = 1                      # batch split, parameters and optimizer states sharded
  c.mesh.context = 1                   # sequence parallel over video tokens
  c.mesh.tensor = 1                    # attention heads and FFN hidden units
  # Logical parameter axis -> mesh axis (or a tuple of axes); names without a rule replicate.
  c.logical_rules = (("embed", "fsdp"), ("heads", "tensor"), ("mlp", "tensor"))

  c.physics = ml_collections.ConfigDict()  # the physics teacher's world (data.teacher=physics)
  c.physics.size = 32
  c.physics.num_frames = 12
  c.physics.fps = 8.0
  c.physics.radius = 0.1
  c.physics.max_balls = 3                  # prompts with 1..max_balls balls
  c.physics.gravity_words = ("weak", "normal", "strong")  # the gravities prompts may ask for
  c.physics.gravity_range = (1.0, 1.0)     # per-video scale of the prompt's gravity; (1, 1): true
  c.physics.restitution_range = (1.0, 1.0)

  c.output = ml_collections.ConfigDict()
  c.output.fps = 8.0
  c.output.upscale = 8
  c.output.max_videos = 4              # decoded (VAE) samples: one MP4 per prompt, this many

  c.debug = ml_collections.ConfigDict()
  c.debug.kill_at_step = -1            # preemption drills: SIGKILL ourselves after this step
  c.debug.term_at_step = -1            # ... or SIGTERM
  c.debug.nan_at_step = -1             # poison the student batch at this step
  return c
