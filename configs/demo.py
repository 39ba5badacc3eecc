"""The physics demo: AFD in miniature on 2 CPU cores.

A small causal Wan student (3 blocks, width 128) generates 9-frame, 24x24 videos of one bouncing
ball (pixels as latents: 2x2 pixel blocks become 12 channels) from prompts of the physics grammar,
frame by frame, in four denoising steps per frame with Self-Forcing's KV-cache sampler. Its base
checkpoint was made as the paper's students were: a flow-matching model of a world it knows only
imperfectly (each video's gravity and bounciness scaled by a random factor), distilled by DMD
into a few-step causal student that renders balls well and moves them wrongly. AFD then distils
the true-physics teacher into it. Variants (``--config=configs/demo.py:VARIANT``):

* (none): the demo. Loads the shipped base student, runs 40 iterations of AFD against the
  physics teacher (four rollouts of each of two prompts per iteration), then evaluates
  ``base``, ``afd`` and ``teacher`` on held-out prompts into ``WORKDIR/report.json``.
* ``base`` and ``distill``: the two stages that made the shipped base student, run by one
  command (``afd_jax/tools/physics_base.py``)::

      python -m afd_jax.tools.physics_base --workdir=runs/physics_base \\
          --out=afd_jax/assets/physics_base
"""

from pathlib import Path

import ml_collections

from configs import tiny

BASE_CHECKPOINT = str(Path(__file__).resolve().parents[1] / "afd_jax" / "assets" / "physics_base")


def get_config(variant: str = ""):
  c = tiny.get_config()
  c.mode = "experiment"
  c.method = "afd"
  c.model.checkpoint = BASE_CHECKPOINT
  c.model.overrides.update(dict(
      dim=128, ffn_dim=256, num_heads=4, num_layers=3, freq_dim=64, in_dim=12, out_dim=12,
      text_dim=32, text_len=16))
  c.disc.readout_layers = (1, 2)
  c.disc.readout_ffn_dim = 256

  # The distilled student samples as Self-Forcing's does (x0, then fresh noise, KV cache), with
  # four evenly spaced levels: these small pixel videos need no shift toward high noise.
  c.rollout.denoising_steps = (1000.0, 750.0, 500.0, 250.0)
  c.rollout.shift = 1.0
  c.rollout.sampler = "renoise"
  # Frame by frame (chunks of one latent frame), as Self-Forcing's frame-wise student: with three
  # frames per chunk no network of this size made the ball fall inside a chunk (it wobbles there),
  # so no update could teach that part of gravity (docs/results/what_limits_afd.md, 9 to 11).
  c.rollout.chunk_frames = 1
  c.afd.nft_passes = 2

  c.data.teacher = "physics"
  c.data.teacher_samples = 2
  # Gravity is a law of this world, as it is of the paper's: every prompt says "normal gravity"
  # (docs/results/what_limits_afd.md: at this scale no network reads the gravity word). 84 one-ball
  # scenes: 52 to train on, 32 held out.
  c.physics.gravity_words = ("normal",)
  c.data.num_prompts = 52
  c.data.num_eval_prompts = 32
  c.data.text_length = 16
  # Eight rollouts per iteration, four of each of two prompts (``afd.group_size``): centring the
  # scores per prompt removes what a prompt's rollouts share (their colours and brightness, which
  # the discriminator reads first) and leaves what varies between them, their motion. Over five
  # seeds this teaches gravity where one rollout of each of eight prompts does not
  # (what_limits_afd.md, section 14).
  c.data.batch_size = 2
  c.afd.group_size = 4
  c.data.encoder_patch = 2
  c.data.num_frames, c.data.height, c.data.width = 9, 12, 12
  c.physics.size, c.physics.num_frames, c.physics.fps = 24, 9, 6.0
  c.physics.max_balls = 1

  c.afd.ema_decay = 0.9
  c.afd.ema_start = 0
  # The base renders imperfect balls that a fresh discriminator tells apart in a few steps; strong
  # pair-shared noise augmentation and a slower discriminator keep its ranking informative.
  c.afd.disc_tau_max = 0.3
  # A short, strong update: 40 iterations at 5e-5. The oracle closes as much of the gap by the
  # 40th iteration at 5e-5 as by the 120th at 2e-5, and later the frame-wise student's gravity
  # overshoots or collapses (what_limits_afd.md, sections 11, 13 and 14).
  c.optim.student.lr = 5e-5
  c.optim.disc.lr = 3e-5
  # The discriminator wins on the base's blotchy appearance; without a real pull toward the base
  # (DiffusionNFT's 1e-4 is negligible here) the student trades Frechet for physics. At 0.1 both
  # improve (measured 2026-11-23, 120 iterations: physics 1.98 -> 1.79, Frechet .0165 -> .0118;
  # at 1e-2, Frechet got worse: .0197).
  c.afd.reg_weight = 0.1

  c.train.num_steps = 40
  c.train.log_every = 10
  c.train.checkpoint_every = 20
  c.train.eval_every = 40
  c.output.upscale = 8

  c.experiment = ml_collections.ConfigDict()
  c.experiment.systems = ("teacher", "base", "afd")   # what report.json compares (in order)
  c.experiment.name = ""                              # the trained system's name; "": method

  if variant in ("base", "distill"):  # both stages train on the world the student gets wrong
    c.mode = "train"
    c.physics.gravity_words = ("weak", "normal", "strong")  # the shipped base saw every word
    c.data.num_prompts = 200
    c.model.checkpoint = ""
    c.physics.gravity_range = (0.25, 1.0)
    c.physics.restitution_range = (0.5, 1.0)
    c.data.teacher_samples = 0                     # a fresh video every step
    c.data.batch_size, c.afd.group_size = 8, 1
  if variant == "base":
    c.method = "pretrain"
    c.afd.nft_levels = "continuous"                # every noise level, not only the sampler's
    c.rollout.sampler = "ode"                      # a plain flow-matching model (evaluation):
    c.rollout.denoising_steps = (1000.0, 875.0, 750.0, 625.0, 500.0, 375.0, 250.0, 125.0)
    c.optim.student.lr = 1e-3
    c.optim.student.b1 = 0.9                       # pretraining from scratch wants momentum
    c.optim.student.warmup_steps = 200
    c.optim.student.decay_steps = 8000             # cosine to 0
    c.afd.ema_decay = 0.999
    c.train.num_steps = 8000
    c.train.log_every = 200
    c.train.checkpoint_every = 1000
    c.train.eval_every = 2000
  elif variant == "distill":
    c.method = "dmd"                               # model.checkpoint: the base (the real score)
    c.optim.student.lr = 1e-4
    c.optim.critic.lr = 1e-4
    c.afd.ema_decay = 0.99
    c.train.num_steps = 1000
    c.train.log_every = 100
    c.train.checkpoint_every = 500
    c.train.eval_every = 1000
  elif variant:
    raise ValueError(f"unknown configs/demo.py variant {variant!r}; use '', 'base' or 'distill'.")
  return c
