"""What a user watches: a progress line per logged step (``console.py``), TensorBoard scalars and
``metrics.jsonl``.

Only process 0 writes. Every logged step is one JSON object per line with ``step``, so the file
plots with any tool and survives crashes (each line is flushed). A resumed run first drops the
rows past its restored step (written after the checkpoint it resumes from, and about to be
written again), so the file stays one true history.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax
import numpy as np

from afd_jax import console


class MetricWriter:
  def __init__(self, workdir, total_steps: int, start_step: int = 0):
    self.active = jax.process_index() == 0
    self.total = total_steps
    self._last_step, self._last_time = start_step, time.perf_counter()
    if self.active:
      from tensorboardX import SummaryWriter
      workdir = Path(workdir)
      workdir.mkdir(parents=True, exist_ok=True)
      self._jsonl = _open_history(workdir / "metrics.jsonl", start_step)
      self._tb = SummaryWriter(str(workdir / "tensorboard"))

  def write(self, step: int, scalars: dict) -> dict:
    """Logs scalars for ``step`` and returns them as floats, with throughput and ETA added."""
    values = {k: float(np.asarray(v)) for k, v in scalars.items()}
    now = time.perf_counter()
    done, elapsed = step - self._last_step, now - self._last_time
    if done > 0:  # throughput since the previous log line (the first includes compilation)
      values["perf/steps_per_second"] = done / elapsed
      values["perf/eta_seconds"] = (self.total - step) * elapsed / done
    self._last_step, self._last_time = step, now
    if self.active:
      self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
      self._jsonl.flush()
      for k, v in values.items():
        if math.isfinite(v):
          self._tb.add_scalar(k, v, step)
      self._tb.flush()
      console.show_progress(step, self.total, values)
    return values

  def close(self):
    if self.active:
      self._jsonl.close()
      self._tb.close()


def _open_history(path: Path, start_step: int):
  """``path`` opened for appending, holding only its rows up to ``start_step``."""
  if path.exists():
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
      try:
        if json.loads(line)["step"] <= start_step:
          kept.append(line)
      except (ValueError, KeyError, TypeError):  # a line torn by a crash mid-write
        continue
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
    tmp.replace(path)
  return open(path, "a", encoding="utf-8")
