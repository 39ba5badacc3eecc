"""Self-Forcing's chunk-wise few-step sampler with a fixed-capacity KV cache, as one jitted function.

For chunk ``b`` (``chunk_frames`` latent frames): start from the initial noise; for each warped
timestep ``t_q`` predict the velocity against the cache, take ``x0 = x - s_q v``, and, except after
the last step, re-noise with *fresh* noise to ``s_{q+1}`` (``sampler="ode"`` takes the
deterministic Euler step ``x + (s_{q+1} - s_q) v`` instead, for undistilled students). The chunk's output is the last ``x0``.
A ``t = 0`` pass over that clean chunk then commits its post-RoPE K/V to the cache; later chunks
attend to the committed K/V and to themselves. Text K/V are computed once.

Static shapes, so the whole video compiles once per input shape, and its compile time does not
grow with its length: the chunks run under ``lax.scan`` over one fixed-capacity cache buffer,
written in place with dynamic slices; each chunk attends to the buffer's written prefix, and the
attention kernels stop at its length (cuDNN's key sequence lengths; for ``dense`` the shortest of
at most 17 static prefixes that holds it; elsewhere an online softmax over key blocks that skips
every block past it), so (almost) no work goes to unwritten slots. The denoising steps of a chunk
run under an inner ``lax.scan``. ``scan_chunks=False`` unrolls the chunks in Python over static
cache slices instead (one program per chunk's shapes; its compile time grows by 0.65-0.8 s per
chunk on a CPU, and its run time there equals the scanned form's within 3 %:
``docs/benchmarks.md``).

With ``window_frames`` (LongLive-style local attention) the cache holds ``sink_frames`` sink
frames plus a ring of ``window_frames - sink_frames - chunk_frames`` recent frames, so videos longer
than the cache roll through it. Keys carry absolute RoPE positions, so slot order does not matter.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from afd_jax import errors
from afd_jax import flow
from afd_jax import lora as lora_lib
from afd_jax import steps
from afd_jax.models import wan


SAMPLERS = ("renoise", "ode")


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  chunk_frames: int = 3
  denoising_steps: tuple[float, ...] = (1000.0, 750.0, 500.0, 250.0)
  shift: float = 5.0
  warp: bool = True
  commit_timestep: float = 0.0
  commit_last_chunk: bool = False
  window_frames: int | None = None
  sink_frames: int = 0
  unroll_steps: bool = False  # unrolled steps: longer compile, exact XLA cost analysis
  # Chunks under lax.scan: compile time independent of the video's length, attention stopping
  # at the cache's written length. False: chunks unrolled in Python over static cache slices.
  scan_chunks: bool = True
  # "renoise": Self-Forcing's x0-then-fresh-noise steps (for distilled few-step students);
  # "ode": deterministic Euler steps of the flow ODE, for students that are plain flow-matching
  # models (e.g. pretrained bases), whose x0 predictions are conditional means.
  sampler: str = "renoise"

  def __post_init__(self):
    if self.sampler not in SAMPLERS:
      raise errors.UserError(f"rollout sampler {self.sampler!r} is not one of {SAMPLERS}.")

  def timesteps(self) -> np.ndarray:
    steps = np.asarray(self.denoising_steps, np.float32)
    return flow.warped_timesteps(steps, self.shift) if self.warp else steps


@dataclasses.dataclass(frozen=True)
class CachePlan:
  """Where each chunk reads and writes in the cache buffer, in frames (all static)."""

  capacity_frames: int
  reads: tuple[int, ...]          # chunk b attends to cache frames [0, reads[b])
  writes: tuple[int | None, ...]  # chunk b commits to cache frames [writes[b], writes[b] + f)


def plan_cache(num_frames: int, cfg: RolloutConfig) -> CachePlan:
  f = cfg.chunk_frames
  if num_frames % f:
    raise errors.UserError(f"{num_frames} latent frames are not a multiple of chunk_frames={f}.")
  chunks = num_frames // f
  last_write = chunks if cfg.commit_last_chunk else chunks - 1
  if not cfg.window_frames:
    if cfg.sink_frames:
      raise errors.UserError("sink_frames only applies together with window_frames.")
    reads = tuple(b * f for b in range(chunks))
    writes = tuple(b * f if b < last_write else None for b in range(chunks))
    return CachePlan(max(last_write * f, 0), reads, writes)
  wan.check_window(cfg.window_frames, cfg.sink_frames, f)
  sink, ring = cfg.sink_frames, cfg.window_frames - cfg.sink_frames - f
  reads, writes = [], []
  for b in range(chunks):
    start = b * f
    reads.append(min(start, sink + ring))
    if b >= last_write:
      writes.append(None)
    elif start < sink:
      writes.append(start)
    else:
      writes.append(sink + (start - sink) % ring if ring else None)
  return CachePlan(sink + ring, tuple(reads), tuple(writes))


def rollout(model: wan.WanModel, noise, context, key, cfg: RolloutConfig = RolloutConfig(),
            return_intermediates: bool = False, exit_step=None):
  """Samples clean latents ``[B, F, H, W, C]`` chunk by chunk from initial ``noise`` of that shape.

  ``key`` draws the fresh noise between steps. With ``return_intermediates`` also returns
  ``{"inputs", "velocities"}`` of shape ``[S, B, F, H, W, C]``: the model input and prediction at
  every denoising step (chunk b's entries at frames of chunk b). ``exit_step`` (an index, may be
  traced) ends every chunk at that step's clean estimate instead of the last one, and later
  chunks see that estimate as history: Self-Forcing's training rollout, whose exit step is the
  only one a generator loss backpropagates through (``steps.exit_estimate``).
  """
  num_frames = noise.shape[1]
  plan = plan_cache(num_frames, cfg)
  text = model.text_kv(context)
  cache = empty_cache(model, noise.shape, plan)
  chunks = num_frames // cfg.chunk_frames
  if cfg.scan_chunks:
    def body(cache, chunk):
      clean, cache, inter = chunk_step(model, noise, text, cache, key, chunk, plan, cfg, exit_step)
      return cache, (clean, inter)

    _, (outputs, (inputs, velocities)) = jax.lax.scan(body, cache, jnp.arange(chunks))
    join = lambda x, axis: jnp.moveaxis(x, 0, axis).reshape(
        *x.shape[1:axis + 1], num_frames, *x.shape[axis + 2:])   # chunk axis into frames
    latents = join(outputs, 1)
    inputs, velocities = join(inputs, 2), join(velocities, 2)
  else:
    outputs, inputs, velocities = [], [], []
    for chunk in range(chunks):
      clean, cache, (xs, vs) = chunk_step(model, noise, text, cache, key, chunk, plan, cfg,
                                          exit_step)
      outputs.append(clean)
      inputs.append(xs)
      velocities.append(vs)
    latents = jnp.concatenate(outputs, 1)
    inputs, velocities = jnp.concatenate(inputs, 2), jnp.concatenate(velocities, 2)
  if not return_intermediates:
    return latents
  return latents, {"inputs": inputs, "velocities": velocities}


def _tokens_per_frame(mcfg: wan.WanConfig, shape) -> int:
  return (shape[2] // mcfg.patch_size[1]) * (shape[3] // mcfg.patch_size[2]) // mcfg.patch_size[0]


def empty_cache(model: wan.WanModel, shape, plan: CachePlan) -> wan.KV:
  """The zero KV cache of a rollout of latents ``shape`` (``[B, F, H, W, C]``)."""
  mcfg = model.config
  size = (mcfg.num_layers, shape[0], plan.capacity_frames * _tokens_per_frame(mcfg, shape),
          mcfg.num_heads, mcfg.head_dim)
  return wan.constrain_kv(wan.KV(jnp.zeros(size, mcfg.dtype), jnp.zeros(size, mcfg.dtype)))


def chunk_step(model: wan.WanModel, noise, text, cache: wan.KV, key, chunk, plan: CachePlan,
               cfg: RolloutConfig, exit_step=None):
  """Chunk ``chunk`` of a rollout: its denoising steps from ``noise``'s frames of it against the
  cache, then its clean latents committed where the plan writes them. Returns ``(clean [B, f, H,
  W, C], cache, (inputs, velocities) [S, B, f, H, W, C])``.

  A Python int ``chunk`` reads and writes static cache slices (one program per chunk); a traced
  one (a ``lax.scan`` over chunks) reads the whole buffer with its written length, which the
  attention kernels stop at, and writes with a dynamic slice, in place."""
  b = noise.shape[0]
  f = cfg.chunk_frames
  start = chunk * f
  per_frame = _tokens_per_frame(model.config, noise.shape)
  ts = jnp.asarray(cfg.timesteps())
  sigmas = flow.timestep_to_sigma(ts)
  next_sigmas = jnp.concatenate([sigmas[1:], jnp.zeros((1,), jnp.float32)])
  static = isinstance(chunk, int)
  if static:   # the read prefix sliced out exactly: every key in ctx is written
    n_read, cache_len = plan.reads[chunk] * per_frame, None
    ctx = None if n_read == 0 else wan.KV(cache.k[:, :, :n_read], cache.v[:, :, :n_read])
    x_in = noise[:, start:start + f]
  else:        # the whole buffer, of which the first cache_len tokens are written
    cache_len = jnp.asarray(plan.reads, jnp.int32)[chunk] * per_frame
    ctx = cache if plan.capacity_frames else None
    x_in = jax.lax.dynamic_slice_in_dim(noise, start, f, axis=1)

  def denoise(x, step):
    t, s, s_next, k = step
    v, _ = model.forward_cached(x, jnp.full((b,), t), text, ctx, start, cache_len)
    x0 = flow.x0_from_velocity(x, v, s)
    if cfg.sampler == "ode":
      x_next = x + (s_next - s) * v
    else:
      fresh = jax.random.normal(k, x.shape, x.dtype)
      x_next = jnp.where(s_next > 0, flow.add_noise(x0, fresh, s_next), x0)
    return x_next, (x0, x, v)

  keys = jax.random.split(jax.random.fold_in(key, chunk), len(cfg.denoising_steps))
  _, (x0s, xs, vs) = jax.lax.scan(denoise, x_in, (ts, sigmas, next_sigmas, keys),
                                  unroll=cfg.unroll_steps)
  clean = x0s[-1] if exit_step is None else jnp.take(x0s, exit_step, axis=0)

  def commit(cache, slot):
    _, kv = model.forward_cached(clean, jnp.full((b,), cfg.commit_timestep), text, ctx, start,
                                 cache_len)
    return wan.constrain_kv(wan.KV(*(jax.lax.dynamic_update_slice_in_dim(
        c, n.astype(c.dtype), slot * per_frame, axis=2) for c, n in zip(cache, kv))))

  if static:
    if plan.writes[chunk] is not None:
      cache = commit(cache, plan.writes[chunk])
  elif plan.capacity_frames:
    slot = jnp.asarray([-1 if w is None else w for w in plan.writes], jnp.int32)[chunk]
    cache = jax.lax.cond(slot >= 0, commit, lambda cache, slot: cache, cache, slot)
  return clean, cache, (xs, vs)


@functools.lru_cache(maxsize=8)
def _stream_programs(graphdef: nnx.GraphDef, cfg: RolloutConfig, plan: CachePlan):
  """The compiled pieces of a streamed rollout: text K/V, the zero cache, one program a chunk."""
  text = jax.jit(lambda s, c: nnx.merge(graphdef, s).text_kv(c))
  cache = jax.jit(lambda s, shape: empty_cache(nnx.merge(graphdef, s), shape, plan),
                  static_argnums=1)
  step = jax.jit(lambda s, x, t, c, k, chunk: chunk_step(nnx.merge(graphdef, s), x, t, c, k,
                                                         chunk, plan, cfg)[:2],
                 static_argnums=5, donate_argnums=3)
  return text, cache, step


def stream(model: wan.WanModel, noise, context, key, cfg: RolloutConfig = RolloutConfig()):
  """The rollout as a generator: yields each chunk's clean latents ``[B, f, H, W, C]`` as soon as
  it is sampled (the same numbers as ``rollout``, chunk by chunk), so a caller can decode and show
  the first frames while later chunks are sampled. One compiled program per chunk, reused by
  every later stream of the same model, settings and shape."""
  plan = plan_cache(noise.shape[1], cfg)
  graphdef, state = nnx.split(model)
  text_fn, cache_fn, step = _stream_programs(graphdef, cfg, plan)
  text, cache = text_fn(state, context), cache_fn(state, tuple(noise.shape))
  for chunk in range(noise.shape[1] // cfg.chunk_frames):
    clean, cache = step(state, noise, text, cache, key, chunk)
    yield clean


def make_rollout(graphdef: nnx.GraphDef, cfg: RolloutConfig = RolloutConfig(),
                 return_intermediates: bool = False, out_shardings=None, micro_batches: int = 1,
                 exit_inputs: bool = False, lora: lora_lib.LoRA | None = None):
  """A jitted pure function ``(params, noise, context, key[, exit_step, frozen]) -> latents``
  over split NNX state (``params`` an adapter set over ``frozen`` with ``lora``);
  ``micro_batches`` > 1 samples the batch in that many slices, one after the other (bounded
  memory, as in the training steps). ``exit_inputs``: ``(params, noise, context, key, exit_step)
  -> (latents, inputs)``, the training rollout ending each chunk at ``exit_step`` and the model
  inputs of that step (what a generator loss recomputes with gradient)."""
  if micro_batches > 1 and return_intermediates:
    raise errors.UserError("return_intermediates needs micro_batches=1.")

  def one(model, noise, context, key, exit_step):
    if not exit_inputs:
      return rollout(model, noise, context, key, cfg, return_intermediates)
    x, inter = rollout(model, noise, context, key, cfg, True, exit_step=exit_step)
    return x, jnp.take(inter["inputs"], exit_step, axis=0)

  def fn(params, noise, context, key, exit_step=None, frozen=None):
    model = steps.merged(graphdef, lora, frozen, params)
    if micro_batches == 1:
      return one(model, noise, context, key, exit_step)
    micro = (steps.split_micro(noise, micro_batches), steps.split_micro(context, micro_batches),
             jax.random.split(key, micro_batches))
    return jax.tree.map(steps.merge_micro,
                        jax.lax.map(lambda a: one(model, *a, exit_step), micro))

  return jax.jit(fn, out_shardings=out_shardings)


def sample_noise(key, batch: int, latent_shape: Sequence[int]):
  """Initial Gaussian noise ``[B, F, H, W, C]`` for a rollout."""
  return jax.random.normal(key, (batch, *latent_shape), jnp.float32)
