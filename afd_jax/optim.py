"""The optimizers: AdamW behind a non-finite guard for the student (and DMD's critic), and the
discriminator's two parameter groups with frozen trunk blocks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from afd_jax import steps

def optimizer(o, max_nonfinite: int):
  """AdamW behind ``apply_if_finite``: a non-finite gradient leaves the parameters unchanged."""
  inner = steps.adamw(o.lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, eps=o.eps,
                      grad_clip=o.grad_clip, warmup_steps=o.warmup_steps,
                      decay_steps=o.decay_steps)
  return optax.apply_if_finite(inner, max_consecutive_errors=max_nonfinite + 1)


def disc_optimizer(o, freeze_below: int, max_nonfinite: int, lora: bool = False):
  """Self-Forcing's two parameter groups: the trunk at ``lr``, readouts and head at
  ``lr * head_lr_multiplier``, one global-norm clip over both. Frozen trunk blocks (and the patch
  embedding below them), and the trunk's unused output head, get no update at all, weight decay
  included. ``lora``: the parameters are an adapter set (``lora.py``): the trunk's adapters form
  the first group, the fully trained readouts and head the second."""
  def adamw(lr):
    return optax.adamw(steps.lr_schedule(lr, o.warmup_steps, o.decay_steps), b1=o.b1, b2=o.b2, eps=o.eps,
                       weight_decay=o.weight_decay)

  trunk = "adapters" if lora else "trunk"
  labels = lambda params: {k: jax.tree.map(lambda _: "trunk" if k == trunk else "readout", v)
                           for k, v in params.items()}

  def freeze(updates, state, params=None):
    del params
    if lora:
      return updates, state

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
