"""The prompt-paired AFD discriminator: a bidirectional Wan trunk read out by learned registers.

Follows Self-Forcing's GAN discriminator (``afd_method.md`` section 6): the trunk sees the clean (or
lightly noised) latent video and the prompt through its own text cross-attention; after chosen
blocks a readout block lets one learned register token attend over all video tokens; the
readouts are concatenated and an MLP head gives one logit ``D(x, c)``. Lower trunk blocks can be
frozen (no gradient below ``freeze_below``).

With ``chunk_frames > 0`` (``afd_method.md`` section 6.6) the trunk is block-causal over chunks of
that many latent frames and each register reads every chunk's prefix: one logit per chunk
``[B, C]``, where chunk ``c``'s logit judges frames ``< (c + 1) * chunk_frames`` and nothing
after them, so a chunk that breaks from its past (a jump at its boundary) is scored where it
happens.

With ``input="motion"`` the trunk reads the frame-to-frame change of its input (the first frame's
change is zero) instead of the frames: what stays still in a video, its background, brightness
and the look of its objects where they do not move, is no longer there to tell teacher from
student, so the ranking is left to how things move (``docs/results/what_limits_afd.md``, 13).
With ``input="coarse"`` it reads each video averaged over ``coarse_pool`` x ``coarse_pool`` latent
cells and standardised per channel over its frames and cells (no texture inside a cell, and no
colour or brightness offset or gain, survives): where things are and how they move
(``what_limits_afd.md``, 21).
"""

from __future__ import annotations

import dataclasses

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from afd_jax import errors
from afd_jax.models import attention as attn_lib
from afd_jax.models import wan


INPUTS = ("video", "motion", "coarse")


@dataclasses.dataclass(frozen=True)
class DiscriminatorConfig:
  readout_layers: tuple[int, ...] = (13, 21, 29)  # trunk blocks (0-indexed) read by registers
  readout_ffn_dim: int = 8192
  freeze_below: int = 0                            # blocks < this get no gradient; 0 = none
  head_eps: float = 1e-5
  chunk_frames: int = 0                            # > 0: one logit per chunk prefix (block-causal)
  input: str = "video"                             # video | motion | coarse (see the docstring)
  coarse_pool: int = 2                             # input="coarse": latent cells averaged per side

  def validate(self, trunk: wan.WanConfig):
    layers = self.readout_layers
    if not layers or len(set(layers)) != len(layers) or min(layers) < 0 \
        or max(layers) >= trunk.num_layers:
      raise errors.UserError(f"readout_layers {layers} must be distinct block indices of the "
                       f"{trunk.num_layers}-block trunk.")
    if not 0 <= self.freeze_below <= min(layers):
      raise errors.UserError(f"freeze_below={self.freeze_below} must lie in [0, {min(layers)}] "
                       "(readouts above a frozen block still need their inputs).")
    if self.chunk_frames < 0:
      raise errors.UserError(f"chunk_frames={self.chunk_frames} must be >= 0 (0: one logit per video).")
    if self.input not in INPUTS:
      raise errors.UserError(f"disc input {self.input!r} is not one of {INPUTS}.")
    if self.input == "coarse" and (self.coarse_pool < 1 or self.chunk_frames):
      raise errors.UserError(f"disc input 'coarse' needs coarse_pool >= 1 (got {self.coarse_pool}) "
                             "and no per-chunk logits (its standardisation reads every frame).")


def coarse_view(latents, pool: int):
  """``[B, F, H, W, C]`` -> the same shape: each video averaged over ``pool x pool`` cells, then
  standardised per channel over its frames and cells, and repeated back onto the grid."""
  h, w = latents.shape[2:4]
  if h % pool or w % pool:
    raise errors.UserError(f"disc coarse_pool={pool} does not divide the {h}x{w} latent grid; "
                           "pick a divisor of both.")
  x = einops.reduce(latents, "b f (h p) (w q) c -> b f h w c", "mean", p=pool, q=pool)
  x = x - x.mean(axis=(1, 2, 3), keepdims=True)
  x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=(1, 2, 3), keepdims=True) + 1e-4)
  return einops.repeat(x, "b f h w c -> b f (h p) (w q) c", p=pool, q=pool)


class ReadoutBlock(nnx.Module):
  """One register token attends over the video tokens, then an FFN; no timestep modulation."""

  def __init__(self, trunk: wan.WanConfig, ffn_dim: int, rngs: nnx.Rngs):
    d, pd = trunk.dim, jnp.dtype(trunk.param_dtype)
    self.eps = trunk.eps
    self.kernel = trunk.attention_kernel
    self.norm = wan.AffineLayerNorm(d, trunk.eps, pd)
    self.attn = wan.Attention(trunk, rngs)
    self.ffn_in = wan._linear(d, ffn_dim, ("embed", "mlp"), trunk, rngs)
    self.ffn_out = wan._linear(ffn_dim, d, ("mlp", "embed"), trunk, rngs)

  def __call__(self, h, register, prefix_tokens: tuple[int, ...] = ()):
    """``h [B, N, d]`` fp32 trunk features, ``register [d]`` (normed) -> ``[B, d]`` fp32, or with
    ``prefix_tokens`` one read of each prefix ``h[:, :n]``: ``[B, len(prefix_tokens), d]``."""
    b = h.shape[0]
    dtype = self.ffn_in.dtype
    q = self.attn.query(register[None, None, :].astype(dtype))
    q = jnp.broadcast_to(q, (b, *q.shape[1:]))
    kv = self.attn.key_value(self.norm(h).astype(dtype))
    reads = [attn_lib.attend(q, kv.k[:, :n], kv.v[:, :n], self.kernel) for n in prefix_tokens]
    read = self.attn.out(jnp.concatenate(reads, 1) if reads
                         else attn_lib.attend(q, kv.k, kv.v, self.kernel)[:, 0])
    u = register + read.astype(jnp.float32)
    y = self.ffn_out(jax.nn.gelu(self.ffn_in(wan.layer_norm(u, self.eps).astype(dtype)),
                                 approximate=True))
    return u + y.astype(jnp.float32)


class Discriminator(nnx.Module):
  def __init__(self, trunk: wan.WanModel, cfg: DiscriminatorConfig, *, rngs: nnx.Rngs):
    cfg.validate(trunk.config)
    tc = trunk.config
    d, n = tc.dim, len(cfg.readout_layers)
    self.config = cfg
    self.trunk = trunk
    self.registers = nnx.Param(0.02 * jax.random.normal(rngs.params(), (n, d),
                                                        jnp.dtype(tc.param_dtype)),
                               out_sharding=(None, "embed"), eager_sharding=False)
    self.register_norm = wan.RMSNorm(d, tc.eps, jnp.dtype(tc.param_dtype))
    self.readouts = nnx.List([ReadoutBlock(tc, cfg.readout_ffn_dim, rngs) for _ in range(n)])
    self.head_norm = wan.AffineLayerNorm(n * d, cfg.head_eps, jnp.dtype(tc.param_dtype))
    self.head_hidden = wan._linear(n * d, d, ("readout", "embed"), tc, rngs)
    self.head_out = wan._linear(d, 1, ("embed", None), tc, rngs)

  def __call__(self, latents, timesteps, context=None, *, text_kv: wan.KV | None = None):
    """Logits ``[B]`` (``[B, C]`` per chunk prefix with ``chunk_frames``) for clean (or lightly
    noised, ``timesteps = 1000 tau``) latents."""
    f = self.config.chunk_frames
    if self.config.input == "motion":
      latents = jnp.concatenate([jnp.zeros_like(latents[:, :1]), jnp.diff(latents, axis=1)], 1)
    elif self.config.input == "coarse":
      latents = coarse_view(latents, self.config.coarse_pool)
    feats = self.trunk.features(latents, timesteps, context, self.config.readout_layers,
                                text_kv=text_kv, stop_gradient_below=self.config.freeze_below,
                                chunk_frames=f)
    frames, n = latents.shape[1] // self.trunk.config.patch_size[0], feats[0].shape[1]
    prefixes = tuple(range(f * n // frames, n + 1, f * n // frames)) if f else ()
    regs = self.register_norm(self.registers[...].astype(jnp.float32))
    order = sorted(range(len(self.config.readout_layers)),
                   key=lambda i: self.config.readout_layers[i])
    by_layer = dict(zip(order, feats))
    outs = [block(by_layer[i], regs[i], prefixes) for i, block in enumerate(self.readouts)]
    z = self.head_norm(jnp.concatenate(outs, -1))
    z = self.head_out(jax.nn.silu(self.head_hidden(z.astype(self.head_hidden.dtype))))
    return z[..., 0].astype(jnp.float32)


def init(trunk: wan.WanModel, cfg: DiscriminatorConfig = DiscriminatorConfig(),
         seed: int = 0) -> Discriminator:
  """A discriminator on ``trunk`` (e.g. ``wan.from_pretrained(...)``) with fresh readouts and head."""
  return Discriminator(trunk, cfg, rngs=nnx.Rngs(seed))
