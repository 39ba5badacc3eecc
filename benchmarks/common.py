"""What every benchmark script measures the same way: the median wall time of jitted calls
(each ended with ``block_until_ready``; several programs in alternation) and the device's peak
memory."""

from __future__ import annotations

import statistics
import time

import jax


def median_time(fn, repeats: int, warmup: int = 0) -> float:
  """Median seconds of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones."""
  return alternating_medians({"fn": fn}, repeats, warmup)["fn"]


def alternating_medians(fns: dict, repeats: int, warmup: int = 1) -> dict:
  """Median seconds of each callable, timed one after the other in each of ``repeats`` rounds, so
  a shared machine's slow spells hit all of them alike."""
  for fn in fns.values():
    for _ in range(warmup):
      jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - t0)
  return {name: statistics.median(t) for name, t in times.items()}


def peak_device_bytes() -> int | None:
  """The first device's peak memory so far (cumulative over the process; None on CPU)."""
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")
