"""What every benchmark script measures the same way: the median wall time of a jitted call
(each ended with ``block_until_ready``) and the device's peak memory."""

from __future__ import annotations

import statistics
import time

import jax


def median_time(fn, repeats: int, warmup: int = 0) -> float:
  """Median seconds of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def peak_device_bytes() -> int | None:
  """The first device's peak memory so far (cumulative over the process; None on CPU)."""
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")
