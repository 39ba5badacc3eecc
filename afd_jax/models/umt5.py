"""The umT5 encoder as Wan uses it (its text encoder: umT5-XXL, encoder half), in Flax NNX.

Pre-norm T5 blocks: RMS norms (scale only, fp32 statistics), self-attention without the
``1/sqrt(d)`` scaling and with a learned relative-position bias in every layer (32 bidirectional
buckets up to distance 128; umT5 does not share it across layers), padding keys masked, and a
gated-GELU feed-forward (``fc2(fc1(x) * gelu_tanh(gate(x)))``), no biases; a final norm. Matmuls
run in ``config.dtype`` (bf16 by default), norms and the softmax in fp32. Parameters carry logical
axis names (``vocab``, ``embed``, ``heads``, ``mlp``, ``layers``), so the DiT's rules shard it.

    from afd_jax.models import umt5
    encoder = umt5.from_pretrained(path)        # HF UMT5EncoderModel folder, Wan .pth, or converted
    h = encoder(token_ids, attention_mask)      # [B, L] ints -> [B, L, d_model] last hidden state
    emb = umt5.encode_prompts(encoder, tokenizer, prompts, text_len=512)   # Wan's convention

``encode_prompts`` follows Wan: whitespace cleaned, tokenised with the end token and padded to
``text_len`` (longer prompts truncated), encoded with the padding masked, and every row past a
prompt's tokens set to zero (Wan trims them and its DiT pads zeros back: the same context).
Weights: ``umt5_checkpoint.py``.
"""

from __future__ import annotations

import dataclasses
import html
import math
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from afd_jax import errors
from afd_jax.models import umt5_checkpoint
from afd_jax.models import weights


@dataclasses.dataclass(frozen=True)
class UMT5Config:
  vocab_size: int = 256_384
  dim: int = 4096
  num_heads: int = 64
  head_dim: int = 64
  ffn_dim: int = 10_240
  num_layers: int = 24
  num_buckets: int = 32
  max_distance: int = 128
  eps: float = 1e-6
  # Runtime (not part of a checkpoint).
  dtype: str = "bfloat16"
  param_dtype: str = "float32"
  scan_layers: bool = True

  ARCHITECTURE = ("vocab_size", "dim", "num_heads", "head_dim", "ffn_dim", "num_layers",
                  "num_buckets", "max_distance", "eps")
  RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers")

  def architecture(self) -> dict:
    return {k: getattr(self, k) for k in self.ARCHITECTURE}


PRESETS = {
    "xxl": {},   # Wan's models_t5_umt5-xxl-enc-bf16.pth and google/umt5-xxl
    "tiny": dict(vocab_size=512, dim=64, num_heads=4, head_dim=16, ffn_dim=128, num_layers=2),
}


def preset(name: str, **overrides) -> UMT5Config:
  if name not in PRESETS:
    raise errors.UserError(f"unknown umT5 preset {name!r}; choose one of {sorted(PRESETS)}.")
  return UMT5Config(**{**PRESETS[name], **overrides})


def _param(value, axes):
  return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def _linear(din, dout, axes, cfg: UMT5Config, rngs):
  return nnx.Linear(din, dout, use_bias=False, dtype=jnp.dtype(cfg.dtype),
                    param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs,
                    kernel_init=nnx.with_partitioning(nnx.initializers.normal(din ** -0.5), axes,
                                                      eager_sharding=False))


class RMSNorm(nnx.Module):
  """T5's layer norm: ``x / rms(x) * w``, statistics in fp32."""

  def __init__(self, cfg: UMT5Config):
    self.eps = cfg.eps
    self.scale = _param(jnp.ones((cfg.dim,), jnp.dtype(cfg.param_dtype)), ("norm",))

  def __call__(self, x):
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), -1, keepdims=True) + self.eps)
    return x * self.scale[...].astype(jnp.float32)


def relative_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
  """``[L, L]`` bucket of each (query, key) pair, T5's bidirectional scheme, computed as the
  reference computes it (float32 logarithm, truncation) so the buckets match exactly."""
  rel = np.arange(length)[None, :] - np.arange(length)[:, None]       # key - query
  half = num_buckets // 2
  buckets = (rel > 0).astype(np.int64) * half
  rel = np.abs(rel)
  max_exact = half // 2
  with np.errstate(divide="ignore"):
    ratio = (np.log(rel.astype(np.float32) / np.float32(max_exact))
             / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact))
  large = max_exact + np.where(rel < max_exact, 0, ratio).astype(np.int64)
  return buckets + np.where(rel < max_exact, rel, np.minimum(large, half - 1))


class Attention(nnx.Module):
  def __init__(self, cfg: UMT5Config, rngs: nnx.Rngs):
    inner = cfg.num_heads * cfg.head_dim
    self.cfg = cfg
    self.q = _linear(cfg.dim, inner, ("embed", "heads"), cfg, rngs)
    self.k = _linear(cfg.dim, inner, ("embed", "heads"), cfg, rngs)
    self.v = _linear(cfg.dim, inner, ("embed", "heads"), cfg, rngs)
    self.o = _linear(inner, cfg.dim, ("heads", "embed"), cfg, rngs)
    self.relative_bias = _param(
        0.02 * jax.random.normal(rngs.params(), (cfg.num_buckets, cfg.num_heads),
                                 jnp.dtype(cfg.param_dtype)), (None, None))

  def __call__(self, x, key_mask):
    """``x [B, L, d]``; ``key_mask [B, L]`` (True: a token, False: padding)."""
    cfg = self.cfg
    b, length, _ = x.shape
    split = lambda t: t.reshape(b, length, cfg.num_heads, cfg.head_dim)
    q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    buckets = relative_buckets(length, cfg.num_buckets, cfg.max_distance)
    bias = jnp.take(self.relative_bias[...].astype(jnp.float32), buckets, axis=0)  # [q, k, h]
    scores = scores + jnp.transpose(bias, (2, 0, 1))[None]
    scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, length, -1)
    return self.o(out)


class Block(nnx.Module):
  def __init__(self, cfg: UMT5Config, rngs: nnx.Rngs):
    self.dtype = jnp.dtype(cfg.dtype)
    self.norm1 = RMSNorm(cfg)
    self.attn = Attention(cfg, rngs)
    self.norm2 = RMSNorm(cfg)
    self.gate = _linear(cfg.dim, cfg.ffn_dim, ("embed", "mlp"), cfg, rngs)
    self.fc1 = _linear(cfg.dim, cfg.ffn_dim, ("embed", "mlp"), cfg, rngs)
    self.fc2 = _linear(cfg.ffn_dim, cfg.dim, ("mlp", "embed"), cfg, rngs)

  def __call__(self, x, key_mask):
    x = x + self.attn(self.norm1(x).astype(self.dtype), key_mask).astype(jnp.float32)
    h = self.norm2(x).astype(self.dtype)
    h = self.fc1(h) * jax.nn.gelu(self.gate(h), approximate=True)
    return x + self.fc2(h).astype(jnp.float32)


class UMT5Encoder(nnx.Module):
  """``encoder(token_ids [B, L], attention_mask [B, L] | None) -> [B, L, dim]`` (float32)."""

  def __init__(self, cfg: UMT5Config, *, rngs: nnx.Rngs):
    self.config = cfg
    self.token_embedding = nnx.Embed(
        cfg.vocab_size, cfg.dim, dtype=jnp.float32, param_dtype=jnp.dtype(cfg.param_dtype),
        embedding_init=nnx.with_partitioning(nnx.initializers.normal(1.0), ("vocab", "embed"),
                                             eager_sharding=False), rngs=rngs)

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_blocks(r):
      return Block(cfg, r)

    self.blocks = make_blocks(rngs)
    self.norm = RMSNorm(cfg)

  def __call__(self, token_ids, attention_mask=None):
    token_ids = jnp.asarray(token_ids)
    if token_ids.ndim != 2:
      raise errors.UserError(f"token_ids must be [batch, length], got shape {token_ids.shape}.")
    key_mask = (jnp.ones(token_ids.shape, bool) if attention_mask is None
                else jnp.asarray(attention_mask).astype(bool))
    x = self.token_embedding(token_ids)
    graphdef, state = nnx.split(self.blocks)

    def body(x, params):
      return nnx.merge(graphdef, params)(x, key_mask), None

    if self.config.scan_layers:
      x, _ = jax.lax.scan(body, x, state)
    else:
      for i in range(self.config.num_layers):
        x, _ = body(x, jax.tree.map(lambda a: a[i], state))
    return self.norm(x)


def init(cfg: UMT5Config, seed: int = 0, shardings=None) -> UMT5Encoder:
  """A randomly initialised encoder, made in one jitted program (``shardings``: a pure dict)."""
  graphdef, state = nnx.split(abstract(cfg))
  make = jax.jit(lambda: nnx.to_pure_dict(nnx.state(UMT5Encoder(cfg, rngs=nnx.Rngs(seed)))),
                 out_shardings=shardings)
  nnx.replace_by_pure_dict(state, make())
  return nnx.merge(graphdef, state)


def abstract(cfg: UMT5Config) -> UMT5Encoder:
  return nnx.eval_shape(lambda: UMT5Encoder(cfg, rngs=nnx.Rngs(0)))


def from_pretrained(path, *, shardings=None, **runtime) -> UMT5Encoder:
  """Any layout ``umt5_checkpoint`` reads; ``runtime``: ``dtype``, ``param_dtype``,
  ``scan_layers``; ``shardings`` (a callable of the abstract state) places weights as they load."""
  weights.check_runtime(runtime, UMT5Config.RUNTIME_FIELDS)
  found = umt5_checkpoint.locate(path)
  cfg = UMT5Config(**found.arch, **runtime)
  return weights.build(abstract(cfg), cfg, found, shardings)


# ----------------------------------------------------------------------------------------------
# Prompts -> embeddings.


def clean(text: str) -> str:
  """Wan's prompt cleaning (``clean='whitespace'``): mojibake and odd Unicode repaired by ftfy,
  HTML entities unescaped twice, whitespace collapsed."""
  try:
    import ftfy
  except ImportError as e:
    raise ImportError("Wan's prompt cleaning needs ftfy: `pip install 'afd_jax[text]'`.") from e
  return re.sub(r"\s+", " ", html.unescape(html.unescape(ftfy.fix_text(text)))).strip()


def load_tokenizer(path):
  """The tokenizer folder Wan ships (``google/umt5-xxl``), read by Hugging Face ``transformers``."""
  try:
    from transformers import AutoTokenizer
  except ImportError as e:
    raise ImportError("reading the umT5 tokenizer needs transformers: "
                      "`pip install 'afd_jax[text]'`.") from e
  try:
    return AutoTokenizer.from_pretrained(str(path))
  except (OSError, ValueError) as e:
    raise errors.UserError(f"{path} is not a tokenizer folder ({e}); point at the google/umt5-xxl "
                           "folder of the Wan2.1 release.") from e


def tokenize(tokenizer, prompts: Sequence[str], text_len: int = 512):
  """``(ids [B, text_len] int32, mask [B, text_len] bool)``: Wan's tokenisation (cleaned, end
  token added, padded to and truncated at ``text_len``)."""
  out = tokenizer([clean(p) for p in prompts], padding="max_length", truncation=True,
                  max_length=text_len, add_special_tokens=True, return_tensors="np")
  return out["input_ids"].astype(np.int32), out["attention_mask"].astype(bool)


def encode_prompts(encoder: UMT5Encoder, tokenizer, prompts: Sequence[str], text_len: int = 512,
                   batch_size: int = 16) -> np.ndarray:
  """``[len(prompts), text_len, dim]`` float32 contexts in Wan's convention (rows past each
  prompt's tokens zero), in batches of ``batch_size`` through one compiled program."""
  graphdef, state = nnx.split(encoder)
  run = jax.jit(lambda s, ids, mask: jnp.where(
      mask[..., None], nnx.merge(graphdef, s)(ids, mask), 0.0))
  out = []
  for i in range(0, len(prompts), batch_size):
    part = list(prompts[i:i + batch_size])
    ids, mask = tokenize(tokenizer, part + part[-1:] * (batch_size - len(part)), text_len)
    out.append(np.asarray(run(state, ids, mask))[:len(part)])
  return np.concatenate(out) if out else np.zeros((0, text_len, encoder.config.dim), np.float32)
