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

import hashlib
import json
import os
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding

from afd_jax import checkpoint as ckpt_lib
from afd_jax import data as data_lib
from afd_jax import mesh as mesh_lib
from afd_jax import metrics as metrics_lib
from afd_jax import rollout as rollout_lib
from afd_jax import steps
from afd_jax import video
from afd_jax.models import discriminator as disc_lib
from afd_jax.models import wan
from afd_jax.teachers.synthetic import SyntheticTeacher

METHODS = ("afd", "sft", "afd_frozen_disc", "pretrain")
ADVERSARIAL = ("afd", "afd_frozen_disc")


# ----------------------------------------------------------------------------------------------
# Configuration.


def validate(config: ml_collections.ConfigDict):
  """Fails before anything is built or compiled, naming the field and the fix."""
  problems = []
  if config.method not in METHODS:
    problems.append(f"config.method={config.method!r} is not one of {METHODS}")
  if config.train.num_steps <= 0:
    problems.append(f"config.train.num_steps={config.train.num_steps} must be positive")
  if config.train.checkpoint_every < 0:
    problems.append("config.train.checkpoint_every must be >= 0 (0 saves only at the end)")
  d, r = config.data, config.rollout
  if d.num_frames % r.chunk_frames:
    problems.append(f"config.data.num_frames={d.num_frames} is not a multiple of "
                    f"config.rollout.chunk_frames={r.chunk_frames}")
  if d.height % 2 or d.width % 2:
    problems.append(f"latent height/width {d.height}x{d.width} must be even (Wan's 2x2 patches)")
  if config.afd.group_size != 1:
    problems.append(f"config.afd.group_size={config.afd.group_size}: the trainer pairs one teacher "
                    "video with one rollout per prompt so far; use 1 (the default)")
  if d.teacher != "synthetic":
    problems.append(f"config.data.teacher={d.teacher!r}: only 'synthetic' is available so far "
                    "(teacher stores are built with afd_jax.tools.build_teacher_store)")
  for field, path in (("config.model.checkpoint", config.model.checkpoint),
                      ("config.disc.checkpoint", config.disc.checkpoint)):
    if path and not Path(path).exists():
      problems.append(f"{field}={path!r} does not exist; convert a Wan2.1 checkpoint with "
                      "`python -m afd_jax.tools.convert_wan SRC DST` and point the field at DST")
  if problems:
    raise ValueError("invalid config:\n  - " + "\n  - ".join(problems))


def afd_config(config) -> steps.AFDConfig:
  a = config.afd
  return steps.AFDConfig(
      chunk_frames=config.rollout.chunk_frames,
      rollout_timesteps=tuple(float(t) for t in rollout_config(config).timesteps()),
      nft_passes=a.nft_passes, nft_levels=a.nft_levels, shift=config.rollout.shift, beta=a.beta,
      a_max=a.a_max, adv_mode=a.adv_mode, group_size=a.group_size, reg_weight=a.reg_weight,
      disc_tau_max=a.disc_tau_max, r1_weight=a.r1_weight, r2_weight=a.r2_weight,
      penalty_sigma=a.penalty_sigma, ema_decay=a.ema_decay, ema_start=a.ema_start,
      old_decay_type=a.old_decay_type)


def rollout_config(config) -> rollout_lib.RolloutConfig:
  r = config.rollout
  return rollout_lib.RolloutConfig(
      chunk_frames=r.chunk_frames, denoising_steps=tuple(r.denoising_steps), shift=r.shift,
      window_frames=r.window_frames or None, sink_frames=r.sink_frames)


def optimizer(o, max_nonfinite: int):
  """AdamW behind ``apply_if_finite``: a non-finite gradient leaves the parameters unchanged."""
  inner = steps.adamw(o.lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, eps=o.eps,
                      grad_clip=o.grad_clip, warmup_steps=o.warmup_steps)
  return optax.apply_if_finite(inner, max_consecutive_errors=max_nonfinite + 1)


def disc_optimizer(o, freeze_below: int, max_nonfinite: int):
  """Self-Forcing's two parameter groups: the trunk at ``lr``, readouts and head at
  ``lr * head_lr_multiplier``, one global-norm clip over both. Frozen trunk blocks (and the patch
  embedding below them), and the trunk's unused output head, get no update at all, weight decay
  included."""
  def adamw(lr):
    schedule = (optax.linear_schedule(0.0, lr, o.warmup_steps) if o.warmup_steps
                else optax.constant_schedule(lr))
    return optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)

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


def build_student(config) -> wan.WanModel:
  m = config.model
  runtime = dict(dtype=m.dtype, attention_kernel=m.attention_kernel, scan_layers=m.scan_layers,
                 remat_policy=m.remat_policy)
  if m.checkpoint:
    return wan.from_pretrained(m.checkpoint, **runtime)
  return wan.init(wan.preset(m.preset, **runtime), seed=config.seed)


def build_discriminator(config, student: wan.WanModel) -> disc_lib.Discriminator:
  trunk = wan.from_pretrained(config.disc.checkpoint) if config.disc.checkpoint else student
  cfg = disc_lib.DiscriminatorConfig(readout_layers=tuple(config.disc.readout_layers),
                                     readout_ffn_dim=config.disc.readout_ffn_dim,
                                     freeze_below=config.disc.freeze_below)
  return disc_lib.init(trunk, cfg, seed=config.seed + 1)


class Trainer:
  def __init__(self, config, workdir):
    validate(config)
    self.config = config
    self.workdir = Path(workdir)
    self.method = config.method
    self.afd = afd_config(config)
    self.mesh = mesh_lib.make_mesh(config.mesh.num_devices, config.mesh.data, config.mesh.fsdp)
    batch_devices = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    if config.data.batch_size % batch_devices:
      raise ValueError(f"config.data.batch_size={config.data.batch_size} is not divisible by the "
                       f"{batch_devices} data x fsdp devices of the mesh.")
    self.batch_sharding = mesh_lib.batch_sharding(self.mesh)
    self._stop_requested = False
    self._build()

  # -- construction ----------------------------------------------------------------------------

  def _build(self):
    config = self.config
    rules = tuple(tuple(r) for r in config.logical_rules)
    student = build_student(config)
    self.student_cfg = student.config
    d = config.data
    self.pool = data_lib.PromptPool.random(d.num_prompts, d.text_length, student.config.text_dim,
                                           config.seed)
    self.latent_shape = (d.num_frames, d.height, d.width, student.config.in_dim)
    self.teacher = SyntheticTeacher(self.latent_shape, offset=d.teacher_offset)
    self.student_graph, params = nnx.split(student)
    param_sh = mesh_lib.param_shardings(params, self.mesh, rules)
    params = jax.device_put(nnx.to_pure_dict(params), param_sh)
    self.tx_student = optimizer(config.optim.student, config.train.max_nonfinite)
    state = {"student": {"params": params, "opt": jax.jit(self.tx_student.init)(params),
                         "ema": params},
             "step": jnp.zeros((), jnp.int32),
             "rng": jax.random.key_data(jax.random.key(config.seed))}
    if self.method in ADVERSARIAL:
      disc = build_discriminator(config, student)
      self.disc_graph, dparams = nnx.split(disc)
      dparams = jax.device_put(nnx.to_pure_dict(dparams),
                               mesh_lib.param_shardings(dparams, self.mesh, rules))
      self.tx_disc = disc_optimizer(config.optim.disc, config.disc.freeze_below,
                                    config.train.max_nonfinite)
      state["old"] = params
      state["ref"] = params
      state["disc"] = {"params": dparams, "opt": jax.jit(self.tx_disc.init)(dparams)}
    # Every leaf gets an explicit mesh sharding (replicated unless a rule shards it), so inputs
    # and outputs of the steps match from the first call; the copy unshares the aliased params.
    self.state_sharding = jax.tree.map(
        lambda x: x.sharding if isinstance(x.sharding, NamedSharding) and x.sharding.mesh == self.mesh
        else mesh_lib.replicated(self.mesh), state)
    self.state = jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=self.state_sharding)(
        state)
    self._compile_steps()

  def _compile_steps(self):
    sh = self.state_sharding
    self.rollout_fn = rollout_lib.make_rollout(self.student_graph, rollout_config(self.config))
    self.noise_fn = jax.jit(lambda k: jax.random.normal(k, (self.config.data.batch_size,
                                                            *self.latent_shape), jnp.float32),
                            out_shardings=self.batch_sharding)
    if self.method in ADVERSARIAL:
      self.disc_fn = jax.jit(steps.make_disc_step(self.disc_graph, self.tx_disc, self.afd),
                             donate_argnums=(0, 1),
                             out_shardings=(sh["disc"]["params"], sh["disc"]["opt"], None))
      self.score_fn = jax.jit(steps.make_disc_step(self.disc_graph, self.tx_disc, self.afd,
                                                   update=False),
                              out_shardings=(sh["disc"]["params"], sh["disc"]["opt"], None))
      self.adv_fn = jax.jit(lambda t, s: steps.advantage(t, s, self.afd))
      self.student_fn = jax.jit(steps.make_student_step(self.student_graph, self.tx_student,
                                                        self.afd),
                                donate_argnums=(0,), out_shardings=(sh["student"], None))
      decay = self.afd.old_decay_type
      self.old_fn = jax.jit(
          lambda old, p, k: steps.update_old(old, p, steps.old_policy_eta(k, decay)),
          donate_argnums=(0,), out_shardings=sh["old"])
    else:
      self.fm_fn = jax.jit(steps.make_fm_step(self.student_graph, self.tx_student, self.afd),
                           donate_argnums=(0,), out_shardings=(sh["student"], None))

  # -- data ------------------------------------------------------------------------------------

  def _batch(self, step: int):
    d = self.config.data
    ids = data_lib.host_slice(data_lib.batch_ids(step, d.batch_size, len(self.pool),
                                                 self.config.seed))
    put = lambda x: jax.make_array_from_process_local_data(self.batch_sharding, x)
    return ids, put(self.pool.embeddings[ids]), put(self.teacher(ids, seed=step))

  # -- the loop --------------------------------------------------------------------------------

  def _iteration(self, step: int) -> dict:
    state = self.state
    _, context, teacher = self._batch(step)
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
    k_noise, k_roll, k_disc, k_student = jax.random.split(key, 4)
    timings = {}
    t0 = time.perf_counter()
    if self.method not in ADVERSARIAL:
      state["student"], metrics = self.fm_fn(state["student"], teacher, context, k_student,
                                             state["step"])
      jax.block_until_ready(metrics)
      timings["time/student_s"] = time.perf_counter() - t0
    else:
      x_student = self.rollout_fn(state["old"], self.noise_fn(k_noise), context, k_roll)
      jax.block_until_ready(x_student)
      timings["time/rollout_s"] = time.perf_counter() - t0
      t0 = time.perf_counter()
      train_disc = self.method == "afd" or step < self.config.afd.disc_warmup_steps
      fn = self.disc_fn if train_disc else self.score_fn
      dparams, dopt, out = fn(state["disc"]["params"], state["disc"]["opt"], teacher, x_student,
                              context, k_disc)
      state["disc"] = {"params": dparams, "opt": dopt}
      r, adv_metrics = self.adv_fn(out["teacher_logits"], out["student_logits"])
      jax.block_until_ready(r)
      timings["time/disc_s"] = time.perf_counter() - t0
      t0 = time.perf_counter()
      if step == self.config.debug.nan_at_step:
        x_student = x_student * jnp.nan
      state["student"], metrics = self.student_fn(state["student"], state["old"], state["ref"],
                                                  x_student, context, r, k_student, state["step"])
      state["old"] = self.old_fn(state["old"], state["student"]["params"], state["step"] + 1)
      jax.block_until_ready(state["old"])
      timings["time/student_s"] = time.perf_counter() - t0
      metrics = dict(metrics, **out["metrics"], **adv_metrics)
      metrics["disc/trained"] = float(train_disc)
    opt = state["student"]["opt"]
    metrics["student/rejected"] = 1.0 - jnp.asarray(opt.last_finite, jnp.float32)
    o = self.config.optim.student
    metrics["student/lr"] = o.lr * (min(1.0, step / o.warmup_steps) if o.warmup_steps else 1.0)
    state["step"] = state["step"] + 1
    return dict(metrics, **timings)

  def _meta(self, step):
    return {"method": self.method, "seed": self.config.seed, "step": step,
            "config": self.config.to_dict()}

  def _restore(self, ckpt: ckpt_lib.Checkpointer) -> int:
    meta = ckpt.latest_meta()
    for field in ("method", "seed"):
      if meta is not None and meta.get(field) != getattr(self.config, field):
        raise ValueError(f"{ckpt.directory} holds a run with {field}={meta.get(field)!r}, but "
                         f"config.{field}={getattr(self.config, field)!r}; use a new --workdir "
                         "or the original config.")
    restored = ckpt.restore(ckpt_lib.abstract_like(self.state, self.state_sharding))
    if restored is None:
      return 0
    step, self.state, _ = restored
    logging.info("resumed from step %d in %s", step, ckpt.directory)
    return step

  def _on_sigterm(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM: saving a checkpoint after this step, then exiting.")
    self._stop_requested = True

  def run(self) -> dict:
    config = self.config
    total = config.train.num_steps
    ckpt = ckpt_lib.Checkpointer(self.workdir / "checkpoints", keep_last=config.train.keep_last,
                                 keep_every=config.train.keep_every)
    start = self._restore(ckpt)
    writer = metrics_lib.MetricWriter(self.workdir, total, start)
    previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    last = {}
    try:
      with jax.set_mesh(self.mesh):
        for step in range(start, total):
          metrics = self._iteration(step)
          done = step + 1
          rejected = int(self.state["student"]["opt"].notfinite_count)
          if rejected:
            logging.warning("step %d: non-finite student loss or gradient, update rejected "
                            "(%d in a row).", step, rejected)
          if rejected >= config.train.max_nonfinite:
            raise FloatingPointError(
                f"{rejected} consecutive non-finite updates at step {step}; stopping. The last "
                f"good checkpoint (step {ckpt.steps()[-1] if ckpt.steps() else 'none'}) in "
                f"{ckpt.directory} is intact.")
          if done % config.train.log_every == 0 or done == total:
            last = writer.write(done, metrics)
          self._debug_signal(done)
          if (done == total or self._stop_requested or (config.train.checkpoint_every and
                                                        done % config.train.checkpoint_every == 0)):
            ckpt.save(done, self.state, self._meta(done), force=True)
          if self._stop_requested:
            ckpt.wait()
            logging.warning("stopped after step %d on SIGTERM; resume with the same command.",
                            done)
            return {"stopped_at": done, **last}
        samples = self.write_samples(total)
    finally:
      signal.signal(signal.SIGTERM, previous)
      ckpt.close()
      writer.close()
    summary = {"method": self.method, "steps": total, "state_digest": self.digest(), **last,
               **samples}
    (self.workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary

  def digest(self) -> str:
    """SHA-256 over every array of the training state: equal digests, bit-identical runs."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(jax.device_get(self.state)):
      h.update(np.ascontiguousarray(leaf).tobytes())
    return h.hexdigest()

  def _debug_signal(self, done: int):
    """Preemption drills (tests): deliver SIGKILL / SIGTERM to ourselves after a given step, before
    that step's checkpoint is written."""
    if done == self.config.debug.kill_at_step:
      os.kill(os.getpid(), signal.SIGKILL)
    if done == self.config.debug.term_at_step:
      os.kill(os.getpid(), signal.SIGTERM)

  # -- samples ---------------------------------------------------------------------------------

  def write_samples(self, step: int) -> dict:
    """Rollouts of the EMA student beside teacher videos on held-out prompts, as a GIF, plus the
    teacher's visible property measured on both (no discriminator involved)."""
    n = self.config.data.batch_size
    ids = np.arange(len(self.pool) - n, len(self.pool))  # fixed, last prompts of the pool
    put = lambda x: jax.make_array_from_process_local_data(self.batch_sharding, data_lib.host_slice(x))
    context = put(self.pool.embeddings[ids])
    teacher = np.asarray(self.teacher(ids, seed=10**6))
    noise = self.noise_fn(jax.random.key(self.config.seed + 10**6))
    student = np.asarray(jax.device_get(self.rollout_fn(
        self.state["student"]["ema"], noise, context, jax.random.key(self.config.seed + 1))))
    ch = self.teacher.offset_channel
    gap = float(abs(student[..., ch].mean() - teacher[..., ch].mean()))
    out = {"eval/property_gap": gap, "eval/student_property": float(student[..., ch].mean()),
           "eval/teacher_property": float(teacher[..., ch].mean())}
    if jax.process_index() == 0:
      up = self.config.output.upscale
      frames = np.concatenate([video.tile(np.stack([video.latents_to_frames(v, upscale=up)
                                                    for v in x])) for x in (teacher, student)], 1)
      gif = video.write_gif(frames, self.workdir / "samples" / f"step_{step:06d}.gif",
                            fps=self.config.output.fps)
      out["samples"] = str(gif)
      logging.info("samples (top: teacher, bottom: student EMA) in %s; property gap %.4f", gif, gap)
    return out


def run(config, workdir) -> dict:
  return Trainer(config, workdir).run()
