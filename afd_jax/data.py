"""Prompts and a deterministic, resumable data order.

The batch of step ``k`` depends only on ``(seed, k)``: a fresh permutation of the prompt pool per
epoch, read sequentially, so a run resumed from a checkpoint at step k sees exactly the prompts
an uninterrupted run would. Each host takes its own slice of the global batch.
"""

from __future__ import annotations

import jax
import numpy as np


class PromptPool:
  """Prompt ids with their text embeddings ``[N, L, text_dim]``.

  ``random`` builds a reproducible pool of Gaussian embeddings (tiny configs, random students);
  real pools load precomputed umT5 embeddings with the teacher stores.
  """

  def __init__(self, embeddings: np.ndarray):
    self.embeddings = np.asarray(embeddings, np.float32)

  @classmethod
  def random(cls, num_prompts: int, length: int, dim: int, seed: int = 0) -> "PromptPool":
    return cls(np.random.default_rng([seed, 7]).standard_normal((num_prompts, length, dim)))

  def __len__(self):
    return self.embeddings.shape[0]


def batch_ids(step: int, batch_size: int, pool_size: int, seed: int) -> np.ndarray:
  """Global prompt ids of step ``step``."""
  positions = step * batch_size + np.arange(batch_size)
  epochs, offsets = np.divmod(positions, pool_size)
  out = np.empty(batch_size, np.int64)
  for epoch in np.unique(epochs):
    perm = np.random.default_rng([seed, int(epoch)]).permutation(pool_size)
    out[epochs == epoch] = perm[offsets[epochs == epoch]]
  return out


def host_slice(global_ids: np.ndarray) -> np.ndarray:
  """This process's contiguous share of a global batch."""
  n = jax.process_count()
  if len(global_ids) % n:
    raise ValueError(f"global batch {len(global_ids)} is not divisible by {n} processes.")
  per = len(global_ids) // n
  return global_ids[jax.process_index() * per:(jax.process_index() + 1) * per]
