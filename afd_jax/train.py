"""The AFD training loop (and its baselines), built from the pure steps in ``steps.py``.

One iteration of ``afd``: teacher videos for a prompt batch; a KV-cache rollout of the old policy;
one Bradley-Terry discriminator step (its pre-update logits become the advantage); one NFT student
step; the old policy's soft update. ``afd_frozen_disc`` stops training the discriminator after
``afd.disc_warmup_steps``. ``sft`` and ``pretrain`` run plain flow matching on teacher videos.

Everything that changes lives in one pytree ``state`` (networks, optimizer states, step, RNG),
sharded over the mesh and saved by Orbax. The data order and every random draw derive from
``(seed, step)``, so a run killed at any moment resumes from its last checkpoint and ends with the
same parameters as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from afd_jax import checkpoint as ckpt_lib
from afd_jax import data as data_lib
from afd_jax import errors
from afd_jax import lock as lock_lib
from afd_jax import losses
from afd_jax import mesh as mesh_lib
from afd_jax import metrics as metrics_lib
from afd_jax import rollout as rollout_lib
from afd_jax import steps
from afd_jax import teachers
from afd_jax import video
from afd_jax.models import discriminator as disc_lib
from afd_jax.models import wan
from afd_jax.models import wan_checkpoint

METHODS = ("afd", "afd_frozen_disc", "afd_oracle", "gan", "sft", "dmd", "pretrain")
EVAL_SEED = 10**6  # evaluation noise and teacher samples: never used by training
NFT = ("afd", "afd_frozen_disc", "afd_oracle")   # on-policy NFT updates: old policy and reference
WITH_DISC = ("afd", "afd_frozen_disc", "gan")    # a discriminator in the training state
GENERATOR = ("gan", "dmd")                       # losses through the rollout's exit step
ON_POLICY = NFT + GENERATOR                      # methods that roll out the student


# ----------------------------------------------------------------------------------------------
# Configuration.


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
  if config.afd.nft_branches not in ("both", "positive"):
    problems.append(f"config.afd.nft_branches={config.afd.nft_branches!r} must be 'both' or "
                    "'positive' (reward-weighted flow matching, no negative branch)")
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
      disc_tau_max=a.disc_tau_max, disc_tau_min=a.disc_tau_min, r1_weight=a.r1_weight, r2_weight=a.r2_weight,
      penalty_sigma=a.penalty_sigma, ema_decay=a.ema_decay, ema_start=a.ema_start,
      old_decay_type=a.old_decay_type, negative_branch=a.nft_branches == "both",
      micro_batches=config.train.micro_batches, disc_loss=config.disc.loss,
      dmd_sigma=tuple(config.dmd.sigma_range))


def rollout_config(config) -> rollout_lib.RolloutConfig:
  r = config.rollout
  return rollout_lib.RolloutConfig(
      chunk_frames=r.chunk_frames, denoising_steps=tuple(r.denoising_steps), shift=r.shift,
      window_frames=r.window_frames or None, sink_frames=r.sink_frames, sampler=r.sampler)


def optimizer(o, max_nonfinite: int):
  """AdamW behind ``apply_if_finite``: a non-finite gradient leaves the parameters unchanged."""
  inner = steps.adamw(o.lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, eps=o.eps,
                      grad_clip=o.grad_clip, warmup_steps=o.warmup_steps,
                      decay_steps=o.decay_steps)
  return optax.apply_if_finite(inner, max_consecutive_errors=max_nonfinite + 1)


def disc_optimizer(o, freeze_below: int, max_nonfinite: int):
  """Self-Forcing's two parameter groups: the trunk at ``lr``, readouts and head at
  ``lr * head_lr_multiplier``, one global-norm clip over both. Frozen trunk blocks (and the patch
  embedding below them), and the trunk's unused output head, get no update at all, weight decay
  included."""
  def adamw(lr):
    return optax.adamw(steps.lr_schedule(lr, o.warmup_steps, o.decay_steps), b1=o.b1, b2=o.b2, eps=o.eps,
                       weight_decay=o.weight_decay)

  labels = lambda params: {k: jax.tree.map(lambda _: "trunk" if k == "trunk" else "readout", v)
                           for k, v in params.items()}

  def freeze(updates, state, params=None):
    del params

    def zero(path, u):
      top = path[0].key
      if top == "head" or (freeze_below and top == "patch_embedding"):
        return jnp.zeros_like(u)
      if freeze_below and top == "blocks":
        return u.at[:freeze_below].set(0)
      return u

    return dict(updates, trunk=jax.tree_util.tree_map_with_path(zero, updates["trunk"])), state

  inner = optax.chain(
      optax.clip_by_global_norm(o.grad_clip),
      optax.multi_transform({"trunk": adamw(o.lr), "readout": adamw(o.lr * o.head_lr_multiplier)},
                            labels),
      optax.GradientTransformation(lambda params: optax.EmptyState(), freeze))
  return optax.apply_if_finite(inner, max_consecutive_errors=max_nonfinite + 1)


# ----------------------------------------------------------------------------------------------
# Models and state.


def model_runtime(config) -> dict:
  """``config.model``'s runtime settings (WanConfig.RUNTIME_FIELDS but the parameter dtype), for
  every Wan network the trainer builds: the student and the discriminator's trunk alike."""
  m = config.model
  return dict(dtype=m.dtype, attention_kernel=m.attention_kernel, scan_layers=m.scan_layers,
              remat_policy=m.remat_policy)


def build_student(config, shardings=None, abstract: bool = False) -> wan.WanModel:
  """The student from ``config.model``, each parameter placed by ``shardings`` (a callable from
  the abstract NNX state to a pure dict of shardings) as it is created or loaded. ``abstract``
  gives shapes and metadata only: a checkpoint's architecture is read, its weights are not."""
  m = config.model
  runtime = model_runtime(config)
  cfg = (wan_checkpoint.load_config(m.checkpoint, **runtime) if m.checkpoint
         else wan.preset(m.preset, **runtime, **m.overrides))
  if abstract:
    return wan.abstract(cfg)
  if m.checkpoint:
    return wan.from_pretrained(m.checkpoint, shardings=shardings, **runtime)
  return wan.init(cfg, seed=config.seed, shardings=shardings and shardings(nnx.state(
      wan.abstract(cfg))))


def build_discriminator(config, student: wan.WanModel, shardings=None,
                        abstract: bool = False) -> disc_lib.Discriminator:
  """Readouts and head on a trunk: ``config.disc.checkpoint``, or a copy of the student. Fresh
  parameters are created in one jitted program straight into ``shardings`` (as for the student)."""
  cfg = disc_lib.DiscriminatorConfig(readout_layers=tuple(config.disc.readout_layers),
                                     readout_ffn_dim=config.disc.readout_ffn_dim,
                                     freeze_below=config.disc.freeze_below)
  path, seed = config.disc.checkpoint, config.seed + 1
  runtime = model_runtime(config)
  trunk_cfg = wan_checkpoint.load_config(path, **runtime) if path else student.config
  shapes = nnx.eval_shape(lambda: disc_lib.init(wan.WanModel(trunk_cfg, rngs=nnx.Rngs(0)), cfg))
  if abstract:
    return shapes
  trunk = wan.from_pretrained(path, shardings=shardings, **runtime) if path else student
  trunk_graph, trunk_state = nnx.split(trunk)
  graph, state = nnx.split(shapes)
  make = jax.jit(lambda t: nnx.to_pure_dict(nnx.state(disc_lib.init(nnx.merge(trunk_graph, t),
                                                                    cfg, seed=seed))),
                 out_shardings=shardings and shardings(state))
  nnx.replace_by_pure_dict(state, make(trunk_state))
  return nnx.merge(graph, state)


@dataclasses.dataclass
class Networks:
  """The static half of the training state: graph definitions, optimizers, shardings."""

  student_graph: nnx.GraphDef
  student_config: wan.WanConfig
  tx_student: optax.GradientTransformation
  disc_graph: nnx.GraphDef | None
  tx_disc: optax.GradientTransformation | None
  tx_critic: optax.GradientTransformation | None
  state_sharding: dict
  logical_names: dict          # logical axis names of every parameter, by network


def build_state(config, mesh, abstract: bool = False):
  """``(networks, state)``: every network, optimizer state, the step and the RNG of
  ``config.method``, each parameter placed by the sharding its logical rule names, optimizer
  moments like their parameters, counters replicated. ``abstract`` returns ShapeDtypeStructs
  carrying the shardings and allocates nothing (the compile-only planner)."""
  rules = mesh_lib.check_rules(config.logical_rules)
  shardings = lambda state: mesh_lib.param_shardings(state, mesh, rules)
  replicated = mesh_lib.replicated(mesh)
  student = build_student(config, shardings, abstract)
  graph, pstate = nnx.split(student)
  param_sh = shardings(pstate)
  names = {"student": mesh_lib.logical_names(pstate)}
  params = nnx.to_pure_dict(pstate)
  tx = optimizer(config.optim.student, config.train.max_nonfinite)
  sharding = {"student": {"params": param_sh, "ema": param_sh,
                          "opt": mesh_lib.opt_state_shardings(tx, params, param_sh, mesh)},
              "step": replicated, "rng": replicated}
  disc_graph = tx_disc = dparams = tx_critic = None
  if config.method in NFT:
    sharding.update(old=param_sh, ref=param_sh)
  if config.method == "dmd":   # the real score (the initial student) and the fake one
    tx_critic = optimizer(config.optim.critic, config.train.max_nonfinite)
    sharding.update(ref=param_sh, critic={
        "params": param_sh, "opt": mesh_lib.opt_state_shardings(tx_critic, params, param_sh, mesh)})
  if config.method in WITH_DISC:
    disc_graph, dstate = nnx.split(build_discriminator(config, student, shardings, abstract))
    dparam_sh = shardings(dstate)
    names["disc"] = mesh_lib.logical_names(dstate)
    dparams = nnx.to_pure_dict(dstate)
    tx_disc = disc_optimizer(config.optim.disc, config.disc.freeze_below,
                             config.train.max_nonfinite)
    sharding.update(disc={
        "params": dparam_sh, "opt": mesh_lib.opt_state_shardings(tx_disc, dparams, dparam_sh, mesh)})
  nets = Networks(graph, student.config, tx, disc_graph, tx_disc, tx_critic, sharding, names)

  def assemble(params, dparams):
    state = {"student": {"params": params, "ema": params, "opt": tx.init(params)},
             "step": jnp.zeros((), jnp.int32),
             "rng": jax.random.key_data(jax.random.key(config.seed))}
    if config.method in NFT:
      state.update(old=params, ref=params)
    if config.method == "dmd":
      state.update(ref=params, critic={"params": params, "opt": tx_critic.init(params)})
    if dparams is not None:
      state.update(disc={"params": dparams, "opt": tx_disc.init(dparams)})
    return jax.tree.map(jnp.copy, state)  # unshares the aliased copies of the student

  if abstract:
    shapes = jax.eval_shape(assemble, params, dparams)
    return nets, jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              shapes, sharding)
  return nets, jax.jit(assemble, out_shardings=sharding)(params, dparams)


@dataclasses.dataclass
class StepFns:
  """The jitted programs of one training configuration on one mesh."""

  noise: Callable
  rollout: Callable
  train_rollout: Callable | None = None   # GENERATOR methods: ends chunks at an exit step
  fm: Callable | None = None
  disc: Callable | None = None
  score: Callable | None = None
  advantage: Callable | None = None
  student: Callable | None = None
  critic: Callable | None = None
  old: Callable | None = None


_STEP_FNS: dict = {}


def rollout_rows(config) -> int:
  """Videos per rollout: ``group_size`` rollouts of each of the ``batch_size`` prompts."""
  return config.data.batch_size * config.afd.group_size


def make_step_fns(config, nets: Networks, mesh, latent_shape) -> StepFns:
  """Jitted steps with explicit output shardings and donation of the state they replace.

  Memoised on everything the programs depend on, so a second trainer of the same configuration
  (a resume, an evaluation, a test) reuses the traced and compiled programs."""
  key = (config.method, config.rollout.to_json(), config.afd.to_json(), config.optim.to_json(),
         config.disc.to_json(), config.dmd.to_json(), config.train.max_nonfinite,
         config.train.micro_batches, config.data.batch_size,
         tuple(latent_shape), mesh, nets.student_config,  # with config.disc: the graphs
         tuple(jax.tree.leaves(nets.state_sharding)), jax.tree.structure(nets.state_sharding))
  if key not in _STEP_FNS:
    _STEP_FNS[key] = _make_step_fns(config, nets, mesh, latent_shape)
  return _STEP_FNS[key]


def _make_step_fns(config, nets: Networks, mesh, latent_shape) -> StepFns:
  sh, afd = nets.state_sharding, afd_config(config)
  graph, micro = nets.student_graph, config.train.micro_batches
  batch = mesh_lib.batch_sharding(mesh)
  fns = StepFns(
      noise=jax.jit(lambda k, rows: jax.random.normal(k, (rows, *latent_shape), jnp.float32),
                    static_argnums=1, out_shardings=batch),
      rollout=rollout_lib.make_rollout(graph, rollout_config(config), out_shardings=batch,
                                       micro_batches=micro))
  student_out = (sh["student"], None)
  if config.method not in ON_POLICY:
    fns.fm = jax.jit(steps.make_fm_step(graph, nets.tx_student, afd), donate_argnums=(0,),
                     out_shardings=student_out)
    return fns
  if config.method in WITH_DISC:
    disc_out = (sh["disc"]["params"], sh["disc"]["opt"], None)
    fns.disc = jax.jit(steps.make_disc_step(nets.disc_graph, nets.tx_disc, afd),
                       donate_argnums=(0, 1), out_shardings=disc_out)
    fns.score = jax.jit(steps.make_disc_step(nets.disc_graph, nets.tx_disc, afd, update=False))
  if config.method in GENERATOR:
    fns.train_rollout = rollout_lib.make_rollout(graph, rollout_config(config),
                                                 out_shardings=(batch, batch),
                                                 micro_batches=micro, exit_inputs=True)
  if config.method == "gan":
    fns.student = jax.jit(steps.make_gan_step(graph, nets.disc_graph, nets.tx_student, afd),
                          donate_argnums=(0,), out_shardings=student_out)
    return fns
  if config.method == "dmd":
    fns.critic = jax.jit(steps.make_fm_step(graph, nets.tx_critic, afd, critic=True),
                         donate_argnums=(0,), out_shardings=(sh["critic"], None))
    fns.student = jax.jit(steps.make_dmd_step(graph, nets.tx_student, afd), donate_argnums=(0,),
                          out_shardings=student_out)
    return fns
  fns.advantage = jax.jit(lambda t, s: steps.advantage(t, s, afd))
  fns.student = jax.jit(steps.make_student_step(graph, nets.tx_student, afd),
                        donate_argnums=(0,), out_shardings=student_out)
  decay = afd.old_decay_type
  fns.old = jax.jit(lambda old, p, k: steps.update_old(old, p, steps.old_policy_eta(k, decay)),
                    donate_argnums=(0,), out_shardings=sh["old"])
  return fns


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


class Trainer:
  def __init__(self, config, workdir):
    validate(config)
    self.config = config
    self.workdir = Path(workdir)
    self.method = config.method
    afd_config(config)  # refuses bad method hyperparameters before anything is built
    self.mesh = mesh_lib.mesh_from_config(config)
    self.batch_sharding = mesh_lib.batch_sharding(self.mesh)
    self._stop_requested = False
    # Resuming: shapes and shardings only, restored into (a fresh state would double the memory).
    self.nets, self.state = build_state(config, self.mesh, abstract=ckpt_lib.has_checkpoints(
        self.workdir / "checkpoints"))
    self.state_sharding = self.nets.state_sharding
    self.student_graph = self.nets.student_graph
    self.student_cfg = self.nets.student_config
    check_divisibility(config, self.mesh, self.student_cfg)
    self.data = teachers.from_config(config, self.student_cfg, self.workdir)
    self.pool = self.data.pool
    self.latent_shape = self.data.latent_shape
    self.fns = make_step_fns(config, self.nets, self.mesh, self.latent_shape)
    # Physics teacher: what the discriminator (or oracle) rewards, measured on every rollout.
    self.diagnose = (self.data.physics_world is not None
                     and self.method in (*NFT, "gan"))
    self._diagnostics: list = []

  # -- data ------------------------------------------------------------------------------------

  def _host_batch(self, step: int):
    """This host's text embeddings and teacher latents of step ``step`` (numpy; runs in the
    prefetch thread, so reading or rendering overlaps the previous step's compute). With
    ``group_size`` K > 1 every prompt fills K consecutive rows (prompt-major), row k paired with
    the prompt's k-th teacher draw."""
    d, k = self.config.data, self.config.afd.group_size
    ids = data_lib.host_slice(data_lib.batch_ids(step, d.batch_size, self.pool.num_train,
                                                 self.config.seed))
    teacher = np.stack([self.data.source.latents(ids, step, draw) for draw in range(k)], 1)
    return (np.repeat(self.pool.embeddings[ids], k, axis=0),
            teacher.reshape(-1, *teacher.shape[2:]))

  def _to_global(self, local):
    """This process's rows -> one batch-sharded global array."""
    return jax.make_array_from_process_local_data(self.batch_sharding, local)

  # -- the loop --------------------------------------------------------------------------------

  def _iteration(self, step: int, batch) -> dict:
    """One training iteration of ``self.method``."""
    state = self.state
    context, teacher = map(self._to_global, batch)
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
    keys = dict(zip(("noise", "rollout", "disc", "student"), jax.random.split(key, 4)))
    clock = _Clock()
    if self.method not in ON_POLICY:
      state["student"], metrics = self.fns.fm(state["student"], teacher, context, keys["student"],
                                             state["step"])
      clock.lap("student", metrics)
    elif self.method in GENERATOR:
      metrics = self._generator_iteration(step, context, teacher, keys, clock)
    else:
      metrics = self._nft_iteration(step, context, teacher, keys, clock)
    opt = state["student"]["opt"]
    metrics["student/rejected"] = 1.0 - jnp.asarray(opt.last_finite, jnp.float32)
    o = self.config.optim.student
    metrics["student/lr"] = steps.lr_schedule(o.lr, o.warmup_steps, o.decay_steps)(step)
    state["step"] = state["step"] + 1
    return dict(metrics, **clock.times)

  def _nft_iteration(self, step, context, teacher, keys, clock) -> dict:
    """AFD: rollout of the old policy, scores (discriminator or oracle), advantage, NFT step."""
    state = self.state
    rows = rollout_rows(self.config)
    x_student = self.fns.rollout(state["old"], self.fns.noise(keys["noise"], rows), context,
                                 keys["rollout"])
    clock.lap("rollout", x_student)
    physics = None
    if self.method == "afd_oracle" or self.diagnose:
      physics = self.rollout_physics(x_student, self.step_ids(step))
    if self.method == "afd_oracle":
      scores = -physics["physics_error"]
      r, adv, adv_metrics = self.fns.advantage(np.zeros_like(scores), scores)
      metrics = {"oracle/physics_error": float(np.mean(physics["physics_error"]))}
    else:
      out = self._disc_step(teacher, x_student, context, keys["disc"],
                            train=self.method == "afd"
                            or step < self.config.afd.disc_warmup_steps)
      r, adv, adv_metrics = self.fns.advantage(out["teacher_logits"], out["student_logits"])
      metrics = out["metrics"]
    clock.lap("score", r)
    if self.diagnose:
      self._diagnostics.append((np.asarray(adv), physics))
    if step == self.config.debug.nan_at_step:
      x_student = x_student * jnp.nan
    state["student"], student_metrics = self.fns.student(
        state["student"], state["old"], state["ref"], x_student, context, r, keys["student"],
        state["step"])
    state["old"] = self.fns.old(state["old"], state["student"]["params"], state["step"] + 1)
    clock.lap("student", state["old"])
    return dict(metrics, **student_metrics, **adv_metrics)

  def _generator_iteration(self, step, context, teacher, keys, clock) -> dict:
    """GAN and DMD: the student's own training rollout, ending every chunk at one exit step
    (random, as Self-Forcing, or the last), then the critic (discriminator or fake score) and the
    student's update through that exit step."""
    state, cfg = self.state, self.config
    steps_per_chunk = len(cfg.rollout.denoising_steps)
    k_exit, k_roll = jax.random.split(keys["rollout"])
    exit_step = (jax.random.randint(k_exit, (), 0, steps_per_chunk) if cfg.afd.exit_step == "random"
                 else jnp.asarray(steps_per_chunk - 1))
    params = state["student"]["params"]
    x_student, inputs = self.fns.train_rollout(
        params, self.fns.noise(keys["noise"], rollout_rows(cfg)), context, k_roll, exit_step)
    clock.lap("rollout", x_student)
    if step == cfg.debug.nan_at_step:
      x_student = x_student * jnp.nan
    if self.method == "gan":
      out = self._disc_step(teacher, x_student, context, keys["disc"], train=True)
      metrics = out["metrics"]
      clock.lap("score", metrics)
      if self.diagnose:
        self._diagnostics.append((np.asarray(out["student_logits"] - out["teacher_logits"]),
                                  self.rollout_physics(x_student, self.step_ids(step))))
      state["student"], student_metrics = self.fns.student(
          state["student"], state["disc"]["params"], inputs, x_student, teacher, context,
          exit_step, keys["student"], state["step"])
    else:
      state["critic"], metrics = self.fns.critic(state["critic"], x_student, context,
                                                 keys["disc"], state["step"])
      clock.lap("score", metrics)
      student_metrics = {}
      if (step + 1) % cfg.dmd.critic_ratio == 0:
        state["student"], student_metrics = self.fns.student(
            state["student"], state["critic"]["params"], state["ref"], inputs, x_student,
            context, exit_step, keys["student"], state["step"])
    clock.lap("student", state["student"]["params"])
    return dict(metrics, **student_metrics)

  def _disc_step(self, teacher, x_student, context, key, train: bool) -> dict:
    """One discriminator update on the (teacher, student) pairs (or, ``train=False``, only their
    scores); returns the pre-update logits and metrics."""
    disc = self.state["disc"]
    if train:
      params, opt, out = self.fns.disc(disc["params"], disc["opt"], teacher, x_student, context,
                                       key)
      self.state["disc"] = {"params": params, "opt": opt}
    else:
      out = self.fns.score(disc["params"], teacher, x_student, context, key)
    out["metrics"]["disc/trained"] = float(train)
    return out

  def _pop_diagnostics(self) -> dict:
    """What the scores rewarded since the last log line: Spearman correlations of the advantage
    (GAN: the paired score) with the rollouts' physics score and its terms, over every rollout
    of the window (scores standardised per step, so the window's pairs pool)."""
    if not self._diagnostics:
      return {}
    advantage = np.concatenate([a for a, _ in self._diagnostics])
    physics = {k: np.concatenate([p[k] for _, p in self._diagnostics])
               for k in self._diagnostics[0][1]}
    self._diagnostics = []
    return _rank_correlations(advantage, physics)

  def step_ids(self, step: int) -> np.ndarray:
    """The global prompt id of every row of step ``step`` (K rows per prompt)."""
    d = self.config.data
    return np.repeat(data_lib.batch_ids(step, d.batch_size, self.pool.num_train,
                                        self.config.seed), self.config.afd.group_size)

  def rollout_physics(self, latents, ids) -> dict[str, np.ndarray]:
    """Per-video ``physics_error`` and its terms of rollouts (a global array) for prompts
    ``ids``, measured by ``afd_jax.eval`` on the decoded pixels (every host computes all)."""
    from afd_jax.eval import physics as eval_physics
    x = np.asarray(multihost_utils.process_allgather(latents, tiled=True))
    videos = np.stack([self.data.encoder.decode(v) for v in x])
    rows, _ = eval_physics.evaluate(videos, [self.pool.prompts[i] for i in ids],
                                    self.data.physics_world, self.config.rollout.chunk_frames)
    out = {k: np.array([row[k] for row in rows]) for k in ("physics_error", *eval_physics.TERMS)}
    out["gravity_gap"] = np.abs(np.array([row["gravity_ratio"] for row in rows]) - 1.0)  # NaN: unseen
    return out

  def _meta(self, step):
    return {"method": self.method, "seed": self.config.seed, "step": step,
            "run": self._identity(), "config": self.config.to_dict()}

  def _identity(self) -> dict:
    """What a resumed run must share with its checkpoint to continue the same run."""
    d = self.config.data
    return {**{f"model.{k}": v for k, v in self.student_cfg.architecture().items()},
            "data.batch_size": d.batch_size,
            "afd.group_size": self.config.afd.group_size,
            "video (frames, height, width)": [d.num_frames, d.height, d.width]}

  def _restore(self, ckpt: ckpt_lib.Checkpointer) -> int:
    meta = ckpt.latest_meta()
    if meta is not None:
      theirs = {"method": meta.get("method"), "seed": meta.get("seed"), **meta.get("run", {})}
      ours = {"method": self.method, "seed": self.config.seed, **self._identity()}
      changed = [f"{k}: {theirs[k]} -> {ours[k]}" for k in theirs
                 if k in ours and theirs[k] != ours[k]]
      if changed:
        raise errors.UserError(
            f"{ckpt.directory} holds a run that differs from this config ({'; '.join(changed)}); "
            "resume with the original config or use a new --workdir.")
    restored = ckpt.restore(ckpt_lib.abstract_like(self.state, self.state_sharding))
    if restored is None:
      if self.abstract:  # every step was damaged and moved aside: start afresh
        self.state = build_state(self.config, self.mesh)[1]
      return 0
    step, self.state, _ = restored
    logging.info("resumed from step %d in %s", step, ckpt.directory)
    return step

  @property
  def abstract(self) -> bool:
    """Whether the state is still shapes only (built to restore a checkpoint into)."""
    return isinstance(jax.tree.leaves(self.state)[0], jax.ShapeDtypeStruct)

  def initial_student(self):
    """The student's parameters before any training: ``model.checkpoint`` or the seed's init
    (built afresh when the state is waiting for a checkpoint)."""
    if not self.abstract and int(self.state["step"]) == 0:
      return self.copy(self.state["student"]["params"])
    rules = mesh_lib.check_rules(self.config.logical_rules)
    student = build_student(self.config, lambda s: mesh_lib.param_shardings(s, self.mesh, rules))
    return nnx.to_pure_dict(nnx.state(student))

  def _on_sigterm(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM: saving a checkpoint after this step, then exiting.")
    self._stop_requested = True

  def _save(self, ckpt: ckpt_lib.Checkpointer, step: int):
    """Saves the state after checking it is finite: only checked states become checkpoints."""
    bad = ckpt_lib.nonfinite(self.state)
    if bad:
      raise errors.UserError(
          f"the training state at step {step} holds non-finite values ({', '.join(bad[:3])}); "
          f"not saved. The last good checkpoint (step {self._good_step or 'none'}) in "
          f"{ckpt.directory} is intact; lower the learning rate and resume.")
    ckpt.save(step, self.state, self._meta(step), force=True)
    self._good_step = step

  def run(self) -> dict:
    with lock_lib.WorkdirLock(self.workdir):
      return self._run()

  def _run(self) -> dict:
    config = self.config
    total = config.train.num_steps
    ckpt = ckpt_lib.Checkpointer(self.workdir / "checkpoints", keep_last=config.train.keep_last,
                                 keep_every=config.train.keep_every)
    try:
      start = self._good_step = self._restore(ckpt)
    except BaseException:
      ckpt.close()
      raise
    if start >= total:
      ckpt.close()
      message = (f"the checkpoint in {ckpt.directory} is at step {start}, at or past "
                 f"config.train.num_steps={total}: nothing to train (raise num_steps to go on).")
      logging.warning(message)
      return {"method": self.method, "steps": start, "nothing_to_do": message}
    writer = metrics_lib.MetricWriter(self.workdir, total, start)
    previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    prefetch = data_lib.Prefetcher(self._host_batch, range(start, total))
    last, done = {}, start
    try:
      with jax.set_mesh(self.mesh):
        for step in range(start, total):
          batch = prefetch.get(step, stop=lambda: self._stop_requested)
          if batch is data_lib.STOPPED:  # SIGTERM while waiting for the teacher
            break
          done = step + 1
          log = done % config.train.log_every == 0 or done == total
          metrics = self._iteration(step, batch)
          rejected = max(int(s["opt"].notfinite_count) for s in self.state.values()
                         if isinstance(s, dict) and "opt" in s)
          if rejected:
            logging.warning("step %d: non-finite loss, gradient or parameters, update rejected "
                            "(%d in a row).", step, rejected)
          if rejected >= config.train.max_nonfinite:
            raise errors.UserError(
                f"{rejected} consecutive non-finite updates at step {step}; stopping. The last "
                f"good checkpoint (step {self._good_step or 'none'}, checked finite) in "
                f"{ckpt.directory} is intact; lower the learning rate or check the data, then "
                "resume.")
          evaluate = config.train.eval_every and done % config.train.eval_every == 0
          if evaluate and done < total:
            metrics.update(self.evaluate(done, write=False))
          if log or evaluate:
            last = writer.write(done, dict(metrics, **self._pop_diagnostics()))
          self._debug_signal(done)
          if self._stop_requested or done == total or (
              config.train.checkpoint_every and done % config.train.checkpoint_every == 0):
            self._save(ckpt, done)
          if self._stop_requested:
            break
        if self._stop_requested:
          if done > self._good_step:
            self._save(ckpt, done)
          ckpt.wait()
          logging.warning("stopped after step %d on SIGTERM; resume with the same command.", done)
          return {"stopped_at": done, **last}
        if config.train.export:  # every host writes its shards
          logging.info("exported the EMA student to %s", self.export(config.train.export))
        samples = self.evaluate(total)
    finally:
      prefetch.close(wait=not self._stop_requested)
      signal.signal(signal.SIGTERM, previous)
      writer.close()
      ckpt.close()
    summary = {"method": self.method, "steps": total, "state_digest": self.digest(), **last,
               **samples}
    if jax.process_index() == 0:
      (self.workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary

  def digest(self) -> str:
    """SHA-256 over this process's shards of the training state (one replica of each, with its
    place in the global array): equal digests on one topology, bit-identical runs. Nothing is
    gathered, so it costs one shard at a time, not the whole state on every host."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(self.state):
      for shard in sorted((s for s in leaf.addressable_shards if s.replica_id == 0),
                          key=lambda s: str(s.index)):
        h.update(str(shard.index).encode())
        h.update(np.ascontiguousarray(np.asarray(shard.data)).tobytes())
    return h.hexdigest()

  def _debug_signal(self, done: int):
    """Preemption drills (tests): deliver SIGKILL / SIGTERM to ourselves after a given step, before
    that step's checkpoint is written."""
    if done == self.config.debug.kill_at_step:
      os.kill(os.getpid(), signal.SIGKILL)
    if done == self.config.debug.term_at_step:
      os.kill(os.getpid(), signal.SIGTERM)

  # -- samples and evaluation ------------------------------------------------------------------

  def sample(self, params, ids, seed: int) -> np.ndarray:
    """Student rollouts ``[len(ids), F, h, w, C]`` (numpy, on every host) for global prompt
    ``ids``, in batches of the training batch size (the rollout compiled for training)."""
    n = self.config.data.batch_size  # whatever the group size: the same samples for every method
    padded = np.concatenate([ids, np.repeat(ids[-1:], -len(ids) % n)])
    out = []
    with jax.set_mesh(self.mesh):
      for i in range(0, len(padded), n):
        context = self._to_global(data_lib.host_slice(self.pool.embeddings[padded[i:i + n]]))
        noise = self.fns.noise(jax.random.fold_in(jax.random.key(seed), i), n)
        x = self.fns.rollout(params, noise, context, jax.random.key(seed + 1 + i))
        out.append(np.asarray(multihost_utils.process_allgather(x, tiled=True)))
    return np.concatenate(out)[:len(ids)]

  def eval_ids(self) -> np.ndarray:
    """The held-out prompts evaluation uses (never trained on)."""
    return self.pool.eval_ids(self.pool.num_eval or self.config.data.batch_size)

  def student_videos(self, params, ids, seed: int) -> np.ndarray:
    """Rollouts as the teacher's kind of video: uint8 pixels for video teachers, else latents."""
    x = self.sample(params, ids, seed)
    return x if self.data.encoder is None else np.stack([self.data.encoder.decode(v) for v in x])

  def teacher_videos(self, ids, seed: int) -> np.ndarray:
    """The true-world teacher's videos (pixels), or synthetic latents."""
    if self.data.encoder is None:
      return self.data.source.latents(ids, seed)
    return self.data.reference(ids, seed)

  def score(self, videos, ids, reference) -> dict:
    """Metrics of ``videos`` for prompts ``ids`` against teacher ``reference`` videos, with no
    discriminator involved: ``afd_jax.eval`` on pixels, or the synthetic teacher's property."""
    if self.data.encoder is None:
      ch = self.data.source.offset_channel
      student, teacher = float(videos[..., ch].mean()), float(reference[..., ch].mean())
      return {"property_gap": abs(student - teacher), "student_property": student,
              "teacher_property": teacher}
    from afd_jax.eval import frechet, report as eval_report
    if self.data.physics_world is None:  # prompts outside the physics grammar: distribution only
      return {"frechet_distance": frechet.video_frechet(videos, reference)}
    return eval_report.evaluate(videos, [self.pool.prompts[i] for i in ids], reference=reference,
                                world=self.data.physics_world,
                                chunk_frames=self.config.rollout.chunk_frames)

  def viewable(self, videos) -> np.ndarray:
    """uint8 ``[N, T, H, W, 3]`` frames at a watchable size."""
    up = self.config.output.upscale
    if self.data.encoder is None:
      return np.stack([video.latents_to_frames(v, upscale=up) for v in videos])
    up = max(1, up // self.data.encoder.spatial_stride)
    return videos.repeat(up, axis=2).repeat(up, axis=3)

  def write_samples(self, step: int, ids, teacher, student) -> Path:
    """Teacher above student: full-size VAE videos as one MP4 per prompt (``output.max_videos``
    of them), small ones as one GIF of the whole batch side by side."""
    fps = self.config.output.fps
    if getattr(self.data.encoder, "name", None) == "wan_vae":
      folder = self.workdir / "samples" / f"step_{step:06d}"
      for i in range(min(len(ids), self.config.output.max_videos)):
        line = np.full((teacher.shape[1], 2, *teacher.shape[3:]), 255, np.uint8)
        video.write_mp4(np.concatenate([teacher[i], line, student[i]], axis=1),
                        folder / f"prompt_{ids[i]}.mp4", fps=fps)
      return folder
    n = self.config.data.batch_size
    grid = np.concatenate([video.tile(self.viewable(x[:n])) for x in (teacher, student)], 1)
    return video.write_gif(grid, self.workdir / "samples" / f"step_{step:06d}.gif", fps=fps)

  def evaluate(self, step: int, params=None, write: bool = True) -> dict:
    """The student (EMA by default) on held-out prompts; process 0 writes sample videos (top:
    teacher, bottom: student)."""
    params = self.state["student"]["ema"] if params is None else params
    ids = self.eval_ids()
    teacher = self.teacher_videos(ids, EVAL_SEED)
    student = self.student_videos(params, ids, self.config.seed + EVAL_SEED)
    out = {f"eval/{k}": v for k, v in self.score(student, ids, teacher).items()}
    if write and jax.process_index() == 0:
      path = self.write_samples(step, ids, teacher, student)
      out["samples"] = str(path)
      logging.info("samples (top: teacher, bottom: student EMA) in %s", path)
    return out

  def copy(self, params):
    """A device copy of student parameters with their shardings (safe from donation)."""
    return jax.jit(lambda t: jax.tree.map(jnp.copy, t),
                   out_shardings=self.state_sharding["student"]["params"])(params)

  def export(self, path) -> Path:
    """The EMA student as a converted checkpoint (``wan.from_pretrained(path)`` loads it)."""
    model = nnx.merge(self.student_graph, self.copy(self.state["student"]["ema"]))
    return wan_checkpoint.save_converted(model, path, source=f"afd_jax {self.method} "
                                         f"{self.workdir}")


class _Clock:
  """Wall time of the parts of an iteration (each lap waits for its result)."""

  def __init__(self):
    self.times, self._t0 = {}, time.perf_counter()

  def lap(self, name: str, result):
    jax.block_until_ready(result)
    now = time.perf_counter()
    self.times[f"time/{name}_s"] = now - self._t0
    self._t0 = now


def _rank_correlations(advantage, physics) -> dict:
  """Spearman correlation of the advantage with the negated physics error, each of its terms and
  the distance of the shown gravity from the prompt's (positive: the advantage favours rollouts
  with better physics), over the rollouts where a value was measured; NaN where it is constant."""
  from scipy import stats
  out = {}
  for name, values in physics.items():
    seen = np.isfinite(values)
    a, v = advantage[seen], values[seen]
    ok = len(v) > 2 and np.ptp(v) > 0 and np.ptp(a) > 0
    out[f"diag/spearman_{name}"] = float(stats.spearmanr(a, -v).statistic) if ok else float("nan")
  return out


def run(config, workdir) -> dict:
  return Trainer(config, workdir).run()
