"""The training loop of AFD and its baselines: the ``Trainer`` steps the state (``state.py``) with
the compiled programs (``programs.py``) of the pure steps (``steps.py``), checkpoints it, logs and
evaluates (``evaluation.py``). What each method needs and the config checks: ``methods.py``.

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

import functools
import hashlib
import json
import os
import signal
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from afd_jax import checkpoint as ckpt_lib
from afd_jax import data as data_lib
from afd_jax import errors
from afd_jax import evaluation
from afd_jax import lock as lock_lib
from afd_jax import lora as lora_lib
from afd_jax import mesh as mesh_lib
from afd_jax import methods
from afd_jax import metrics as metrics_lib
from afd_jax import programs
from afd_jax import state as state_lib
from afd_jax import steps
from afd_jax import teachers
from afd_jax.models import wan_checkpoint



class Trainer:
  def __init__(self, config, workdir):
    methods.validate(config)
    self.config = config
    self.workdir = Path(workdir)
    self.method = config.method
    methods.afd_config(config)  # refuses bad method hyperparameters before anything is built
    self.mesh = mesh_lib.mesh_from_config(config)
    self.batch_sharding = mesh_lib.batch_sharding(self.mesh)
    self._stop_requested = False
    # Resuming: shapes and shardings only, restored into (a fresh state would double the memory).
    self.nets, self.state = state_lib.build_state(config, self.mesh, abstract=ckpt_lib.has_checkpoints(
        self.workdir / "checkpoints"), abstract_base=False)
    self.state_sharding = self.nets.state_sharding
    self.frozen = self.nets.frozen   # the bases adapters apply to (None: trained fully)
    self.student_graph = self.nets.student_graph
    self.student_cfg = self.nets.student_config
    methods.check_divisibility(config, self.mesh, self.student_cfg)
    self.data = teachers.from_config(config, self.student_cfg, self.workdir)
    self.pool = self.data.pool
    self.latent_shape = self.data.latent_shape
    self.fns = programs.make_step_fns(config, self.nets, self.mesh, self.latent_shape)
    rollout = functools.partial(self.fns.rollout, frozen=self.frozen["student"])
    self.evaluator = evaluation.Evaluator(config, self.data, rollout, self.fns.noise, self.mesh,
                                          self.workdir)
    # Physics teacher: what the discriminator (or oracle) rewards, measured on every rollout.
    self.diagnose = (self.data.physics_world is not None
                     and self.method in (*methods.NFT, "gan"))
    self._diagnostics: list = []
    self._teacher_speeds: dict[int, float] = {}   # prompt id -> the teacher's ball speed

  # -- data ------------------------------------------------------------------------------------

  def _host_batch(self, step: int):
    """This host's text embeddings and teacher latents of step ``step`` (numpy; runs in the
    prefetch thread, so reading or rendering overlaps the previous step's compute). With
    ``group_size`` K > 1 every prompt fills K consecutive rows (prompt-major), row k paired with
    the prompt's k-th teacher draw (``afd.group_pairs=shared``: every row with draw 0)."""
    d, k = self.config.data, self.config.afd.group_size
    ids = data_lib.host_slice(data_lib.batch_ids(step, d.batch_size, self.pool.num_train,
                                                 self.config.seed))
    if self.config.afd.group_pairs == "shared":   # one teacher draw for the prompt's K pairs
      teacher = np.repeat(self.data.source.latents(ids, step)[:, None], k, 1)
    else:
      teacher = np.stack([self.data.source.latents(ids, step, draw) for draw in range(k)], 1)
    return (np.repeat(self.pool.embeddings[ids], k, axis=0),
            teacher.reshape(-1, *teacher.shape[2:]))

  def _to_global(self, local):
    """This process's rows -> one batch-sharded global array."""
    return jax.make_array_from_process_local_data(self.batch_sharding, local)

  # -- the loop --------------------------------------------------------------------------------

  def _iteration(self, step: int, batch, timed: bool = True) -> dict:
    """One training iteration of ``self.method`` (``timed``: with its time split)."""
    state = self.state
    context, teacher = map(self._to_global, batch)
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
    keys = dict(zip(("noise", "rollout", "disc", "student"), jax.random.split(key, 4)))
    clock = _Clock(timed)
    if self.method not in methods.ON_POLICY:
      state["student"], metrics = self.fns.fm(state["student"], teacher, context, keys["student"],
                                             state["step"], self.frozen["student"])
      clock.lap("student", metrics)
    elif self.method in methods.GENERATOR:
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
    rows = methods.rollout_rows(self.config)
    x_student = self.fns.rollout(state["old"], self.fns.noise(keys["noise"], rows), context,
                                 keys["rollout"], None, self.frozen["student"])
    clock.lap("rollout", x_student)
    physics = None
    if self.method == "afd_oracle" or self.diagnose:
      physics = self.rollout_physics(x_student, self.step_ids(step))
    if self.method == "afd_oracle":
      score = self.config.afd.oracle_score
      values = ranked = methods.oracle_values(physics, score)
      if self.config.afd.oracle_noise:   # a noisy ranking, as a discriminator's would be
        normal = jax.random.normal(jax.random.fold_in(keys["disc"], 0x0AC1E), values.shape)
        ranked = methods.blur_oracle(values, self.config.afd.oracle_noise,
                                     self.config.afd.group_size, np.asarray(normal))
      r, adv, metrics = self.fns.advantage(np.zeros_like(ranked), -ranked)
      metrics["oracle/physics_error"] = float(np.mean(physics["physics_error"]))
      metrics[f"oracle/{score}"] = float(np.mean(values))
    else:   # the discriminator's program computes the advantage too
      out = self._disc_step(teacher, x_student, context, keys["disc"],
                            train=self.method == "afd"
                            or step < self.config.afd.disc_warmup_steps)
      r, adv, metrics = out["r"], out["advantage"], out["metrics"]
    clock.lap("score", r)
    if self.diagnose:
      self._diagnostics.append((np.asarray(adv), physics))
    if step < self.config.afd.disc_lead_steps:  # the discriminator's head start: no student step
      return metrics
    if step == self.config.debug.nan_at_step:
      x_student = x_student * jnp.nan
    state["student"], state["old"], student_metrics = self.fns.student(
        state["student"], state["old"], state.get("ref"), x_student, context, r, keys["student"],
        state["step"], self.frozen["student"])
    clock.lap("student", state["old"])
    return dict(metrics, **student_metrics)

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
        params, self.fns.noise(keys["noise"], methods.rollout_rows(cfg)), context, k_roll,
        exit_step, self.frozen["student"])
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
          exit_step, keys["student"], state["step"], self.frozen["student"], self.frozen["disc"])
    else:
      state["critic"], metrics = self.fns.critic(state["critic"], x_student, context, keys["disc"],
                                                 state["step"], self.frozen["student"])
      clock.lap("score", metrics)
      student_metrics = {}
      if (step + 1) % cfg.dmd.critic_ratio == 0:
        state["student"], student_metrics = self.fns.student(
            state["student"], state["critic"]["params"], state.get("ref"), inputs, x_student,
            context, exit_step, keys["student"], state["step"], self.frozen["student"])
    clock.lap("student", state["student"]["params"])
    return dict(metrics, **student_metrics)

  def _disc_step(self, teacher, x_student, context, key, train: bool) -> dict:
    """``afd.disc_steps`` discriminator updates on the (teacher, student) pairs, each with its own
    noise augmentation (or, ``train=False``, only their scores); returns the first update's
    pre-update logits, advantage and metrics."""
    disc = self.state["disc"]
    if train:
      for i in range(self.config.afd.disc_steps):
        params, opt, scored = self.fns.disc(disc["params"], disc["opt"], teacher, x_student,
                                            context, jax.random.fold_in(key, i) if i else key,
                                            self.frozen["disc"])
        disc = self.state["disc"] = {"params": params, "opt": opt}
        if i == 0:
          out = scored
    else:
      out = self.fns.score(disc["params"], teacher, x_student, context, key, self.frozen["disc"])
    out["metrics"]["disc/trained"] = float(train)
    return out

  def _pop_diagnostics(self) -> dict:
    """What the scores rewarded since the last log line: Spearman correlations of the advantage
    (GAN: the paired score) with the rollouts' physics score and its terms, over every rollout
    of the window (scores standardised per step, so the window's pairs pool; a per-chunk
    discriminator's, averaged over the rollout's chunks). With K rollouts per prompt the
    advantage is centred per prompt, so the physics scores are too (and GAN's paired scores): the
    correlation is then how well the scores rank each prompt's own rollouts, all they can rank."""
    if not self._diagnostics:
      return {}
    k = self.config.afd.group_size
    advantage = np.concatenate([centred_per_prompt(a.reshape(len(a), -1).mean(1), k)
                                for a, _ in self._diagnostics])
    physics = {key: np.concatenate([centred_per_prompt(p[key], k) for _, p in self._diagnostics])
               for key in self._diagnostics[0][1]}
    self._diagnostics = []
    return rank_correlations(advantage, physics)

  def step_ids(self, step: int) -> np.ndarray:
    """The global prompt id of every row of step ``step`` (K rows per prompt)."""
    d = self.config.data
    return np.repeat(data_lib.batch_ids(step, d.batch_size, self.pool.num_train,
                                        self.config.seed), self.config.afd.group_size)

  def rollout_physics(self, latents, ids) -> dict[str, np.ndarray]:
    """Per-video ``physics_error``, its terms, the gravity gaps, ``fall_jitter`` and the speed
    gap (``|speed / teacher's speed - 1|``, the teacher's rendered for the same prompt) of
    rollouts (a global array) for prompts ``ids``, measured by ``afd_jax.eval`` on the decoded
    pixels (every host computes all)."""
    from afd_jax.eval import motion, tracking
    from afd_jax.eval import physics as eval_physics
    world, prompts = self.data.physics_world, [self.pool.prompts[i] for i in ids]
    x = np.asarray(multihost_utils.process_allgather(latents, tiled=True))
    videos = [self.data.encoder.decode(v) for v in x]
    tracks = [tracking.track(v, p, world.radius) for v, p in zip(videos, prompts)]  # once each
    rows = [eval_physics.video_physics(v, p, world, self.config.rollout.chunk_frames, tracks=t)
            for v, p, t in zip(videos, prompts, tracks)]
    out = {k: np.array([row[k] for row in rows]) for k in ("physics_error", *eval_physics.TERMS)}
    for gap, ratio in methods.GRAVITY_GAPS.items():   # NaN where no ball flew three frames
      out[gap] = np.abs(np.array([row[ratio] for row in rows]) - 1.0)
    out["fall_jitter"] = np.array([row["fall_jitter"] for row in rows])
    for i, prompt in zip(ids, prompts):
      if i not in self._teacher_speeds:
        self._teacher_speeds[i] = motion.video_speed(world.render(prompt, 0), prompt, world)
    speed = np.array([motion.video_speed(v, p, world, tracks=t)
                      for v, p, t in zip(videos, prompts, tracks)])
    out["speed_gap"] = np.abs(speed / np.maximum([self._teacher_speeds[i] for i in ids], 1e-6)
                              - 1.0)
    return out

  def _meta(self, step):
    return {"method": self.method, "seed": self.config.seed, "step": step,
            "run": self._identity(), "config": self.config.to_dict()}

  def _identity(self) -> dict:
    """What a resumed run must share with its checkpoint to continue the same run."""
    d = self.config.data
    lora = lambda spec: spec and [spec.rank, spec.alpha, list(spec.targets)]
    return {**{f"model.{k}": v for k, v in self.student_cfg.architecture().items()},
            "model.lora (rank, alpha, targets)": lora(self.nets.lora["student"]),
            "disc.lora (rank, alpha, targets)": lora(self.nets.lora["disc"]),
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
        self.state = state_lib.build_state(self.config, self.mesh)[1]
      return 0
    step, self.state, _ = restored
    for name, fingerprint in self.nets.fingerprint.items():
      saved = np.asarray(self.state["lora_base"][name].addressable_data(0))
      if not lora_lib.same_base(saved, np.asarray(fingerprint.addressable_data(0))):
        field = "config.model.checkpoint" if name == "student" else "config.disc.checkpoint"
        raise errors.UserError(
            f"the {name} adapters in {ckpt.directory} (step {step}) were trained on another base "
            f"than {field}={self.config[field.split('.')[1]].checkpoint!r} holds now; point it at "
            "the weights the run started from, or use a new --workdir.")
    logging.info("resumed from step %d in %s", step, ckpt.directory)
    return step

  def _checkpointer(self) -> ckpt_lib.Checkpointer:
    t = self.config.train
    return ckpt_lib.Checkpointer(self.workdir / "checkpoints", keep_last=t.keep_last,
                                 keep_every=t.keep_every)

  def restore(self) -> int:
    """Loads the workdir's last checkpoint without training (tools that read a finished run);
    returns its step, 0 where there is none."""
    ckpt = self._checkpointer()
    try:
      return self._restore(ckpt)
    finally:
      ckpt.close()

  @property
  def abstract(self) -> bool:
    """Whether the state is still shapes only (built to restore a checkpoint into)."""
    return isinstance(jax.tree.leaves(self.state)[0], jax.ShapeDtypeStruct)

  def initial_student(self):
    """The student's parameters before any training: ``model.checkpoint`` or the seed's init
    (built afresh when the state is waiting for a checkpoint); with adapters, None (the base,
    adapters off, which is where they start)."""
    if self.nets.lora["student"]:
      return None
    if not self.abstract and int(self.state["step"]) == 0:
      return self.copy(self.state["student"]["params"])
    rules = mesh_lib.check_rules(self.config.logical_rules)
    student = state_lib.build_student(self.config, lambda s: mesh_lib.param_shardings(s, self.mesh, rules))
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
    ckpt = self._checkpointer()
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
    last, done, final = {}, start, {}
    try:
      with jax.set_mesh(self.mesh):
        for step in range(start, total):
          batch = prefetch.get(step, stop=lambda: self._stop_requested)
          if batch is data_lib.STOPPED:  # SIGTERM while waiting for the teacher
            break
          done = step + 1
          log = done % config.train.log_every == 0 or done == total
          evaluate = config.train.eval_every and done % config.train.eval_every == 0
          metrics = self._iteration(step, batch, timed=log or evaluate)
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
          if done == total:   # the last evaluation writes samples and is logged like the rest
            final = self.evaluate(done)
            metrics.update({k: v for k, v in final.items() if k != "samples"})
          elif evaluate:
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
          logging.info("exported the EMA student to %s",
                       self.export(config.train.export, config.train.export_format))
        samples = final or self.evaluate(total)   # a finished run started again: evaluate
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

  def evaluate(self, step: int, write: bool = True) -> dict:
    """The EMA student on held-out prompts (``evaluation.Evaluator``); with the physics teacher,
    also what the discriminator reads (``probe/*``, ``eval.disc_probe``)."""
    out = self.evaluator.evaluate(self.state["student"]["ema"], step, write)
    if "disc" in self.state and self.data.physics_world is not None and self.data.embed:
      from afd_jax.eval import disc_probe
      prompts = [self.pool.prompts[i] for i in self.evaluator.eval_ids()]
      probes = disc_probe.probe(self.disc_logits, prompts, self.data.physics_world,
                                evaluation.SEED)
      out.update({f"probe/{k}": v for k, v in probes.items()})
    return out

  def disc_logits(self, videos, prompts) -> np.ndarray:
    """The discriminator's logits of uint8 ``videos`` under ``prompts`` (any text), in batches
    of the compiled size; its noise augmentation depends only on the row's position. A
    per-chunk discriminator gives its last chunk's, which judges the whole video."""
    rows, n = methods.rollout_rows(self.config), len(prompts)
    x = np.stack([self.data.encoder.encode(v) for v in videos])
    context = self.data.embed(list(prompts))
    x, context = (np.concatenate([a, np.repeat(a[-1:], -n % rows, 0)]) for a in (x, context))
    out = []
    with jax.set_mesh(self.mesh):
      for i in range(0, len(x), rows):
        xs, cs = (self._to_global(data_lib.host_slice(a[i:i + rows])) for a in (x, context))
        scored = self.fns.score(self.state["disc"]["params"], xs, xs, cs, jax.random.key(i),
                                self.frozen["disc"])
        out.append(np.asarray(multihost_utils.process_allgather(scored["teacher_logits"],
                                                                tiled=True)))
    logits = np.concatenate(out)[:n]
    return logits[:, -1] if logits.ndim == 2 else logits

  def copy(self, params):
    """A device copy of student parameters with their shardings (safe from donation)."""
    return jax.jit(lambda t: jax.tree.map(jnp.copy, t),
                   out_shardings=self.state_sharding["student"]["params"])(params)

  def export(self, path, fmt: str = "converted") -> Path:
    """The EMA student, adapters merged into the base, as a checkpoint ``wan.from_pretrained``
    loads: ``converted`` (Orbax, sharded writes) or ``diffusers`` (also read by diffusers'
    ``WanTransformer3DModel.from_pretrained``)."""
    model = steps.merged(self.student_graph, self.nets.lora["student"], self.frozen["student"],
                         self.copy(self.state["student"]["ema"]))
    if fmt == "diffusers":
      return wan_checkpoint.save_diffusers(model, path)
    return wan_checkpoint.save_converted(model, path, source=f"afd_jax {self.method} "
                                         f"{self.workdir}")


class _Clock:
  """Wall time of the parts of an iteration. Each lap waits for its result, which serialises
  the programs, so only logged iterations are timed; the others dispatch without waiting."""

  def __init__(self, enabled: bool = True):
    self.enabled, self.times, self._t0 = enabled, {}, time.perf_counter()

  def lap(self, name: str, result):
    if not self.enabled:
      return
    jax.block_until_ready(result)
    now = time.perf_counter()
    self.times[f"time/{name}_s"] = now - self._t0
    self._t0 = now


def centred_per_prompt(values: np.ndarray, group_size: int) -> np.ndarray:
  """Each prompt's ``group_size`` rollouts (consecutive rows) less their mean over the measured
  ones; unchanged for one rollout per prompt."""
  if group_size == 1:
    return values
  groups = values.reshape(-1, group_size)
  with warnings.catch_warnings():   # a prompt none of whose rollouts was measured stays NaN
    warnings.simplefilter("ignore", RuntimeWarning)
    return (groups - np.nanmean(groups, 1, keepdims=True)).reshape(-1)


def rank_correlations(advantage, physics) -> dict:
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
