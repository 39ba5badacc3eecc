"""Compile-only planning: per-device memory and FLOPs of every training step for a target mesh,
without weights, data or accelerators, so a pod can be sized before it is paid for.

    python -m afd_jax.tools.plan --config=configs/wan_ar.py --devices=64 \\
        --config.mesh.data=8 --config.mesh.fsdp=8 --out=plan.json

The steps are lowered from abstract state (shapes and shardings only; nothing is allocated) and
compiled for ``--devices`` CPU devices standing in for the chips: XLA partitions the program
exactly as it would on the pod, and reports each device's argument, output, temporary and aliased
(donated) bytes; FLOPs per device are the model's (``afd_jax.flops``) over the devices. The
training state per device is exact (it follows from the shardings); temporaries come from the CPU
compiler, whose fusion and layout choices differ from a TPU's or GPU's, so treat them as an
estimate and keep 10-20 % headroom. Attention compiles with the ``blockwise`` kernel (flash
attention in plain JAX), standing in for the splash (TPU) or cuDNN (GPU) kernel an ``auto`` config
gets on the target; both hold O(N D), never the ``[Nq, Nk]`` logits. A checkpoint the config names
but that is not there yet is replaced by its preset's architecture.
"""

from __future__ import annotations

import os
import sys


def _emulate_devices(argv) -> None:
  """``--devices=N`` fake CPU devices; must run before jax is imported."""
  n = next((a.split("=", 1)[1] for a in argv if a.startswith("--devices=")), None)
  if n is not None:
    if not n.isdigit() or int(n) < 1:
      print(f"afd_jax: --devices={n} must be a positive number of chips (the target's).",
            file=sys.stderr)
      sys.exit(2)  # errors.EXIT_CODE; jax must not be imported yet
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={int(n)}").strip()


if __name__ == "__main__":
  _emulate_devices(sys.argv)

import copy  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from afd_jax import errors  # noqa: E402
from afd_jax import flops as flops_lib  # noqa: E402
from afd_jax import mesh as mesh_lib  # noqa: E402
from afd_jax import methods  # noqa: E402
from afd_jax import programs  # noqa: E402
from afd_jax import state as state_lib  # noqa: E402
from afd_jax.models import attention as attn_lib  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/wan_ar.py", "Training config.",
                                          lock_config=False)
flags.DEFINE_integer("devices", None, "Emulate this many devices (the target's chip count).")
_OUT = flags.DEFINE_string("out", "", "Also write the plan as JSON here.")
_HBM = flags.DEFINE_float("hbm_gib", 0.0, "Per-chip memory to check the plan against (GiB).")

GIB = 2**30


def _per_device_bytes(tree) -> int:
  """Bytes one device holds of abstract arrays carrying shardings (the largest shard counts)."""
  return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


def _sds(shape, dtype, sharding):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def step_inputs(config, nets, state, mesh, latent_shape) -> dict:
  """``{name: (jitted step, abstract args)}`` for every program of ``config.method``."""
  d, cfg, method = config.data, nets.student_config, config.method
  batch = mesh_lib.batch_sharding(mesh)
  rep = mesh_lib.replicated(mesh)
  rows = methods.rollout_rows(config) if method in methods.ON_POLICY else d.batch_size
  x = _sds((rows, *latent_shape), jnp.float32, batch)
  ctx = _sds((rows, d.text_length, cfg.text_dim), jnp.float32, batch)
  key = jax.eval_shape(lambda: jax.random.key(0))
  key = _sds(key.shape, key.dtype, rep)
  exit_step = _sds((), jnp.int32, rep)
  fns = programs.make_step_fns(config, nets, mesh, latent_shape)
  base, disc_base = nets.frozen["student"], nets.frozen["disc"]   # None without adapters
  if method not in methods.ON_POLICY:
    return {"fm": (fns.fm, (state["student"], x, ctx, key, state["step"], base))}
  params, ref = state["student"]["params"], state.get("ref")
  steps = ({"rollout": (fns.rollout, (state["old"], x, ctx, key, None, base))}
           if method in methods.NFT
           else {"rollout": (fns.train_rollout, (params, x, ctx, key, exit_step, base))})
  if method in methods.WITH_DISC:
    steps["disc"] = (fns.disc, (state["disc"]["params"], state["disc"]["opt"], x, x, ctx, key,
                                disc_base))
  if method in methods.NFT:
    per_chunk = method in methods.WITH_DISC and config.disc.per_chunk   # one r per chunk
    r = _sds((rows, latent_shape[0] // config.rollout.chunk_frames) if per_chunk else (rows,),
             jnp.float32, batch)
    steps["student"] = (fns.student, (state["student"], state["old"], ref, x, ctx, r, key,
                                      state["step"], base))
  elif method == "gan":
    steps["student"] = (fns.student, (state["student"], state["disc"]["params"], x, x, x, ctx,
                                      exit_step, key, state["step"], base, disc_base))
  else:
    steps["critic"] = (fns.critic, (state["critic"], x, ctx, key, state["step"], base))
    steps["student"] = (fns.student, (state["student"], state["critic"]["params"], ref, x, x,
                                      ctx, exit_step, key, state["step"], base))
  return steps


def model_flops(config, cfg, latent_shape) -> dict:
  """Model FLOPs of each step for the whole batch (``afd_jax.flops``). XLA's own cost analysis
  counts a loop body once (the scanned layers, NFT passes and micro-batches), so it is not used.
  A backward costs two forwards, plus one more under rematerialisation."""
  f, h, w, _ = latent_shape
  tokens = (h // cfg.patch_size[1]) * (w // cfg.patch_size[2])
  d, chunk, method = config.data, config.rollout.chunk_frames, config.method
  train_pass = 3 + (cfg.remat_policy != "none")
  causal = flops_lib.forward_flops(cfg, f, tokens, d.text_length, "block_causal", chunk)["total"]
  if method not in methods.ON_POLICY:
    return {"fm": d.batch_size * (1 + train_pass) * causal}
  b = methods.rollout_rows(config)
  bidirectional = flops_lib.forward_flops(cfg, f, tokens, d.text_length)["total"]
  out = {"rollout": b * flops_lib.rollout_flops(cfg, f, tokens, d.text_length, chunk,
                                                len(config.rollout.denoising_steps))}
  if method in methods.WITH_DISC:
    out["disc"] = 2 * b * train_pass * bidirectional                # teacher and student videos
  exit_estimate = (1 + train_pass) * causal                         # history, then trained pass
  if method in methods.NFT:
    # context K/V of theta, old, ref; per NFT pass old and ref forwards, theta trained
    out.update(student=b * (3 + config.afd.nft_passes * (2 + train_pass)) * causal, old=0.0)
  elif method == "gan":  # the discriminator's backward into the student's videos, its teacher side
    out["student"] = b * (exit_estimate + (train_pass + 1) * bidirectional)
  else:                  # the fake score's flow matching; real and fake scores with their history
    out.update(critic=b * (1 + train_pass) * causal, student=b * (exit_estimate + 4 * causal))
  return out


def plan(config) -> dict:
  """Compiles each step for the config's mesh and returns the per-device figures. ``config`` is
  left as given: a checkpoint not on this machine is planned with the preset's architecture (the
  runtime settings, which every network takes from ``config.model``, are unchanged)."""
  config = copy.deepcopy(config)
  for field in ("model", "disc"):
    path = config[field].checkpoint
    if path and not Path(path).exists():
      logging.warning("config.%s.checkpoint=%s is not there: planning with the %r preset's "
                      "architecture.", field, path, config.model.preset)
      config[field].checkpoint = ""
  if jax.default_backend() == "cpu" and config.model.attention_kernel in ("auto", "cudnn", "splash"):
    config.model.attention_kernel = "blockwise"  # stands in for the target's flash kernel
  mesh = mesh_lib.mesh_from_config(config)
  nets, state = state_lib.build_state(config, mesh, abstract=True)
  methods.check_divisibility(config, mesh, nets.student_config)
  d = config.data
  latent_shape = (d.num_frames, d.height, d.width, nets.student_config.in_dim)
  # Resident through every step: the training state and the frozen bases adapters apply to.
  state_bytes = _per_device_bytes(state) + _per_device_bytes(nets.frozen)
  kernel = attn_lib.resolve_kernel(config.model.attention_kernel, config.model.dtype)
  out = {"devices": mesh.size, "platform": jax.default_backend(), "mesh": dict(mesh.shape),
         "attention_kernel": kernel,
         "method": config.method, "batch_size": d.batch_size, "latent_shape": list(latent_shape),
         "state_bytes_per_device": state_bytes,
         "state_bytes": {**{k: _per_device_bytes(v) for k, v in state.items()},
                         **{f"{k} base": _per_device_bytes(v) for k, v in nets.frozen.items()
                            if v is not None}}, "steps": {}}
  flops = model_flops(config, nets.student_config, latent_shape)
  with jax.set_mesh(mesh):
    for name, (fn, args) in step_inputs(config, nets, state, mesh, latent_shape).items():
      compiled = fn.lower(*args).compile()
      mem = compiled.memory_analysis()
      # The state this step does not take stays resident while it runs.
      peak = (mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
              - mem.alias_size_in_bytes + max(state_bytes - _per_device_bytes(args), 0))
      out["steps"][name] = {"arguments": mem.argument_size_in_bytes,
                            "outputs": mem.output_size_in_bytes,
                            "temporaries": mem.temp_size_in_bytes,
                            "donated": mem.alias_size_in_bytes, "peak": peak,
                            "flops": flops[name] / mesh.size}
  out["peak_bytes_per_device"] = max(s["peak"] for s in out["steps"].values())
  out["flops_per_device_per_iteration"] = sum(s["flops"] for s in out["steps"].values())
  return out


def _size(n: float) -> str:
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= scale:
      return f"{n / scale:.2f} {unit}"
  return f"{n:.0f} B"


def _flop(n: float) -> str:
  for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
    if n >= scale:
      return f"{n / scale:.1f} {unit}"
  return f"{n:.0f} FLOP"


def format_table(p: dict, hbm_gib: float = 0.0) -> str:
  lines = [f"{p['method']} on {p['devices']} {p['platform']} devices, mesh "
           + " x ".join(f"{k}={v}" for k, v in p["mesh"].items())
           + f", batch {p['batch_size']}, latents {p['latent_shape']}, attention kernel "
           + p["attention_kernel"] + (" (holds the logits: temporaries are an upper bound)"
                                      if p["attention_kernel"] == "dense" else ""),
           f"training state per device: {_size(p['state_bytes_per_device'])} ("
           + ", ".join(f"{k} {_size(v)}" for k, v in p["state_bytes"].items()) + ")", "",
           "| step | arguments | temporaries | outputs | donated | peak | FLOPs |",
           "|---|---:|---:|---:|---:|---:|---:|"]
  for name, s in p["steps"].items():
    lines.append(f"| {name} | " + " | ".join(_size(s[k]) for k in (
        "arguments", "temporaries", "outputs", "donated", "peak")) + f" | {_flop(s['flops'])} |")
  lines.append(f"\npeak per device: {_size(p['peak_bytes_per_device'])}; "
               f"{_flop(p['flops_per_device_per_iteration'])} per device per iteration")
  if hbm_gib:
    fits = p["peak_bytes_per_device"] <= 0.9 * hbm_gib * GIB
    lines.append(f"against {hbm_gib:g} GiB per chip (90% usable): "
                 + ("fits" if fits else "DOES NOT FIT"))
  return "\n".join(lines)


def main(argv):
  del argv
  config = _CONFIG.value
  if config.method not in methods.METHODS:
    raise errors.UserError(f"config.method={config.method!r} is not one of {methods.METHODS}.")
  p = plan(config)
  print(format_table(p, _HBM.value))
  if _OUT.value:
    Path(_OUT.value).write_text(json.dumps(p, indent=2))
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  errors.run(main)
