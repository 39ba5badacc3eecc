"""AFD's objectives as pure functions (``shared/reference/afd_method.md`` sections 3-5).

* Prompt-paired Bradley-Terry discriminator loss, accuracy and finite-difference R1/R2 penalties.
* The on-policy advantage: paired score ``s = D(x_S) - D(x_T)``, normalised (batch or per-prompt
  mean, population std over the whole global batch), clipped to ``+-A_max``, an optional advantage
  mode, and the optimality probability ``r = 0.5 + A / (2 A_max)``.
* The DiffusionNFT forward-process loss with implicit positive/negative velocities, adaptive
  per-(sample, chunk) weights and the ``A_max / beta`` scale; the velocity regulariser.
* NFT noise-level sampling: the student's own rollout levels, permuted per chunk, or continuous
  shifted levels.

Reductions are plain ``jnp`` reductions over global (sharded) arrays, so under ``jax.jit`` with
sharded inputs every statistic covers all devices and hosts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from afd_jax import flow

ADV_MODES = ("all", "positive_only", "negative_only", "one_only", "binary")
DISC_LOSSES = ("bt", "gan")
WEIGHT_FLOOR = 1e-5
STD_EPS = 1e-4


# ----------------------------------------------------------------------------------------------
# Discriminator.


def bt_loss(teacher_logits, student_logits):
  """``mean(-log sigmoid(D(x_T) - D(x_S)))`` over prompt pairs (the relativistic / BT loss)."""
  return jnp.mean(jax.nn.softplus(-(teacher_logits - student_logits)))


def unpaired_gan_loss(teacher_logits, student_logits):
  """The plain (non-saturating) GAN discriminator loss, ``softplus(-D(x_T)) + softplus(D(x_S))``:
  each sample judged on its own, not against its prompt's pair (the BT ablation)."""
  return jnp.mean(jax.nn.softplus(-teacher_logits)) + jnp.mean(jax.nn.softplus(student_logits))


def disc_loss(kind: str, teacher_logits, student_logits):
  """``kind`` in ``DISC_LOSSES``."""
  if kind == "gan":
    return unpaired_gan_loss(teacher_logits, student_logits)
  return bt_loss(teacher_logits, student_logits)


def relativistic_generator_loss(teacher_logits, student_logits):
  """The generator's side of the relativistic pair loss, ``mean(softplus(D(x_T) - D(x_S)))``:
  direct adversarial imitation (Self-Forcing's GAN variant)."""
  return jnp.mean(jax.nn.softplus(teacher_logits - student_logits))


def bt_accuracy(teacher_logits, student_logits):
  """Fraction of pairs the discriminator ranks correctly (teacher above student)."""
  return jnp.mean((teacher_logits > student_logits).astype(jnp.float32))


def mismatch_partners(context, group_size: int = 1):
  """For every row, the row holding the same teacher draw of the batch's most similar *other*
  prompt (cosine of the mean-pooled text embeddings ``context [P * K, L, D]``, prompt-major).

  Its teacher video, judged under this row's prompt, is a real video that fits the prompt less:
  the matching-aware discriminator's negative (Reed et al. 2016). The nearest prompt shares the
  most words the batch allows, so the pair differs in as few of them as it can."""
  b = context.shape[0]
  if b % group_size or b // group_size < 2:
    raise ValueError(f"{b} rows are not >= 2 prompts of {group_size} rollouts each.")
  pooled = jnp.mean(context.reshape(b // group_size, group_size, -1, context.shape[-1])[:, 0],
                    axis=1).astype(jnp.float32)
  unit = pooled / (jnp.linalg.norm(pooled, axis=-1, keepdims=True) + 1e-6)
  similarity = unit @ unit.T
  similarity = jnp.where(jnp.eye(similarity.shape[0], dtype=bool), -jnp.inf, similarity)
  nearest = jnp.argmax(similarity, axis=-1)
  return (nearest[:, None] * group_size + jnp.arange(group_size)[None]).reshape(b)


def finite_difference_penalty(logits, perturbed_logits, sigma: float):
  """Approximate R1 (teacher inputs) / R2 (student inputs): ``mean(((D(x + d) - D(x)) / s)^2)``
  with ``d ~ N(0, s^2 I)``; the caller evaluates D on the perturbed inputs."""
  return jnp.mean(jnp.square((perturbed_logits - logits) / sigma))


# ----------------------------------------------------------------------------------------------
# Advantage.


def paired_scores(teacher_logits, student_logits, group_size: int = 1):
  """``s = D(x_S, c) - D(x_T, c)``, one per rollout (``[B]``, or ``[B, C]`` with one logit per chunk
  prefix). With ``group_size`` K > 1 rollouts per prompt both are laid out prompt-major
  ``[P * K]`` (rollout k paired with the prompt's k-th teacher draw), and every rollout is
  measured against the mean teacher logit of its prompt: one baseline per prompt, which
  per-prompt centring then removes exactly."""
  if group_size == 1:
    return student_logits - teacher_logits
  teacher = jnp.mean(teacher_logits.reshape(-1, group_size, *teacher_logits.shape[1:]), axis=1)
  return student_logits - jnp.repeat(teacher, group_size, axis=0)


def normalize_advantages(scores, group_size: int = 1):
  """Batch mean (K = 1) or per-prompt mean (K > 1), divided by the population std of all scores.
  Per-chunk scores ``[B, C]`` are normalised chunk by chunk, each column as a video's would be.

  Matches DiffusionNFT's ``PerPromptStatTracker(global_std=True)``.
  """
  if scores.shape[0] % group_size:
    raise ValueError(f"{scores.shape[0]} scores are not a whole number of groups of {group_size}.")
  std = jnp.std(scores, axis=0)
  grouped = scores.reshape(-1, group_size, *scores.shape[1:])
  centred = grouped - (jnp.mean(scores, axis=0) if group_size == 1
                       else grouped.mean(1, keepdims=True))
  return centred.reshape(scores.shape) / (std + STD_EPS)


def shape_advantages(adv, a_max: float, mode: str = "all"):
  """Clip to ``+-A_max``, then apply DiffusionNFT's advantage mode."""
  if mode not in ADV_MODES:
    raise ValueError(f"unknown adv_mode {mode!r}; choose one of {ADV_MODES}.")
  adv = jnp.clip(adv, -a_max, a_max)
  if mode == "positive_only":
    return jnp.clip(adv, 0.0, a_max)
  if mode == "negative_only":
    return jnp.clip(adv, -a_max, 0.0)
  if mode == "one_only":
    return (adv > 0).astype(adv.dtype)
  if mode == "binary":
    return jnp.sign(adv)
  return adv


def optimality_probability(adv, a_max: float):
  """``r = clip(0.5 + A / (2 A_max), 0, 1)``: the probability that a sample is teacher-like."""
  return jnp.clip(0.5 + adv / (2.0 * a_max), 0.0, 1.0)


def advantage_stats(raw, adv, r, a_max: float) -> dict:
  return {"adv/raw_mean": jnp.mean(raw), "adv/raw_std": jnp.std(raw),
          "adv/mean": jnp.mean(adv), "adv/std": jnp.std(adv), "adv/abs_mean": jnp.mean(jnp.abs(adv)),
          "adv/clipped_frac": jnp.mean((jnp.abs(raw) >= a_max).astype(jnp.float32)),
          "r/mean": jnp.mean(r), "r/min": jnp.min(r), "r/max": jnp.max(r),
          "r/saturated_frac": jnp.mean(((r <= 0) | (r >= 1)).astype(jnp.float32))}


# ----------------------------------------------------------------------------------------------
# NFT loss.


def _per_chunk(x, chunk_frames: int):
  """``[B, F, H, W, C]`` -> ``[B, F / f, f * H * W * C]``: one row per (sample, chunk) group."""
  b, f = x.shape[:2]
  return x.reshape(b, f // chunk_frames, -1)


def nft_loss(v_theta, v_old, x_t, x0, sigma, r, *, beta: float, a_max: float, chunk_frames: int,
             negative_branch: bool = True):
  """DiffusionNFT's policy loss on the student's own noised samples.

  ``v_theta`` (with gradient), ``v_old`` (old policy), ``x_t``, ``x0`` (the clean rollout sample):
  ``[B, F, H, W, C]``; ``sigma``: per frame ``[B, F]`` (constant within a chunk); ``r``: ``[B]``,
  or ``[B, F / chunk_frames]`` (one per chunk, from a per-chunk discriminator).
  ``negative_branch=False`` drops the ``(1 - r)`` term: reward-weighted flow matching toward the
  student's own samples (the ablation "positive-only updates"). Returns the scalar loss and parts.
  """
  v_old = jax.lax.stop_gradient(v_old)
  v_pos = beta * v_theta + (1.0 - beta) * v_old
  v_neg = (1.0 + beta) * v_old - beta * v_theta
  err_pos = _per_chunk(flow.x0_from_velocity(x_t, v_pos, sigma) - x0, chunk_frames)
  err_neg = _per_chunk(flow.x0_from_velocity(x_t, v_neg, sigma) - x0, chunk_frames)
  w_pos = jax.lax.stop_gradient(jnp.maximum(jnp.mean(jnp.abs(err_pos), -1), WEIGHT_FLOOR))
  w_neg = jax.lax.stop_gradient(jnp.maximum(jnp.mean(jnp.abs(err_neg), -1), WEIGHT_FLOOR))
  loss_pos = jnp.mean(jnp.square(err_pos), -1) / w_pos
  loss_neg = jnp.mean(jnp.square(err_neg), -1) / w_neg
  r = r if r.ndim == 2 else r[:, None]
  per_group = a_max * (r * loss_pos + ((1.0 - r) * loss_neg if negative_branch else 0.0)) / beta
  return jnp.mean(per_group), {"nft/loss": jnp.mean(per_group), "nft/positive": jnp.mean(loss_pos),
                               "nft/negative": jnp.mean(loss_neg)}


def velocity_regularizer(v_theta, v_ref, weight: float):
  """``weight * mean((v_theta - v_ref)^2)``: keeps the student near its starting point."""
  return weight * jnp.mean(jnp.square(v_theta - jax.lax.stop_gradient(v_ref)))


# ----------------------------------------------------------------------------------------------
# Noise levels for the NFT passes.


def permuted_levels(key, levels, batch: int, chunks: int, passes: int):
  """``[passes, B, chunks]`` sigmas: per (sample, chunk) a random permutation of ``levels``, so
  with ``passes == len(levels)`` every chunk sees every level once, in random order."""
  levels = jnp.asarray(levels, jnp.float32)
  if passes > levels.shape[0]:
    raise ValueError(f"{passes} NFT passes but only {levels.shape[0]} noise levels to permute.")
  keys = jax.random.split(key, batch * chunks)
  perms = jax.vmap(lambda k: jax.random.permutation(k, levels))(keys)
  return perms.reshape(batch, chunks, -1)[..., :passes].transpose(2, 0, 1)


def continuous_levels(key, batch: int, chunks: int, passes: int, shift: float,
                      low: float = 0.02, high: float = 0.98):
  """``[passes, B, chunks]`` sigmas ``shift_sigma(U(low, high))``."""
  u = jax.random.uniform(key, (passes, batch, chunks), minval=low, maxval=high)
  return flow.shift_sigma(u, shift)


def chunk_to_frames(sigma_chunks, chunk_frames: int):
  """``[..., B, chunks]`` -> ``[..., B, chunks * chunk_frames]`` (constant within each chunk)."""
  return jnp.repeat(sigma_chunks, chunk_frames, axis=-1)
