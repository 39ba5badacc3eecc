"""Wan DiT forward / chunk / rollout speed and FLOP accounting (a benchmark, not a test).

    python benchmarks/wan_benchmark.py --out benchmarks/results/cpu.json

CPU: the ``tiny`` and ``small`` presets. Reports median wall time over repeated calls after
warm-up, analytic FLOPs (``afd_jax.flops``) against XLA's ``cost_analysis()`` (compiled with
unrolled layers and steps so XLA counts every iteration; target ratio 0.9-1.0), and the time ratio
of the last to the first KV-cache chunk against its FLOP ratio (perf_targets.md C1, C5).
``--vs_diffusers``: the forward beside diffusers' on the same weights, in alternation.
``--rollout_chunks 3,7,28,112``: rollout compile and run time against the number of chunks, scanned
and unrolled. The 1.3B model on a GPU is ``benchmarks/gpu_suite.py``'s.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from afd_jax import flops
from afd_jax import rollout as rollout_lib
from afd_jax.models import wan
from common import alternating_medians, median_time

def timed(fn, *args, warmup=2, repeats=10):
  return median_time(lambda: fn(*args), repeats, warmup)


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
  exact = rollout_lib.make_rollout(unrolled, rollout_lib.RolloutConfig(unroll_steps=True,
                                                                        scan_chunks=False))
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


def rollout_scaling(chunk_counts, height=8, width=12, window_frames=None, budget_s=60.0):
  """Compile and run time of the ``small`` model's rollout against the number of chunks, chunks
  under ``lax.scan`` (``scan_chunks=True``) and unrolled; run times in alternation, as many rounds
  (3 to 15) as ``budget_s`` allows."""
  cfg = wan.preset("small", attention_kernel="dense", dtype="float32")
  graphdef, state = nnx.split(wan.init(cfg))
  key = jax.random.key(0)
  ctx = jax.random.normal(key, (1, cfg.text_len, cfg.text_dim), jnp.float32)
  rows = []
  for chunks in chunk_counts:
    x = jax.random.normal(key, (1, 3 * chunks, height, width, cfg.in_dim), jnp.float32)
    row = dict(config="small", what=f"rollout {chunks} chunks", chunks=chunks,
               window_frames=window_frames)
    programs = {}
    for form, scan in (("scan", True), ("unrolled", False)):
      rcfg = rollout_lib.RolloutConfig(scan_chunks=scan, window_frames=window_frames)
      t0 = time.perf_counter()
      programs[form] = rollout_lib.make_rollout(graphdef, rcfg).lower(state, x, ctx, key).compile()
      row[f"{form}_compile_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(programs["scan"](state, x, ctx, key))
    rounds = int(min(15, max(3, budget_s / (2 * (time.perf_counter() - t0)))))
    ms = alternating_medians({f: (lambda c=c: c(state, x, ctx, key)) for f, c in programs.items()},
                             rounds)
    row.update(scan_s=ms["scan"], unrolled_s=ms["unrolled"], rounds=rounds,
               run_ratio=ms["scan"] / ms["unrolled"], seconds=ms["scan"])
    rows.append(row)
  return rows


def vs_diffusers(repeats, frames=9, height=32, width=48, text_len=64):
  """The ``small`` model's bidirectional float32 forward against diffusers'
  ``WanTransformer3DModel`` on the same weights and inputs, timed side by side in alternation
  (so machine noise hits both alike); the ratio is afd_jax's median time over the peer's."""
  import tempfile

  import numpy as np
  import torch
  from diffusers.models.transformers import transformer_wan

  cfg = wan.preset("small", attention_kernel="dense", dtype="float32")
  torch.manual_seed(0)
  ref = transformer_wan.WanTransformer3DModel(
      patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads,
      attention_head_dim=cfg.head_dim, in_channels=cfg.in_dim, out_channels=cfg.out_dim,
      text_dim=cfg.text_dim, freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim,
      num_layers=cfg.num_layers, cross_attn_norm=cfg.cross_attn_norm,
      qk_norm="rms_norm_across_heads", eps=cfg.eps).eval()
  with tempfile.TemporaryDirectory() as tmp:
    ref.save_pretrained(tmp)
    model = wan.from_pretrained(tmp, attention_kernel="dense", dtype="float32")
  graphdef, state = nnx.split(model)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((1, frames, height, width, cfg.in_dim), np.float32)
  # A prompt of text_len umT5 rows: diffusers takes it zero-padded to the model's 512 rows (as its
  # pipeline passes it); afd_jax takes the rows themselves, as Wan's own DiT does, and pads inside.
  ctx = np.zeros((1, model.config.text_len, cfg.text_dim), np.float32)
  ctx[:, :text_len] = rng.standard_normal((1, text_len, cfg.text_dim))
  t = np.full((1,), 500.0, np.float32)
  ours = jax.jit(lambda s, x, c: nnx.merge(graphdef, s)(x, t, c))
  args = (state, jnp.asarray(x), jnp.asarray(ctx[:, :text_len]))
  tx = torch.from_numpy(x).permute(0, 4, 1, 2, 3).contiguous()
  tc, tt = torch.from_numpy(ctx), torch.from_numpy(t)

  def peer():
    with torch.no_grad():
      return ref(tx, timestep=tt, encoder_hidden_states=tc).sample

  out = np.asarray(ours(*args))
  err = float(np.linalg.norm(out - peer().permute(0, 2, 3, 4, 1).numpy()) / np.linalg.norm(out))
  ms = alternating_medians({"afd_jax": lambda: ours(*args), "diffusers": peer}, repeats, warmup=2)
  return [dict(config=f"small fp32 vs diffusers (torch {torch.__version__}, "
                      f"{torch.get_num_threads()} threads)",
               what=f"forward, {frames * (height // 2) * (width // 2)} tokens",
               seconds=ms["afd_jax"], peer_seconds=ms["diffusers"],
               time_ratio=ms["afd_jax"] / ms["diffusers"], rel_l2=err)]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="benchmarks/results/wan_benchmark.json")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--vs_diffusers", action="store_true",
                      help="also time diffusers' forward side by side (needs torch, diffusers)")
  parser.add_argument("--rollout_chunks", default="",
                      help="e.g. 3,7,28,112: rollout compile and run time against chunk count")
  args = parser.parse_args()
  rows = bench_config("tiny", wan.preset("tiny"), 9, 8, 12, 16, 2, args.repeats)
  rows += bench_config("small", wan.preset("small"), 9, 16, 24, 64, 1, args.repeats)
  if args.vs_diffusers:
    rows += vs_diffusers(args.repeats, height=16, width=24)
    rows += vs_diffusers(args.repeats)
  if args.rollout_chunks:
    rows += rollout_scaling([int(c) for c in args.rollout_chunks.split(",")])
  print(f"{'config':<16} {'what':<34} {'ms':>9} {'analytic GF':>12} {'XLA GF':>9} "
        f"{'ratio':>6} {'extra':>22}")
  for r in rows:
    af, xf = r.get("analytic_flops"), r.get("xla_flops")
    extra = (f"x{r['time_ratio']:.2f} of {1e3 * r['peer_seconds']:.1f} ms" if "peer_seconds" in r
             else (f"compile {r['scan_compile_s']:.1f} vs {r['unrolled_compile_s']:.1f} s, "
                   f"run x{r['run_ratio']:.2f}") if "chunks" in r
             else f"time {r['time_ratio']:.2f} / flop {r['flop_ratio']:.2f}" if "time_ratio" in r
             else "")
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
