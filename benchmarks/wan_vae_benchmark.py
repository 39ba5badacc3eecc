"""Wan2.1 VAE encode / decode speed and memory (a benchmark, not a test).

    python benchmarks/wan_vae_benchmark.py --out benchmarks/results/wan_vae_cpu.json

The published architecture (126.9M parameters) with random weights: speed and memory do not depend
on the values. Timed: a small clip on CPU (default 9 frames at 64x64); 81 frames at 480x832 on a GPU
(float32 and bfloat16), through the public ``wan_vae.encode`` / ``decode`` (chunked, one latent
frame at a time, as Wan does). Reported per call: the median wall time after compiling, FLOPs from
XLA's cost analysis of the whole-video program (the chunked program's scan body is counted once, so
its own count is not used) and the achieved rate, the compiled program's temporary memory, and the
device's peak memory where the backend reports one. A compile-only table shows the temporary memory
of chunked and whole-video programs as the video grows: chunked stays flat.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from afd_jax.models import wan_vae
from common import median_time, peak_device_bytes


def compiled(fn, graphdef, state, x, chunk):
  return fn.lower(graphdef, state, x, chunk).compile()


def flops(c) -> float:
  cost = c.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost.get("flops", float("nan")))


def bench(vae, frames, height, width, chunk, repeats) -> list[dict]:
  cfg = vae.config
  rng = np.random.default_rng(0)
  video = jnp.asarray(rng.uniform(-1, 1, (1, frames, height, width, 3)), jnp.float32)
  lat = cfg.latent_shape(frames, height, width)
  latents = jnp.asarray(rng.standard_normal((1, *lat, cfg.z_dim)), jnp.float32)
  graphdef, state = nnx.split(vae)
  mu = latents * jnp.asarray(cfg.latents_std) + jnp.asarray(cfg.latents_mean)
  rows = []
  for what, fn, public, x in (
      ("encode", wan_vae._moments, lambda: wan_vae.encode(vae, video, chunk=chunk), video),
      ("decode", wan_vae._pixels, lambda: wan_vae.decode(vae, latents, chunk=chunk), mu)):
    seconds = median_time(public, repeats, warmup=1)   # the first call compiles
    whole = flops(compiled(fn, graphdef, state, x, 0))
    temp = compiled(fn, graphdef, state, x, chunk).memory_analysis().temp_size_in_bytes
    rows.append({"what": what, "video": [frames, height, width], "latents": list(lat),
                 "dtype": cfg.dtype, "chunk": chunk, "seconds": seconds, "flops": whole,
                 "tflops_per_s": whole / seconds / 1e12, "temp_bytes": int(temp),
                 "peak_device_bytes": peak_device_bytes()})
  return rows


def memory_table(vae, frame_counts, height, width) -> list[dict]:
  """Compile-only: temporary memory of chunked (1 latent frame) vs whole-video programs."""
  graphdef, state = nnx.split(vae)
  rows = []
  for frames in frame_counts:
    x = jax.ShapeDtypeStruct((1, frames, height, width, 3), jnp.float32)
    lat = vae.config.latent_shape(frames, height, width)
    z = jax.ShapeDtypeStruct((1, *lat, vae.config.z_dim), jnp.float32)
    row = {"video": [frames, height, width]}
    for what, fn, arg in (("encode", wan_vae._moments, x), ("decode", wan_vae._pixels, z)):
      for chunk in (1, 0):
        mem = compiled(fn, graphdef, state, arg, chunk).memory_analysis()
        row[f"{what}_{'chunked' if chunk else 'whole'}_temp_bytes"] = int(mem.temp_size_in_bytes)
    rows.append(row)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="benchmarks/results/wan_vae.json")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--frames", type=int, default=None, help="default: 81 on GPU, 9 on CPU")
  parser.add_argument("--height", type=int, default=None, help="default: 480 on GPU, 64 on CPU")
  parser.add_argument("--width", type=int, default=None, help="default: 832 on GPU, 64 on CPU")
  parser.add_argument("--chunk", type=int, default=1, help="latent frames per step (0: whole)")
  parser.add_argument("--memory_frames", default="5,9,17,33,81",
                      help="frame counts of the compile-only memory table ('' to skip)")
  parser.add_argument("--memory_size", default="64x64", help="HxW of the memory table's frames")
  args = parser.parse_args()
  gpu = jax.default_backend() == "gpu"
  frames = args.frames or (81 if gpu else 9)
  height, width = args.height or (480 if gpu else 64), args.width or (832 if gpu else 64)
  rows = []
  for dtype in ("float32", "bfloat16") if gpu else ("float32",):
    vae = wan_vae.init(wan_vae.VAEConfig(dtype=dtype))
    rows += bench(vae, frames, height, width, args.chunk, args.repeats)
  counts = [int(f) for f in args.memory_frames.split(",") if f]
  mh, mw = map(int, args.memory_size.split("x"))
  memory = memory_table(wan_vae.init(), counts, mh, mw) if counts else []

  print(f"{'what':<7} {'video':>14} {'dtype':>9} {'s':>8} {'TFLOP':>8} {'TFLOP/s':>8} "
        f"{'temp MiB':>9} {'peak MiB':>9}")
  for r in rows:
    peak = r["peak_device_bytes"]
    print(f"{r['what']:<7} {'x'.join(map(str, r['video'])):>14} {r['dtype']:>9} "
          f"{r['seconds']:>8.3f} {r['flops'] / 1e12:>8.3f} {r['tflops_per_s']:>8.3f} "
          f"{r['temp_bytes'] / 2**20:>9.1f} {'-' if peak is None else f'{peak / 2**20:.1f}':>9}")
  if memory:
    print(f"\ncompile-only temporary memory (MiB), {args.memory_size} frames:")
    print(f"{'frames':>6} {'enc chunked':>12} {'enc whole':>10} {'dec chunked':>12} "
          f"{'dec whole':>10}")
    for m in memory:
      print(f"{m['video'][0]:>6} " + " ".join(
          f"{m[k] / 2**20:>{w}.1f}" for k, w in (
              ("encode_chunked_temp_bytes", 12), ("encode_whole_temp_bytes", 10),
              ("decode_chunked_temp_bytes", 12), ("decode_whole_temp_bytes", 10))))
  meta = {"jax": jax.__version__, "backend": jax.default_backend(),
          "devices": [str(d) for d in jax.devices()], "machine": platform.machine(),
          "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({"meta": meta, "rows": rows, "memory": memory}, indent=2))
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
