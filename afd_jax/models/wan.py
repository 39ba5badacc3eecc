"""The Wan2.1 text-to-video DiT in Flax NNX, with the causal modes of Self-Forcing / CausVid.

One parameter layout serves every use: bidirectional (teacher, discriminator trunk), block-causal
over chunks, the two-copy teacher-forcing layout, and chunk-by-chunk KV-cache inference. Semantics
follow the original ``wan/modules/model.py`` (see ``shared/reference/wan_reference.md``):

* latents are channel-last ``[B, F, H, W, C]``; timesteps are on the 0..1000 scale, ``[B]`` or
  per latent frame ``[B, F]``; ``context`` is the umT5 output ``[B, L, text_dim]``;
* time embedding, the six-way modulation, norms, gates and the residual stream run in fp32; matmuls
  and attention run in ``config.dtype`` (bf16 on accelerators), parameters in ``param_dtype``;
* q/k RMSNorm spans all heads; RoPE splits each head into temporal/height/width pairs, adjacent-pair
  convention, temporal position = absolute latent frame (plus an offset in cached rollout);
* cross-attention covers every text position with no key mask; the head is modulated by ``e``.

Blocks are stored stacked along a leading ``layers`` axis and run with ``lax.scan`` (or a Python
loop, ``scan_layers=False``) so compile time stays flat in depth; both share one checkpoint layout.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, NamedTuple

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from afd_jax import errors
from afd_jax import mesh as mesh_lib
from afd_jax.models import attention as attn_lib
from afd_jax.models import wan_checkpoint
from afd_jax.models import weights

# ----------------------------------------------------------------------------------------------
# Configuration.

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class WanConfig:
  """Architecture (stored with checkpoints) plus runtime choices (``RUNTIME_FIELDS``)."""

  dim: int = 1536
  ffn_dim: int = 8960
  num_heads: int = 12
  num_layers: int = 30
  in_dim: int = 16
  out_dim: int = 16
  patch_size: tuple[int, int, int] = (1, 2, 2)
  freq_dim: int = 256
  text_dim: int = 4096
  text_len: int = 512
  eps: float = 1e-6
  qk_norm: bool = True
  cross_attn_norm: bool = True
  # Runtime choices: not part of a checkpoint.
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention_kernel: str = "auto"
  scan_layers: bool = True
  remat_policy: str = "none"

  RUNTIME_FIELDS = ("dtype", "param_dtype", "attention_kernel", "scan_layers", "remat_policy")

  def __post_init__(self):
    object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
    problems = []
    if self.dim % self.num_heads:
      problems.append(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
    elif self.head_dim % 2 or self.head_dim < 6:
      problems.append(f"head dim {self.head_dim} must be even and >= 6 for the 3-axis RoPE")
    if self.freq_dim % 2:
      problems.append(f"freq_dim {self.freq_dim} must be even")
    if len(self.patch_size) != 3 or min(self.patch_size) < 1:
      problems.append(f"patch_size {self.patch_size} must be three positive integers")
    if self.remat_policy not in REMAT_POLICIES:
      problems.append(f"remat_policy {self.remat_policy!r} not in {sorted(REMAT_POLICIES)}")
    if self.attention_kernel not in attn_lib.KERNELS:
      problems.append(f"attention_kernel {self.attention_kernel!r} not in {attn_lib.KERNELS}")
    for name in ("dtype", "param_dtype"):
      try:
        jnp.dtype(getattr(self, name))
      except TypeError:
        problems.append(f"{name} {getattr(self, name)!r} is not a dtype")
    if problems:
      raise errors.UserError("invalid WanConfig: " + "; ".join(problems) + ".")

  @property
  def head_dim(self) -> int:
    return self.dim // self.num_heads

  @property
  def patch_numel(self) -> int:
    return math.prod(self.patch_size)

  def architecture(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()
            if k not in self.RUNTIME_FIELDS}

  def replace(self, **kw) -> "WanConfig":
    return dataclasses.replace(self, **kw)

  def to_json(self) -> str:
    return json.dumps(self.architecture(), indent=2, sort_keys=True)


PRESETS = {
    "tiny": WanConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=2, freq_dim=32, text_dim=32,
                      text_len=16),
    "small": WanConfig(dim=256, ffn_dim=768, num_heads=4, num_layers=4, freq_dim=64, text_dim=128,
                       text_len=64),
    "1.3b": WanConfig(),
    "14b": WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
}


def preset(name: str, **overrides) -> WanConfig:
  """A named architecture with fields replaced; a None value (an unset config placeholder) keeps
  the preset's."""
  if name not in PRESETS:
    raise errors.UserError(f"unknown Wan preset {name!r}; choose one of {sorted(PRESETS)}.")
  return PRESETS[name].replace(**{k: v for k, v in overrides.items() if v is not None})


# ----------------------------------------------------------------------------------------------
# Building blocks.

_XAVIER = nnx.initializers.xavier_uniform()
_ZEROS = nnx.initializers.zeros_init()


def _annotated(init, axes):
  """Attaches logical axis names; sharding is applied by jit out_shardings, never eagerly."""
  return nnx.with_partitioning(init, axes, eager_sharding=False)


def _param(value, axes):
  return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def _linear(din, dout, axes, cfg: WanConfig, rngs, *, init=_XAVIER, dtype=None):
  return nnx.Linear(
      din, dout, dtype=jnp.dtype(dtype or cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
      kernel_init=_annotated(init, axes), bias_init=_annotated(_ZEROS, (axes[1],)), rngs=rngs)


def _modulation_table(rows: int, cfg: WanConfig, rngs):
  """Learned ``[1, rows, d]`` shift/scale/gate table, initialised N(0, 1/d) as in Wan."""
  value = jax.random.normal(rngs.params(), (1, rows, cfg.dim), jnp.dtype(cfg.param_dtype))
  return _param(value / math.sqrt(cfg.dim), (None, None, "embed"))


def layer_norm(x, eps: float):
  """LayerNorm without affine parameters, statistics and output in fp32."""
  x = x.astype(jnp.float32)
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


class AffineLayerNorm(nnx.Module):
  def __init__(self, dim: int, eps: float, param_dtype):
    self.eps = eps
    self.scale = _param(jnp.ones((dim,), param_dtype), ("norm",))
    self.bias = _param(jnp.zeros((dim,), param_dtype), ("norm",))

  def __call__(self, x):
    return layer_norm(x, self.eps) * self.scale[...].astype(jnp.float32) + self.bias[...].astype(
        jnp.float32)


class RMSNorm(nnx.Module):
  """RMSNorm over the full width (all heads together), fp32 statistics."""

  def __init__(self, dim: int, eps: float, param_dtype):
    self.eps = eps
    self.scale = _param(jnp.ones((dim,), param_dtype), ("norm",))

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def sinusoidal_embedding(t, dim: int):
  """Wan's ``[cos | sin]`` timestep sinusoid; ``t`` is the float model timestep."""
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[..., None] * freqs
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], -1)


def rope_angles(head_dim: int, frames, height: int, width: int, frame_offset=0):
  """Per-token rotation angles ``[frames*height*width, head_dim // 2]``.

  Pairs split temporal / height / width as ``D - 4(D//6)``, ``2(D//6)``, ``2(D//6)`` real dims,
  each axis with its own frequency table ``theta^(-2i/dim_axis)``; tokens in (f, h, w) order.
  """
  dh = 2 * (head_dim // 6)
  dt = head_dim - 2 * dh

  def freqs(dim):
    return 1.0 / (10000.0 ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))

  f = jnp.arange(frames, dtype=jnp.float32) + jnp.asarray(frame_offset, jnp.float32)
  ang_t = f[:, None] * freqs(dt)
  ang_h = jnp.arange(height, dtype=jnp.float32)[:, None] * freqs(dh)
  ang_w = jnp.arange(width, dtype=jnp.float32)[:, None] * freqs(dh)
  grid = jnp.concatenate([
      jnp.broadcast_to(ang_t[:, None, None], (frames, height, width, dt // 2)),
      jnp.broadcast_to(ang_h[None, :, None], (frames, height, width, dh // 2)),
      jnp.broadcast_to(ang_w[None, None, :], (frames, height, width, dh // 2)),
  ], -1)
  return grid.reshape(frames * height * width, head_dim // 2)


def apply_rope(x, angles):
  """Rotates adjacent pairs ``(x[2i], x[2i+1])`` of ``x [B, N, H, D]`` by ``angles [N, D/2]``.
  The cosines and sines are computed here, inside the fusion that uses them: on a CPU that is
  faster than reading them precomputed once per forward (measured)."""
  b, n, h, d = x.shape
  pairs = x.astype(jnp.float32).reshape(b, n, h, d // 2, 2)
  cos = jnp.cos(angles)[None, :, None, :]
  sin = jnp.sin(angles)[None, :, None, :]
  x0, x1 = pairs[..., 0], pairs[..., 1]
  out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1)
  return out.reshape(b, n, h, d).astype(x.dtype)


class KV(NamedTuple):
  """Keys and values ``[..., B, N, H, D]`` (a leading layer axis when stacked over blocks)."""

  k: jax.Array
  v: jax.Array


# Activation shardings by role (afd_jax.mesh.constrain): the residual stream [B, F, T, d] splits
# over batch and tokens per frame, cached keys/values [..., B, N, H, D] over batch, tokens, heads.
RESIDUAL_ROLES = ("batch", None, "tokens", None)


def constrain_kv(kv: KV) -> KV:
  roles = (None,) * (kv.k.ndim - 4) + ("batch", "tokens", "heads", None)
  return KV(*(mesh_lib.constrain(a, roles) for a in kv))


class Attention(nnx.Module):
  """Wan attention: q, k, v, o projections with bias and optional q/k RMSNorm across heads."""

  def __init__(self, cfg: WanConfig, rngs: nnx.Rngs):
    d = cfg.dim
    self.num_heads = cfg.num_heads
    self.q = _linear(d, d, ("embed", "heads"), cfg, rngs)
    self.k = _linear(d, d, ("embed", "heads"), cfg, rngs)
    self.v = _linear(d, d, ("embed", "heads"), cfg, rngs)
    self.o = _linear(d, d, ("heads", "embed"), cfg, rngs)
    pd = jnp.dtype(cfg.param_dtype)
    self.norm_q = nnx.data(RMSNorm(d, cfg.eps, pd) if cfg.qk_norm else None)
    self.norm_k = nnx.data(RMSNorm(d, cfg.eps, pd) if cfg.qk_norm else None)

  def _heads(self, x):
    return x.reshape(*x.shape[:-1], self.num_heads, -1)

  def query(self, x):
    q = self.q(x)
    return self._heads(self.norm_q(q) if self.norm_q is not None else q)

  def key_value(self, x) -> KV:
    k = self.k(x)
    k = self.norm_k(k) if self.norm_k is not None else k
    return KV(self._heads(k), self._heads(self.v(x)))

  def out(self, x):
    return self.o(x.reshape(*x.shape[:-2], -1))


class Block(nnx.Module):
  """One Wan transformer block (self-attn, text cross-attn, FFN, six-way modulation)."""

  def __init__(self, cfg: WanConfig, rngs: nnx.Rngs):
    d = cfg.dim
    self.eps = cfg.eps
    self.text_len = cfg.text_len
    self.modulation = _modulation_table(6, cfg, rngs)
    self.self_attn = Attention(cfg, rngs)
    self.cross_attn = Attention(cfg, rngs)
    self.norm3 = nnx.data(
        AffineLayerNorm(d, cfg.eps, jnp.dtype(cfg.param_dtype)) if cfg.cross_attn_norm else None)
    self.ffn_in = _linear(d, cfg.ffn_dim, ("embed", "mlp"), cfg, rngs)
    self.ffn_out = _linear(cfg.ffn_dim, d, ("mlp", "embed"), cfg, rngs)

  def __call__(self, x, e0, angles, text: KV, layout: attn_lib.Layout, cache: KV | None = None):
    """``x [B, F, T, d]`` fp32 residual (T tokens per frame), ``e0 [B, F, 6, d]``.

    Returns the new residual and this block's post-RoPE self-attention keys/values (for caching).
    """
    b, f, t, d = x.shape
    dtype = self.ffn_in.dtype
    m = self.modulation[...].astype(jnp.float32) + e0
    shift, scale, gate, c_shift, c_scale, c_gate = (m[:, :, i, None, :] for i in range(6))

    h = (layer_norm(x, self.eps) * (1 + scale) + shift).reshape(b, f * t, d).astype(dtype)
    q = apply_rope(self.self_attn.query(h), angles)
    kv = self.self_attn.key_value(h)
    kv = KV(apply_rope(kv.k, angles), kv.v)
    y = layout(q, kv.k, kv.v, cache)
    x = x + self.self_attn.out(y).astype(jnp.float32).reshape(b, f, t, d) * gate

    h = self.norm3(x) if self.norm3 is not None else x
    q = self.cross_attn.query(h.reshape(b, f * t, d).astype(dtype))
    y = attn_lib.attend_text(q, text.k, text.v, self.text_len, layout.kernel)
    x = x + self.cross_attn.out(y).astype(jnp.float32).reshape(b, f, t, d)

    h = (layer_norm(x, self.eps) * (1 + c_scale) + c_shift).astype(dtype)
    y = self.ffn_out(jax.nn.gelu(self.ffn_in(h), approximate=True))
    return x + y.astype(jnp.float32) * c_gate, kv


class Head(nnx.Module):
  def __init__(self, cfg: WanConfig, rngs: nnx.Rngs):
    d = cfg.dim
    self.eps = cfg.eps
    self.modulation = _modulation_table(2, cfg, rngs)
    self.head = _linear(d, cfg.out_dim * cfg.patch_numel, ("embed", "patch"), cfg, rngs,
                        init=_ZEROS)

  def __call__(self, x, e):
    """``x [B, F, T, d]``, ``e [B, F, d]`` (the time embedding, not e0)."""
    m = self.modulation[...].astype(jnp.float32) + e[:, :, None, :]
    shift, scale = m[:, :, 0, None, :], m[:, :, 1, None, :]
    h = layer_norm(x, self.eps) * (1 + scale) + shift
    return self.head(h.astype(self.head.dtype)).astype(jnp.float32)


class MLP(nnx.Module):
  """Linear, activation, Linear (Wan's text and time embedders)."""

  def __init__(self, din, d, cfg, rngs, act, *, dtype=None, in_axis="embed"):
    init = nnx.initializers.normal(0.02)
    self.act = act
    self.linear_1 = _linear(din, d, (in_axis, "embed"), cfg, rngs, init=init, dtype=dtype)
    self.linear_2 = _linear(d, d, ("embed", "embed_out"), cfg, rngs, init=init, dtype=dtype)

  def __call__(self, x):
    return self.linear_2(self.act(self.linear_1(x)))


# ----------------------------------------------------------------------------------------------
# The model.


class WanModel(nnx.Module):
  """Wan2.1 DiT. See the module docstring for conventions; ``__call__`` for the attention modes."""

  def __init__(self, cfg: WanConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    d = cfg.dim
    self.patch_embedding = _linear(cfg.in_dim * cfg.patch_numel, d, ("patch", "embed"), cfg, rngs)
    self.text_embedding = MLP(cfg.text_dim, d, cfg, rngs, lambda x: jax.nn.gelu(x, approximate=True),
                              in_axis="text")
    self.time_embedding = MLP(cfg.freq_dim, d, cfg, rngs, jax.nn.silu, dtype=jnp.float32,
                              in_axis="freq")
    self.time_projection = _linear(d, 6 * d, ("embed", "modulation"), cfg, rngs,
                                   init=nnx.initializers.normal(0.02), dtype=jnp.float32)

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_blocks(r):
      return Block(cfg, r)

    self.blocks = make_blocks(rngs)
    self.head = Head(cfg, rngs)

  # -- public API ------------------------------------------------------------------------------

  def __call__(self, latents, timesteps, context=None, attention: str = "bidirectional",
               chunk_frames: int | None = None, *, clean_latents=None, clean_timesteps=None,
               text_kv: KV | None = None, window_frames: int | None = None, sink_frames: int = 0):
    """Flow velocity for ``latents [B, F, H, W, C]`` (returned fp32, same shape).

    attention:
      ``bidirectional``: every token sees every token.
      ``block_causal``: a token sees its own chunk of ``chunk_frames`` latent frames and earlier
        chunks (optionally only the last ``window_frames`` frames plus ``sink_frames`` sink frames).
      ``teacher_forcing``: the sequence ``[clean_latents ; latents]`` with shared RoPE positions;
        noisy chunk j sees clean chunks < j and itself, clean chunk j sees clean chunks <= j. The
        clean copy runs at ``clean_timesteps`` (default 0); the velocity of the noisy copy returns.
    ``text_kv`` (from :meth:`text_kv`) replaces ``context`` when the text K/V are precomputed.
    """
    cfg = self.config
    grid = self._check_latents(latents, "latents")
    b, f = latents.shape[0], grid[0]
    t = self._frame_timesteps(timesteps, b, f)
    if attention not in attn_lib.MODES or attention == "kv_cache":
      raise errors.UserError(f"attention must be one of bidirectional, block_causal, teacher_forcing "
                       f"(use forward_cached for the KV cache), got {attention!r}.")
    text = self._text(context, text_kv, b)
    layout = self._layout(attention, chunk_frames, f, grid, window_frames, sink_frames)
    x = self._embed(latents)
    angles = rope_angles(cfg.head_dim, *grid)
    if attention == "teacher_forcing":
      if clean_latents is None or clean_latents.shape != latents.shape:
        raise errors.UserError("teacher_forcing needs clean_latents with the shape of latents, got "
                         f"{None if clean_latents is None else clean_latents.shape} vs {latents.shape}.")
      tc = (jnp.zeros_like(t) if clean_timesteps is None
            else self._frame_timesteps(clean_timesteps, b, f))
      x = jnp.concatenate([self._embed(clean_latents), x], 1)
      t = jnp.concatenate([tc, t], 1)
      angles = jnp.concatenate([angles, angles], 0)
    e, e0 = self._time(t)
    x, _ = self._run_blocks(x, e0, angles, text, layout)
    if attention == "teacher_forcing":
      x, e = x[:, f:], e[:, f:]
    return self._unpatchify(self.head(x, e), grid)

  def features(self, latents, timesteps, context=None, layers=(), *, text_kv: KV | None = None,
               stop_gradient_below: int = 0, chunk_frames: int = 0):
    """Hidden states ``[B, N, d]`` (fp32) after each block index in ``layers``: bidirectional, or
    block-causal over chunks of ``chunk_frames`` frames (each token sees its own chunk and the
    earlier ones only, so a prefix's features do not depend on what follows it).

    Blocks after the last requested one and the output head are not run. With
    ``stop_gradient_below=k`` no gradient reaches blocks ``< k`` or the embeddings (a partly frozen
    discriminator trunk).
    """
    cfg = self.config
    layers = tuple(sorted(set(layers)))
    if not layers or layers[0] < 0 or layers[-1] >= cfg.num_layers:
      raise errors.UserError(f"feature layers {layers} must be non-empty block indices in "
                       f"[0, {cfg.num_layers}).")
    grid = self._check_latents(latents, "latents")
    b = latents.shape[0]
    t = self._frame_timesteps(timesteps, b, grid[0])
    text = self._text(context, text_kv, b)
    layout = self._layout("block_causal" if chunk_frames else "bidirectional", chunk_frames,
                          grid[0], grid, None, 0)
    angles = rope_angles(cfg.head_dim, *grid)
    _, e0 = self._time(t)
    x = self._embed(latents)
    n = x.shape[1]
    x = x.reshape(b, grid[0], n // grid[0], cfg.dim)
    bounds = sorted({l + 1 for l in layers} | ({stop_gradient_below} if 0 < stop_gradient_below
                                               <= layers[-1] else set()))
    out, start = [], 0
    for end in bounds:
      x, _ = self._run_blocks(x, e0, angles, text, layout, start=start, end=end)
      if end == stop_gradient_below:
        x = jax.lax.stop_gradient(x)
      if end - 1 in layers:
        out.append(x.reshape(b, n, cfg.dim))
      start = end
    return out

  def context_kv(self, clean_latents, chunk_frames: int, text_kv: KV, timesteps=None) -> KV:
    """Per-layer post-RoPE K/V ``[L, B, N, H, D]`` of a block-causal pass over the clean video at
    ``timesteps`` (default 0): exactly the K/V a rollout commits to its cache. With
    :meth:`forward_with_context` it evaluates the teacher-forcing layout without the clean copy."""
    cfg = self.config
    grid = self._check_latents(clean_latents, "clean_latents")
    b, f = clean_latents.shape[0], grid[0]
    t = (jnp.zeros((b, f), jnp.float32) if timesteps is None
         else self._frame_timesteps(timesteps, b, f))
    layout = self._layout("block_causal", chunk_frames, f, grid, None, 0)
    _, e0 = self._time(t)
    _, kv = self._run_blocks(self._embed(clean_latents), e0, rope_angles(cfg.head_dim, *grid),
                             self._text(None, text_kv, b), layout, return_kv=True)
    return kv

  def forward_with_context(self, latents, timesteps, context_kv: KV, chunk_frames: int,
                           text_kv: KV):
    """Velocity of noisy ``latents`` whose chunk j attends to the clean context K/V of chunks < j
    (from :meth:`context_kv`) and to itself: the teacher-forcing noisy half, cached form."""
    cfg = self.config
    grid = self._check_latents(latents, "latents")
    b, f = latents.shape[0], grid[0]
    t = self._frame_timesteps(timesteps, b, f)
    layout = self._layout("cached_context", chunk_frames, f, grid, None, 0)
    e, e0 = self._time(t)
    x, _ = self._run_blocks(self._embed(latents), e0, rope_angles(cfg.head_dim, *grid),
                            self._text(None, text_kv, b), layout, context_kv)
    return self._unpatchify(self.head(x, e), grid)

  def text_kv(self, context) -> KV:
    """Per-layer cross-attention keys/values ``[L, B, T, H, D]``; compute once per prompt.

    As Wan (and Self-Forcing) do inside the model, a context of ``C < text_len`` rows is
    zero-padded to ``text_len``, and the padding rows, embedded like any other, take part in
    cross-attention: umT5's trimmed embeddings give the published model's outputs. The padding
    rows all embed to the same key and value, so they are kept as one row (``T = C + 1``) that
    :func:`attention.attend_text` counts ``text_len - C`` times: the same outputs from
    ``text_len / (C + 1)`` times fewer keys. A context of ``text_len`` rows is kept whole."""
    self._check_context(context)
    missing = self.config.text_len - context.shape[1]
    if missing < 0:
      raise errors.UserError(f"context has {context.shape[1]} text rows, more than the model's "
                             f"text_len={self.config.text_len}; trim it to the model's length.")
    context = jnp.pad(context, ((0, 0), (0, min(missing, 1)), (0, 0)))
    ctx = self.text_embedding(context.astype(self.text_embedding.linear_1.dtype))
    graphdef, state = nnx.split(self.blocks)
    return jax.lax.map(lambda s: nnx.merge(graphdef, s).cross_attn.key_value(ctx), state)

  def forward_cached(self, latents, timesteps, text_kv: KV, cache: KV | None, start_frame,
                     cache_len=None):
    """One chunk of KV-cache inference.

    ``latents [B, f, H, W, C]`` is the current chunk starting at absolute latent frame
    ``start_frame`` (RoPE offset); its queries attend to ``cache`` (post-RoPE K/V of earlier
    tokens, ``[L, B, Nc, H, D]``, any order, or None) plus the chunk itself. ``cache_len`` (may be
    traced): only the cache's first ``cache_len`` tokens are written, and attention does no work
    on the rest. Returns the velocity and the chunk's own per-layer K/V ``[L, B, n, H, D]`` for the
    caller to commit.
    """
    cfg = self.config
    grid = self._check_latents(latents, "latents")
    b = latents.shape[0]
    t = self._frame_timesteps(timesteps, b, grid[0])
    e, e0 = self._time(t)
    angles = rope_angles(cfg.head_dim, *grid, frame_offset=start_frame)
    layout = attn_lib.Layout("kv_cache", kernel=cfg.attention_kernel)
    if cache is not None and cache_len is not None:
      cache = attn_lib.Prefix(cache.k, cache.v, jnp.asarray(cache_len, jnp.int32))
    x, kv = self._run_blocks(self._embed(latents), e0, angles, text_kv, layout, cache,
                             return_kv=True)
    return self._unpatchify(self.head(x, e), grid), kv

  # -- internals -------------------------------------------------------------------------------

  def _check_latents(self, x, name):
    cfg = self.config
    if x.ndim != 5:
      raise errors.UserError(f"{name} must be channel-last [B, F, H, W, C], got shape {x.shape}.")
    if x.shape[-1] != cfg.in_dim:
      raise errors.UserError(f"{name} have {x.shape[-1]} channels but the model expects "
                       f"in_dim={cfg.in_dim} (layout is channel-last [B, F, H, W, C]).")
    for size, p, what in zip(x.shape[1:4], cfg.patch_size, ("frames F", "height H", "width W")):
      if size % p:
        raise errors.UserError(f"{name} {what}={size} is not divisible by the patch size {p} "
                         f"(patch_size={cfg.patch_size}).")
    return tuple(s // p for s, p in zip(x.shape[1:4], cfg.patch_size))

  def _check_context(self, context):
    if context is None or context.ndim != 3 or context.shape[-1] != self.config.text_dim:
      raise errors.UserError(f"context must be [B, L, text_dim={self.config.text_dim}], got "
                       f"{None if context is None else context.shape}.")

  def _frame_timesteps(self, timesteps, b, f):
    t = jnp.asarray(timesteps, jnp.float32)
    pt = self.config.patch_size[0]
    if t.ndim == 1 and t.shape[0] == b:
      return jnp.broadcast_to(t[:, None], (b, f))
    if t.ndim == 2 and t.shape == (b, f * pt):
      return t[:, ::pt]
    raise errors.UserError(f"timesteps must be [B]={b} or per latent frame [B, F]=({b}, {f * pt}), "
                     f"got {t.shape}.")

  def _text(self, context, text_kv, b) -> KV:
    if text_kv is not None:
      if (text_kv.k.ndim != 5 or text_kv.k.shape[:2] != (self.config.num_layers, b)
          or text_kv.k.shape[2] > self.config.text_len):
        raise errors.UserError(f"text_kv must be [L={self.config.num_layers}, B={b}, "
                               f"T <= text_len={self.config.text_len}, H, D], got "
                         f"{text_kv.k.shape}.")
      return text_kv
    self._check_context(context)
    if context.shape[0] != b:
      raise errors.UserError(f"context batch {context.shape[0]} != latents batch {b}.")
    return self.text_kv(context)

  def _layout(self, mode, chunk_frames, f, grid, window_frames, sink_frames):
    kernel = self.config.attention_kernel
    if mode == "bidirectional":
      return attn_lib.Layout(mode, kernel=kernel)
    if not chunk_frames or chunk_frames <= 0:
      raise errors.UserError(f"attention {mode!r} needs chunk_frames > 0, got {chunk_frames}.")
    if f % chunk_frames:
      raise errors.UserError(f"{f} latent frames are not a multiple of chunk_frames={chunk_frames}.")
    per_frame = grid[1] * grid[2]
    window = None
    if window_frames:
      check_window(window_frames, sink_frames, chunk_frames)
      window = window_frames * per_frame
    elif sink_frames:
      raise errors.UserError("sink_frames only applies together with window_frames.")
    return attn_lib.Layout(mode, chunk_frames * per_frame, window, sink_frames * per_frame, kernel)

  def _embed(self, latents):
    pt, ph, pw = self.config.patch_size
    patches = einops.rearrange(
        latents, "b (f pt) (h ph) (w pw) c -> b (f h w) (pt ph pw c)", pt=pt, ph=ph, pw=pw)
    return self.patch_embedding(patches.astype(self.patch_embedding.dtype)).astype(jnp.float32)

  def _unpatchify(self, out, grid):
    pt, ph, pw = self.config.patch_size
    f, h, w = grid
    return einops.rearrange(out, "b f (h w) (pt ph pw c) -> b (f pt) (h ph) (w pw) c",
                            h=h, w=w, pt=pt, ph=ph, pw=pw)

  def _time(self, t):
    """``e [B, F, d]`` and ``e0 [B, F, 6, d]`` in fp32 from per-frame timesteps ``[B, F]``."""
    e = self.time_embedding(sinusoidal_embedding(t, self.config.freq_dim))
    e0 = self.time_projection(jax.nn.silu(e))
    return e, e0.reshape(*e0.shape[:-1], 6, self.config.dim)

  def _run_blocks(self, x, e0, angles, text: KV, layout, cache: KV | None = None,
                  return_kv: bool = False, start: int = 0, end: int | None = None):
    """Runs blocks ``[start, end)`` over ``x`` (``[B, N, d]``, or ``[B, F, T, d]`` to continue)."""
    cfg = self.config
    end = cfg.num_layers if end is None else end
    f = e0.shape[1]
    graphdef, state = nnx.split(self.blocks)
    shared = None
    if isinstance(cache, attn_lib.Prefix):   # every layer reads the one buffer in place
      shared, cache = cache, jnp.arange(cfg.num_layers)
    if (start, end) != (0, cfg.num_layers):
      state, text, cache = jax.tree.map(lambda a: a[start:end], (state, text, cache))

    def body(x, layer):
      params, text_l, cache_l = layer
      if shared is not None:
        cache_l = shared._replace(layer=cache_l)
      x, kv = nnx.merge(graphdef, params)(x, e0, angles, text_l, layout, cache_l)
      x = mesh_lib.constrain(x, RESIDUAL_ROLES)
      return x, (constrain_kv(kv) if return_kv else None)

    policy = REMAT_POLICIES[cfg.remat_policy]
    if cfg.remat_policy != "none":
      body = jax.checkpoint(body, policy=policy, prevent_cse=not cfg.scan_layers)
    if x.ndim == 3:
      b, n, d = x.shape
      x = x.reshape(b, f, n // f, d)
    x = mesh_lib.constrain(x, RESIDUAL_ROLES)
    if cfg.scan_layers:
      x, kvs = jax.lax.scan(body, x, (state, text, cache))
    else:
      outs = []
      for i in range(end - start):
        layer = jax.tree.map(lambda a: a[i], (state, text, cache))
        x, kv = body(x, layer)
        outs.append(kv)
      kvs = jax.tree.map(lambda *a: jnp.stack(a), *outs) if return_kv else None
    return x, kvs


def check_window(window_frames: int, sink_frames: int, chunk_frames: int):
  """Local attention needs whole chunks: sink and window multiples of the chunk, window > sink."""
  if (window_frames % chunk_frames or sink_frames % chunk_frames
      or window_frames < sink_frames + chunk_frames or sink_frames < 0):
    raise errors.UserError(
        f"window_frames={window_frames} and sink_frames={sink_frames} must be multiples of "
        f"chunk_frames={chunk_frames} with window_frames >= sink_frames + chunk_frames.")


# ----------------------------------------------------------------------------------------------
# Construction and loading.


def init(cfg: WanConfig, seed: int = 0, shardings=None) -> WanModel:
  """A freshly initialised model (Wan's initialisation: Xavier linears, zero head).

  Initialisation runs as one jitted program; ``shardings`` (a pure dict matching the state, e.g.
  from ``afd_jax.mesh.param_shardings``) places each parameter directly where it belongs, on every
  host of a multi-host mesh, without a host copy.
  """
  graphdef, state = nnx.split(abstract(cfg))
  make = jax.jit(lambda: nnx.to_pure_dict(nnx.state(WanModel(cfg, rngs=nnx.Rngs(seed)))),
                 out_shardings=shardings)
  nnx.replace_by_pure_dict(state, make())
  return nnx.merge(graphdef, state)


def abstract(cfg: WanConfig) -> WanModel:
  """Shapes and logical axis metadata only; no memory is allocated."""
  return nnx.eval_shape(lambda: WanModel(cfg, rngs=nnx.Rngs(0)))


def from_pretrained(path, *, pt_key: str | None = None, num_heads: int | None = None,
                    shardings=None, **runtime) -> WanModel:
  """Loads any supported Wan2.1 checkpoint (see :mod:`afd_jax.models.wan_checkpoint`).

  ``runtime`` sets non-architecture fields (``dtype``, ``attention_kernel``, ``scan_layers``,
  ``remat_policy``, ``param_dtype``); ``num_heads`` is for files without a config, ``pt_key``
  picks a model inside a training ``.pt`` (e.g. ``generator``), and ``shardings`` (a callable of
  the abstract state, e.g. ``afd_jax.mesh.param_shardings``) places the weights as they load.
  """
  weights.check_runtime(runtime, WanConfig.RUNTIME_FIELDS)
  found = wan_checkpoint.locate(path, pt_key=pt_key, num_heads=num_heads)
  cfg = WanConfig(**found.arch, **runtime)
  return weights.build(abstract(cfg), cfg, found, shardings)


def load_config(path, *, pt_key: str | None = None, num_heads: int | None = None,
                **runtime) -> WanConfig:
  """The config ``from_pretrained(path, **runtime)`` would build."""
  weights.check_runtime(runtime, WanConfig.RUNTIME_FIELDS)
  return WanConfig(**wan_checkpoint.locate(path, pt_key=pt_key, num_heads=num_heads).arch,
                   **runtime)
