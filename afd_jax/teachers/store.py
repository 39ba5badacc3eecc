"""Teacher stores: what a teacher returned, kept once, as a TFDS dataset of ArrayRecord files.

One record per teacher sample: ``prompt`` (text), ``prompt_id``, ``sample`` (which of the prompt's
samples), ``text_embedding`` float32 ``[L, D]`` and ``latents`` float32 ``[F, h, w, C]``.
ArrayRecord gives random access, so every host reads exactly its own prompts' records of step k,
and a resumed run reads what an uninterrupted one would have.

The directory is a regular TFDS dataset (``tfds.builder_from_directory(path)
.as_data_source("train")``) written without TensorFlow: TFDS's feature connectors serialize each
record, the ArrayRecord writer TFDS itself uses writes the shards (streaming, in arrival order, so
a store larger than memory is fine), and ``tfds.folder_dataset.write_metadata`` describes them.
Its metadata (``metadata.json``, ``builder.info.metadata``) carries the shapes, the encoder, fps,
the prompts and which records hold each prompt's samples, so opening a store reads no record.

Build stores with ``python -m afd_jax.tools.build_teacher_store``; ``build_store`` is its library
half.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from array_record.python import array_record_module

from afd_jax import data as data_lib
from afd_jax import encoders as encoders_lib
from afd_jax import errors

FORMAT = "afd_jax.teacher_store"
FORMAT_VERSION = 1
SPLIT = "train"
BUILD_COMMAND = ("python -m afd_jax.tools.build_teacher_store --prompts PROMPTS.jsonl "
                 "--videos VIDEOS_DIR --out STORE_DIR")
# One record per chunk keeps every record individually addressable (TFDS's own setting); zstd
# level 1 instead of the default brotli: latents barely compress and brotli reads ~5x slower.
_WRITER_OPTIONS = "group_size:1,zstd:1"
_RESERVED = ("format", "format_version", "latent_shape", "text_shape", "encoder", "fps",
             "num_prompts", "num_records", "samples_per_prompt", "prompts", "records",
             "shard_bytes")


class StoreError(errors.UserError):
  """A teacher store that is missing, incomplete, corrupt, or does not fit the run."""


@dataclasses.dataclass(frozen=True)
class Record:
  """One teacher sample of one prompt, as ``build_store`` takes it."""

  prompt: str
  prompt_id: int
  sample: int
  text_embedding: np.ndarray  # float32 [L, D]
  latents: np.ndarray         # float32 [F, h, w, C]


def _features(latent_shape, text_shape) -> tfds.features.FeaturesDict:
  # Raw bytes, not float lists: big tensors serialize and parse at memory speed that way.
  return tfds.features.FeaturesDict({
      "prompt": tfds.features.Text(),
      "prompt_id": np.int64,
      "sample": np.int64,
      "text_embedding": tfds.features.Tensor(shape=tuple(text_shape), dtype=np.float32,
                                             encoding="bytes"),
      "latents": tfds.features.Tensor(shape=tuple(latent_shape), dtype=np.float32,
                                      encoding="bytes"),
  })


def _is_store(path: Path) -> bool:
  return (path / "dataset_info.json").is_file()


def ensure_writable(out_dir, overwrite: bool = False) -> Path:
  """Refuses, before any work, a target that holds a store (unless ``overwrite``) or anything
  else that is not an empty directory (never deleted, whatever ``overwrite`` says)."""
  out = Path(out_dir)
  if out.exists() and not out.is_dir():
    raise StoreError(f"{out} is a file, not a teacher store directory; choose another --out.")
  if out.is_dir() and _is_store(out) and not overwrite:
    raise StoreError(f"teacher store {out} already exists; pass --overwrite (overwrite=True) to "
                     "replace it, or choose another --out.")
  if out.is_dir() and not _is_store(out) and any(out.iterdir()):
    raise StoreError(f"{out} exists, is not empty and is not a teacher store (no "
                     "dataset_info.json); refusing to replace it: choose another --out.")
  return out


class _ShardWriter:
  """ArrayRecord shards of about ``shard_bytes`` each, named ``part-i`` until the count is known."""

  def __init__(self, directory: Path, shard_bytes: int):
    self.directory, self.shard_bytes = directory, shard_bytes
    self.lengths: list[int] = []
    self._writer, self._bytes = None, 0

  def write(self, serialized: bytes):
    if self._writer is None or self._bytes >= self.shard_bytes:
      self.close()
      path = self.directory / f"part-{len(self.lengths)}"
      self._writer = array_record_module.ArrayRecordWriter(str(path), _WRITER_OPTIONS)
      self.lengths.append(0)
      self._bytes = 0
    self._writer.write(serialized)
    self.lengths[-1] += 1
    self._bytes += len(serialized)

  def close(self):
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def finalize(self, name: str) -> list[int]:
    """Renames the parts to TFDS's shard names; returns their sizes in bytes."""
    self.close()
    sizes = []
    for i in range(len(self.lengths)):
      final = self.directory / f"{name}-{SPLIT}.array_record-{i:05d}-of-{len(self.lengths):05d}"
      os.replace(self.directory / f"part-{i}", final)
      sizes.append(final.stat().st_size)
    return sizes


def _validate(rec: Record, first: Record, prompts: dict[int, tuple[str, str]],
              seen: set) -> Record:
  """``rec`` if it fits the store so far; else a StoreError naming the record and the rule."""
  where = f"record (prompt_id={rec.prompt_id}, sample={rec.sample})"
  for field in ("latents", "text_embedding"):
    x, want = np.asarray(getattr(rec, field)), np.shape(getattr(first, field))
    if x.shape != want:
      raise StoreError(f"{where}: {field} has shape {list(x.shape)} but the store's first record "
                       f"set {list(want)}; every record of a store must have the same shapes.")
    if not np.issubdtype(x.dtype, np.floating) or not np.isfinite(x).all():
      raise StoreError(f"{where}: {field} must be finite floats, got {x.dtype} with "
                       f"{int(np.size(x) - np.isfinite(x).sum())} non-finite values.")
  if int(rec.prompt_id) < 0 or (rec.prompt_id, rec.sample) in seen:
    raise StoreError(f"{where}: prompt ids must be >= 0 and each (prompt_id, sample) written "
                     "once.")
  # A digest, not the array: a prompt's samples may arrive far apart and umT5 is 8 MB a prompt.
  text = hashlib.sha256(np.asarray(rec.text_embedding, np.float32).tobytes()).hexdigest()
  if prompts.setdefault(int(rec.prompt_id), (rec.prompt, text)) != (rec.prompt, text):
    raise StoreError(f"{where}: prompt {rec.prompt!r} or its text embedding differs from what was "
                     f"written before under the same prompt_id ({prompts[rec.prompt_id][0]!r}); "
                     "all samples of a prompt share both.")
  seen.add((rec.prompt_id, rec.sample))
  return rec


def build_store(records: Iterable[Record], out_dir, *, encoder: Mapping[str, Any],
                fps: float | None, metadata: Mapping[str, Any] | None = None,
                name: str = "teacher_store", version: str = "1.0.0", overwrite: bool = False,
                shard_bytes: int = 1 << 30,
                extra_json: Mapping[str, Callable[[], Any]] | None = None) -> Path:
  """Writes ``records`` (streamed, any order) as a teacher store at ``out_dir``; returns it.

  Args:
    records: every sample of every prompt; prompt ids must end up covering ``0..N-1`` (they
      index the trainer's prompt pool), shapes must all equal the first record's.
    encoder: how the latents were made, e.g. ``{"name": "pixels", "patch": 4}``
      (``encoders.make(**encoder)`` rebuilds it to view them).
    fps: the teacher videos' frame rate (None if unknown).
    metadata: more JSON-able facts to keep (e.g. ``video_shape``, the text encoder).
    name, version: the TFDS dataset name (shard file prefix) and version.
    overwrite: replace an existing store; without it one is refused.
    shard_bytes: start a new shard after this many bytes.
    extra_json: files to put beside the data, each a callable evaluated after the last record
      (so a build report can say what was written).

  The store appears atomically: it is written to a sibling temporary directory renamed into place
  at the end. A failed build removes it; a killed one leaves ``.NAME.tmp-*`` beside ``out_dir``
  (safe to delete), never a half store.
  """
  out = ensure_writable(out_dir, overwrite)
  if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
    raise StoreError(f"store name {name!r} must be snake_case ([a-z][a-z0-9_]*), as TFDS wants.")
  clash = sorted(set(metadata or {}) & set(_RESERVED))
  if clash:
    raise StoreError(f"metadata keys {clash} are written by build_store itself; rename them.")
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
  tmp.mkdir()
  shards = _ShardWriter(tmp, shard_bytes)
  try:
    records = iter(records)
    first = next(records, None)
    if first is None:
      raise StoreError(f"no records to write to {out}: nothing usable was given.")
    latent_shape, text_shape = np.shape(first.latents), np.shape(first.text_embedding)
    features = _features(latent_shape, text_shape)
    prompts: dict[int, tuple[str, str]] = {}  # prompt id -> (prompt, embedding digest)
    index: dict[int, list[tuple[int, int]]] = {}  # prompt id -> [(sample, record)]
    seen: set = set()
    for i, rec in enumerate(_validate(r, first, prompts, seen)
                            for r in itertools.chain([first], records)):
      shards.write(features.serialize_example({
          "prompt": rec.prompt, "prompt_id": int(rec.prompt_id), "sample": int(rec.sample),
          "text_embedding": np.asarray(rec.text_embedding, np.float32),
          "latents": np.asarray(rec.latents, np.float32)}))
      index.setdefault(int(rec.prompt_id), []).append((int(rec.sample), i))
    missing = sorted(set(range(max(prompts) + 1)) - set(prompts))
    if missing:
      raise StoreError(f"prompt ids must be 0..N-1 (they index the prompt pool), but ids "
                       f"{missing[:10]} are missing below the highest id {max(prompts)}.")
    sizes = shards.finalize(name)
    ids = range(len(prompts))
    meta = tfds.core.MetadataDict(
        format=FORMAT, format_version=FORMAT_VERSION, latent_shape=list(latent_shape),
        text_shape=list(text_shape), encoder=dict(encoder), fps=fps, num_prompts=len(prompts),
        num_records=sum(shards.lengths), samples_per_prompt=[len(index[p]) for p in ids],
        prompts=[prompts[p][0] for p in ids], shard_bytes=sizes,
        records=[[i for _, i in sorted(index[p])] for p in ids],  # in sample order
        **dict(metadata or {}))
    split = tfds.core.SplitInfo(name=SPLIT, shard_lengths=shards.lengths, num_bytes=sum(sizes))
    tfds.folder_dataset.write_metadata(
        data_dir=tmp, features=features, split_infos=[split], version=version, check_data=False,
        description="afd_jax teacher store: teacher samples as latents, with text embeddings.",
        metadata=meta)
    for filename, make in (extra_json or {}).items():
      (tmp / filename).write_text(json.dumps(make(), indent=1) + "\n", encoding="utf-8")
    _move_into_place(tmp, out, overwrite)
  except BaseException:
    shards.close()
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out


def _move_into_place(tmp: Path, out: Path, overwrite: bool):
  ensure_writable(out, overwrite)  # again: another build may have finished meanwhile
  if out.is_dir() and not _is_store(out):
    out.rmdir()  # an empty directory
  if out.is_dir():
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old)
  else:
    os.rename(tmp, out)


class _Embeddings:
  """The store's text embeddings as a read-on-demand ``[N, L, D]`` array: index it
  (``store.embeddings[ids]``) to read only those prompts; ``np.asarray`` reads all of them (fine
  for small stores, 8 MB a prompt for umT5)."""

  dtype = np.dtype(np.float32)
  ndim = 3

  def __init__(self, store: TeacherStore):
    self._store = store

  @property
  def shape(self) -> tuple[int, int, int]:
    return (len(self._store), *self._store.text_shape)

  def __len__(self) -> int:
    return len(self._store)

  def __getitem__(self, key) -> np.ndarray:
    ids = np.arange(len(self._store))[key]
    out = self._store.read(np.atleast_1d(ids), field="text_embedding")
    return out[0] if np.ndim(ids) == 0 else out

  def __array__(self, dtype=None, copy=None):
    out = self[:]
    return out if dtype is None else out.astype(dtype, copy=False)


class TeacherStore:
  """A built teacher store, opened for random access.

  ``prompts`` (prompt-id order), ``samples_per_prompt`` (``[N]``), ``latent_shape``,
  ``text_shape``, ``encoder_spec`` and ``fps`` come from the metadata; ``embeddings`` and
  ``latents`` read records on demand (from any thread, e.g. a ``Prefetcher``'s: the ArrayRecord
  readers are thread-safe).
  """

  def __init__(self, path):
    self.path = Path(path)
    rebuild = f"build one with `{BUILD_COMMAND}`"
    if not self.path.is_dir():
      raise StoreError(f"teacher store {self.path} does not exist; {rebuild}.")
    if not _is_store(self.path):
      raise StoreError(f"{self.path} is not a teacher store (no dataset_info.json; an interrupted "
                       f"build never leaves one behind); {rebuild}.")
    try:
      builder = tfds.builder_from_directory(os.fspath(self.path))
      meta = dict(builder.info.metadata or {})
    except Exception as e:  # TFDS raises many kinds for damaged json/proto files
      raise StoreError(f"teacher store {self.path} has unreadable metadata ({e}); rebuild it "
                       f"with `{BUILD_COMMAND} --overwrite`.") from e
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
      raise StoreError(f"{self.path} is a TFDS dataset but not an afd_jax teacher store of format "
                       f"version {FORMAT_VERSION} (metadata format={meta.get('format')!r}, "
                       f"version={meta.get('format_version')!r}); {rebuild}.")
    self.metadata = meta
    self.prompts: list[str] = list(meta["prompts"])
    self.samples_per_prompt = np.asarray(meta["samples_per_prompt"], np.int64)
    self.latent_shape: tuple[int, ...] = tuple(meta["latent_shape"])
    self.text_shape: tuple[int, ...] = tuple(meta["text_shape"])
    self.encoder_spec: dict[str, Any] = dict(meta["encoder"])
    self.fps: float | None = meta["fps"]
    self._records: list[list[int]] = meta["records"]
    self._check_shards(builder.info.splits[SPLIT].filepaths, meta["shard_bytes"])
    self._source = builder.as_data_source(split=SPLIT)
    self.embeddings = _Embeddings(self)

  def _check_shards(self, paths, sizes):
    """Missing or truncated shards fail here, at open, not at step 10,000."""
    for path, size in zip(paths, sizes, strict=True):
      path = Path(os.fspath(path))
      have = path.stat().st_size if path.is_file() else None
      if have != size:
        state = "is missing" if have is None else f"has {have} bytes, {size} were written"
        raise StoreError(f"teacher store {self.path}: shard {path.name} {state} (copied "
                         f"incompletely or damaged); copy it again or rebuild with "
                         f"`{BUILD_COMMAND} --overwrite`.")

  def __len__(self) -> int:
    return len(self.prompts)

  def encoder(self, **overrides) -> encoders_lib.LatentEncoder:
    """The encoder the latents were made with (its ``decode`` shows them as videos);
    ``overrides`` replace recorded arguments, e.g. ``vae=`` where the VAE lives on this machine."""
    return encoders_lib.make(**{**self.encoder_spec, **overrides})

  def check(self, latent_shape, text_shape):
    """Refuses a store whose shapes do not fit the run, naming both sides and the fix."""
    problems = [f"{what} {list(mine)} in the store but {list(want)} in the config"
                for what, mine, want in (("latents [F, h, w, C]", self.latent_shape, latent_shape),
                                         ("text embeddings [L, D]", self.text_shape, text_shape))
                if tuple(mine) != tuple(want)]
    if problems:
      raise StoreError(
          f"teacher store {self.path} does not fit this run: {'; '.join(problems)}. Either set the "
          f"config to the store (data.num_frames, data.height, data.width, data.text_length and "
          f"the model's in_dim / text_dim) or rebuild the store for the config (`{BUILD_COMMAND} "
          f"--overwrite` with --num_frames/--height/--width, --encoder/--patch, "
          f"--text_length/--text_dim).")

  def sample_indices(self, prompt_ids, seed: int, draw: int = 0) -> np.ndarray:
    """Which stored sample of each prompt a read with ``seed`` (and ``draw``, the rollout of a
    prompt's group it pairs with) returns: a function of ``(seed, prompt_id, draw)`` only, so any
    host, any restart reads the same."""
    ids = self._ids(prompt_ids)
    extra = [int(draw)] if draw else []
    return np.array([np.random.default_rng([int(seed), int(i), *extra]).integers(
        self.samples_per_prompt[i]) for i in ids], np.int64)

  def latents(self, prompt_ids, seed: int, draw: int = 0) -> np.ndarray:
    """float32 ``[B, F, h, w, C]``: one stored sample per prompt, chosen by ``sample_indices``.
    Pass the host's own slice of the global ids (``data.host_slice``, ``host_batch``)."""
    ids = self._ids(prompt_ids)
    return self.read(ids, field="latents", samples=self.sample_indices(ids, seed, draw))

  def read(self, prompt_ids, field: str, samples=None) -> np.ndarray:
    """``field`` (``latents`` or ``text_embedding``) of each prompt's ``samples[i]``-th sample
    in sample-number order (default the first), stacked."""
    ids = self._ids(prompt_ids)
    samples = np.zeros(len(ids), np.int64) if samples is None else np.asarray(samples)
    keys = [self._records[i][s] for i, s in zip(ids, samples)]
    try:
      rows = self._source.__getitems__(keys) if keys else []
    except (RuntimeError, ValueError, OSError) as e:
      raise StoreError(f"teacher store {self.path}: reading records {keys[:8]} failed "
                       f"({type(e).__name__}: {e}); a shard is corrupt: rebuild the store with "
                       f"`{BUILD_COMMAND} --overwrite`.") from e
    shape = self.latent_shape if field == "latents" else self.text_shape
    return np.stack([r[field] for r in rows]) if rows else np.zeros((0, *shape), np.float32)

  def _ids(self, prompt_ids) -> np.ndarray:
    ids = np.asarray(prompt_ids, np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
      raise StoreError(f"prompt ids {ids[(ids < 0) | (ids >= len(self))][:8].tolist()} are "
                       f"outside teacher store {self.path}, which holds {len(self)} prompts.")
    return ids


def host_batch(store: TeacherStore, global_ids, seed: int, process_index: int,
               process_count: int) -> tuple[np.ndarray, np.ndarray]:
  """This process's share of a global batch (``data.host_slice``, the trainer's own split) and its
  latents: hosts read disjoint records, together exactly the global batch."""
  ids = data_lib.host_slice(global_ids, process_index, process_count)
  return ids, store.latents(ids, seed)
