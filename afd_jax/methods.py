"""What each training method is and needs: the method families, the config checks that refuse a
bad run before anything is built, and the frozen settings the pure steps close over.

Used by the trainer, the planner (``tools/plan.py``) and ``main.py``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import numpy as np

from afd_jax import errors
from afd_jax import losses
from afd_jax import rollout as rollout_lib
from afd_jax import steps
from afd_jax import teachers
from afd_jax.eval import physics as eval_physics
from afd_jax.models import discriminator as disc_lib
from afd_jax.models import wan

if TYPE_CHECKING:   # configs are ConfigDicts; the steps and programs import without ml_collections
  import ml_collections

METHODS = ("afd", "afd_frozen_disc", "afd_oracle", "gan", "sft", "dmd", "pretrain")
NFT = ("afd", "afd_frozen_disc", "afd_oracle")   # on-policy NFT updates: old policy and reference
WITH_DISC = ("afd", "afd_frozen_disc", "gan")    # a discriminator in the training state
GENERATOR = ("gan", "dmd")                       # losses through the rollout's exit step
ON_POLICY = NFT + GENERATOR                      # methods that roll out the student
# The distance of the gravity a rollout shows (over the whole video, or inside chunks only) from
# the teacher's: |ratio - 1|, per the evaluator's ratio it is read from.
GRAVITY_GAPS = {"gravity_gap": "gravity_ratio", "gravity_gap_in_chunks": "gravity_ratio_in_chunks"}
# What afd_oracle ranks (lower: better): the physics score, its terms, a gravity gap, or how
# much the ball's fall wobbles inside chunks.
ORACLE_SCORES = ("physics_error", *eval_physics.TERMS, *GRAVITY_GAPS, "fall_jitter")


def oracle_values(physics: dict[str, np.ndarray], score: str) -> np.ndarray:
  """Per-rollout values of ``score`` for afd_oracle, an unmeasured one (NaN: no ball flew three
  frames inside a chunk) counting as the worst: 1 for a gravity gap, the batch's largest
  ``fall_jitter`` for the jitter."""
  values = np.asarray(physics[score], np.float64)
  if np.isnan(values).all():
    return np.zeros_like(values)   # nothing measured: no preference
  return np.nan_to_num(values, nan=1.0 if score in GRAVITY_GAPS else np.nanmax(values))


def blur_oracle(values: np.ndarray, noise: float, group_size: int,
                normal: np.ndarray) -> np.ndarray:
  """``values`` plus ``noise`` times the pooled within-prompt std of ``values`` times the
  standard normal draws ``normal``: an oracle whose ranking of a prompt's rollouts correlates
  about ``1 / sqrt(1 + noise**2)`` with the truth, to measure how good a discriminator's ranking
  must be for the update to teach physics. With ``group_size`` 1 the whole batch is one group."""
  if not noise or values.size < 2:
    return values
  grouped = values.reshape(-1, group_size) if group_size > 1 else values.reshape(1, -1)
  spread = np.sqrt(np.mean(np.var(grouped, axis=1, ddof=1)))   # unbiased: the correlation holds
  return values + noise * spread * np.asarray(normal, np.float64).reshape(values.shape)


def validate(config: ml_collections.ConfigDict):
  """Fails before anything is built or compiled, naming the field and the fix."""
  problems = []
  if config.method not in METHODS:
    problems.append(f"config.method={config.method!r} is not one of {METHODS}")
  if config.train.num_steps <= 0:
    problems.append(f"config.train.num_steps={config.train.num_steps} must be positive")
  t = config.train
  for field, least, meaning in (
      ("log_every", 1, "log every N steps"), ("checkpoint_every", 0, "0: save only at the end"),
      ("eval_every", 0, "0: evaluate only at the end"), ("keep_last", 1, "the last checkpoint is "
      "what a resume needs"), ("keep_every", 0, "0: keep only the last ones"),
      ("max_nonfinite", 1, "rejected updates in a row before the run stops"),
      ("micro_batches", 1, "slices of the batch")):
    value = t[field]
    if not isinstance(value, int) or value < least:
      problems.append(f"config.train.{field}={value!r} must be an integer >= {least} ({meaning})")
  for name, o in config.optim.items():
    least = 0.0 if name == "disc" else None  # a zero discriminator lr freezes it (an ablation)
    if not (math.isfinite(o.lr) and (o.lr > 0 or (least == 0.0 and o.lr == 0))):
      problems.append(f"config.optim.{name}.lr={o.lr!r} must be a finite number "
                      f"{'>= 0' if least == 0.0 else '> 0'}")
  d, r = config.data, config.rollout
  for field, value in (("data.batch_size", d.batch_size), ("data.num_frames", d.num_frames),
                       ("data.height", d.height), ("data.width", d.width),
                       ("rollout.chunk_frames", r.chunk_frames)):
    if value <= 0:
      problems.append(f"config.{field}={value} must be positive")
  if problems:  # the checks below divide by these
    raise _invalid(problems)
  if d.num_frames % r.chunk_frames:
    problems.append(f"config.data.num_frames={d.num_frames} is not a multiple of "
                    f"config.rollout.chunk_frames={r.chunk_frames}")
  if d.height % 2 or d.width % 2:
    problems.append(f"latent height/width {d.height}x{d.width} must be even (Wan's 2x2 patches)")
  if config.afd.group_size < 1:
    problems.append(f"config.afd.group_size={config.afd.group_size} must be >= 1 (student "
                    "rollouts per prompt)")
  elif config.afd.group_size > 1 and config.method not in ON_POLICY:
    problems.append(f"config.afd.group_size={config.afd.group_size}: {config.method!r} trains on "
                    "teacher videos, not on rollouts; use 1")
  if config.disc.loss not in losses.DISC_LOSSES:
    problems.append(f"config.disc.loss={config.disc.loss!r} is not one of {losses.DISC_LOSSES}")
  if config.disc.input not in disc_lib.INPUTS:
    problems.append(f"config.disc.input={config.disc.input!r} is not one of {disc_lib.INPUTS}")
  elif config.disc.input == "coarse":
    pool = config.disc.coarse_pool
    if not isinstance(pool, int) or pool < 1 or d.height % pool or d.width % pool:
      problems.append(f"config.disc.coarse_pool={pool!r} must be an integer >= 1 dividing the "
                      f"{d.height}x{d.width} latent grid")
    if config.disc.per_chunk:
      problems.append("config.disc.input='coarse' standardises each video over all its frames, "
                      "so a chunk's prefix logit would see its future: use per_chunk=False")
  if not isinstance(config.afd.disc_steps, int) or config.afd.disc_steps < 1:
    problems.append(f"config.afd.disc_steps={config.afd.disc_steps!r} must be an integer >= 1 "
                    "(discriminator updates per iteration)")
  n = config.afd.student_steps
  if not isinstance(n, int) or n < 1 or (n > 1 and config.method not in NFT):
    problems.append(f"config.afd.student_steps={n!r} must be an integer >= 1, and 1 unless the "
                    f"method is one of {NFT} (NFT updates per iteration on its rollouts)")
  if config.afd.group_pairs not in ("own", "shared"):
    problems.append(f"config.afd.group_pairs={config.afd.group_pairs!r} must be 'own' (each of a "
                    "prompt's K rollouts with its own teacher draw and noise) or 'shared'")
  lead = config.afd.disc_lead_steps
  if lead and (config.method not in ("afd", "afd_frozen_disc")
               or not 0 < lead < config.train.num_steps):
    problems.append(f"config.afd.disc_lead_steps={lead}: the discriminator's head start needs "
                    "'afd' or 'afd_frozen_disc' and 0 <= it < config.train.num_steps")
  if config.afd.exit_step not in ("random", "last"):
    problems.append(f"config.afd.exit_step={config.afd.exit_step!r} must be 'random' (Self-"
                    "Forcing) or 'last'")
  if config.method == "dmd" and not config.model.checkpoint:
    problems.append("config.method='dmd' distils config.model.checkpoint (the score model, e.g. "
                    "a flow-matching base) into a few-step student; set it")
  if config.method == "afd_oracle" and d.teacher != "physics":
    problems.append("config.method='afd_oracle' scores rollouts with the physics evaluator, so it "
                    "needs config.data.teacher='physics'")
  if d.teacher not in teachers.KINDS:
    problems.append(f"config.data.teacher={d.teacher!r} is not one of {teachers.KINDS}")
  elif d.teacher == "store" and not (d.store and Path(d.store).exists()):
    problems.append(f"config.data.store={d.store!r} does not exist; build a teacher store with "
                    "`python -m afd_jax.tools.build_teacher_store --prompts P.jsonl --videos DIR "
                    "--out STORE` and point the field at STORE")
  elif d.teacher == "http" and not d.teacher_url:
    problems.append("config.data.teacher='http' needs config.data.teacher_url")
  elif d.teacher == "http" and not (math.isfinite(d.teacher_timeout_s) and d.teacher_timeout_s > 0):
    problems.append(f"config.data.teacher_timeout_s={d.teacher_timeout_s!r} must be a positive "
                    "number of seconds")
  elif d.teacher == "callable" and ":" not in d.teacher_callable:
    problems.append(f"config.data.teacher_callable={d.teacher_callable!r} must be 'module:function'")
  if d.teacher in ("http", "callable") and not Path(d.prompts).is_file():
    problems.append(f"config.data.prompts={d.prompts!r} must be a prompts file (.txt or .jsonl) "
                    "for an online teacher")
  if d.num_eval_prompts < 0 or d.num_eval_prompts % max(1, jax.process_count()):
    problems.append(f"config.data.num_eval_prompts={d.num_eval_prompts} must be >= 0 and divisible "
                    "by the number of processes")
  for section in ("model", "disc"):
    rank = config[section].get("lora_rank", 0)
    if not isinstance(rank, int) or rank < 0:
      problems.append(f"config.{section}.lora_rank={rank!r} must be an integer >= 0 (0: train "
                      "every parameter)")
    elif rank and not (math.isfinite(alpha := config[section].lora_alpha) and alpha > 0):
      problems.append(f"config.{section}.lora_alpha={alpha!r} must be > 0")
  if config.train.get("export_format", "converted") not in ("converted", "diffusers"):
    problems.append(f"config.train.export_format={config.train.export_format!r} must be "
                    "'converted' or 'diffusers'")
  if config.disc.get("lora_rank", 0) and config.disc.freeze_below:
    problems.append("config.disc.freeze_below and config.disc.lora_rank both limit what the trunk "
                    "learns; use one (set freeze_below=0 with adapters)")
  if d.text_encoder not in ("tiny", "umt5"):
    problems.append(f"config.data.text_encoder={d.text_encoder!r} must be 'tiny' or 'umt5'")
  elif d.text_encoder == "umt5" and not all(p and Path(p).exists() for p in (d.t5, d.tokenizer)):
    problems.append(f"config.data.text_encoder='umt5' needs config.data.t5={d.t5!r} (the "
                    f"encoder) and config.data.tokenizer={d.tokenizer!r} (its folder) to exist")
  if config.disc.mismatch_weight < 0:
    problems.append(f"config.disc.mismatch_weight={config.disc.mismatch_weight} must be >= 0")
  elif config.disc.mismatch_weight > 0 and config.method not in WITH_DISC:
    problems.append(f"config.disc.mismatch_weight={config.disc.mismatch_weight}: "
                    f"{config.method!r} trains no discriminator; use 0")
  elif config.disc.mismatch_weight > 0 and d.batch_size < 2:
    problems.append("config.disc.mismatch_weight > 0 pairs each prompt with another prompt of "
                    f"the batch; config.data.batch_size={d.batch_size} must be >= 2")
  if config.disc.per_chunk and config.method not in WITH_DISC:
    problems.append(f"config.disc.per_chunk: {config.method!r} trains no discriminator; use False")
  dropout, guidance = config.pretrain.text_dropout, config.dmd.guidance_scale
  if not 0.0 <= dropout < 1.0:
    problems.append(f"config.pretrain.text_dropout={dropout} must lie in [0, 1)")
  elif dropout and config.method not in ("pretrain", "sft"):
    problems.append(f"config.pretrain.text_dropout={dropout}: only flow-matching methods "
                    f"(pretrain, sft) drop prompts, not {config.method!r}; use 0")
  if not (math.isfinite(guidance) and guidance > 0):
    problems.append(f"config.dmd.guidance_scale={guidance!r} must be a positive number (1: none)")
  elif guidance != 1.0 and config.method != "dmd":
    problems.append(f"config.dmd.guidance_scale={guidance}: only method 'dmd' guides a score "
                    f"model, not {config.method!r}; use 1")
  if (dropout or guidance != 1.0) and d.text_encoder != "tiny":
    problems.append("config.pretrain.text_dropout and config.dmd.guidance_scale take the empty "
                    "prompt as a zero context, which is the tiny text encoder's; umT5's empty "
                    "prompt is not zero, so use 0 and 1 with umT5 contexts")
  if config.mode == "experiment":
    trained = config.experiment.name or config.method
    unknown = [s for s in config.experiment.systems if s not in ("teacher", "base", trained)]
    if unknown:
      problems.append(f"config.experiment.systems names {unknown}, which is neither 'teacher', "
                      f"'base' nor the trained system {trained!r} (config.experiment.name, or "
                      f"config.method when it is empty); set --config.experiment.name={unknown[0]}"
                      f" or list {trained!r}")
  if config.afd.oracle_score not in ORACLE_SCORES:
    problems.append(f"config.afd.oracle_score={config.afd.oracle_score!r} must be one of "
                    f"{ORACLE_SCORES} (the physics score, one of its terms, a gravity gap or "
                    "the fall's jitter)")
  noise = config.afd.oracle_noise
  if not (math.isfinite(noise) and noise >= 0):
    problems.append(f"config.afd.oracle_noise={noise} must be >= 0 (0: the exact oracle)")
  elif noise and config.method != "afd_oracle":
    problems.append(f"config.afd.oracle_noise={noise} blurs afd_oracle's ranking; "
                    f"config.method={config.method!r} has no oracle (set it to 0)")
  if config.afd.nft_branches not in ("both", "positive"):
    problems.append(f"config.afd.nft_branches={config.afd.nft_branches!r} must be 'both' or "
                    "'positive' (reward-weighted flow matching, no negative branch)")
  if config.afd.disc_color_jitter and (d.encoder != "pixels" or d.teacher == "synthetic"):
    problems.append(f"config.afd.disc_color_jitter={config.afd.disc_color_jitter} scales RGB "
                    "channels, which only pixel latents of a video teacher have (here "
                    f"config.data.teacher={d.teacher!r}, config.data.encoder={d.encoder!r}); set "
                    "it to 0, or use config.data.encoder='pixels' with a video teacher")
  if d.encoder == "wan_vae" and d.teacher in ("physics", "http", "callable") and not d.vae:
    problems.append("config.data.encoder='wan_vae' needs config.data.vae (the VAE checkpoint)")
  if d.vae and not Path(d.vae).exists():
    problems.append(f"config.data.vae={d.vae!r} does not exist; convert the Wan VAE with `python -m "
                    "afd_jax.tools.convert_wan_vae Wan2.1_VAE.pth DST` and point the field at DST")
  for field, path in (("config.model.checkpoint", config.model.checkpoint),
                      ("config.disc.checkpoint", config.disc.checkpoint)):
    if path and not Path(path).exists():
      problems.append(f"{field}={path!r} does not exist; convert a Wan2.1 checkpoint with "
                      "`python -m afd_jax.tools.convert_wan SRC DST` and point the field at DST")
  if problems:
    raise _invalid(problems)


def _invalid(problems: list[str]) -> errors.UserError:
  """One line for one problem, a list for several."""
  if len(problems) == 1:
    return errors.UserError(f"invalid config: {problems[0]}.")
  return errors.UserError("invalid config:\n  - " + "\n  - ".join(problems))


def afd_config(config) -> steps.AFDConfig:
  a = config.afd
  return steps.AFDConfig(
      chunk_frames=config.rollout.chunk_frames,
      rollout_timesteps=tuple(float(t) for t in rollout_config(config).timesteps()),
      nft_passes=a.nft_passes, nft_levels=a.nft_levels, shift=config.rollout.shift, beta=a.beta,
      a_max=a.a_max, adv_mode=a.adv_mode, group_size=a.group_size, reg_weight=a.reg_weight,
      disc_tau_max=a.disc_tau_max, disc_tau_min=a.disc_tau_min,
      shared_group_noise=a.group_pairs == "shared", disc_color_jitter=a.disc_color_jitter,
      score_tau=a.score_tau,
      r1_weight=a.r1_weight, r2_weight=a.r2_weight,
      penalty_sigma=a.penalty_sigma, ema_decay=a.ema_decay, ema_start=a.ema_start,
      old_decay_type=a.old_decay_type, student_steps=a.student_steps,
      negative_branch=a.nft_branches == "both",
      micro_batches=config.train.micro_batches, disc_loss=config.disc.loss,
      mismatch_weight=config.disc.mismatch_weight,
      dmd_sigma=tuple(config.dmd.sigma_range), dmd_guidance=config.dmd.guidance_scale,
      text_dropout=config.pretrain.text_dropout)


def rollout_config(config) -> rollout_lib.RolloutConfig:
  r = config.rollout
  return rollout_lib.RolloutConfig(
      chunk_frames=r.chunk_frames, denoising_steps=tuple(r.denoising_steps), shift=r.shift,
      window_frames=r.window_frames or None, sink_frames=r.sink_frames, sampler=r.sampler,
      scan_chunks=r.scan_chunks)


def rollout_rows(config) -> int:
  """Videos per rollout: ``group_size`` rollouts of each of the ``batch_size`` prompts."""
  return config.data.batch_size * config.afd.group_size


def check_divisibility(config, mesh, student_cfg: wan.WanConfig):
  """Batch and token counts the mesh must split evenly, refused before anything compiles."""
  d, micro = config.data, config.train.micro_batches
  batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
  rows, what = d.batch_size, f"batch_size={d.batch_size}"
  if config.afd.group_size > 1:
    rows, what = rollout_rows(config), (f"batch_size x afd.group_size = {d.batch_size} x "
                                        f"{config.afd.group_size} rollouts")
  if rows % batch_devices:
    raise errors.UserError(f"config.data.{what} is not divisible by the {batch_devices} data x fsdp "
                     "devices of the mesh; change the batch or the mesh.")
  if micro < 1 or rows % (batch_devices * micro):
    raise errors.UserError(f"config.train.micro_batches={micro}: every micro-batch must give each of "
                     f"the {batch_devices} data x fsdp devices the same number of videos; "
                     f"{what} is not divisible by {batch_devices} x {micro}.")
  if d.batch_size % jax.process_count():
    raise errors.UserError(f"config.data.batch_size={d.batch_size} prompts do not split over the "
                     f"{jax.process_count()} processes (each reads its own prompts).")
  ctx = mesh.shape["context"]
  tokens = (d.height // student_cfg.patch_size[1]) * (d.width // student_cfg.patch_size[2])
  if ctx > 1 and (tokens * config.rollout.chunk_frames) % ctx:
    raise errors.UserError(f"mesh.context={ctx} does not divide the {tokens * config.rollout.chunk_frames}"
                     f" tokens of a chunk ({config.rollout.chunk_frames} frames x {tokens} "
                     "tokens); pick a context size that divides it.")
  if mesh.shape["tensor"] > 1 and student_cfg.num_heads % mesh.shape["tensor"]:
    raise errors.UserError(f"mesh.tensor={mesh.shape['tensor']} does not divide the "
                     f"{student_cfg.num_heads} attention heads.")
