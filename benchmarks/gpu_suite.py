"""Everything worth measuring on a lent GPU, most valuable first, in one command.

    PYTHONPATH=. python benchmarks/gpu_suite.py --out DIR [--deadline_s 480] [--smoke]

Each section appends one JSON record to ``DIR/gpu_suite.jsonl`` the moment it finishes, so a late
failure, or the device call's own timeout, loses nothing measured before it; a section that
would not finish before ``--deadline_s`` (its estimate says) is recorded as skipped, and a
section that fails is recorded with its error while the suite goes on. Sections:

1. ``matmul``: the measured bf16 matmul rate, the denominator of every MFU below.
2. ``attention``: the cuDNN and ``blockwise`` kernels against ``dense`` on Wan's first and last
   chunk shapes in bf16 (error against float32 dense, speed). If cuDNN fails, later sections use
   the best kernel that worked, and the record says so.
3. ``chunk_forward``: the 1.3B KV-cache forward of chunk 0 and chunk 6 (ms, MFU).
4. ``rollout``: the 21-latent-frame, 4-step rollout (seconds, compile seconds, peak memory).
5. ``afd_iteration`` / ``afd_iteration_lora``: one AFD iteration of ``configs/wan_ar.py`` at
   batch 1 with random weights (student and discriminator 1.3B): rollout, discriminator (with the
   advantage) and student times, compile times, XLA's memory plan per program, peak memory.
   These need ``ml_collections`` (configs); the device image lacks it: carry its wheel
   (DEVELOPERS.md).
6. ``vae_decode``: the VAE decode of 81 x 480 x 832 in bf16.

``--smoke`` runs every section on tiny shapes on the CPU (``tests/test_gpu_suite.py``), so the
suite is known to work before a device is ever lent. Only jax, flax, optax, numpy and einops
are needed besides ``ml_collections`` for the two AFD sections.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from afd_jax import flops
from afd_jax import rollout as rollout_lib
from afd_jax.models import attention as attn_lib
from afd_jax.models import wan
from afd_jax.models import wan_vae
from common import median_time, peak_device_bytes


@dataclasses.dataclass(frozen=True)
class Shapes:
  """What each section runs: the real recipe, or tiny stand-ins for ``--smoke``."""

  matmul: int
  heads: int
  head_dim: int
  preset: str
  frames: int       # latent frames of the video
  height: int       # latent height and width
  width: int
  text_len: int
  vae_video: tuple[int, int, int]
  lora_rank: int
  repeats: int
  # Seconds each section may take on the device (compile included), checked against the deadline.
  estimates: dict = dataclasses.field(default_factory=dict)


REAL = Shapes(matmul=8192, heads=12, head_dim=128, preset="1.3b", frames=21, height=60, width=104,
              text_len=512, vae_video=(81, 480, 832), lora_rank=256, repeats=5,
              estimates={"matmul": 15, "attention": 60, "chunk_forward": 90, "rollout": 150,
                         "afd_iteration": 240, "afd_iteration_lora": 240, "vae_decode": 150})
SMOKE = Shapes(matmul=128, heads=2, head_dim=16, preset="tiny", frames=6, height=4, width=6,
               text_len=16, vae_video=(5, 16, 16), lora_rank=4, repeats=2,
               estimates=dict.fromkeys(REAL.estimates, 1))


def compile_timed(jitted, *args):
  """``(compiled, seconds)``: lowering and compiling, timed apart from running."""
  t0 = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - t0


def memory_plan(compiled) -> dict:
  m = compiled.memory_analysis()
  if m is None:
    return {}
  return {"argument_bytes": int(m.argument_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
          "temp_bytes": int(m.temp_size_in_bytes), "alias_bytes": int(m.alias_size_in_bytes)}


def rel_l2(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# ----------------------------------------------------------------------------------------------
# Sections. Each takes the suite's context and returns its record's fields.


class Suite:
  def __init__(self, shapes: Shapes, out: Path, deadline_s: float, smoke: bool):
    self.s, self.out, self.smoke = shapes, out, smoke
    self.deadline = time.monotonic() + deadline_s
    self.kernel = "dense" if smoke else "cudnn"   # the attention kernel later sections use
    self.matmul_flops_per_s = None
    out.mkdir(parents=True, exist_ok=True)
    self.path = out / "gpu_suite.jsonl"
    self.path.unlink(missing_ok=True)

  def record(self, section: str, **fields):
    row = {"section": section, **fields}
    with open(self.path, "a") as fh:
      fh.write(json.dumps(row) + "\n")
    shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in fields.items()
             if not isinstance(v, (dict, list))}
    print(f"[{section}] " + " ".join(f"{k}={v}" for k, v in shown.items()), flush=True)

  def run(self, name: str, fn):
    left = self.deadline - time.monotonic()
    if left < self.s.estimates.get(name, 0):
      self.record(name, status="skipped", reason=f"{left:.0f} s left before the deadline, "
                  f"the section needs about {self.s.estimates[name]} s")
      return
    t0 = time.perf_counter()
    try:
      fields = fn()
    except Exception as e:   # record and go on: a later section may still work
      self.record(name, status="failed", error=f"{type(e).__name__}: {e}"[:2000],
                  traceback=traceback.format_exc()[-4000:], seconds_total=time.perf_counter() - t0)
      return
    self.record(name, status="ok", seconds_total=time.perf_counter() - t0, **fields)

  def env(self):
    d = jax.devices()[0]
    self.record("env", status="ok", jax=jax.__version__, backend=jax.default_backend(),
                device=getattr(d, "device_kind", str(d)), devices=jax.device_count(),
                python=platform.python_version(), smoke=self.smoke,
                memory_bytes=(d.memory_stats() or {}).get("bytes_limit"))

  def mfu(self, flop, seconds):
    return flop / seconds / self.matmul_flops_per_s if self.matmul_flops_per_s else None

  # -- 1 ---------------------------------------------------------------------------------------

  def matmul(self):
    n = self.s.matmul
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    fn = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(fn(a, b))
    seconds = median_time(lambda: fn(a, b), 10)
    self.matmul_flops_per_s = 2 * n ** 3 / seconds
    return {"n": n, "seconds": seconds, "tflops_per_s": self.matmul_flops_per_s / 1e12}

  # -- 2 ---------------------------------------------------------------------------------------

  def attention(self):
    s = self.s
    chunk = 3 * (s.height // 2) * (s.width // 2)
    rows, working = [], {}
    for keys in (chunk, s.frames // 3 * chunk):
      k0, k1, k2 = jax.random.split(jax.random.key(keys), 3)
      q = jax.random.normal(k0, (1, chunk, s.heads, s.head_dim), jnp.bfloat16)
      k = jax.random.normal(k1, (1, keys, s.heads, s.head_dim), jnp.bfloat16)
      v = jax.random.normal(k2, (1, keys, s.heads, s.head_dim), jnp.bfloat16)
      exact = jax.jit(attn_lib.dense_attention)(*(x.astype(jnp.float32) for x in (q, k, v)))
      flop = 4 * chunk * keys * s.heads * s.head_dim
      for kernel in ("cudnn", "blockwise", "dense"):
        row = {"queries": chunk, "keys": keys, "kernel": kernel}
        try:
          fn = jax.jit(lambda q, k, v, kernel=kernel: attn_lib.attend(q, k, v, kernel))
          compiled, row["compile_s"] = compile_timed(fn, q, k, v)
          row["rel_l2_vs_fp32_dense"] = rel_l2(compiled(q, k, v), exact)
          row["ms"] = 1e3 * median_time(lambda: compiled(q, k, v), s.repeats)
          row["mfu"] = self.mfu(flop, row["ms"] / 1e3)
          working.setdefault(kernel, []).append(row["ms"])
        except Exception as e:
          row["error"] = f"{type(e).__name__}: {e}"[:500]
        rows.append(row)
    usable = [k for k in ("cudnn", "blockwise", "dense") if len(working.get(k, ())) == 2]
    self.kernel = min(usable, key=lambda k: sum(working[k])) if usable else "dense"
    return {"rows": rows, "kernel_for_later_sections": self.kernel}

  # -- 3, 4 ------------------------------------------------------------------------------------

  def _model(self):
    cfg = wan.preset(self.s.preset, dtype="bfloat16", attention_kernel=self.kernel,
                     text_len=self.s.text_len)
    return cfg, nnx.split(wan.init(cfg))

  def chunk_forward(self):
    s = self.s
    cfg, (graphdef, state) = self._model()
    tpf = (s.height // 2) * (s.width // 2)
    key = jax.random.key(0)
    ctx = jax.random.normal(key, (1, s.text_len, cfg.text_dim), jnp.bfloat16)
    text = jax.jit(lambda p, c: nnx.merge(graphdef, p).text_kv(c))(state, ctx)
    x = jax.random.normal(key, (1, 3, s.height, s.width, cfg.in_dim), jnp.float32)
    t = jnp.full((1,), 937.5)
    fn = jax.jit(lambda p, x, text, cache, start: nnx.merge(graphdef, p).forward_cached(
        x, t, text, cache, start)[0])
    rows = []
    for c in (0, s.frames // 3 - 1):
      shape = (cfg.num_layers, 1, 3 * c * tpf, cfg.num_heads, cfg.head_dim)
      cache = None if c == 0 else wan.KV(jnp.ones(shape, cfg.dtype), jnp.ones(shape, cfg.dtype))
      start = jnp.asarray(3 * c)
      compiled, compile_s = compile_timed(fn, state, x, text, cache, start)
      seconds = median_time(lambda: compiled(state, x, text, cache, start), s.repeats)
      f = flops.chunk_flops(cfg, 3 * tpf, 3 * c * tpf, s.text_len, 3)
      rows.append({"chunk": c, "ms": 1e3 * seconds, "compile_s": compile_s, "flops": f,
                   "mfu": self.mfu(f, seconds)})
    return {"kernel": self.kernel, "rows": rows, "peak_bytes": peak_device_bytes()}

  def rollout(self):
    s = self.s
    cfg, (graphdef, state) = self._model()
    key = jax.random.key(0)
    noise = jax.random.normal(key, (1, s.frames, s.height, s.width, cfg.in_dim), jnp.float32)
    ctx = jax.random.normal(key, (1, s.text_len, cfg.text_dim), jnp.float32)
    compiled, compile_s = compile_timed(rollout_lib.make_rollout(graphdef), state, noise, ctx, key)
    jax.block_until_ready(compiled(state, noise, ctx, key))
    seconds = median_time(lambda: compiled(state, noise, ctx, key), max(2, s.repeats // 2))
    tpf = (s.height // 2) * (s.width // 2)
    f = flops.rollout_flops(cfg, s.frames, tpf, s.text_len, 3, 4)
    return {"kernel": self.kernel, "frames": s.frames, "seconds": seconds, "compile_s": compile_s,
            "flops": f, "mfu": self.mfu(f, seconds), "memory_plan": memory_plan(compiled),
            "peak_bytes": peak_device_bytes()}

  # -- 5 ---------------------------------------------------------------------------------------

  def afd_config(self, lora: bool):
    from configs import tiny, wan_ar   # needs ml_collections
    s = self.s
    c = (tiny if self.smoke else wan_ar).get_config()
    c.model.checkpoint = c.disc.checkpoint = ""      # random weights: speed does not depend on them
    c.model.preset, c.model.attention_kernel = s.preset, self.kernel
    c.model.dtype, c.data.text_length = "bfloat16", s.text_len
    c.data.batch_size, c.train.micro_batches = 1, 1
    c.data.num_frames, c.data.height, c.data.width = s.frames, s.height, s.width
    c.mesh.data, c.mesh.fsdp = 1, -1
    if lora:
      c.model.lora_rank = c.disc.lora_rank = s.lora_rank
    if self.smoke:   # the fewest layers and NFT passes that still run every part of the step
      c.model.overrides.num_layers, c.disc.readout_layers, c.afd.nft_passes = 1, (0,), 1
    return c

  def afd_iteration(self, lora: bool = False):
    from afd_jax import mesh as mesh_lib
    from afd_jax import methods
    from afd_jax import programs
    from afd_jax import state as state_lib

    config = self.afd_config(lora)
    mesh = mesh_lib.mesh_from_config(config)
    t0 = time.perf_counter()
    nets, state = state_lib.build_state(config, mesh)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0
    cfg, d = nets.student_config, config.data
    latent_shape = (d.num_frames, d.height, d.width, cfg.in_dim)
    fns = programs.make_step_fns(config, nets, mesh, latent_shape)
    rows = methods.rollout_rows(config)
    batch = mesh_lib.batch_sharding(mesh)
    teacher = jax.device_put(jnp.zeros((rows, *latent_shape), jnp.float32), batch)
    context = jax.device_put(
        jax.random.normal(jax.random.key(1), (rows, d.text_length, cfg.text_dim)), batch)
    frozen = nets.frozen
    compiled, compile_s, plans = {}, {}, {}

    def call(name, jitted, *args):
      if name not in compiled:
        compiled[name], compile_s[name] = compile_timed(jitted, *args)
        plans[name] = memory_plan(compiled[name])
      return compiled[name](*args)

    times = []
    with jax.set_mesh(mesh):
      for i in range(2):    # the first iteration compiles; the second is timed
        key = jax.random.key(i)
        lap, t = {}, time.perf_counter()
        noise = fns.noise(key, rows)
        x = call("rollout", fns.rollout, state["old"], noise, context, key, None, frozen["student"])
        jax.block_until_ready(x)
        lap["rollout_s"], t = time.perf_counter() - t, time.perf_counter()
        disc = state["disc"]
        p, o, out = call("disc", fns.disc, disc["params"], disc["opt"], teacher, x, context, key,
                         frozen["disc"])
        state["disc"] = {"params": p, "opt": o}
        jax.block_until_ready(out["r"])
        lap["disc_s"], t = time.perf_counter() - t, time.perf_counter()
        state["student"], state["old"], metrics = call(
            "student", fns.student, state["student"], state["old"], state.get("ref"), x, context,
            out["r"], key, state["step"], frozen["student"])
        jax.block_until_ready(state["old"])
        lap["student_s"] = time.perf_counter() - t
        times.append(lap)
    finite = bool(np.isfinite(float(metrics["student/loss"])))
    return {"lora_rank": config.model.lora_rank, "kernel": self.kernel, "init_s": init_s,
            **times[-1], "iteration_s": sum(times[-1].values()), "compile_s": compile_s,
            "memory_plan": plans, "peak_bytes": peak_device_bytes(), "loss_finite": finite}

  # -- 6 ---------------------------------------------------------------------------------------

  def vae_decode(self):
    f, h, w = self.s.vae_video
    vae = wan_vae.init(wan_vae.VAEConfig(dtype="bfloat16"))
    lat = vae.config.latent_shape(f, h, w)
    z = jax.random.normal(jax.random.key(0), (1, *lat, vae.config.z_dim), jnp.float32)
    t0 = time.perf_counter()
    jax.block_until_ready(wan_vae.decode(vae, z))
    first_s = time.perf_counter() - t0
    seconds = median_time(lambda: wan_vae.decode(vae, z), max(1, self.s.repeats // 2))
    return {"video": [f, h, w], "latents": list(lat), "seconds": seconds,
            "first_call_s": first_s, "peak_bytes": peak_device_bytes()}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="folder for gpu_suite.jsonl")
  parser.add_argument("--deadline_s", type=float, default=480.0,
                      help="start no section that would end after this many seconds")
  parser.add_argument("--smoke", action="store_true", help="tiny shapes, CPU: checks the suite")
  parser.add_argument("--only", default="", help="comma-separated sections (default: all)")
  args = parser.parse_args(argv)
  if not args.smoke and jax.default_backend() != "gpu":
    sys.exit("gpu_suite: no GPU here (backend %s); use --smoke to check the suite on CPU."
             % jax.default_backend())
  suite = Suite(SMOKE if args.smoke else REAL, Path(args.out), args.deadline_s, args.smoke)
  sections = {"matmul": suite.matmul, "attention": suite.attention,
              "chunk_forward": suite.chunk_forward, "rollout": suite.rollout,
              "afd_iteration": suite.afd_iteration,
              "afd_iteration_lora": lambda: suite.afd_iteration(lora=True),
              "vae_decode": suite.vae_decode}
  only = [s for s in args.only.split(",") if s]
  unknown = set(only) - set(sections)
  if unknown:
    sys.exit(f"gpu_suite: unknown sections {sorted(unknown)}; choose from {list(sections)}.")
  suite.env()
  for name, fn in sections.items():
    if not only or name in only:
      suite.run(name, fn)
  print(f"wrote {suite.path}")


if __name__ == "__main__":
  main()
