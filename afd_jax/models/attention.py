"""Attention kernels and the causal layouts of the Wan student, behind one interface.

Two layers, kept apart on purpose:

* **Kernels** compute plain, unmasked softmax attention ``softmax(q k^T / sqrt(D)) v`` over
  ``q [B, Nq, H, D]`` and ``k, v [B, Nk, H, D]``: ``dense`` (einsum, fp32 softmax; the ground truth
  and the CPU path), ``blockwise`` (flash attention in plain JAX, O(N D) memory on any backend),
  ``cudnn`` (``jax.nn.dot_product_attention(implementation="cudnn")``) on GPU, and ``splash`` (the
  Pallas splash kernel) on TPU. ``auto`` picks by backend and dtype.
* **Layouts** express every causal pattern the student needs as *static slices* of the keys:
  chunk ``b`` of a block-causal sequence attends to the key prefix that ends with its own chunk, a
  teacher-forcing noisy chunk to the clean prefix plus itself, a KV-cache chunk to the cache plus
  itself. No ``[Nq, Nk]`` mask is ever built and a video of C chunks costs the block-causal
  minimum (C+1)/(2C) of a bidirectional pass. The one traced length, a rollout's written cache
  under ``lax.scan``, is handled by :func:`attend_cached` (a per-key mask on at most one step of
  keys past it, or none).

Under a mesh with a ``context`` axis (``jax.set_mesh``), every kernel call runs sequence-parallel
in ``jax.shard_map``: each device keeps its block of queries and all-gathers the keys and values.

The boolean ``*_mask`` helpers at the end build the same patterns as explicit ``[Nq, Nk]`` masks.
They exist only as an independent reference for tests and for running a PyTorch model with the
identical mask; nothing on an accelerator uses them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from afd_jax import mesh as mesh_lib

KERNELS = ("auto", "dense", "blockwise", "cudnn", "splash")
MODES = ("bidirectional", "block_causal", "teacher_forcing", "kv_cache", "cached_context")
_DENSE_BLOCK_LOGITS = 1 << 22   # fp32 logits per query block of the dense kernel: 16 MiB
_PREFIX_LENGTHS, _PREFIX_STEP = 16, 128   # static cache prefixes of the dense kernel's cached form


# ----------------------------------------------------------------------------------------------
# Kernels.


def dense_attention(q, k, v, key_bias=None):
  """Reference kernel: fp32 logits and softmax, output in the dtype of ``q``. ``key_bias [Nk]`` is
  added to every query's logits: the ``log`` count of collapsed text padding, or ``-inf`` on cache
  keys not yet written.

  Computed heads-first (``[B, H, N, D]``): both products are then plain batched matmuls over
  (batch, head), so only q, k, v and the output are transposed (``O(N D)``), never the
  ``[Nq, Nk]`` probabilities. The scale goes on q and the normalisation on the output (``O(N D)``
  operations each instead of ``O(Nq Nk)``). Queries run in blocks whose logits stay within
  ``_DENSE_BLOCK_LOGITS`` values, so the exponentials are re-read from cache rather than memory
  (one layer at 3,456 tokens on a 2-core CPU: 106 ms before, 60-66 ms blocked); each block's rows
  are computed exactly as an unblocked call computes them."""
  b, n, h, d = q.shape
  blocks = -(-b * h * n * k.shape[1] // _DENSE_BLOCK_LOGITS)
  if blocks == 1:
    return _dense_block(q, k, v, key_bias)
  size = -(-n // blocks)
  qs = jnp.pad(q, ((0, 0), (0, blocks * size - n), (0, 0), (0, 0)))
  qs = jnp.moveaxis(qs.reshape(b, blocks, size, h, d), 1, 0)
  out = jax.lax.map(lambda qi: _dense_block(qi, k, v, key_bias), qs)
  return jnp.moveaxis(out, 0, 1).reshape(b, blocks * size, h, d)[:, :n]


def _dense_block(q, k, v, key_bias):
  scale = jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)
  qh, kh, vh = (jnp.swapaxes(x, 1, 2) for x in (q * scale, k, v))
  logits = jnp.einsum("bhqd,bhkd->bhqk", qh, kh, preferred_element_type=jnp.float32)
  if key_bias is not None:
    logits = logits + jnp.asarray(key_bias, jnp.float32)
  p = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
  out = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), vh, preferred_element_type=jnp.float32)
  out = out / p.sum(-1, keepdims=True)
  return jnp.swapaxes(out, 1, 2).astype(q.dtype)


def cudnn_attention(q, k, v):
  """cuDNN flash attention (GPU, bf16/fp16 only)."""
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(
        f"attention kernel 'cudnn' needs bfloat16 or float16 inputs, got {q.dtype}; set the model "
        "dtype to bfloat16 or use attention kernel 'dense'.")
  return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")


_SPLASH_BLOCK = 128


@functools.lru_cache(maxsize=None)
def _splash_kernel(num_heads: int, q_len: int, kv_len: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  mask = sm.MultiHeadMask([sm.FullMask((q_len, kv_len)) for _ in range(num_heads)])
  block = sk.BlockSizes(
      block_q=_SPLASH_BLOCK, block_kv=_SPLASH_BLOCK, block_kv_compute=_SPLASH_BLOCK,
      block_q_dkv=_SPLASH_BLOCK, block_kv_dkv=_SPLASH_BLOCK, block_kv_dkv_compute=_SPLASH_BLOCK,
      block_q_dq=_SPLASH_BLOCK, block_kv_dq=_SPLASH_BLOCK)
  return sk.make_splash_mha(mask=mask, head_shards=1, q_seq_shards=1, block_sizes=block,
                            interpret=interpret)


def splash_attention(q, k, v, interpret: bool = False):
  """Pallas splash attention (TPU; ``interpret`` runs it anywhere, for tests). Lengths are padded to
  the block size and padded keys masked with segment ids, so any Wan chunk length (4,680 tokens,
  not a multiple of 128) is exact."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

  b, nq, h, d = q.shape
  nk = k.shape[1]
  pq, pk = -nq % _SPLASH_BLOCK, -nk % _SPLASH_BLOCK
  scale = 1.0 / math.sqrt(d)
  to_heads_first = lambda x, pad: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
  qh, kh, vh = to_heads_first(q * scale, pq), to_heads_first(k, pk), to_heads_first(v, pk)
  seg = sk.SegmentIds(
      q=jnp.concatenate([jnp.zeros(nq, jnp.int32), jnp.ones(pq, jnp.int32)]),
      kv=jnp.concatenate([jnp.zeros(nk, jnp.int32), jnp.full(pk, 2, jnp.int32)]))
  kernel = _splash_kernel(h, nq + pq, nk + pk, interpret)
  out = jax.vmap(lambda q1, k1, v1: kernel(q1, k1, v1, segment_ids=seg))(qh, kh, vh)
  return out.transpose(0, 2, 1, 3)[:, :nq].astype(q.dtype)


_FLASH_BLOCK = 512


def _blocks(x, size: int):
  """``[B, N, ...]`` -> ``[N / size, B, size, ...]``, zero-padding N to a multiple of ``size``."""
  pad = -x.shape[1] % size
  x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
  return jnp.moveaxis(x.reshape(x.shape[0], -1, size, *x.shape[2:]), 1, 0)


def _unblock(x, n: int):
  return jnp.moveaxis(x, 0, 1).reshape(x.shape[1], -1, *x.shape[3:])[:, :n]


def blockwise_attention(q, k, v, block: int = _FLASH_BLOCK):
  """Flash attention in plain JAX (any backend): query blocks against key blocks with an online
  softmax, and a backward pass that recomputes each block from the saved log-sum-exp. Memory is
  O(N D) instead of the dense kernel's O(Nq Nk): the long-video path on CPU, and what the
  compile-only planner uses to stand in for the splash / cuDNN kernels of a TPU or GPU."""
  return _flash(q, k, v, min(block, q.shape[1]), min(block, k.shape[1]))


def _flash_forward(q, k, v, bq, bk):
  b, nq, h, d = q.shape
  scale = 1.0 / math.sqrt(d)
  kb, vb = _blocks(k, bk), _blocks(v, bk)
  valid = (jnp.arange(kb.shape[0] * bk) < k.shape[1]).reshape(-1, bk)

  def query_block(qi):
    def key_block(carry, blk):
      m, l, acc = carry
      kj, vj, ok = blk
      s = jnp.einsum("bqhd,bkhd->bhqk", qi, kj, preferred_element_type=jnp.float32) * scale
      s = jnp.where(ok, s, -jnp.inf)
      m_new = jnp.maximum(m, s.max(-1))
      p = jnp.exp(s - m_new[..., None])
      c = jnp.exp(m - m_new)
      acc = acc * jnp.swapaxes(c, 1, 2)[..., None] + jnp.einsum(
          "bhqk,bkhd->bqhd", p, vj, preferred_element_type=jnp.float32)
      return (m_new, l * c + p.sum(-1), acc), None

    init = (jnp.full((b, h, bq), -jnp.inf), jnp.zeros((b, h, bq)), jnp.zeros((b, bq, h, d)))
    (m, l, acc), _ = jax.lax.scan(key_block, init, (kb, vb, valid))
    return acc / jnp.swapaxes(l, 1, 2)[..., None], m + jnp.log(l)

  out, lse = jax.lax.map(query_block, _blocks(q, bq))    # [nQ, B, bq, H, D], [nQ, B, H, bq]
  return _unblock(out, nq).astype(q.dtype), lse            # lse stays blocked for the backward


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _flash(q, k, v, bq, bk):
  return _flash_forward(q, k, v, bq, bk)[0]


def _flash_fwd(q, k, v, bq, bk):
  out, lse = _flash_forward(q, k, v, bq, bk)
  return out, (q, k, v, out, lse)


def _flash_bwd(bq, bk, res, g):
  q, k, v, out, lse = res
  nk, d = k.shape[1], q.shape[-1]
  scale = 1.0 / math.sqrt(d)
  delta = jnp.sum(g.astype(jnp.float32) * out.astype(jnp.float32), -1)   # [B, Nq, H]
  kb, vb = _blocks(k, bk), _blocks(v, bk)
  valid = (jnp.arange(kb.shape[0] * bk) < nk).reshape(-1, bk)

  def query_block(dkv, xs):
    qi, gi, di, lse_i = xs

    def key_block(dq, blk):
      kj, vj, ok = blk
      s = jnp.einsum("bqhd,bkhd->bhqk", qi, kj, preferred_element_type=jnp.float32) * scale
      p = jnp.where(ok, jnp.exp(s - lse_i[..., None]), 0.0)
      dp = jnp.einsum("bqhd,bkhd->bhqk", gi, vj, preferred_element_type=jnp.float32)
      ds = p * (dp - jnp.swapaxes(di, 1, 2)[..., None]) * scale
      dq = dq + jnp.einsum("bhqk,bkhd->bqhd", ds, kj, preferred_element_type=jnp.float32)
      return dq, (jnp.einsum("bhqk,bqhd->bkhd", ds, qi, preferred_element_type=jnp.float32),
                  jnp.einsum("bhqk,bqhd->bkhd", p, gi, preferred_element_type=jnp.float32))

    dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros(qi.shape, jnp.float32), (kb, vb, valid))
    return (dkv[0] + dk, dkv[1] + dv), dq

  zeros = jnp.zeros(kb.shape, jnp.float32)
  (dk, dv), dq = jax.lax.scan(query_block, (zeros, zeros),
                              (_blocks(q, bq), _blocks(g, bq), _blocks(delta, bq), lse))
  return (_unblock(dq, q.shape[1]).astype(q.dtype), _unblock(dk, nk).astype(k.dtype),
          _unblock(dv, nk).astype(v.dtype))


_flash.defvjp(_flash_fwd, _flash_bwd)


def resolve_kernel(kernel: str, dtype) -> str:
  """Maps ``auto`` to the fast kernel of the current backend; validates explicit choices."""
  if kernel not in KERNELS:
    raise ValueError(f"unknown attention kernel {kernel!r}; choose one of {KERNELS}.")
  if kernel != "auto":
    return kernel
  backend = jax.default_backend()
  if backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return "cudnn"
  if backend == "tpu":
    return "splash"
  return "dense"


def attend(q, k, v, kernel: str = "auto"):
  """Unmasked attention of ``q [B, Nq, H, D]`` over ``k, v [B, Nk, H, D]`` with the chosen kernel,
  sequence-parallel when the mesh in context has a ``context`` axis."""
  fn = {"dense": dense_attention, "blockwise": blockwise_attention, "cudnn": cudnn_attention,
        "splash": splash_attention}[resolve_kernel(kernel, q.dtype)]
  return _parallel_if_meshed(fn, q, k, v)


def attend_text(q, k, v, text_len: int, kernel: str = "auto"):
  """Cross-attention over a prompt's keys ``[B, T, H, D]`` whose last row stands for
  ``text_len - T + 1`` identical rows: Wan zero-pads every prompt to ``text_len`` rows, and the
  padding rows all embed to one key and value, so ``WanModel.text_kv`` keeps them as one row, which
  counts here by a ``log(count)`` logit bias (the dense kernel; a prompt's few keys keep its logits
  small). Exact, and ``text_len / T`` times cheaper; with no padding it is :func:`attend`."""
  count = text_len - k.shape[1] + 1
  if count == 1:
    return attend(q, k, v, kernel)
  bias = np.zeros(k.shape[1], np.float32)
  bias[-1] = math.log(count)
  return _parallel_if_meshed(functools.partial(dense_attention, key_bias=bias), q, k, v)


def _parallel_if_meshed(fn, q, k, v):
  mesh = mesh_lib.current_mesh()
  ctx = mesh_lib.axis_size(mesh, "context")
  if ctx > 1 and q.shape[1] % ctx == 0:  # a lone query (the readout's register) runs replicated
    return sequence_parallel(fn, q, k, v, mesh=mesh)
  return fn(q, k, v)


class Prefix(NamedTuple):
  """A KV cache ``[B, N, H, D]`` whose first ``length`` keys are written (``length`` may be traced,
  as in a rollout whose chunks run under ``lax.scan``); the rest is never attended to. With
  ``layer``, ``k`` and ``v`` are every layer's buffer ``[L, B, N, H, D]`` and this layer's blocks
  are read from it in place (a scan over layers would otherwise copy each layer's whole buffer)."""

  k: jax.Array
  v: jax.Array
  length: jax.Array
  layer: jax.Array | None = None

  def read(self, x, start, size: int):
    """Keys or values ``[B, size, H, D]`` of this layer from token ``start`` (may be traced)."""
    if self.layer is None:
      return jax.lax.dynamic_slice_in_dim(x, start, size, axis=1)
    return jax.lax.dynamic_slice(x, (self.layer, 0, start, 0, 0), (1, x.shape[1], size, *x.shape[3:]))[0]

  def whole(self) -> tuple[jax.Array, jax.Array]:
    """This layer's whole buffers (a copy when ``layer`` is set)."""
    return (self.k, self.v) if self.layer is None else (self.k[self.layer], self.v[self.layer])


def attend_cached(q, cache: Prefix, k, v, kernel: str = "auto", block: int = _FLASH_BLOCK):
  """``q [B, n, H, D]`` over the written part of ``cache`` plus its own ``k, v`` ``[B, n, H, D]``,
  doing no work on the unwritten part: cuDNN takes the valid key length (``key_value_seq_lengths``,
  the chunk's own keys written after the prefix); ``dense`` attends to the shortest of a few
  static prefixes that holds the written keys (:func:`_prefix_dense`); every other kernel runs an
  online softmax over the chunk's own keys, then over the cache's key blocks, skipping
  (``lax.cond``) every block past the written length. All differentiable, so a rollout can be
  backpropagated through."""
  kernel = resolve_kernel(kernel, q.dtype)
  mesh = mesh_lib.current_mesh()
  ctx = mesh_lib.axis_size(mesh, "context")
  parallel = ctx > 1 and q.shape[1] % ctx == 0
  bk = min(block, cache.k.shape[-3])
  prefix = _prefix_dense if kernel == "dense" else functools.partial(_prefix_flash, bk=bk)
  if kernel == "cudnn":
    pad = ((0, 0), (0, k.shape[1]), (0, 0), (0, 0))
    keys, values = (jax.lax.dynamic_update_slice_in_dim(jnp.pad(c, pad), x, cache.length, axis=1)
                    for c, x in zip(cache.whole(), (k, v)))
    fn = lambda q, k, v, n: jax.nn.dot_product_attention(
        q, k, v, key_value_seq_lengths=jnp.full((q.shape[0],), n, jnp.int32),
        implementation="cudnn")
    args, length = (q, keys, values), cache.length + k.shape[1]
  elif parallel:   # the kernel runs per device on [B, N, H, D] buffers
    fn = lambda q, ck, cv, k, v, n: prefix(q, Prefix(ck, cv, n), k, v)
    args, length = (q, *cache.whole(), k, v), cache.length
  else:
    return prefix(q, cache, k, v)
  if parallel:
    return sequence_parallel(fn, *args, mesh=mesh, scalars=(length,))
  return fn(*args, length)


def _prefix_dense(q, cache: Prefix, k, v):
  """The dense kernel over the chunk's own keys and a static prefix of the cache: ``lax.switch``
  takes the shortest of at most ``_PREFIX_LENGTHS + 1`` prefix lengths (steps of at least
  ``_PREFIX_STEP`` keys) that holds the written length, and masks the keys past it (no weight,
  values zeroed). Each branch is one plain dense call, at most one step of keys longer than the
  written prefix; on a 2-core CPU that runs a rollout as fast as exact static slices, where an
  online softmax over key blocks was 14-19 % slower (docs/benchmarks.md)."""
  n, nq = cache.k.shape[-3], k.shape[1]
  step = max(_PREFIX_STEP, -(-n // _PREFIX_LENGTHS))
  sizes = sorted({min(i * step, n) for i in range(-(-n // step) + 1)})

  def prefix_of(size):
    def attend_prefix(q, k, v, length):
      if size == 0:
        return dense_attention(q, k, v)
      written = jnp.arange(size) < length
      ck, cv = (jnp.where(written[:, None, None], cache.read(x, 0, size), 0)
                for x in (cache.k, cache.v))
      bias = jnp.concatenate([jnp.zeros(nq), jnp.where(written, 0.0, -jnp.inf)])
      return dense_attention(q, jnp.concatenate([k, ck], 1), jnp.concatenate([v, cv], 1), bias)
    return attend_prefix

  branch = jnp.searchsorted(jnp.asarray(sizes), cache.length)
  return jax.lax.switch(branch, [prefix_of(size) for size in sizes], q, k, v, cache.length)


def _prefix_flash(q, cache: Prefix, k, v, bk: int):
  """Online softmax over the chunk's own keys, then the first ``cache.length`` keys of the cache in
  blocks of ``bk`` (later blocks skipped); heads-first, fp32 statistics."""
  b, nq, h, d = q.shape
  n, length = cache.k.shape[-3], cache.length
  scale = 1.0 / math.sqrt(d)
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)
  qh = heads_first(q)

  def update(carry, s, vals):
    m, l, acc = carry
    m_new = jnp.maximum(m, s.max(-1))
    p = jnp.exp(s - m_new[..., None])
    c = jnp.exp(m - m_new)
    acc = acc * c[..., None] + jnp.einsum("bhqk,bhkd->bhqd", p.astype(vals.dtype), vals,
                                          preferred_element_type=jnp.float32)
    return m_new, l * c + p.sum(-1), acc

  def logits(keys):
    return jnp.einsum("bhqd,bhkd->bhqk", qh, keys, preferred_element_type=jnp.float32) * scale

  def block(j, carry):
    # Only the blocks read are copied (heads-first); the last one is shifted to end at the
    # buffer's end, and keys another block already took or not yet written are masked.
    start = jnp.minimum(j * bk, n - bk)
    kj, vj = (heads_first(cache.read(x, start, bk)) for x in (cache.k, cache.v))
    idx = start + jnp.arange(bk)
    written = (idx >= j * bk) & (idx < length)
    s = jnp.where(written, logits(kj), -jnp.inf)
    return update(carry, s, jnp.where(written[:, None], vj, 0))

  def maybe_block(carry, j):   # blocks past the written length are skipped, not computed
    return jax.lax.cond(j * bk < length, block, lambda j, carry: carry, j, carry), None

  carry = update((jnp.full((b, h, nq), -jnp.inf), jnp.zeros((b, h, nq)),
                  jnp.zeros((b, h, nq, d), jnp.float32)), logits(heads_first(k)), heads_first(v))
  (m, l, acc), _ = jax.lax.scan(maybe_block, carry, jnp.arange(-(-n // bk)))
  return heads_first(acc / l[..., None]).astype(q.dtype)


def sequence_parallel(kernel, q, *kv, mesh, scalars=()):
  """Ring-free sequence parallelism over the ``context`` axis: each device keeps its block of
  queries, all-gathers the keys and values (kept sharded over tokens outside attention, e.g. in
  the KV cache) and runs the kernel locally; batch stays split over data x fsdp, heads over
  ``tensor``. Keys too short to split (text tokens) arrive replicated over ``context``."""
  ctx = mesh_lib.axis_size(mesh, "context")
  q_spec = mesh_lib.role_spec(mesh, q.shape, ("batch", "tokens", "heads", None))
  gather = [a.shape[1] % ctx == 0 for a in kv]
  kv_specs = tuple(P(q_spec[0], "context" if g else None, q_spec[2], None) for g in gather)

  def local(q, *rest):
    kv, extra = rest[:len(gather)], rest[len(gather):]
    kv = (jax.lax.all_gather(a, "context", axis=1, tiled=True) if g else a
          for a, g in zip(kv, gather))
    return kernel(q, *kv, *extra)

  return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, *kv_specs, *(P(),) * len(scalars)),
                       out_specs=q_spec, check_vma=False)(q, *kv, *scalars)


# ----------------------------------------------------------------------------------------------
# Layouts.


@dataclasses.dataclass(frozen=True)
class Layout:
  """Static description of a self-attention pattern over a video token sequence.

  ``chunk_tokens`` is the number of tokens in one chunk (chunk_frames x tokens per frame).
  ``window_tokens`` (optional) is the total number of tokens a chunk may see, its own chunk and the
  ``sink_tokens`` leading tokens included (LongLive-style local attention with an attention sink).
  """

  mode: str = "bidirectional"
  chunk_tokens: int = 0
  window_tokens: int | None = None
  sink_tokens: int = 0
  kernel: str = "auto"

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"unknown attention mode {self.mode!r}; choose one of {MODES}.")
    if self.mode in ("block_causal", "teacher_forcing", "cached_context") and self.chunk_tokens <= 0:
      raise ValueError(f"attention mode {self.mode!r} needs a positive chunk size.")

  def key_ranges(self, chunk: int) -> list[tuple[int, int]]:
    """Token ranges ``[start, end)`` of the (clean) keys that chunk ``chunk`` attends to."""
    end = (chunk + 1) * self.chunk_tokens
    if self.window_tokens is None:
      return [(0, end)]
    recent = max(self.sink_tokens, end - (self.window_tokens - self.sink_tokens))
    ranges = [(0, min(self.sink_tokens, end))] if self.sink_tokens else []
    return ranges + [(recent, end)] if recent < end else ranges

  def __call__(self, q, k, v, cache=None):
    """Applies the pattern. ``cache`` is ``(k, v)`` of earlier tokens in ``kv_cache`` mode, and the
    clean video's K/V (same length as q) in ``cached_context`` mode."""
    if self.mode == "bidirectional":
      return attend(q, k, v, self.kernel)
    if self.mode == "kv_cache":
      if cache is None:
        return attend(q, k, v, self.kernel)
      if isinstance(cache, Prefix):
        return attend_cached(q, cache, k, v, self.kernel)
      ck, cv = cache
      return attend(q, jnp.concatenate([ck, k], 1), jnp.concatenate([cv, v], 1), self.kernel)
    if self.mode == "block_causal":
      return self._block_causal(q, k, v)
    if self.mode == "cached_context":
      return self._noisy_chunks(q, k, v, *cache)
    return self._teacher_forcing(q, k, v)

  def _num_chunks(self, n: int) -> int:
    if n % self.chunk_tokens:
      raise ValueError(f"{n} tokens are not a whole number of {self.chunk_tokens}-token chunks.")
    return n // self.chunk_tokens

  def _gather(self, x, chunk):
    parts = [x[:, a:b] for a, b in self.key_ranges(chunk)]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, 1)

  def _block_causal(self, q, k, v):
    c = self.chunk_tokens
    outs = [attend(q[:, i * c:(i + 1) * c], self._gather(k, i), self._gather(v, i), self.kernel)
            for i in range(self._num_chunks(q.shape[1]))]
    return jnp.concatenate(outs, 1)

  def _teacher_forcing(self, q, k, v):
    """Sequence ``[clean ; noisy]``: clean chunk j sees clean chunks <= j; noisy chunk j sees clean
    chunks < j and noisy chunk j."""
    n = q.shape[1] // 2
    clean = self._block_causal(q[:, :n], k[:, :n], v[:, :n])
    return jnp.concatenate([clean, self._noisy_chunks(q[:, n:], k[:, n:], v[:, n:], k[:, :n],
                                                      v[:, :n])], 1)

  def _noisy_chunks(self, q, k, v, clean_k, clean_v):
    """Noisy chunk j attends to the clean keys of chunks < j and to its own noisy keys."""
    c = self.chunk_tokens
    outs = []
    for i in range(self._num_chunks(q.shape[1])):
      own = slice(i * c, (i + 1) * c)
      prev = [(a, min(b, i * c)) for a, b in self.key_ranges(i) if a < i * c]
      ks = [clean_k[:, a:b] for a, b in prev] + [k[:, own]]
      vs = [clean_v[:, a:b] for a, b in prev] + [v[:, own]]
      outs.append(attend(q[:, own], jnp.concatenate(ks, 1), jnp.concatenate(vs, 1), self.kernel))
    return jnp.concatenate(outs, 1)


# ----------------------------------------------------------------------------------------------
# Reference masks (tests and PyTorch parity only).


def block_causal_mask(num_tokens: int, chunk_tokens: int, window_tokens: int | None = None,
                      sink_tokens: int = 0) -> np.ndarray:
  """``[N, N]`` boolean mask: query q may see key k (Self-Forcing's block-causal rule)."""
  q = np.arange(num_tokens)[:, None]
  k = np.arange(num_tokens)[None, :]
  end = (q // chunk_tokens + 1) * chunk_tokens
  allowed = k < end
  if window_tokens is not None:
    allowed &= (k < sink_tokens) | (k >= end - (window_tokens - sink_tokens))
  return allowed


def teacher_forcing_mask(num_tokens: int, chunk_tokens: int) -> np.ndarray:
  """``[2N, 2N]`` mask over ``[clean ; noisy]`` (Self-Forcing ``_prepare_teacher_forcing_mask``)."""
  idx = np.arange(num_tokens)
  chunk = idx // chunk_tokens
  clean_clean = chunk[:, None] >= chunk[None, :]
  noisy_clean = chunk[:, None] > chunk[None, :]
  noisy_noisy = chunk[:, None] == chunk[None, :]
  none = np.zeros_like(clean_clean)
  return np.block([[clean_clean, none], [noisy_clean, noisy_noisy]])


def masked_dense_attention(q, k, v, mask):
  """Dense attention with an explicit ``[Nq, Nk]`` boolean mask (reference for the layouts)."""
  scale = 1.0 / math.sqrt(q.shape[-1])
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  logits = jnp.where(jnp.asarray(mask)[None, None], logits, -jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(jnp.float32)).astype(q.dtype)
