"""Prompts files and their text embeddings: the store builder's ``.jsonl`` (one object per line:
``prompt``, optional ``id``, ``videos``, ``embedding``) or a ``.txt`` (one prompt per line), and
umT5 embeddings written as the ``EMB_DIR/<id>.npy`` files stores read."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import numpy as np
from absl import logging

from afd_jax import errors


@dataclasses.dataclass(frozen=True)
class Entry:
  """One line of the prompts file."""

  key: str
  prompt: str
  videos: tuple[str, ...] | None
  embedding: str | None


def load_prompts(path: Path) -> list[Entry]:
  """Parses the prompts file; a malformed line is an error in the input, not a skip."""
  entries, keys = [], set()
  for n, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
    if not line.strip():
      continue
    where = f"{path}:{n + 1}"
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise errors.UserError(f"{where} is not JSON ({e}).") from e
    if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) \
        or not obj["prompt"].strip():
      raise errors.UserError(f"{where} needs an object with a non-empty string 'prompt'.")
    key = str(obj.get("id", n))
    videos = obj.get("videos")
    if videos is not None and not (isinstance(videos, list)
                                   and all(isinstance(v, str) for v in videos)):
      raise errors.UserError(f"{where}: 'videos' must be a list of paths relative to --videos.")
    if key in keys or not re.fullmatch(r"[^/\\]+", key):
      raise errors.UserError(f"{where}: id {key!r} is repeated or contains a path separator.")
    keys.add(key)
    embedding = obj.get("embedding")
    entries.append(Entry(key, obj["prompt"], tuple(videos) if videos is not None else None,
                         str(path.parent / embedding) if embedding else None))
  return entries


def read_prompts(path: Path) -> list[tuple[str, str]]:
  """``[(id, prompt)]`` of a ``.jsonl`` (as ``load_prompts`` reads it) or a ``.txt`` (ids: line
  numbers from 0)."""
  if path.suffix == ".jsonl":
    return [(e.key, e.prompt) for e in load_prompts(path)]
  lines = path.read_text(encoding="utf-8").splitlines()
  return [(str(n), line.strip()) for n, line in enumerate(lines) if line.strip()]


def write_embeddings(items: list[tuple[str, str]], out: Path, encoder, tokenizer,
                     text_len: int = 512, batch_size: int = 16) -> int:
  """Writes ``out/<id>.npy`` (``umt5.encode_prompts``, atomically) for every ``(id, prompt)``
  without one; returns how many were written. An interrupted run continues where it stopped."""
  from afd_jax.models import umt5
  out.mkdir(parents=True, exist_ok=True)
  todo = [(k, p) for k, p in items if not (out / f"{k}.npy").exists()]
  for i in range(0, len(todo), batch_size):
    part = todo[i:i + batch_size]
    emb = umt5.encode_prompts(encoder, tokenizer, [p for _, p in part], text_len, batch_size)
    for (key, _), x in zip(part, emb):
      tmp = out / f".{key}.npy.tmp"
      with open(tmp, "wb") as f:
        np.save(f, x)
      os.replace(tmp, out / f"{key}.npy")
    logging.info("embedded %d / %d prompts", min(i + batch_size, len(todo)), len(todo))
  return len(todo)


class EmbeddingFolder:
  """``folder/<key>.npy`` of ``keys`` as a read-on-demand ``[N, L, D]`` array (index it to read
  only those prompts), as a ``PromptPool`` takes a store's embeddings."""

  dtype = np.dtype(np.float32)
  ndim = 3

  def __init__(self, folder: Path, keys: list[str]):
    self.folder, self.keys = Path(folder), list(keys)
    self._row = np.load(self.folder / f"{self.keys[0]}.npy", mmap_mode="r").shape

  @property
  def shape(self) -> tuple[int, int, int]:
    return (len(self.keys), *self._row)

  def __len__(self) -> int:
    return len(self.keys)

  def __getitem__(self, key) -> np.ndarray:
    ids = np.arange(len(self.keys))[key]
    out = np.stack([np.load(self.folder / f"{self.keys[i]}.npy")
                    for i in np.atleast_1d(ids)]).astype(np.float32)
    return out if np.ndim(ids) else out[0]

  def __array__(self, dtype=None, copy=None):
    return self[:].astype(dtype or self.dtype)


def umt5_embeddings(prompts: list[str], folder: Path, t5: str, tokenizer: str,
                    text_len: int) -> EmbeddingFolder:
  """The prompts' umT5 contexts, embedded once into ``folder`` (by process 0, the others wait)
  and read on demand; keys are the prompts' positions."""
  import jax
  from jax.experimental import multihost_utils
  keys = [str(i) for i in range(len(prompts))]
  if jax.process_index() == 0:
    from afd_jax.models import umt5
    todo = [(k, p) for k, p in zip(keys, prompts) if not (folder / f"{k}.npy").exists()]
    if todo:
      write_embeddings(todo, folder, umt5.from_pretrained(t5), umt5.load_tokenizer(tokenizer),
                       text_len)
  multihost_utils.sync_global_devices("afd_jax text embeddings")
  return EmbeddingFolder(folder, keys)
