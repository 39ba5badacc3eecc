"""The Wan2.1 video VAE in Flax NNX: pixels <-> the 16-channel latents the Wan DiT works on.

Causal 3D convolutions (time is padded on the past side only), RMS norms, one single-head spatial
attention per frame in each middle block; stride 4 in time and 8 in space, so ``1 + 4k`` frames
become ``1 + k`` latent frames (81 x 480 x 832 -> 21 x 60 x 104). Layout is channel-last
everywhere: pixels ``[B, T, H, W, 3]`` in [-1, 1], latents ``[B, F, h, w, 16]``.

Time is processed the way Wan does it: the first frame alone, then chunks, each causal layer
carrying the last frames of its input over to the next chunk (``FeatureCache``). The chunks run in
one ``lax.scan``, so memory is that of one chunk whatever the video length; with ``chunk=0`` the
whole video is one chunk (same result, more memory). Large frames can also be cut into overlapping
spatial tiles that are blended back together (``tile=``, diffusers' tiling scheme).

Latents are normalised per channel with Wan's published statistics: ``encode`` returns
``(mu - mean) / std`` (or a posterior sample), ``decode`` undoes it and clamps pixels to [-1, 1].
The VAE is not part of the training step (teacher videos are encoded offline, samples decoded for
viewing), so its parameters carry no sharding names: it runs replicated.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

# Wan2.1's per-channel latent statistics (Self-Forcing WanVAEWrapper; diffusers latents_mean/std).
LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134,
                -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526,
               2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Architecture (the published Wan2.1 VAE by default) plus runtime precision."""

  base_dim: int = 96
  z_dim: int = 16
  dim_mult: tuple[int, ...] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  temporal_downsample: tuple[bool, ...] = (False, True, True)
  latents_mean: tuple[float, ...] = LATENTS_MEAN
  latents_std: tuple[float, ...] = LATENTS_STD
  dtype: str = "float32"        # compute; float32 runs convolutions at full (HIGHEST) precision
  param_dtype: str = "float32"

  RUNTIME_FIELDS = ("dtype", "param_dtype")

  def __post_init__(self):
    for name in ("dim_mult", "temporal_downsample", "latents_mean", "latents_std"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    if len(self.temporal_downsample) != len(self.dim_mult) - 1:
      raise ValueError(f"temporal_downsample {self.temporal_downsample} needs one entry per "
                       f"downsampling level, {len(self.dim_mult) - 1} for dim_mult {self.dim_mult}.")
    if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
      raise ValueError(f"latents_mean/latents_std need z_dim={self.z_dim} entries, got "
                       f"{len(self.latents_mean)}/{len(self.latents_std)}.")
    if min(self.latents_std) <= 0:
      raise ValueError(f"latents_std must be positive, got {self.latents_std}.")

  @property
  def temporal_stride(self) -> int:
    return 2 ** sum(self.temporal_downsample)

  @property
  def spatial_stride(self) -> int:
    return 2 ** (len(self.dim_mult) - 1)

  def architecture(self) -> dict:
    """The fields that define the weights (JSON-able), without the runtime ones."""
    return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
            for f in dataclasses.fields(self) if f.name not in self.RUNTIME_FIELDS}

  def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
    """``(T, H, W)`` pixels -> ``(F, h, w)`` latents; refuses what the VAE cannot encode."""
    st, ss = self.temporal_stride, self.spatial_stride
    problems = []
    if frames < 1 or (frames - 1) % st:
      fix = f"{frames - (frames - 1) % st} or {frames - (frames - 1) % st + st}" if frames > 1 \
          else f"{1 + st}"
      problems.append(f"{frames} frames is not of the form {st}k+1 (the first frame is encoded "
                      f"alone, then groups of {st}); trim to {fix}")
    if height % ss or width % ss or height < ss or width < ss:
      problems.append(f"frames of {height}x{width} are not divisible by the spatial stride {ss}; "
                      f"resize or crop to e.g. {max(ss, height // ss * ss)}x"
                      f"{max(ss, width // ss * ss)}")
    if problems:
      raise ValueError("the Wan VAE cannot encode this video: " + "; ".join(problems) + ".")
    return (1 + (frames - 1) // st, height // ss, width // ss)


# ----------------------------------------------------------------------------------------------
# The feature cache: what makes chunk-by-chunk processing equal to processing the whole video.


class FeatureCache:
  """The causal layers' memories across time chunks, in the order the layers run.

  ``FeatureCache()`` starts a video (the first chunk: every memory is zeros, and the resampling
  layers treat the first frame specially); ``FeatureCache(previous.new)`` continues it. Each
  causal layer calls ``take`` once per chunk: it gets the last frames of its input from the
  previous chunk and leaves its own for the next. The memories have fixed shapes, so they are the
  carry of a ``lax.scan`` over chunks.
  """

  def __init__(self, previous: list | None = None):
    self.first = previous is None
    self._previous = previous
    self.new: list[jax.Array] = []

  def take(self, x: jax.Array, frames: int) -> jax.Array:
    """The ``frames`` input frames before ``x`` (zeros at the start of the video)."""
    i = len(self.new)
    if self.first:
      past = jnp.zeros((x.shape[0], frames, *x.shape[2:]), x.dtype)
    else:
      past = self._previous[i]
      if past.shape[1] != frames or past.shape[2:] != x.shape[2:]:
        raise ValueError(f"feature cache entry {i} has shape {past.shape}, which does not fit "
                         f"input {x.shape}: continue a video only with chunks of the same size.")
    self.new.append(jnp.concatenate([past, x], axis=1)[:, -frames:])
    return past


# ----------------------------------------------------------------------------------------------
# Layers (channel-last: [B, T, H, W, C]).


def _precision(cfg: VAEConfig):
  return jax.lax.Precision.HIGHEST if jnp.dtype(cfg.dtype) == jnp.float32 else None


class Conv3d(nnx.Module):
  """A 3D convolution, ``same`` padding in space and none in time (callers supply the past)."""

  def __init__(self, cin: int, cout: int, kernel=(3, 3, 3), *, stride_t: int = 1,
               cfg: VAEConfig):
    pdt = jnp.dtype(cfg.param_dtype)
    self.kernel = nnx.Param(jnp.zeros((*kernel, cin, cout), pdt))
    self.bias = nnx.Param(jnp.zeros((cout,), pdt))
    self.stride_t, self.dtype, self.precision = stride_t, jnp.dtype(cfg.dtype), _precision(cfg)

  @property
  def past_frames(self) -> int:
    return self.kernel.shape[0] - 1

  def __call__(self, x):
    kh, kw = self.kernel.shape[1:3]
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), self.kernel[...].astype(self.dtype), (self.stride_t, 1, 1),
        ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2)),
        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"), precision=self.precision)
    return y + self.bias[...].astype(self.dtype)


class CausalConv3d(Conv3d):
  """Sees the current and ``k_t - 1`` past frames: the past comes from the feature cache."""

  def __call__(self, x, cache: FeatureCache):
    if self.past_frames:
      x = jnp.concatenate([cache.take(x, self.past_frames), x], axis=1)
    return super().__call__(x)


class Conv2d(nnx.Module):
  """A per-frame 2D convolution (the spatial half of the resampling layers)."""

  def __init__(self, cin: int, cout: int, *, stride: int, padding, cfg: VAEConfig):
    pdt = jnp.dtype(cfg.param_dtype)
    self.kernel = nnx.Param(jnp.zeros((3, 3, cin, cout), pdt))
    self.bias = nnx.Param(jnp.zeros((cout,), pdt))
    self.stride, self.padding = stride, padding
    self.dtype, self.precision = jnp.dtype(cfg.dtype), _precision(cfg)

  def __call__(self, x):
    b, t = x.shape[:2]
    y = jax.lax.conv_general_dilated(
        x.reshape(b * t, *x.shape[2:]).astype(self.dtype), self.kernel[...].astype(self.dtype),
        (self.stride, self.stride), self.padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=self.precision)
    y = y + self.bias[...].astype(self.dtype)
    return y.reshape(b, t, *y.shape[1:])


class RMSNorm(nnx.Module):
  """``x / ||x|| * sqrt(C) * gamma`` over channels (L2 normalisation, statistics in fp32)."""

  def __init__(self, dim: int, *, cfg: VAEConfig):
    self.gamma = nnx.Param(jnp.ones((dim,), jnp.dtype(cfg.param_dtype)))
    self.dtype = jnp.dtype(cfg.dtype)

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True))
    y = x32 / jnp.maximum(norm, 1e-12) * math.sqrt(x.shape[-1]) * self.gamma[...]
    return y.astype(self.dtype)


class ResidualBlock(nnx.Module):
  def __init__(self, cin: int, cout: int, *, cfg: VAEConfig):
    self.norm1 = RMSNorm(cin, cfg=cfg)
    self.conv1 = CausalConv3d(cin, cout, cfg=cfg)
    self.norm2 = RMSNorm(cout, cfg=cfg)
    self.conv2 = CausalConv3d(cout, cout, cfg=cfg)
    self.conv_shortcut = nnx.data(
        Conv3d(cin, cout, (1, 1, 1), cfg=cfg) if cin != cout else None)

  def __call__(self, x, cache: FeatureCache):
    h = x if self.conv_shortcut is None else self.conv_shortcut(x)
    x = self.conv1(jax.nn.silu(self.norm1(x)), cache)
    x = self.conv2(jax.nn.silu(self.norm2(x)), cache)
    return x + h


class Dense(nnx.Module):
  """``x @ kernel + bias`` over channels (the 1x1 convolutions of the attention block)."""

  def __init__(self, cin: int, cout: int, *, cfg: VAEConfig):
    pdt = jnp.dtype(cfg.param_dtype)
    self.kernel = nnx.Param(jnp.zeros((cin, cout), pdt))
    self.bias = nnx.Param(jnp.zeros((cout,), pdt))
    self.dtype, self.precision = jnp.dtype(cfg.dtype), _precision(cfg)

  def __call__(self, x):
    y = jnp.einsum("...i,io->...o", x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                   precision=self.precision)
    return y + self.bias[...].astype(self.dtype)


class AttentionBlock(nnx.Module):
  """Single-head self-attention over the pixels of each frame (no mixing across time)."""

  def __init__(self, dim: int, *, cfg: VAEConfig):
    self.norm = RMSNorm(dim, cfg=cfg)
    self.to_qkv = Dense(dim, 3 * dim, cfg=cfg)
    self.proj = Dense(dim, dim, cfg=cfg)
    self.precision = _precision(cfg)

  def __call__(self, x, cache: FeatureCache):
    del cache  # frame-local
    b, t, h, w, c = x.shape
    q, k, v = jnp.split(self.to_qkv(self.norm(x)).reshape(b * t, h * w, 3 * c), 3, axis=-1)
    logits = jnp.einsum("nqc,nkc->nqk", q, k, precision=self.precision) / math.sqrt(c)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    y = jnp.einsum("nqk,nkc->nqc", weights, v, precision=self.precision)
    return x + self.proj(y).reshape(b, t, h, w, c)


class Resample(nnx.Module):
  """Halve (``down*``) or double (``up*``) height and width; the ``3d`` modes also halve or
  double time, except for the video's first frame, which passes through alone (so ``1 + 4k``
  frames map to ``1 + k`` and back)."""

  MODES = ("downsample2d", "downsample3d", "upsample2d", "upsample3d")

  def __init__(self, dim: int, mode: str, *, cfg: VAEConfig):
    if mode not in self.MODES:
      raise ValueError(f"resample mode {mode!r} is not one of {self.MODES}.")
    self.mode = mode
    if mode.startswith("up"):  # nearest-neighbour x2, then a 3x3 conv to half the channels
      self.conv = Conv2d(dim, dim // 2, stride=1, padding=((1, 1), (1, 1)), cfg=cfg)
    else:                      # pad bottom/right by one, 3x3 conv with stride 2
      self.conv = Conv2d(dim, dim, stride=2, padding=((0, 1), (0, 1)), cfg=cfg)
    self.time_conv = nnx.data(
        Conv3d(dim, 2 * dim, (3, 1, 1), cfg=cfg) if mode == "upsample3d" else
        Conv3d(dim, dim, (3, 1, 1), stride_t=2, cfg=cfg) if mode == "downsample3d"
        else None)

  def __call__(self, x, cache: FeatureCache):
    if self.mode == "upsample3d":
      x = self._double_time(x, cache)
    if self.mode.startswith("up"):
      x = x.repeat(2, axis=2).repeat(2, axis=3)
    x = self.conv(x)
    if self.mode == "downsample3d":
      x = self._halve_time(x, cache)
    return x

  def _double_time(self, x, cache):
    """Each frame becomes two (the causal time conv makes 2C channels, split into two frames)."""
    head, x = (x[:, :1], x[:, 1:]) if cache.first else (None, x)
    past = cache.take(x, 2)
    if x.shape[1]:
      y = self.time_conv(jnp.concatenate([past, x], axis=1))
      b, t, h, w, c2 = y.shape
      x = y.reshape(b, t, h, w, 2, c2 // 2).transpose(0, 1, 4, 2, 3, 5).reshape(
          b, 2 * t, h, w, c2 // 2)
    return x if head is None else jnp.concatenate([head, x], axis=1)

  def _halve_time(self, x, cache):
    """Stride-2 time conv over (previous frame, two new frames): windows start at frame 0."""
    past = cache.take(x, 1)
    if not cache.first:
      return self.time_conv(jnp.concatenate([past, x], axis=1))
    if x.shape[1] == 1:
      return x
    return jnp.concatenate([x[:, :1], self.time_conv(x)], axis=1)


class MidBlock(nnx.Module):
  def __init__(self, dim: int, *, cfg: VAEConfig):
    self.resnets = nnx.List([ResidualBlock(dim, dim, cfg=cfg) for _ in range(2)])
    self.attentions = nnx.List([AttentionBlock(dim, cfg=cfg)])

  def __call__(self, x, cache):
    x = self.resnets[0](x, cache)
    return self.resnets[1](self.attentions[0](x, cache), cache)


class Encoder(nnx.Module):
  def __init__(self, cfg: VAEConfig):
    dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
    self.conv_in = CausalConv3d(3, dims[0], cfg=cfg)
    blocks = []
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
      for _ in range(cfg.num_res_blocks):
        blocks.append(ResidualBlock(cin, cout, cfg=cfg))
        cin = cout
      if i < len(cfg.dim_mult) - 1:
        mode = "downsample3d" if cfg.temporal_downsample[i] else "downsample2d"
        blocks.append(Resample(cout, mode, cfg=cfg))
    self.down_blocks = nnx.List(blocks)
    self.mid_block = MidBlock(dims[-1], cfg=cfg)
    self.norm_out = RMSNorm(dims[-1], cfg=cfg)
    self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim, cfg=cfg)

  def __call__(self, x, cache):
    x = self.conv_in(x, cache)
    for block in self.down_blocks:
      x = block(x, cache)
    x = self.mid_block(x, cache)
    return self.conv_out(jax.nn.silu(self.norm_out(x)), cache)


class UpBlock(nnx.Module):
  def __init__(self, cin: int, cout: int, mode: str | None, *, cfg: VAEConfig):
    self.resnets = nnx.List([ResidualBlock(c, cout, cfg=cfg)
                             for c in [cin] + [cout] * cfg.num_res_blocks])
    self.upsamplers = nnx.List([Resample(cout, mode, cfg=cfg)] if mode else [])

  def __call__(self, x, cache):
    for block in (*self.resnets, *self.upsamplers):
      x = block(x, cache)
    return x


class Decoder(nnx.Module):
  def __init__(self, cfg: VAEConfig):
    mult = cfg.dim_mult
    dims = [cfg.base_dim * m for m in (mult[-1], *mult[::-1])]
    up_temporal = cfg.temporal_downsample[::-1]
    self.conv_in = CausalConv3d(cfg.z_dim, dims[0], cfg=cfg)
    self.mid_block = MidBlock(dims[0], cfg=cfg)
    blocks = []
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
      cin = cin // 2 if i > 0 else cin  # the previous upsampler halved the channels
      mode = None if i == len(mult) - 1 else "upsample3d" if up_temporal[i] else "upsample2d"
      blocks.append(UpBlock(cin, cout, mode, cfg=cfg))
    self.up_blocks = nnx.List(blocks)
    self.norm_out = RMSNorm(dims[-1], cfg=cfg)
    self.conv_out = CausalConv3d(dims[-1], 3, cfg=cfg)

  def __call__(self, x, cache):
    x = self.mid_block(self.conv_in(x, cache), cache)
    for block in self.up_blocks:
      x = block(x, cache)
    return self.conv_out(jax.nn.silu(self.norm_out(x)), cache)


# ----------------------------------------------------------------------------------------------
# The model.


class WanVAE(nnx.Module):
  """Encoder, decoder and the 1x1x1 convs around the latent bottleneck (diffusers' module names,
  so checkpoints map one to one). Use :func:`encode` / :func:`decode`; the methods here are the
  traceable pieces they jit."""

  def __init__(self, cfg: VAEConfig):
    self.config = cfg
    self.encoder = Encoder(cfg)
    self.quant_conv = Conv3d(2 * cfg.z_dim, 2 * cfg.z_dim, (1, 1, 1), cfg=cfg)
    self.post_quant_conv = Conv3d(cfg.z_dim, cfg.z_dim, (1, 1, 1), cfg=cfg)
    self.decoder = Decoder(cfg)

  def moments(self, video, chunk: int = 1):
    """Pixels ``[B, 1 + s*k, H, W, 3]`` -> posterior ``[B, 1 + k, h, w, 2 z]`` (mean, log-var),
    unnormalised: the first frame, then ``chunk`` latent frames (``s * chunk`` pixel frames) at a
    time; ``chunk=0``: all at once."""
    step = self.config.temporal_stride
    return _chunked(lambda x, cache: self.quant_conv(self.encoder(x, cache)), video, step * chunk)

  def pixels(self, mu, chunk: int = 1):
    """Unnormalised latents ``[B, 1 + k, h, w, z]`` -> pixels ``[B, 1 + s*k, H, W, 3]`` (not
    clamped): the first latent frame, then ``chunk`` at a time; ``chunk=0``: all at once."""
    return _chunked(self.decoder, self.post_quant_conv(mu), chunk)


def _chunked(fn, x, size: int):
  """``fn`` over ``x``'s first frame, then over chunks of ``size`` frames (a shorter tail last)
  with the feature cache carried through; ``size=0``: one call."""
  cache = FeatureCache()
  if size == 0:
    return fn(x, cache)
  outs = [fn(x[:, :1], cache)]
  rest, memory = x[:, 1:], cache.new
  b, n = x.shape[0], rest.shape[1] // size
  if n:
    chunks = rest[:, :n * size].reshape(b, n, size, *x.shape[2:]).swapaxes(0, 1)

    def body(memory, chunk):
      cache = FeatureCache(memory)
      y = fn(chunk, cache)
      return cache.new, y

    memory, ys = jax.lax.scan(body, memory, chunks)
    outs.append(ys.swapaxes(0, 1).reshape(b, -1, *ys.shape[3:]))
  if rest.shape[1] > n * size:
    outs.append(fn(rest[:, n * size:], FeatureCache(memory)))
  return jnp.concatenate(outs, axis=1)


def init(cfg: VAEConfig | None = None, seed: int = 0) -> WanVAE:
  """A random VAE for benchmarks and tests (real weights come from ``wan_vae_checkpoint.load``):
  kernels drawn from N(0, 1/fan_in) on the host, biases zero, norm gains one."""
  cfg = cfg or VAEConfig()
  graphdef, state = nnx.split(abstract(cfg))
  rng = np.random.default_rng(seed)
  pdt = jnp.dtype(cfg.param_dtype)

  def draw(path, leaf):
    if path[-1] == "kernel":
      x = rng.standard_normal(leaf.shape) / math.sqrt(math.prod(leaf.shape[:-1]))
    else:
      x = np.full(leaf.shape, 1.0 if path[-1] == "gamma" else 0.0)
    return jnp.asarray(x, pdt)

  pure = traverse_util.unflatten_dict({k: draw(k, v) for k, v in traverse_util.flatten_dict(
      nnx.to_pure_dict(state)).items()})
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


def abstract(cfg: VAEConfig) -> WanVAE:
  """The model's structure with ShapeDtypeStruct leaves (nothing allocated)."""
  return nnx.eval_shape(lambda: WanVAE(cfg))


# ----------------------------------------------------------------------------------------------
# Encoding and decoding.


@dataclasses.dataclass(frozen=True)
class Tiling:
  """Spatial tiles in pixels (diffusers' defaults): frames larger than ``size`` are cut into
  ``size x size`` tiles every ``stride`` pixels, processed separately and blended linearly over the
  ``size - stride`` overlap. Multiples of the VAE's spatial stride."""

  size: int = 256
  stride: int = 192

  def check(self, spatial_stride: int):
    if self.size % spatial_stride or self.stride % spatial_stride or not \
        0 < self.stride <= self.size:
      raise ValueError(f"tiling size={self.size}, stride={self.stride} must be multiples of "
                       f"{spatial_stride} with 0 < stride <= size.")


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk"))
def _moments(graphdef, state, video, chunk):
  return nnx.merge(graphdef, state).moments(video, chunk).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk"))
def _pixels(graphdef, state, mu, chunk):
  return nnx.merge(graphdef, state).pixels(mu, chunk).astype(jnp.float32)


def _blend(a, b, extent: int, axis: int):
  """``b`` with its first ``extent`` rows (along ``axis``) faded in from ``a``'s last ones."""
  extent = min(a.shape[axis], b.shape[axis], extent)
  if extent == 0:
    return b
  shape = [1] * b.ndim
  shape[axis] = extent
  w = (jnp.arange(extent, dtype=b.dtype) / extent).reshape(shape)
  tail = jax.lax.slice_in_dim(a, a.shape[axis] - extent, a.shape[axis], axis=axis)
  head = jax.lax.slice_in_dim(b, 0, extent, axis=axis)
  rest = jax.lax.slice_in_dim(b, extent, b.shape[axis], axis=axis)
  return jnp.concatenate([tail * (1 - w) + head * w, rest], axis=axis)


def _tiled(fn, x, tile_in: int, stride_in: int, scale: float):
  """Runs ``fn`` on overlapping spatial tiles of ``x [B, T, H, W, C]`` (tiles of ``tile_in`` every
  ``stride_in`` input pixels; ``fn`` scales space by ``scale``), blends each tile into its upper
  and left neighbours in raster order and stitches the ``stride`` cores together."""
  h, w = x.shape[2:4]
  blend = round((tile_in - stride_in) * scale)
  core = round(stride_in * scale)
  rows = []
  for i in range(0, h, stride_in):
    row = []
    for j in range(0, w, stride_in):
      tile = fn(x[:, :, i:i + tile_in, j:j + tile_in])
      if rows:
        tile = _blend(rows[-1][len(row)], tile, blend, axis=2)
      if row:
        tile = _blend(row[-1], tile, blend, axis=3)
      row.append(tile)
    rows.append(row)
  out = jnp.concatenate([jnp.concatenate([t[:, :, :core, :core] for t in row], axis=3)
                         for row in rows], axis=2)
  return out[:, :, :round(h * scale), :round(w * scale)]


def _apply(vae: WanVAE, program, x, chunk: int, tiling: Tiling | None, decoding: bool):
  """The jitted ``program`` (``_moments`` or ``_pixels``) over the split ``vae`` on ``x``, in
  overlapping spatial tiles when ``tiling`` asks for them (its sizes are in pixels; ``x`` holds
  pixels, or latents when ``decoding``)."""
  if chunk < 0:
    raise ValueError(f"chunk={chunk} must be >= 0 latent frames (0: the whole video at once).")
  graphdef, state = nnx.split(vae)
  fn = lambda y: program(graphdef, state, y, chunk)
  s = vae.config.spatial_stride
  per = s if decoding else 1  # pixels per element of x
  if tiling is None or max(x.shape[2:4]) * per <= tiling.size:
    return fn(x)
  tiling.check(s)
  return _tiled(fn, x, tiling.size // per, tiling.stride // per, s if decoding else 1 / s)


def _check_rank(x, what: str, channels: int):
  if x.ndim != 5 or x.shape[-1] != channels:
    raise ValueError(f"{what} must be channel-last [B, T, H, W, {channels}], got shape "
                     f"{tuple(x.shape)}.")


def encode_moments(vae: WanVAE, video, *, chunk: int = 1, tiling: Tiling | None = None):
  """Pixels ``[B, T, H, W, 3]`` in [-1, 1] -> unnormalised posterior ``[B, F, h, w, 2 z]``."""
  _check_rank(video, "video", 3)
  vae.config.latent_shape(*video.shape[1:4])
  return _apply(vae, _moments, jnp.asarray(video, jnp.float32), chunk, tiling, decoding=False)


def encode(vae: WanVAE, video, *, key: jax.Array | None = None, chunk: int = 1,
           tiling: Tiling | None = None) -> jax.Array:
  """Pixels ``[B, T, H, W, 3]`` in [-1, 1] (``T = 4k + 1``, ``H, W`` multiples of 8) -> normalised
  latents ``[B, 1 + k, H/8, W/8, z]``: the posterior mean, or a sample of it when ``key`` is
  given."""
  cfg = vae.config
  moments = encode_moments(vae, video, chunk=chunk, tiling=tiling)
  mu, logvar = jnp.split(moments, 2, axis=-1)
  if key is not None:
    mu = mu + jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0)) * jax.random.normal(key, mu.shape)
  return (mu - jnp.asarray(cfg.latents_mean)) / jnp.asarray(cfg.latents_std)


def decode(vae: WanVAE, latents, *, chunk: int = 1, tiling: Tiling | None = None) -> jax.Array:
  """Normalised latents ``[B, F, h, w, z]`` -> pixels ``[B, 1 + 4(F - 1), 8h, 8w, 3]`` in
  [-1, 1] (clamped)."""
  cfg = vae.config
  _check_rank(latents, "latents", cfg.z_dim)
  mu = jnp.asarray(latents, jnp.float32) * jnp.asarray(cfg.latents_std) + jnp.asarray(
      cfg.latents_mean)
  return jnp.clip(_apply(vae, _pixels, mu, chunk, tiling, decoding=True), -1.0, 1.0)


class StreamDecoder:
  """Decodes one video's latents as they arrive (``decoder(latents [B, n, h, w, z])`` -> pixels
  in [-1, 1]), exactly as ``decode(chunk=1)`` decodes the whole video: the first latent frame
  alone, then one at a time, the causal layers' feature cache carried from call to call. Two
  compiled programs (the first frame, every later one), shared by every decoder of ``vae``."""

  def __init__(self, vae: WanVAE):
    self.config = vae.config
    self._graphdef, self._state = nnx.split(vae)
    self._memory = None

  def __call__(self, latents) -> jax.Array:
    cfg = self.config
    _check_rank(latents, "latents", cfg.z_dim)
    mu = jnp.asarray(latents, jnp.float32) * jnp.asarray(cfg.latents_std) + jnp.asarray(
        cfg.latents_mean)
    out = []
    for i in range(mu.shape[1]):
      y, self._memory = _stream_step(self._graphdef, self._state, mu[:, i:i + 1], self._memory)
      out.append(y)
    return jnp.clip(jnp.concatenate(out, axis=1), -1.0, 1.0)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _stream_step(graphdef, state, mu, memory):
  vae = nnx.merge(graphdef, state)
  cache = FeatureCache(memory)
  return vae.decoder(vae.post_quant_conv(mu), cache).astype(jnp.float32), cache.new


def to_pixels(frames) -> np.ndarray:
  """uint8 ``[..., 3]`` -> float32 in [-1, 1]."""
  return np.asarray(frames, np.float32) / 127.5 - 1.0


def to_uint8(pixels) -> np.ndarray:
  """float in [-1, 1] -> uint8."""
  return np.clip(np.round((np.asarray(pixels, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
