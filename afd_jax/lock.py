"""One run per workdir: a second trainer on the same folder would interleave ``metrics.jsonl`` and
collide on checkpoint saves, so it is refused in one line that names the holder.

Process 0 holds an exclusive ``flock`` on ``WORKDIR/run.lock`` for the whole run; the file records
who holds it (host, pid, start time) for the message. The kernel drops the lock when the holder
exits, however it exits (SIGKILL and crashes included), so a dead run never wedges its workdir.
Other processes of a multi-host run learn process 0's answer by a broadcast.
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


class WorkdirLock:
  def __init__(self, workdir):
    self.path = Path(workdir) / FILE
    self._fd = None

  def acquire(self) -> "WorkdirLock":
    holder = None
    if jax.process_index() == 0:
      holder = self._try_lock()
    held = holder is not None
    if jax.process_count() > 1:
      held = bool(multihost_utils.broadcast_one_to_all(np.int32(held)))
    if held:
      raise UserError(f"{self.path.parent} is in use by another run ({holder or 'see process 0'}); "
                      "wait for it to finish, stop it, or use another --workdir.")
    return self

  def _try_lock(self) -> str | None:
    """None when this process now holds the lock, else a description of the holder."""
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      try:
        who = json.loads(self.path.read_text())
        return f"pid {who['pid']} on {who['host']}, started {who['started']}"
      except (OSError, ValueError, KeyError):
        return f"the holder of {self.path}"
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
    self._fd = fd
    return None

  def release(self):
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()
