"""One run per workdir: a second trainer on the same folder would interleave ``metrics.jsonl`` and
collide on checkpoint saves, so it is refused in one line that names the holder.

Process 0 holds an exclusive ``flock`` on ``WORKDIR/run.lock`` for the whole run; the file records
who holds it (host, pid, start time) for the message. The kernel drops the lock when the holder
exits, however it exits (SIGKILL and crashes included), so a dead run never wedges its workdir.
Other processes of a multi-host run learn process 0's answer by a broadcast. Within one process
the lock is reentrant (``main`` takes it before the trainer it runs does).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from afd_jax.errors import UserError

FILE = "run.lock"
_HELD: dict = {}  # resolved lock path -> [file descriptor (process 0) or None, holders]


class WorkdirLock:
  def __init__(self, workdir):
    self.path = Path(workdir) / FILE
    self._key = None

  def acquire(self) -> "WorkdirLock":
    key = self.path.resolve()
    if key not in _HELD:
      fd, holder = self._try_lock() if jax.process_index() == 0 else (None, None)
      refused = holder is not None
      if jax.process_count() > 1:
        refused = bool(multihost_utils.broadcast_one_to_all(np.int32(refused)))
      if refused:
        raise UserError(f"{self.path.parent} is in use by another run "
                        f"({holder or 'see process 0'}); wait for it to finish, stop it, or use "
                        "another --workdir.")
      _HELD[key] = [fd, 0]
    _HELD[key][1] += 1  # this process holds it already: main, then the trainer it runs
    self._key = key
    return self

  def _try_lock(self) -> tuple[int | None, str | None]:
    """``(fd, None)`` when this process now holds the lock, else ``(None, holder)``."""
    self.path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      try:
        who = json.loads(self.path.read_text())
        return None, f"pid {who['pid']} on {who['host']}, started {who['started']}"
      except (OSError, ValueError, KeyError):
        return None, f"the holder of {self.path}"
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
    return fd, None

  def release(self):
    key, self._key = self._key, None
    if key is None or key not in _HELD:
      return
    _HELD[key][1] -= 1
    if _HELD[key][1] == 0:
      fd = _HELD.pop(key)[0]
      if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()
