"""One run per workdir: a second run is refused in one line naming the holder; a killed holder
leaves nothing that blocks the next run."""

import signal
import subprocess
import sys
import time

import pytest

from afd_jax import errors
from afd_jax import lock


def test_a_second_run_is_refused_naming_the_holder(tmp_path):
  with lock.WorkdirLock(tmp_path):
    holder = subprocess.run(
        [sys.executable, "-c", "import sys; from afd_jax import lock; "
         "lock.WorkdirLock(sys.argv[1]).acquire()", str(tmp_path)],
        capture_output=True, text=True)
    assert holder.returncode != 0 and "is in use by another run (pid" in holder.stderr
  lock.WorkdirLock(tmp_path).acquire().release()  # released on exit


def test_a_killed_holder_does_not_wedge_the_workdir(tmp_path):
  child = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from afd_jax import lock; "
       "lock.WorkdirLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)",
       str(tmp_path)], stdout=subprocess.PIPE, text=True)
  assert child.stdout.readline().strip() == "held"
  with pytest.raises(errors.UserError, match=f"pid {child.pid} on "):
    lock.WorkdirLock(tmp_path).acquire()
  child.send_signal(signal.SIGKILL)
  child.wait()
  deadline = time.time() + 10
  while True:  # the kernel drops the lock with the process
    try:
      lock.WorkdirLock(tmp_path).acquire().release()
      break
    except errors.UserError:
      assert time.time() < deadline
      time.sleep(0.1)
