"""AFD's pure step functions over split NNX state (``afd_method.md`` section 3).

Each builder closes over the static parts (graph definitions, optimizers, the method config)
and returns a pure function of arrays, ready for ``jax.jit`` with shardings and donation:

* ``disc_step``: one Bradley-Terry update of the discriminator on (teacher, student) pairs that
  share one noise-augmentation draw; returns the pre-update logits for the advantage;
* ``advantage``: paired scores -> normalised, clipped advantage -> optimality probability ``r``;
* ``student_step``: the DiffusionNFT loss on the student's own noised rollouts in the cached
  teacher-forcing layout (stop-gradient clean context), plus the velocity regulariser, gradients
  averaged over ``nft_passes`` noise levels, one AdamW step, and the evaluation EMA;
* ``update_old``: the old policy's soft update with DiffusionNFT's decay schedule.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from afd_jax import errors
from afd_jax import flow
from afd_jax import lora as lora_lib
from afd_jax import losses

DECAY_PRESETS = {0: (0, 0.0, 0.0), 1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}


@dataclasses.dataclass(frozen=True)
class AFDConfig:
  """Method hyperparameters (defaults: ``afd_method.md`` section 7)."""

  chunk_frames: int = 3
  rollout_timesteps: tuple[float, ...] = (1000.0, 937.5, 833.3333, 625.0)
  nft_passes: int = 4
  nft_levels: str = "rollout"      # "rollout": the student's own levels, permuted per chunk
  shift: float = 5.0               # for nft_levels="continuous"
  beta: float = 1.0
  a_max: float = 5.0
  adv_mode: str = "all"
  group_size: int = 1
  reg_weight: float = 1e-4
  disc_tau_max: float = 0.1
  disc_tau_min: float = 0.0        # > 0: the discriminator never sees a clean video
  shared_group_noise: bool = False  # a prompt's K pairs share one augmentation draw
  score_tau: float = -1.0          # >= 0: the advantage's logits at this one noise level, one
                                   # draw per prompt (-1: the training draw's own logits)
  disc_color_jitter: float = 0.0   # > 0: every video the discriminator sees gets its own RGB
                                   # gains exp(U[-a, a]) (pixel latents; teacher and student alike)
  r1_weight: float = 0.0
  r2_weight: float = 0.0
  penalty_sigma: float = 0.01
  ema_decay: float = 0.99
  ema_start: int = 200
  old_decay_type: int = 1
  student_steps: int = 1           # NFT optimizer steps per iteration on its rollouts
  negative_branch: bool = True     # False: reward-weighted flow matching (positive branch only)
  micro_batches: int = 1           # gradients accumulated over this many slices of the batch
  disc_loss: str = "bt"            # "bt": prompt-paired Bradley-Terry; "gan": unpaired logistic
  mismatch_weight: float = 0.0     # > 0: also rank each teacher video above the nearest other
                                   # prompt's, under its own prompt (matching-aware)
  dmd_sigma: tuple[float, float] = (0.02, 0.98)  # DMD: noise levels of the score comparison
  dmd_guidance: float = 1.0        # DMD: the real score's classifier-free guidance; 1 = none
  text_dropout: float = 0.0        # pretrain/sft: fraction of videos trained on the empty prompt

  def __post_init__(self):
    if self.nft_levels not in ("rollout", "continuous"):
      raise errors.UserError(f"nft_levels must be 'rollout' or 'continuous', got {self.nft_levels!r}.")
    if self.adv_mode not in losses.ADV_MODES:
      raise errors.UserError(f"adv_mode {self.adv_mode!r} not in {losses.ADV_MODES}.")
    if self.old_decay_type not in DECAY_PRESETS:
      raise errors.UserError(f"old_decay_type {self.old_decay_type} not in {sorted(DECAY_PRESETS)}.")
    if not self.beta > 0 or not self.a_max > 0:
      raise errors.UserError(f"beta ({self.beta}) and a_max ({self.a_max}) must be positive.")
    if self.disc_loss not in losses.DISC_LOSSES:
      raise errors.UserError(f"disc_loss {self.disc_loss!r} not in {losses.DISC_LOSSES}.")
    if not 0.0 <= self.disc_color_jitter < float("inf"):
      raise errors.UserError(f"disc_color_jitter must be a finite number >= 0, got "
                             f"{self.disc_color_jitter}.")
    if not (self.score_tau == -1.0 or 0.0 <= self.score_tau < 1.0):
      raise errors.UserError(f"score_tau must be -1 (off) or lie in [0, 1), got {self.score_tau}.")
    if not 0.0 <= self.disc_tau_min <= self.disc_tau_max <= 1.0:
      raise errors.UserError(f"discriminator noise levels need 0 <= disc_tau_min ({self.disc_tau_min}) "
                       f"<= disc_tau_max ({self.disc_tau_max}) <= 1.")
    if not self.mismatch_weight >= 0.0:
      raise errors.UserError(f"mismatch_weight must be >= 0, got {self.mismatch_weight}.")
    if self.micro_batches < 1 or self.student_steps < 1:
      raise errors.UserError(f"micro_batches ({self.micro_batches}) and student_steps "
                             f"({self.student_steps}) must be >= 1.")
    if not 0.0 <= self.text_dropout < 1.0 or not self.dmd_guidance > 0.0:
      raise errors.UserError(f"text_dropout ({self.text_dropout}) must lie in [0, 1) and "
                             f"dmd_guidance ({self.dmd_guidance}) must be positive.")
    if self.nft_levels == "rollout" and self.nft_passes > len(self.rollout_timesteps):
      raise errors.UserError(f"nft_passes={self.nft_passes} exceeds the {len(self.rollout_timesteps)} "
                       "rollout levels; lower it or use nft_levels='continuous'.")


def lr_schedule(lr: float, warmup_steps: int = 0, decay_steps: int = 0) -> optax.Schedule:
  """Linear warm-up from 0 to ``lr`` over ``warmup_steps``, then constant, or, with
  ``decay_steps`` > 0, a cosine decay to 0 at step ``decay_steps`` (pretraining)."""
  if decay_steps:
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, decay_steps)
  return (optax.linear_schedule(0.0, lr, warmup_steps) if warmup_steps
          else optax.constant_schedule(lr))


def adamw(lr, *, b1=0.0, b2=0.999, weight_decay=0.01, eps=1e-8, grad_clip=10.0, warmup_steps=0,
          decay_steps=0):
  """Global-norm clipping, then AdamW with a linear warm-up (Self-Forcing's full fine-tune)."""
  return optax.chain(optax.clip_by_global_norm(grad_clip),
                     optax.adamw(lr_schedule(lr, warmup_steps, decay_steps), b1=b1, b2=b2,
                                 eps=eps, weight_decay=weight_decay))


def noise_levels(cfg: AFDConfig, key, batch: int, frames: int, passes: int):
  """Per-frame sigmas ``[passes, B, F]`` for training passes, constant within each chunk: the
  rollout's own levels permuted per chunk, or continuous shifted levels (``cfg.nft_levels``)."""
  chunks = frames // cfg.chunk_frames
  if cfg.nft_levels == "rollout":
    levels = flow.timestep_to_sigma(jnp.asarray(cfg.rollout_timesteps, jnp.float32))
    sig = losses.permuted_levels(key, levels, batch, chunks, passes)
  else:
    sig = losses.continuous_levels(key, batch, chunks, passes, cfg.shift)
  return losses.chunk_to_frames(sig, cfg.chunk_frames)


def old_policy_eta(step, decay_type: int):
  """DiffusionNFT ``return_decay``: 0 until ``k_flat``, then ``min(u (k - k_flat), eta_max)``."""
  flat, u, eta_max = DECAY_PRESETS[decay_type]
  return jnp.where(step < flat, 0.0, jnp.minimum(u * (step - flat), eta_max))


def update_old(old_params, params, eta):
  """``theta_old <- eta theta_old + (1 - eta) theta``."""
  return jax.tree.map(lambda o, p: eta * o + (1.0 - eta) * p, old_params, params)


def split_micro(x, m: int):
  """``[B, ...] -> [m, B / m, ...]``; micro-batch j takes rows j, j + m, ..., so each device keeps
  working on the rows it holds when the batch is sharded in contiguous blocks."""
  return jnp.moveaxis(x.reshape(x.shape[0] // m, m, *x.shape[1:]), 1, 0)


def merge_micro(x):
  """The inverse of :func:`split_micro`."""
  return jnp.moveaxis(x, 0, 1).reshape(-1, *x.shape[2:])


def accumulate(fn, params, batch, m: int):
  """``fn(params, micro) -> (out, grads)`` over ``m`` micro-batches of ``batch`` (a tree of
  batch-first arrays), in a scan so only one micro-batch's activations are alive at a time.
  Returns the mean gradient and every ``out`` stacked ``[m, ...]``."""
  if m == 1:
    out, grads = fn(params, batch)
    return grads, jax.tree.map(lambda a: a[None], out)

  def body(total, micro):
    out, grads = fn(params, micro)
    return jax.tree.map(jnp.add, total, grads), out

  grads, outs = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, params),
                             jax.tree.map(lambda a: split_micro(a, m), batch))
  return jax.tree.map(lambda g: g / m, grads), outs


def merged(graphdef, spec: lora_lib.LoRA | None, frozen, params) -> nnx.Module:
  """The network of ``params``: all its parameters, or (with adapters ``spec``) an adapter set
  over the ``frozen`` base; ``params=None`` with adapters is the base itself."""
  return nnx.merge(graphdef, lora_lib.view(frozen, params, spec))


def color_gains(key, rows: int, amount: float):
  """``[rows, 2, 3]`` RGB gains ``exp(U[-amount, amount])``, one set per video of each pair
  (teacher, student): the discriminator's appearance augmentation (after ADA and DiffAugment).
  Drawn for teacher and student videos alike, they leave a small colour or brightness offset of
  the student unable to separate a pair on its own, so the discriminator has to find what else
  differs (the motion). The key is folded from the step's, so the noise draws do not change."""
  return jnp.exp(jax.random.uniform(jax.random.fold_in(key, 0xC010), (rows, 2, 3),
                                    minval=-amount, maxval=amount))


def apply_gains(x, gains):
  """Videos ``x`` ``[B, F, h, w, C]`` (pixel-encoder latents in [-1, 1], RGB the fastest channel
  axis) with their R, G and B scaled by ``gains [B, 3]`` in [0, 1] pixel space (black stays
  black)."""
  g = gains[:, np.arange(x.shape[-1]) % 3].reshape(x.shape[0], *(1,) * (x.ndim - 2), -1)
  return ((x + 1.0) * g.astype(x.dtype) - 1.0).astype(x.dtype)


def make_disc_step(graphdef, tx: optax.GradientTransformation, cfg: AFDConfig,
                   update: bool = True, lora: lora_lib.LoRA | None = None,
                   with_advantage: bool = False):
  """``(params, opt_state, x_teacher, x_student, context, key[, frozen]) -> (params, opt_state,
  out)``; ``frozen``: the trunk's base when ``params`` is an adapter set (``lora``).

  ``update=False`` only scores the pairs (a frozen discriminator after its warm-up): the step
  takes no optimizer state and returns only the outputs, not a copy of the discriminator.
  ``with_advantage``: ``out`` also holds AFD's ``r`` and ``advantage`` of the pre-update logits
  (and their statistics in ``metrics``), so scoring and advantage are one program.

  With ``cfg.score_tau`` >= 0 the returned logits (and the advantage) are the pre-update
  discriminator's at that one noise level, with one noise draw per prompt shared by its K pairs,
  instead of those of the training draw: a level and a draw of its own per rollout rank a
  prompt's rollouts mostly by the draw (``docs/results/what_limits_afd.md``, section 18).
  """

  def logits_fn(params, x, t, context, frozen):
    return merged(graphdef, lora, frozen, params)(x, t, context)

  def noised_pairs(x_teacher, x_student, context, eps, tau):
    """Both videos of each pair under its one noise draw and level, teacher rows first: the
    discriminator's input ``(x, t, context)``."""
    return (jnp.concatenate([flow.add_noise(x_teacher, eps, tau), flow.add_noise(x_student, eps, tau)]),
            jnp.concatenate([tau, tau]) * flow.NUM_TRAIN_TIMESTEPS,
            jnp.concatenate([context, context]))

  def loss_fn(params, micro, frozen):
    """One micro-batch; its noise and mismatched teacher videos are drawn for the whole batch
    beforehand (the same whatever the micro-batching)."""
    x_teacher, x_student, context, tau, eps, delta, x_mismatch = micro
    b = x_teacher.shape[0]
    x, t, ctx = noised_pairs(x_teacher, x_student, context, eps, tau)
    if cfg.mismatch_weight > 0:  # in the same call: another prompt's teacher video, this prompt
      logits = logits_fn(params, jnp.concatenate([x, flow.add_noise(x_mismatch, eps, tau)]),
                         jnp.concatenate([t, t[:b]]), jnp.concatenate([ctx, context]), frozen)
    else:
      logits = logits_fn(params, x, t, ctx, frozen)
    teacher, student = logits[:b], logits[b:2 * b]
    bt = losses.bt_loss(teacher, student)
    loss = losses.disc_loss(cfg.disc_loss, teacher, student)
    parts = {"disc/bt_loss": bt}
    if cfg.mismatch_weight > 0:   # paired under one prompt whatever disc_loss: BT
      parts["disc/mismatch_loss"] = losses.bt_loss(teacher, logits[2 * b:])
      parts["disc/mismatch_accuracy"] = losses.bt_accuracy(teacher, logits[2 * b:])
      loss = loss + cfg.mismatch_weight * parts["disc/mismatch_loss"]
    if cfg.r1_weight or cfg.r2_weight:
      perturbed = logits_fn(params, x + jnp.swapaxes(delta, 0, 1).reshape(x.shape), t, ctx,
                            frozen)
      r1 = losses.finite_difference_penalty(teacher, perturbed[:b], cfg.penalty_sigma)
      r2 = losses.finite_difference_penalty(student, perturbed[b:], cfg.penalty_sigma)
      loss = loss + cfg.r1_weight * r1 + cfg.r2_weight * r2
      parts.update({"disc/r1": r1, "disc/r2": r2})
    return loss, (teacher, student, parts)

  def fixed_level_logits(params, x_teacher, x_student, context, key, frozen):
    """``(teacher, student)`` logits at ``score_tau``, one noise draw per prompt's group."""
    b, g = x_teacher.shape[0], cfg.group_size
    eps = jnp.repeat(jax.random.normal(jax.random.fold_in(key, 0x5C0E),
                                       (b // g, *x_teacher.shape[1:]), x_teacher.dtype), g, axis=0)
    tau = jnp.full((b,), cfg.score_tau, jnp.float32)

    def scored(micro):
      logits = logits_fn(params, *noised_pairs(*micro), frozen)
      return logits[:micro[0].shape[0]], logits[micro[0].shape[0]:]

    m = cfg.micro_batches
    teacher, student = jax.lax.map(scored, jax.tree.map(
        lambda a: split_micro(a, m), (x_teacher, x_student, context, eps, tau)))
    return merge_micro(teacher), merge_micro(student)

  def step(params, opt_state, x_teacher, x_student, context, key, frozen=None):
    b = x_teacher.shape[0]
    fixed = (fixed_level_logits(params, x_teacher, x_student, context, key, frozen)
             if cfg.score_tau >= 0 else None)
    k_tau, k_eps, k_r = jax.random.split(key, 3)
    if cfg.disc_color_jitter:
      gains = color_gains(key, b, cfg.disc_color_jitter)
      x_teacher = apply_gains(x_teacher, gains[:, 0])
      x_student = apply_gains(x_student, gains[:, 1])
    g = cfg.group_size if cfg.shared_group_noise else 1   # rows sharing one draw
    tau = jnp.repeat(jax.random.uniform(k_tau, (b // g,), minval=cfg.disc_tau_min,
                                        maxval=cfg.disc_tau_max), g)
    eps = jnp.repeat(jax.random.normal(k_eps, (b // g, *x_teacher.shape[1:]), x_teacher.dtype), g,
                     axis=0)   # shared within a pair (and a prompt's group)
    delta = (cfg.penalty_sigma * jnp.swapaxes(
        jax.random.normal(k_r, (2, *x_teacher.shape), x_teacher.dtype), 0, 1)   # [B, 2, ...]
             if cfg.r1_weight or cfg.r2_weight else jnp.zeros((b, 0)))
    x_mismatch = (x_teacher[losses.mismatch_partners(context, cfg.group_size)]
                  if cfg.mismatch_weight > 0 else jnp.zeros((b, 0)))
    batch = (x_teacher, x_student, context, tau, eps, delta, x_mismatch)
    metrics = {}
    if update:
      grads, (loss, (teacher, student, parts)) = accumulate(
          jax.value_and_grad(lambda p, micro: loss_fn(p, micro, frozen), has_aux=True), params,
          batch, cfg.micro_batches)
      params, opt_state, _ = guarded_update(tx, grads, opt_state, params)
      metrics["disc/grad_norm"] = optax.tree.norm(grads)
    else:
      m = cfg.micro_batches
      loss, (teacher, student, parts) = jax.lax.map(
          lambda micro: loss_fn(params, micro, frozen),
          jax.tree.map(lambda a: split_micro(a, m), batch))
    teacher, student = merge_micro(teacher), merge_micro(student)
    loss, parts = jax.tree.map(jnp.mean, (loss, parts))
    metrics.update(parts, **{"disc/loss": loss,
                             "disc/accuracy": losses.bt_accuracy(teacher, student),
                             "disc/teacher_logit": jnp.mean(teacher),
                             "disc/student_logit": jnp.mean(student)})
    if fixed is not None:
      teacher, student = fixed
    out = {"teacher_logits": teacher, "student_logits": student, "metrics": metrics}
    if with_advantage:
      out["r"], out["advantage"], adv_metrics = advantage(teacher, student, cfg)
      metrics.update(adv_metrics)
    return (params, opt_state, out) if update else out

  if update:
    return step
  return lambda params, x_teacher, x_student, context, key, frozen=None: step(
      params, None, x_teacher, x_student, context, key, frozen)


def advantage(teacher_logits, student_logits, cfg: AFDConfig):
  """Pre-update logits -> ``(r, normalised advantage before clipping, metrics)``, each ``[B]``."""
  raw = losses.normalize_advantages(
      losses.paired_scores(teacher_logits, student_logits, cfg.group_size), cfg.group_size)
  adv = losses.shape_advantages(raw, cfg.a_max, cfg.adv_mode)
  r = losses.optimality_probability(adv, cfg.a_max)
  return r, raw, losses.advantage_stats(raw, adv, r, cfg.a_max)


def make_student_step(graphdef, tx: optax.GradientTransformation, cfg: AFDConfig,
                      lora: lora_lib.LoRA | None = None):
  """``(student, old_params, ref_params, x0, context, r, key, step[, frozen]) -> (student,
  metrics)``.

  ``student`` is ``{"params", "opt", "ema"}``; ``x0`` the clean rollouts ``[B, F, H, W, C]``.
  With adapters (``lora``) every parameter set is an adapter set over ``frozen``, and
  ``ref_params=None`` is the base (adapters off).
  """
  f = cfg.chunk_frames

  def context_of(params, x0, text):
    return jax.lax.stop_gradient(nnx.merge(graphdef, params).context_kv(x0, f, text))

  def velocity(params, x_t, t, ctx_kv, text):
    return nnx.merge(graphdef, params).forward_with_context(x_t, t, ctx_kv, f, text)

  def micro_grads(params, old_params, ref_params, micro, frozen):
    """Per-pass metrics and the pass-averaged gradient of one micro-batch."""
    x0, context, r, sig, eps = micro
    sig, eps = jnp.swapaxes(sig, 0, 1), jnp.swapaxes(eps, 0, 1)          # passes first again
    full = lambda p: lora_lib.view(frozen, p, lora)
    old_params, ref_params = full(old_params), full(ref_params)
    text_old = nnx.merge(graphdef, old_params).text_kv(context)
    text_ref = nnx.merge(graphdef, ref_params).text_kv(context)
    ctx_theta = context_of(full(params), x0, nnx.merge(graphdef, full(params)).text_kv(context))
    ctx_old = context_of(old_params, x0, text_old)
    ctx_ref = context_of(ref_params, x0, text_ref)

    def pass_loss(p, x_t, t, sigma, v_old, v_ref):
      p = full(p)
      v_theta = velocity(p, x_t, t, ctx_theta, nnx.merge(graphdef, p).text_kv(context))
      nft, parts = losses.nft_loss(v_theta, v_old, x_t, x0, sigma, r, beta=cfg.beta,
                                   a_max=cfg.a_max, chunk_frames=f,
                                   negative_branch=cfg.negative_branch)
      reg = losses.velocity_regularizer(v_theta, v_ref, cfg.reg_weight)
      parts.update({"reg/loss": reg, "monitor/old_deviate": jnp.mean(jnp.square(v_theta - v_old)),
                    "monitor/kl_div": jnp.mean(jnp.square(v_theta - v_ref)),
                    "monitor/old_kl_div": jnp.mean(jnp.square(v_old - v_ref))})
      return nft + reg, parts

    def one_pass(grads, inputs):
      sigma, noise = inputs
      x_t = flow.add_noise(x0, noise, sigma)
      t = sigma * flow.NUM_TRAIN_TIMESTEPS
      v_old = jax.lax.stop_gradient(velocity(old_params, x_t, t, ctx_old, text_old))
      v_ref = jax.lax.stop_gradient(velocity(ref_params, x_t, t, ctx_ref, text_ref))
      (loss, parts), g = jax.value_and_grad(pass_loss, has_aux=True)(params, x_t, t, sigma, v_old,
                                                                     v_ref)
      return jax.tree.map(jnp.add, grads, g), dict(parts, **{"student/loss": loss})

    grads, per_pass = jax.lax.scan(one_pass, jax.tree.map(jnp.zeros_like, params), (sig, eps))
    return per_pass, jax.tree.map(lambda g: g / cfg.nft_passes, grads)

  def step(student, old_params, ref_params, x0, context, r, key, step_index, frozen=None):
    k_lvl, k_eps = jax.random.split(key)
    sig = noise_levels(cfg, k_lvl, *x0.shape[:2], cfg.nft_passes)          # [J, B, F]
    eps = jax.random.normal(k_eps, (cfg.nft_passes, *x0.shape), x0.dtype)
    batch = (x0, context, r, jnp.swapaxes(sig, 0, 1), jnp.swapaxes(eps, 0, 1))  # batch first
    grads, per_pass = accumulate(
        lambda p, micro: micro_grads(p, old_params, ref_params, micro, frozen),
        student["params"], batch, cfg.micro_batches)
    student, metrics = _apply_update(student, grads, tx, cfg, step_index)
    metrics.update(jax.tree.map(jnp.mean, per_pass))
    return student, metrics

  return step


def guarded_update(tx, grads, opt, params):
  """``tx`` (behind ``optax.apply_if_finite``, which rejects non-finite gradients) applied, unless
  the *new parameters* are not finite (a NaN or infinite learning rate, an overflow): then the
  parameters and optimizer state stay as they were and the step counts as rejected, exactly like a
  non-finite gradient. Returns ``(params, opt, updates)``."""
  updates, new_opt = tx.update(grads, opt, params)
  new_params = optax.apply_updates(params, updates)
  finite = jnp.all(jnp.stack([jnp.isfinite(p).all() for p in jax.tree.leaves(new_params)]))
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_params, new_opt = keep(new_params, params), keep(new_opt, opt)
  if not isinstance(opt, optax.ApplyIfFiniteState):  # nothing counts rejections
    return new_params, new_opt, updates
  new_opt = new_opt._replace(
      notfinite_count=jnp.where(finite, new_opt.notfinite_count, opt.notfinite_count + 1),
      total_notfinite=jnp.where(finite, new_opt.total_notfinite, opt.total_notfinite + 1),
      last_finite=finite & new_opt.last_finite)
  return new_params, new_opt, updates


def _apply_update(student, grads, tx, cfg: AFDConfig, step_index, prefix: str = "student"):
  """One optimizer step on ``student["params"]`` and, when the state has one, the evaluation EMA
  (Self-Forcing: the EMA starts as a copy at ``ema_start`` and decays by ``ema_decay`` after)."""
  params, opt, updates = guarded_update(tx, grads, student["opt"], student["params"])
  out = {"params": params, "opt": opt}
  if "ema" in student:
    decay = jnp.where(step_index < cfg.ema_start, 0.0, cfg.ema_decay)
    out["ema"] = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, student["ema"], params)
  metrics = {f"{prefix}/grad_norm": optax.tree.norm(grads),
             f"{prefix}/update_norm": optax.tree.norm(updates),
             f"{prefix}/param_norm": optax.tree.norm(params)}
  return out, metrics


def exit_sigma(cfg: AFDConfig, exit_step):
  """The noise level of rollout step ``exit_step`` (may be traced)."""
  levels = flow.timestep_to_sigma(jnp.asarray(cfg.rollout_timesteps, jnp.float32))
  return jnp.take(levels, exit_step)


def exit_estimate(graphdef, cfg: AFDConfig, params, inputs, exit_step, clean, context):
  """The training rollout's output recomputed with gradient through its exit step only.

  ``inputs`` are every chunk's model inputs at ``exit_step`` and ``clean`` the rollout's output
  (both from ``rollout.make_rollout(exit_inputs=True)``, no gradient). Each chunk's clean estimate
  ``x - sigma v(x)`` is evaluated against the clean history of earlier chunks, stop-gradient, as
  the rollout's cache held it: Self-Forcing's generator backward, which never flows through the
  cache or the earlier denoising steps."""
  f = cfg.chunk_frames
  model = nnx.merge(graphdef, params)
  text = model.text_kv(context)
  history = jax.lax.stop_gradient(model.context_kv(jax.lax.stop_gradient(clean), f, text))
  sigma = jnp.full(inputs.shape[:2], exit_sigma(cfg, exit_step))
  v = model.forward_with_context(jax.lax.stop_gradient(inputs),
                                 sigma * flow.NUM_TRAIN_TIMESTEPS, history, f, text)
  return flow.x0_from_velocity(jax.lax.stop_gradient(inputs), v, sigma)


def make_gan_step(graphdef, disc_graph, tx: optax.GradientTransformation, cfg: AFDConfig,
                  lora: lora_lib.LoRA | None = None, disc_lora: lora_lib.LoRA | None = None):
  """``(student, disc_params, inputs, clean, x_teacher, context, exit_step, key, step[, frozen,
  disc_frozen]) -> (student, metrics)``: direct adversarial imitation. The student's loss is the
  relativistic score of its own rollout against its prompt's teacher video, ``softplus(D(x_T) - D(x_S))``,
  backpropagated through the discriminator into the exit step of every chunk
  (:func:`exit_estimate`). Both videos share the discriminator step's kind of noise
  augmentation."""

  def loss_fn(params, disc_params, micro, exit_step, frozen, disc_frozen):
    inputs, clean, x_teacher, context, tau, eps, gains = micro
    x0 = exit_estimate(graphdef, cfg, lora_lib.view(frozen, params, lora), inputs, exit_step,
                       clean, context)
    if cfg.disc_color_jitter:
      x_teacher, x0 = apply_gains(x_teacher, gains[:, 0]), apply_gains(x0, gains[:, 1])
    disc = merged(disc_graph, disc_lora, disc_frozen, disc_params)
    t = tau * flow.NUM_TRAIN_TIMESTEPS
    student = disc(flow.add_noise(x0, eps, tau), t, context)
    teacher = jax.lax.stop_gradient(disc(flow.add_noise(x_teacher, eps, tau), t, context))
    return losses.relativistic_generator_loss(teacher, student)

  def step(student, disc_params, inputs, clean, x_teacher, context, exit_step, key, step_index,
           frozen=None, disc_frozen=None):
    k_tau, k_eps = jax.random.split(key)
    tau = jax.random.uniform(k_tau, (clean.shape[0],), minval=cfg.disc_tau_min,
                             maxval=cfg.disc_tau_max)
    eps = jax.random.normal(k_eps, clean.shape, clean.dtype)
    gains = (color_gains(key, clean.shape[0], cfg.disc_color_jitter) if cfg.disc_color_jitter
             else jnp.zeros((clean.shape[0], 0)))
    grads, loss = accumulate(
        jax.value_and_grad(lambda p, m: loss_fn(p, disc_params, m, exit_step, frozen,
                                                disc_frozen)), student["params"],
        (inputs, clean, x_teacher, context, tau, eps, gains), cfg.micro_batches)
    student, metrics = _apply_update(student, grads, tx, cfg, step_index)
    metrics["gan/generator_loss"] = jnp.mean(loss)
    return student, metrics

  return step


def make_dmd_step(graphdef, tx: optax.GradientTransformation, cfg: AFDConfig,
                  lora: lora_lib.LoRA | None = None):
  """``(student, fake_params, real_params, inputs, clean, context, exit_step, key, step[,
  frozen]) -> (student, metrics)``: Self-Forcing's distribution matching distillation of a few-step
  student from a score model (here: a plain flow-matching base, ``real_params``). The student's exit-step
  output (:func:`exit_estimate`) is noised to a random level; the real and fake (critic) scores'
  clean estimates there give the gradient ``(x_fake - x_real) / mean|x - x_real|`` of the reverse
  KL, applied as ``0.5 (x - sg(x - grad))^2``. Scores see the student's clean video as history.
  With ``dmd_guidance`` g != 1 the real score is classifier-free guided, as Self-Forcing's is
  (g = 3): ``x_u + g (x_c - x_u)``, ``x_u`` under the empty prompt (zero context), which the score
  model must have learnt (``text_dropout`` when it was pretrained); the fake score is unguided."""
  f = cfg.chunk_frames

  def estimate(params, x_t, sigma, clean, context):
    model = nnx.merge(graphdef, params)
    text = model.text_kv(context)
    v = model.forward_with_context(x_t, sigma * flow.NUM_TRAIN_TIMESTEPS,
                                   model.context_kv(clean, f, text), f, text)
    return jax.lax.stop_gradient(flow.x0_from_velocity(x_t, v, sigma))

  def loss_fn(params, fake_params, real_params, micro, exit_step, frozen):
    inputs, clean, context, sigma, eps = micro
    full = lambda p: lora_lib.view(frozen, p, lora)
    x0 = exit_estimate(graphdef, cfg, full(params), inputs, exit_step, clean, context)
    fake_params, real_params = full(fake_params), full(real_params)
    sample = jax.lax.stop_gradient(x0)
    x_t = flow.add_noise(sample, eps, sigma)
    real = estimate(real_params, x_t, sigma, sample, context)
    if cfg.dmd_guidance != 1.0:
      unconditional = estimate(real_params, x_t, sigma, sample, jnp.zeros_like(context))
      real = unconditional + cfg.dmd_guidance * (real - unconditional)
    fake = estimate(fake_params, x_t, sigma, sample, context)
    scale = jnp.maximum(jnp.mean(jnp.abs(sample - real), axis=(1, 2, 3, 4), keepdims=True), 1e-6)
    grad = (fake - real) / scale
    loss = 0.5 * jnp.mean(jnp.square(x0 - jax.lax.stop_gradient(x0 - grad)))
    return loss, jnp.mean(jnp.abs(grad))

  def step(student, fake_params, real_params, inputs, clean, context, exit_step, key,
           step_index, frozen=None):
    k_sig, k_eps = jax.random.split(key)
    lo, hi = cfg.dmd_sigma
    sigma = flow.shift_sigma(jax.random.uniform(k_sig, (clean.shape[0], 1), minval=lo, maxval=hi),
                             cfg.shift)
    sigma = jnp.broadcast_to(sigma, clean.shape[:2])           # one level per video
    eps = jax.random.normal(k_eps, clean.shape, clean.dtype)
    grads, (loss, grad_size) = accumulate(
        jax.value_and_grad(lambda p, m: loss_fn(p, fake_params, real_params, m, exit_step,
                                                frozen),
                           has_aux=True),
        student["params"], (inputs, clean, context, sigma, eps), cfg.micro_batches)
    student, metrics = _apply_update(student, grads, tx, cfg, step_index)
    metrics.update({"dmd/loss": jnp.mean(loss), "dmd/gradient": jnp.mean(grad_size)})
    return student, metrics

  return step


def make_fm_step(graphdef, tx: optax.GradientTransformation, cfg: AFDConfig,
                 critic: bool = False, lora: lora_lib.LoRA | None = None):
  """``(student, x0, context, key, step[, frozen]) -> (student, metrics)``: plain flow matching on
  clean videos (teacher videos for ``sft``, data for ``pretrain``). Each chunk is noised at its own
  level and sees the clean video as history (the cached teacher-forcing layout). ``critic``:
  the DMD fake score on the student's samples, at the levels the DMD loss compares scores
  (``dmd_sigma``), its metrics under ``critic/``. ``text_dropout``: that fraction of the videos
  (a fresh draw each step) is trained under the empty prompt (zero context), as text-to-video
  models are, so the model also learns the unconditional score classifier-free guidance needs."""
  f = cfg.chunk_frames

  def loss_fn(p, micro, frozen):
    x0, context, sig, eps = micro
    x_t = flow.add_noise(x0, eps, sig)
    model = merged(graphdef, lora, frozen, p)
    text = model.text_kv(context)
    ctx = jax.lax.stop_gradient(model.context_kv(x0, f, text))
    v = model.forward_with_context(x_t, sig * flow.NUM_TRAIN_TIMESTEPS, ctx, f, text)
    return jnp.mean(jnp.square(v - flow.velocity_target(x0, eps)))

  def step(student, x0, context, key, step_index, frozen=None):
    k_lvl, k_eps = jax.random.split(key)
    if critic:
      lo, hi = cfg.dmd_sigma
      sig = losses.chunk_to_frames(flow.shift_sigma(jax.random.uniform(
          k_lvl, (x0.shape[0], x0.shape[1] // f), minval=lo, maxval=hi), cfg.shift), f)
    else:
      sig = noise_levels(cfg, k_lvl, *x0.shape[:2], 1)[0]                  # [B, F]
    eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
    if cfg.text_dropout and not critic:  # its own key: runs without dropout keep their draws
      dropped = jax.random.bernoulli(jax.random.fold_in(key, 1), cfg.text_dropout, x0.shape[:1])
      context = jnp.where(dropped[:, None, None], 0.0, context).astype(context.dtype)
    grads, loss = accumulate(jax.value_and_grad(lambda p, m: loss_fn(p, m, frozen)),
                             student["params"],
                             (x0, context, sig, eps), cfg.micro_batches)
    prefix = "critic" if critic else "student"
    student, metrics = _apply_update(student, grads, tx, cfg, step_index, prefix)
    metrics[f"{prefix}/fm_loss" if critic else "fm/loss"] = jnp.mean(loss)
    return student, metrics

  return step
