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
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from afd_jax import checkpoint as ckpt_lib
from afd_jax import data as data_lib
from afd_jax import mesh as mesh_lib
from afd_jax import metrics as metrics_lib
from afd_jax import rollout as rollout_lib
from afd_jax import steps
from afd_jax import teachers
from afd_jax import video
from afd_jax.models import discriminator as disc_lib
from afd_jax.models import wan
from afd_jax.models import wan_checkpoint

METHODS = ("afd", "sft", "afd_frozen_disc", "pretrain")
EVAL_SEED = 10**6  # evaluation noise and teacher samples: never used by training
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
  if d.teacher not in teachers.KINDS:
    problems.append(f"config.data.teacher={d.teacher!r} is not one of {teachers.KINDS}")
  elif d.teacher == "store" and not (d.store and Path(d.store).exists()):
    problems.append(f"config.data.store={d.store!r} does not exist; build a teacher store with "
                    "`python -m afd_jax.tools.build_teacher_store --prompts P.jsonl --videos DIR "
                    "--out STORE` and point the field at STORE")
  elif d.teacher == "http" and not d.teacher_url:
    problems.append("config.data.teacher='http' needs config.data.teacher_url")
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
      old_decay_type=a.old_decay_type, negative_branch=a.nft_branches == "both")


def rollout_config(config) -> rollout_lib.RolloutConfig:
  r = config.rollout
  return rollout_lib.RolloutConfig(
      chunk_frames=r.chunk_frames, denoising_steps=tuple(r.denoising_steps), shift=r.shift,
      window_frames=r.window_frames or None, sink_frames=r.sink_frames, sampler=r.sampler)


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
    return optax.adamw(steps.lr_schedule(lr, o.warmup_steps), b1=o.b1, b2=o.b2, eps=o.eps,
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


def build_student(config) -> wan.WanModel:
  m = config.model
  runtime = dict(dtype=m.dtype, attention_kernel=m.attention_kernel, scan_layers=m.scan_layers,
                 remat_policy=m.remat_policy)
  if m.checkpoint:
    return wan.from_pretrained(m.checkpoint, **runtime)
  return wan.init(wan.preset(m.preset, **runtime, **m.overrides), seed=config.seed)


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
    self.data = teachers.from_config(config, student.config, self.workdir)
    self.pool = self.data.pool
    self.latent_shape = self.data.latent_shape
    self.student_graph, params = nnx.split(student)
    self.student_template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
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

  def _host_batch(self, step: int):
    """This host's text embeddings and teacher latents of step ``step`` (numpy; runs in the
    prefetch thread, so reading or rendering overlaps the previous step's compute)."""
    d = self.config.data
    ids = data_lib.host_slice(data_lib.batch_ids(step, d.batch_size, self.pool.num_train,
                                                 self.config.seed))
    return self.pool.embeddings[ids], self.data.source.latents(ids, step)

  def _to_global(self, local):
    """This process's rows -> one batch-sharded global array."""
    return jax.make_array_from_process_local_data(self.batch_sharding, local)

  # -- the loop --------------------------------------------------------------------------------

  def _iteration(self, step: int, batch) -> dict:
    state = self.state
    context, teacher = map(self._to_global, batch)
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
    metrics["student/lr"] = steps.lr_schedule(o.lr, o.warmup_steps)(step)
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
    prefetch = data_lib.Prefetcher(self._host_batch, range(start, total))
    last = {}
    try:
      with jax.set_mesh(self.mesh):
        for step in range(start, total):
          metrics = self._iteration(step, prefetch.get(step))
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
          evaluate = config.train.eval_every and done % config.train.eval_every == 0
          if evaluate and done < total:
            metrics.update(self.evaluate(done, write=False))
          if done % config.train.log_every == 0 or done == total or evaluate:
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
        if config.train.export and jax.process_index() == 0:
          logging.info("exported the EMA student to %s", self.export(config.train.export))
        samples = self.evaluate(total)
    finally:
      prefetch.close()
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

  # -- samples and evaluation ------------------------------------------------------------------

  def sample(self, params, ids, seed: int) -> np.ndarray:
    """Student rollouts ``[len(ids), F, h, w, C]`` (numpy, on every host) for global prompt
    ``ids``, in batches of the training batch size (the rollout compiled for training)."""
    n = self.config.data.batch_size
    padded = np.concatenate([ids, np.repeat(ids[-1:], -len(ids) % n)])
    out = []
    for i in range(0, len(padded), n):
      context = self._to_global(data_lib.host_slice(self.pool.embeddings[padded[i:i + n]]))
      noise = self.noise_fn(jax.random.fold_in(jax.random.key(seed), i))
      x = self.rollout_fn(params, noise, context, jax.random.key(seed + 1 + i))
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
    up = max(1, up // self.config.data.encoder_patch)
    return videos.repeat(up, axis=2).repeat(up, axis=3)

  def evaluate(self, step: int, params=None, write: bool = True) -> dict:
    """The student (EMA by default) on held-out prompts; process 0 writes a sample video (top:
    teacher, bottom: student)."""
    params = self.state["student"]["ema"] if params is None else params
    ids = self.eval_ids()
    teacher = self.teacher_videos(ids, EVAL_SEED)
    student = self.student_videos(params, ids, self.config.seed + EVAL_SEED)
    out = {f"eval/{k}": v for k, v in self.score(student, ids, teacher).items()}
    if write and jax.process_index() == 0:
      n = self.config.data.batch_size
      grid = np.concatenate([video.tile(self.viewable(x[:n])) for x in (teacher, student)], 1)
      gif = video.write_gif(grid, self.workdir / "samples" / f"step_{step:06d}.gif",
                            fps=self.config.output.fps)
      out["samples"] = str(gif)
      logging.info("samples (top: teacher, bottom: student EMA) in %s", gif)
    return out

  def copy(self, params):
    """A device copy of student parameters with their shardings (safe from donation)."""
    return jax.jit(lambda t: jax.tree.map(jnp.copy, t),
                   out_shardings=self.state_sharding["student"]["params"])(params)

  def export(self, path) -> Path:
    """The EMA student as a converted checkpoint (``wan.from_pretrained(path)`` loads it)."""
    state = jax.tree.map(lambda x: x, self.student_template)
    nnx.replace_by_pure_dict(state, jax.device_get(self.state["student"]["ema"]))
    model = nnx.merge(self.student_graph, state)
    return wan_checkpoint.save_converted(model, path, source=f"afd_jax {self.method} "
                                         f"{self.workdir}")


def run(config, workdir) -> dict:
  return Trainer(config, workdir).run()
