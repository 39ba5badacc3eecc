"""Prompts, teacher latents and a deterministic, resumable data order.

The batch of step ``k`` depends only on ``(seed, k)``: a fresh permutation of the training prompts
per epoch, read sequentially, so a run resumed from a checkpoint at step k sees exactly the
prompts an uninterrupted run would. Each host takes its own slice of the global batch and reads
only those prompts' teacher samples. Which of a prompt's teacher samples a step sees is also a
function of ``(seed, step, prompt)``, so a fixed teacher-sample budget (``teacher_samples`` per
prompt) is honoured exactly and reproducibly.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import numpy as np

from afd_jax import encoders as encoders_lib
from afd_jax import errors


class PromptPool:
  """Prompts with their text embeddings ``[N, L, text_dim]``; the last ``num_eval`` are held out
  from training (evaluation prompts).

  ``random`` builds a reproducible pool of Gaussian embeddings (tiny configs, random students).
  """

  def __init__(self, embeddings: np.ndarray, prompts: Sequence[str] | None = None,
               num_eval: int = 0):
    # A store's embeddings stay on disk until indexed (umT5 contexts are 8 MB a prompt).
    self.embeddings = (np.asarray(embeddings, np.float32)
                       if isinstance(embeddings, (np.ndarray, list)) else embeddings)
    self.prompts = list(prompts) if prompts is not None else [f"prompt {i}"
                                                              for i in range(len(embeddings))]
    if len(self.prompts) != len(self.embeddings):
      raise errors.UserError(f"{len(self.prompts)} prompts but {len(self.embeddings)} embeddings.")
    if not 0 <= num_eval < len(self.prompts):
      raise errors.UserError(f"num_eval={num_eval} held-out prompts leave none of the "
                       f"{len(self.prompts)} prompts for training.")
    self.num_eval = num_eval

  @classmethod
  def random(cls, num_prompts: int, length: int, dim: int, seed: int = 0,
             num_eval: int = 0) -> "PromptPool":
    emb = np.random.default_rng([seed, 7]).standard_normal((num_prompts + num_eval, length, dim))
    return cls(emb, num_eval=num_eval)

  def __len__(self):
    return self.embeddings.shape[0]

  @property
  def num_train(self) -> int:
    return len(self) - self.num_eval

  def eval_ids(self, n: int | None = None) -> np.ndarray:
    """The held-out prompts (or, without any, the last ``n`` prompts)."""
    n = n or self.num_eval
    return np.arange(len(self) - n, len(self))


def batch_ids(step: int, batch_size: int, pool_size: int, seed: int) -> np.ndarray:
  """Global prompt ids of step ``step``."""
  positions = step * batch_size + np.arange(batch_size)
  epochs, offsets = np.divmod(positions, pool_size)
  out = np.empty(batch_size, np.int64)
  for epoch in np.unique(epochs):
    perm = np.random.default_rng([seed, int(epoch)]).permutation(pool_size)
    out[epochs == epoch] = perm[offsets[epochs == epoch]]
  return out


def host_slice(global_ids: np.ndarray, process_index: int | None = None,
               process_count: int | None = None) -> np.ndarray:
  """This process's contiguous share of a global batch (another process's, given its index)."""
  index = jax.process_index() if process_index is None else process_index
  n = jax.process_count() if process_count is None else process_count
  global_ids = np.asarray(global_ids)
  if len(global_ids) % n:
    raise errors.UserError(f"global batch {len(global_ids)} is not divisible by {n} processes.")
  per = len(global_ids) // n
  return global_ids[index * per:(index + 1) * per]


DRAW_STRIDE = 10**9  # unbounded budgets: draw k of step s is teacher video s + k * DRAW_STRIDE


def teacher_sample(seed: int, step: int, prompt_id: int, samples_per_prompt: int,
                   draw: int = 0) -> int:
  """Which teacher sample of ``prompt_id`` step ``step`` uses for its ``draw``-th rollout of the
  prompt (K rollouts per prompt: draws 0..K-1, each paired with its own pick): one of
  ``samples_per_prompt`` (a fixed budget), or a new one every step and draw when it is 0."""
  if samples_per_prompt <= 0:
    return int(step) + DRAW_STRIDE * int(draw)
  key = [seed, step, prompt_id] + ([draw] if draw else [])
  return int(np.random.default_rng(key).integers(samples_per_prompt))


class EncodedTeacher:
  """A black-box video teacher (prompts and a seed in, uint8 videos out) seen through a latent
  encoder. Encoded samples are cached in memory: each (prompt, sample) is rendered once."""

  def __init__(self, teacher, prompts: Sequence[str], encoder: encoders_lib.LatentEncoder,
               samples_per_prompt: int, seed: int):
    self.teacher, self.prompts, self.encoder = teacher, list(prompts), encoder
    self.samples_per_prompt, self.seed = samples_per_prompt, seed
    self._cache: dict[tuple[int, int], np.ndarray] = {}

  def videos(self, ids, sample: int) -> np.ndarray:
    """uint8 ``[B, T, H, W, 3]`` teacher videos of one sample index."""
    return np.asarray(self.teacher([self.prompts[i] for i in ids], sample))

  def latents(self, ids, step: int, draw: int = 0) -> np.ndarray:
    keys = [(int(i), teacher_sample(self.seed, step, int(i), self.samples_per_prompt, draw))
            for i in ids]
    missing = sorted({k for k in keys if k not in self._cache}, key=lambda k: (k[1], k[0]))
    for sample in sorted({s for _, s in missing}):
      group = [i for i, s in missing if s == sample]
      for i, video in zip(group, self.videos(group, sample)):
        self._cache[(i, sample)] = self.encoder.encode(video)
    out = np.stack([self._cache[k] for k in keys])
    if self.samples_per_prompt <= 0:  # unbounded: keep only what this step used
      self._cache.clear()
    return out


_END = object()


STOPPED = object()  # Prefetcher.get's answer when asked to stop while waiting


class Prefetcher:
  """Runs ``fn(step)`` for the steps of ``steps``, in order, up to ``depth`` ahead of the trainer,
  in one background thread, so reading step k+1 overlaps computing step k.

  ``get(step)`` must be called for the steps in the same order; it returns ``fn(step)`` or raises
  what ``fn`` raised. ``close()`` (or leaving a ``with`` block) stops the thread; a resumed run
  makes a new Prefetcher starting at its resume step.
  """

  def __init__(self, fn: Callable[[int], Any], steps: Iterable[int], depth: int = 2):
    if depth < 1:
      raise errors.UserError(f"Prefetcher depth must be >= 1, got {depth}.")
    self._fn, self._steps = fn, iter(steps)
    self._slots = threading.Semaphore(depth)
    self._ready: queue.SimpleQueue = queue.SimpleQueue()
    self._stop = threading.Event()
    self._done = False
    self._thread = threading.Thread(target=self._run, name="afd_jax-prefetch", daemon=True)
    self._thread.start()

  def _run(self):
    for step in self._steps:
      self._slots.acquire()
      if self._stop.is_set():
        return
      try:
        self._ready.put((step, self._fn(step), None))
      except BaseException as e:  # handed to the trainer's thread by get()
        self._ready.put((step, None, e))
        return
    self._ready.put((_END, None, None))

  def get(self, step: int, stop: Callable[[], bool] = lambda: False) -> Any:
    """``fn(step)``, or ``STOPPED`` when ``stop()`` turns true while waiting for it (a SIGTERM
    while a slow or hanging teacher is being read: the trainer saves and exits without it)."""
    if self._done:
      raise RuntimeError(f"Prefetcher.get({step}): the prefetcher is closed, exhausted or failed.")
    while True:
      try:
        got, value, error = self._ready.get(timeout=0.1)
        break
      except queue.Empty:
        if stop():
          return STOPPED
    self._slots.release()
    if got is _END or error is not None or got != step:
      self.close()
    if error is not None:
      raise error
    if got is _END:
      raise RuntimeError(f"Prefetcher.get({step}): past the last prefetched step.")
    if got != step:
      raise RuntimeError(f"Prefetcher.get({step}) but the next prefetched step is {got}: call "
                         "get for the steps in the order given.")
    return value

  def close(self, wait: bool = True):
    """Stops the thread after the ``fn`` call in flight, if any; ``wait=False`` does not wait for
    that call (a hanging teacher must not hold up a SIGTERM exit: the thread is a daemon)."""
    self._done = True
    self._stop.set()
    self._slots.release()
    if wait:
      self._thread.join()

  def __enter__(self) -> Prefetcher:
    return self

  def __exit__(self, *exc):
    self.close()
