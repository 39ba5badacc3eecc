"""Online teachers: prompts and a seed in, uint8 videos ``[B, T, H, W, 3]`` out, each video asked
for once.

``CallableTeacher`` wraps any Python function ``fn(prompts, seed)``; ``HTTPTeacher`` asks a server.
Both keep every video in an on-disk cache, one ``.npy`` per (prompt, seed) named by
``cache_key(prompt, seed)`` (sha256) and written atomically (temporary file, then ``os.replace``),
and send the teacher only what the cache lacks. While asking they hold an advisory lock per key
(``fcntl.flock``), so processes sharing a cache directory (hosts, restarts, eval jobs) never ask
for the same video twice; on a filesystem without working flock two processes may at worst both
ask, and one atomic write wins. A cache directory belongs to one teacher: keys do not name it.

HTTP protocol (``HTTPTeacher``)::

    POST <url>
    Content-Type: application/json
    Accept: application/x-npy
    {"prompts": ["a red ball dropped", ...], "seed": 3}

    200 OK
    Content-Type: application/x-npy
    <the bytes np.save writes for a uint8 array [len(prompts), T, H, W, 3], in prompt order>

Any other status, content type or array is an error naming the URL and what came back.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from afd_jax import errors

NPY_TYPE = "application/x-npy"


class TeacherError(errors.UserError):
  """A teacher that failed, or answered something that is not the videos asked for."""


def cache_key(prompt: str, seed: int) -> str:
  """The cache file stem of one (prompt, seed): sha256 of its JSON, stable across machines."""
  return hashlib.sha256(json.dumps([prompt, int(seed)], ensure_ascii=False).encode()).hexdigest()


def check_videos(videos, n: int, source: str) -> np.ndarray:
  """``videos`` as uint8 ``[n, T, H, W, 3]``, or a ``TeacherError`` saying what is wrong."""
  videos = np.asarray(videos)
  if videos.dtype != np.uint8:
    raise TeacherError(f"{source} returned {videos.dtype} videos; a teacher must return uint8 "
                       "[B, T, H, W, 3] (floats in [0, 1]: (x * 255).round().astype(np.uint8)).")
  if videos.ndim != 5 or videos.shape[0] != n or videos.shape[-1] != 3 or 0 in videos.shape:
    raise TeacherError(f"{source} returned an array of shape {list(videos.shape)} for {n} prompts; "
                       f"a teacher must return uint8 [{n}, T, H, W, 3] (RGB videos in prompt "
                       "order).")
  return videos


class CallableTeacher:
  """``fn(prompts: list[str], seed: int) -> uint8 [B, T, H, W, 3]`` behind the on-disk cache."""

  def __init__(self, fn: Callable[[list[str], int], np.ndarray], cache_dir):
    self.fn = fn
    self.cache_dir = Path(cache_dir)
    (self.cache_dir / "locks").mkdir(parents=True, exist_ok=True)

  def _path(self, key: str) -> Path:
    return self.cache_dir / f"{key}.npy"

  def _load(self, key: str) -> np.ndarray:
    path = self._path(key)
    try:
      return check_videos(np.load(path, allow_pickle=False)[None], 1, f"cache file {path}")[0]
    except (OSError, ValueError, TeacherError) as e:
      raise TeacherError(f"teacher cache file {path} is unreadable ({e}); delete it to ask the "
                         "teacher again.") from e

  def _save(self, key: str, video: np.ndarray):
    fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=f".{key}.", suffix=".tmp")
    try:
      with os.fdopen(fd, "wb") as f:
        np.save(f, video)
      os.replace(tmp, self._path(key))
    except BaseException:
      Path(tmp).unlink(missing_ok=True)
      raise

  @contextlib.contextmanager
  def _locked(self, keys: Sequence[str]):
    """Exclusive locks on ``keys``, taken in sorted order so that processes cannot deadlock."""
    with contextlib.ExitStack() as stack:
      for key in sorted(keys):
        f = stack.enter_context(open(self.cache_dir / "locks" / f"{key}.lock", "wb"))
        fcntl.flock(f, fcntl.LOCK_EX)
      yield

  def __call__(self, prompts: Sequence[str], seed: int) -> np.ndarray:
    """uint8 ``[B, T, H, W, 3]``, one video per prompt (repeated prompts share one)."""
    prompts, seed = list(prompts), int(seed)
    if not prompts:
      raise errors.UserError("a teacher call needs at least one prompt.")
    keys = {p: cache_key(p, seed) for p in prompts}
    missing = [p for p in keys if not self._path(keys[p]).exists()]
    if missing:
      with self._locked([keys[p] for p in missing]):
        missing = [p for p in missing if not self._path(keys[p]).exists()]  # asked meanwhile?
        if missing:
          fresh = check_videos(self.fn(missing, seed), len(missing), f"teacher {self.name}")
          for p, v in zip(missing, fresh):
            self._save(keys[p], v)
    videos = [self._load(keys[p]) for p in prompts]
    if len({v.shape for v in videos}) > 1:
      raise TeacherError(f"teacher {self.name} videos differ in shape "
                         f"({sorted({v.shape for v in videos})}) for seed {seed}; a teacher must "
                         f"return one shape, and {self.cache_dir} must hold one teacher's videos.")
    return np.stack(videos)

  @property
  def name(self) -> str:
    return getattr(self.fn, "__qualname__", repr(self.fn))


class HTTPTeacher(CallableTeacher):
  """A teacher server speaking the protocol in the module docstring, behind the on-disk cache.

  Uses only the standard library (urllib); ``timeout`` is per request, in seconds.
  """

  def __init__(self, url: str, cache_dir, timeout: float = 600.0):
    if not url.startswith(("http://", "https://")):
      raise errors.UserError(f"teacher URL {url!r} must start with http:// or https://.")
    self.url, self.timeout = url, timeout
    super().__init__(self._post, cache_dir)

  @property
  def name(self) -> str:
    return self.url

  def _post(self, prompts: list[str], seed: int) -> np.ndarray:
    request = urllib.request.Request(
        self.url, data=json.dumps({"prompts": prompts, "seed": seed}).encode(), method="POST",
        headers={"Content-Type": "application/json", "Accept": NPY_TYPE})
    asked = f"{len(prompts)} prompts, seed {seed}"
    try:
      with urllib.request.urlopen(request, timeout=self.timeout) as response:
        content_type, body = response.headers.get_content_type(), response.read()
    except urllib.error.HTTPError as e:
      detail = e.read(500).decode("utf-8", "replace").strip()
      raise TeacherError(f"teacher {self.url} answered HTTP {e.code} {e.reason} ({asked}): "
                         f"{detail or 'no body'}") from e
    except (urllib.error.URLError, OSError) as e:
      reason = getattr(e, "reason", e)
      if isinstance(reason, TimeoutError):  # connected, but no answer in time: overloaded or hung
        raise TeacherError(f"teacher {self.url} did not answer within {self.timeout:g}s ({asked}); "
                           "raise config.data.teacher_timeout_s or check the server.") from e
      raise TeacherError(f"teacher {self.url} could not be reached ({asked}): {reason}; is the "
                         "server running and the URL right?") from e
    if content_type != NPY_TYPE:
      raise TeacherError(f"teacher {self.url} answered Content-Type {content_type!r} ({asked}); "
                         f"expected {NPY_TYPE} (np.save bytes of uint8 [B, T, H, W, 3]): "
                         f"{body[:200]!r}")
    try:
      return np.load(io.BytesIO(body), allow_pickle=False)
    except (OSError, ValueError) as e:
      raise TeacherError(f"teacher {self.url} answered {len(body)} bytes that are not a .npy "
                         f"array ({asked}): {e}") from e
