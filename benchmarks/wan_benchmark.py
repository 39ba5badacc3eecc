"""Wan DiT forward / chunk / rollout speed and FLOP accounting (a benchmark, not a test).

    python benchmarks/wan_benchmark.py --out benchmarks/results/cpu.json

CPU: the ``tiny`` and ``small`` presets. Reports median wall time over repeated calls after
warm-up, analytic FLOPs (``afd_jax.flops``) against XLA's ``cost_analysis()`` (compiled with
unrolled layers and steps so XLA counts every iteration; target ratio 0.9-1.0), and the time ratio
of the last to the first KV-cache chunk against its FLOP ratio (perf_targets.md C1, C5).
GPU (when present): the 1.3B model in bf16 with cuDNN attention at 832x480: the chunk-0 and
chunk-6 forwards and the full 21-latent-frame rollout, with MFU against 989 TFLOP/s (H1xx peak).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from afd_jax import flops
from afd_jax import rollout as rollout_lib
from afd_jax.models import wan

PEAK_BF16 = 989e12  # H100/H200 SXM dense bf16


def timed(fn, *args, warmup=2, repeats=10):
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def xla_flops(fn, *args):
  cost = fn.lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost["flops"])


def bench_config(name, cfg, frames, height, width, text_len, batch, repeats):
  tpf = (height // cfg.patch_size[1]) * (width // cfg.patch_size[2])
  model = wan.init(cfg)
  graphdef, state = nnx.split(model)
  unrolled = nnx.graphdef(wan.abstract(cfg.replace(scan_layers=False)))
  key = jax.random.key(0)
  x = jax.random.normal(key, (batch, frames, height, width, cfg.in_dim), jnp.float32)
  ctx = jax.random.normal(key, (batch, text_len, cfg.text_dim), jnp.float32)
  t = jnp.full((batch,), 500.0)
  rows = []

  for mode in ("bidirectional", "block_causal"):
    make = lambda g: jax.jit(lambda s, x, c: nnx.merge(g, s)(x, t, c, attention=mode,
                                                             chunk_frames=3))
    analytic = batch * flops.forward_flops(cfg, frames, tpf, text_len, mode, 3)["total"]
    seconds = timed(make(graphdef), state, x, ctx, repeats=repeats)
    rows.append(dict(config=name, what=f"forward {mode}", seconds=seconds, analytic_flops=analytic,
                     xla_flops=xla_flops(make(unrolled), state, x, ctx)))

  rcfg = rollout_lib.RolloutConfig()
  fn = rollout_lib.make_rollout(graphdef, rcfg)
  analytic = batch * flops.rollout_flops(cfg, frames, tpf, text_len, 3, len(rcfg.denoising_steps))
  seconds = timed(fn, state, x, ctx, key, warmup=1, repeats=max(3, repeats // 3))
  exact = rollout_lib.make_rollout(unrolled, rollout_lib.RolloutConfig(unroll_steps=True))
  rows.append(dict(config=name, what=f"rollout {frames} frames x 4 steps", seconds=seconds,
                   analytic_flops=analytic, xla_flops=xla_flops(exact, state, x, ctx, key)))

  text = model.text_kv(ctx)
  chunk = x[:, :3]
  cached = jax.jit(lambda s, x, text, cache: nnx.merge(graphdef, s).forward_cached(
      x, t, text, cache, 0)[0])
  first = timed(cached, state, chunk, text, None, repeats=repeats)
  n_prev = (frames - 3) * tpf
  shape = (cfg.num_layers, batch, n_prev, cfg.num_heads, cfg.head_dim)
  cache = wan.KV(jnp.ones(shape, cfg.dtype), jnp.ones(shape, cfg.dtype))
  last = timed(cached, state, chunk, text, cache, repeats=repeats)
  flop_ratio = (flops.chunk_flops(cfg, 3 * tpf, n_prev, text_len, 3)
                / flops.chunk_flops(cfg, 3 * tpf, 0, text_len, 3))
  rows.append(dict(config=name, what="last/first chunk (C5)", seconds=last,
                   time_ratio=last / first, flop_ratio=flop_ratio))
  return rows


def bench_gpu_13b(repeats):
  cfg = wan.preset("1.3b", dtype="bfloat16", attention_kernel="cudnn")
  frames, height, width, text_len, batch = 21, 60, 104, 512, 1
  tpf = (height // 2) * (width // 2)
  model = wan.init(cfg)
  graphdef, state = nnx.split(model)
  key = jax.random.key(0)
  ctx = jax.random.normal(key, (batch, text_len, cfg.text_dim), jnp.bfloat16)
  text = jax.jit(lambda s, c: nnx.merge(graphdef, s).text_kv(c))(state, ctx)
  chunk = jax.random.normal(key, (batch, 3, height, width, cfg.in_dim), jnp.float32)
  t = jnp.full((batch,), 937.5)
  cached = jax.jit(lambda s, x, text, cache, start: nnx.merge(graphdef, s).forward_cached(
      x, t, text, cache, start)[0])
  rows = []
  for k in (0, 6):
    shape = (cfg.num_layers, batch, 3 * k * tpf, cfg.num_heads, cfg.head_dim)
    cache = None if k == 0 else wan.KV(jnp.ones(shape, cfg.dtype), jnp.ones(shape, cfg.dtype))
    seconds = timed(cached, state, chunk, text, cache, 3 * k, repeats=repeats)
    f = flops.chunk_flops(cfg, 3 * tpf, 3 * k * tpf, text_len, 3)
    rows.append(dict(config="1.3b bf16 cudnn", what=f"chunk {k} forward", seconds=seconds,
                     analytic_flops=f, mfu=f / seconds / PEAK_BF16))
  x = jax.random.normal(key, (batch, frames, height, width, cfg.in_dim), jnp.float32)
  fn = rollout_lib.make_rollout(graphdef)
  seconds = timed(fn, state, x, ctx, key, warmup=1, repeats=max(3, repeats // 3))
  f = flops.rollout_flops(cfg, frames, tpf, text_len, 3, 4)
  rows.append(dict(config="1.3b bf16 cudnn", what="rollout 21 frames x 4 steps", seconds=seconds,
                   analytic_flops=f, mfu=f / seconds / PEAK_BF16,
                   peak_bytes=jax.devices()[0].memory_stats().get("peak_bytes_in_use")))
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="benchmarks/results/wan_benchmark.json")
  parser.add_argument("--repeats", type=int, default=10)
  args = parser.parse_args()
  rows = bench_config("tiny", wan.preset("tiny"), 9, 8, 12, 16, 2, args.repeats)
  rows += bench_config("small", wan.preset("small"), 9, 16, 24, 64, 1, args.repeats)
  if jax.default_backend() == "gpu":
    rows += bench_gpu_13b(args.repeats)
  print(f"{'config':<16} {'what':<34} {'ms':>9} {'analytic GF':>12} {'XLA GF':>9} "
        f"{'ratio':>6} {'extra':>22}")
  for r in rows:
    af, xf = r.get("analytic_flops"), r.get("xla_flops")
    extra = (f"time {r['time_ratio']:.2f} / flop {r['flop_ratio']:.2f}" if "time_ratio" in r
             else f"MFU {r['mfu']:.1%}" if "mfu" in r else "")
    gf = lambda v, w: f"{v / 1e9:>{w}.3f}" if v else " " * w
    ratio = f"{af / xf:>6.3f}" if af and xf else " " * 6
    print(f"{r['config']:<16} {r['what']:<34} {1e3 * r['seconds']:>9.2f} {gf(af, 12)} "
          f"{gf(xf, 9)} {ratio} {extra:>22}")
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  meta = {"jax": jax.__version__, "backend": jax.default_backend(),
          "devices": [str(d) for d in jax.devices()], "machine": platform.processor() or
          platform.machine()}
  out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
