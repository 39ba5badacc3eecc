"""Which prompt words does a network read? Its outputs with one physics word of the prompt changed
(``python -m afd_jax.tools.word_sensitivity`` prints the table for a checkpoint).

A word the model ignores changes nothing; a discriminator built on such a trunk starts blind to
it, and a student that ignores it cannot follow it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from afd_jax import encoders, flow, teachers
from afd_jax.eval import disc_probe
from afd_jax.models import wan
from afd_jax.teachers import physics

WORDS = ("gravity", "bounciness", "direction", "color")


def measure(model: wan.WanModel, config, prompts: list[str], timesteps: list[float],
            seed: int = 0) -> dict[str, dict[str, float]]:
  """``{word: {"t=<level>": velocity change, "features": last block's change}}``, changes
  relative to the outputs under the true prompts, over all ``(prompt, other word)`` pairs."""
  world = teachers.physics_world(config, true_world=True)
  encoder = encoders.from_config(config.data)
  text = physics.TextEncoder(model.config.text_dim, config.data.text_length)
  chunk, last = config.rollout.chunk_frames, model.config.num_layers - 1
  x0 = np.stack([encoder.encode(world.render(p, seed)) for p in prompts])
  noise = np.asarray(jax.random.normal(jax.random.key(seed), x0.shape))

  @jax.jit
  def outputs(x0, noise, context):
    b = x0.shape[0]
    out = {"features": model.features(x0, jnp.zeros((b,)), context, (last,))[0]}
    for t in timesteps:
      x_t = flow.add_noise(x0, noise, flow.timestep_to_sigma(t))
      out[f"t={t:g}"] = model(x_t, jnp.full((b,), t), context, "block_causal", chunk)
    return out

  table, references = {}, {}   # true-prompt outputs per row layout: words with one layout share
  for word in WORDS:
    pairs = [(i, other) for i, p in enumerate(prompts)
             for other in disc_probe.other_words(p, word)]
    rows = np.array([i for i, _ in pairs])
    if tuple(rows) not in references:   # same batch shape as the changed prompts': exact zeros
      references[tuple(rows)] = outputs(x0[rows], noise[rows], text([prompts[i] for i in rows]))
    reference = references[tuple(rows)]
    changed = outputs(x0[rows], noise[rows], text([other for _, other in pairs]))
    table[word] = {k: float(jnp.linalg.norm(changed[k] - reference[k])
                            / jnp.linalg.norm(reference[k]))
                   for k in ["features", *(f"t={t:g}" for t in timesteps)]}
  return table
