import jax
import jax.numpy as jnp
import numpy as np
import pytest

from afd_jax.models import attention as A


def _qkv(n, seed=0, b=2, h=2, d=8):
  ks = jax.random.split(jax.random.key(seed), 3)
  return [jax.random.normal(k, (b, n, h, d)) for k in ks]


def test_dense_kernel_is_softmax_attention():
  q, k, v = _qkv(5)
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  np.testing.assert_allclose(A.dense_attention(q, k, v), np.einsum("bhqk,bkhd->bqhd", p, v),
                             atol=1e-5)


def test_dense_kernel_in_query_blocks_equals_one_block(monkeypatch):
  """A logits budget of 100 values splits 2 x 2 x 13 queries over 9 keys into 5 padded blocks of 3:
  the same outputs and gradients as one block, and the per-key bias shifts the logits."""
  q, _, _ = _qkv(13)
  _, k, v = _qkv(9, seed=1)
  bias = np.linspace(-1.0, 2.0, 9).astype(np.float32)
  loss = lambda q, k, v: jnp.sum(jnp.sin(A.dense_attention(q, k, v, bias)))
  whole = [A.dense_attention(q, k, v, bias), jax.grad(loss, (0, 1, 2))(q, k, v)]
  monkeypatch.setattr(A, "_DENSE_BLOCK_LOGITS", 100)
  blocked = jax.make_jaxpr(lambda q: A.dense_attention(q, k, v, bias))(q)
  assert "scan" in str(blocked) and "length=5" in str(blocked)
  got = [A.dense_attention(q, k, v, bias), jax.grad(loss, (0, 1, 2))(q, k, v)]
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(whole)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8) + bias
  p = np.exp(logits - logits.max(-1, keepdims=True))
  np.testing.assert_allclose(got[0], np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v),
                             atol=1e-5)


def test_text_attention_counts_the_collapsed_padding_row():
  """Keys ``[5 rows; pad]`` with ``text_len = 12`` equal dense attention over the 5 rows and seven
  copies of the pad row; with ``text_len`` rows it is plain attention with the chosen kernel; the
  same under sequence parallelism."""
  from afd_jax import mesh as mesh_lib

  q, _, _ = _qkv(12)
  _, k, v = _qkv(6, seed=1)
  padded = [jnp.concatenate([x, jnp.repeat(x[:, -1:], 6, 1)], 1) for x in (k, v)]
  want = A.dense_attention(q, *padded)
  np.testing.assert_allclose(A.attend_text(q, k, v, 12, "blockwise"), want, atol=2e-6)
  np.testing.assert_array_equal(A.attend_text(q, *padded, 12, "blockwise"),
                                A.blockwise_attention(q, *padded))
  with jax.set_mesh(mesh_lib.make_mesh(8, data=1, context=4, tensor=2)):
    got = jax.jit(lambda q, k, v: A.attend_text(q, k, v, 12, "dense"))(q, k, v)
  np.testing.assert_allclose(got, want, atol=2e-6)


@pytest.mark.parametrize("window,sink", [(None, 0), (12, 0), (12, 4), (16, 4)])
def test_block_causal_layout_equals_masked_reference(window, sink):
  q, k, v = _qkv(24)
  layout = A.Layout("block_causal", chunk_tokens=4, window_tokens=window, sink_tokens=sink,
                    kernel="dense")
  mask = A.block_causal_mask(24, 4, window, sink)
  np.testing.assert_allclose(layout(q, k, v), A.masked_dense_attention(q, k, v, mask), atol=1e-5)


def test_block_causal_mask_matches_self_forcing_rule():
  mask = A.block_causal_mask(6, 2)
  expected = np.array([[1, 1, 0, 0, 0, 0]] * 2 + [[1, 1, 1, 1, 0, 0]] * 2 + [[1] * 6] * 2, bool)
  np.testing.assert_array_equal(mask, expected)


def test_teacher_forcing_layout_equals_masked_reference():
  q, k, v = _qkv(2 * 12)
  layout = A.Layout("teacher_forcing", chunk_tokens=4, kernel="dense")
  mask = A.teacher_forcing_mask(12, 4)
  np.testing.assert_allclose(layout(q, k, v), A.masked_dense_attention(q, k, v, mask), atol=1e-5)
  # Noisy chunk 1 sees clean chunk 0 and itself only.
  assert mask[12 + 4].nonzero()[0].tolist() == [0, 1, 2, 3, 16, 17, 18, 19]


def test_kv_cache_layout_concatenates_the_cache():
  q, k, v = _qkv(4)
  ck, cv, _ = _qkv(8, seed=1)
  out = A.Layout("kv_cache", kernel="dense")(q, k, v, (ck, cv))
  ref = A.dense_attention(q, jnp.concatenate([ck, k], 1), jnp.concatenate([cv, v], 1))
  np.testing.assert_allclose(out, ref, atol=1e-6)


def test_bad_kernel_mode_and_chunking_are_refused():
  with pytest.raises(ValueError, match="unknown attention kernel"):
    A.attend(*_qkv(4), kernel="flash3")
  with pytest.raises(ValueError, match="unknown attention mode"):
    A.Layout("causal")
  with pytest.raises(ValueError, match="positive chunk size"):
    A.Layout("block_causal")
  with pytest.raises(ValueError, match="whole number"):
    A.Layout("block_causal", chunk_tokens=5, kernel="dense")(*_qkv(12))
  with pytest.raises(ValueError, match="bfloat16 or float16"):
    A.cudnn_attention(*_qkv(4))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the CPU choice")
def test_auto_kernel_on_cpu_is_dense():
  assert A.resolve_kernel("auto", jnp.bfloat16) == A.resolve_kernel("auto", jnp.float32) == "dense"


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
def test_cudnn_matches_dense_on_gpu():
  q, k, v = [x.astype(jnp.bfloat16) for x in _qkv(300, d=64)]
  ref = A.dense_attention(*[x.astype(jnp.float32) for x in (q, k, v)])
  np.testing.assert_allclose(A.cudnn_attention(q, k, v).astype(jnp.float32), ref, atol=2e-2)


@pytest.mark.parametrize("nq,nk,block", [(37, 53, 16), (12, 12, 512), (64, 32, 32)])
def test_blockwise_kernel_matches_dense_with_gradients(nq, nk, block):
  """Flash attention in plain JAX: query and key lengths not multiples of the block (padding and
  masked keys), one block, and exact multiples; the custom backward against autodiff of dense."""
  q, _, _ = _qkv(nq)
  _, k, v = _qkv(nk, seed=1)
  g = jax.random.normal(jax.random.key(3), q.shape)
  loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v) * g)
  flash = lambda q, k, v: A.blockwise_attention(q, k, v, block)
  np.testing.assert_allclose(flash(q, k, v), A.dense_attention(q, k, v), atol=2e-6)
  for a, b in zip(jax.grad(loss(flash), (0, 1, 2))(q, k, v),
                  jax.grad(loss(A.dense_attention), (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(a, b, atol=5e-6)


def test_blockwise_kernel_keeps_no_quadratic_buffer():
  """At 4,096 tokens the dense kernel's logits alone take 4096^2 x 4 B = 64 MiB per head; the
  blockwise forward and backward stay far below."""
  q, k, v = _qkv(4096, b=1, h=1, d=16)
  step = jax.jit(jax.grad(lambda q, k, v: jnp.sum(A.blockwise_attention(q, k, v, 256)), (0, 1, 2)))
  temp = step.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes
  assert temp < 8 * 2**20


def test_splash_kernel_with_padding_matches_dense_in_interpret_mode():
  """The TPU kernel path (padding to 128-blocks, segment-id masking) run by the Pallas interpreter;
  query and key lengths are deliberately not multiples of the block size."""
  q, _, _ = _qkv(130, b=1, d=128)
  _, k, v = _qkv(200, seed=1, b=1, d=128)
  np.testing.assert_allclose(A.splash_attention(q, k, v, interpret=True),
                             A.dense_attention(q, k, v), atol=2e-5)


def test_sequence_parallel_attention_matches_one_device():
  """Under a mesh with ``context`` = 4 (and batch over data, heads over tensor) the kernel runs in
  shard_map on query blocks with gathered keys: same result as one device, gradients included.
  Keys of a length ``context`` does not divide (text) arrive replicated."""
  from afd_jax import mesh as mesh_lib

  mesh = mesh_lib.make_mesh(8, data=1, context=4, tensor=2)
  q, _, _ = _qkv(12)
  _, k, v = _qkv(20, seed=1)
  _, kt, vt = _qkv(7, seed=2)
  loss = lambda q, k, v: jnp.sum(jnp.sin(A.attend(q, k, v, "dense")))
  ref = [A.attend(q, k, v, "dense"), A.attend(q, kt, vt, "dense"), jax.grad(loss, (0, 1, 2))(q, k, v)]
  with jax.set_mesh(mesh):
    jaxpr = str(jax.make_jaxpr(lambda q, k, v: A.attend(q, k, v, "dense"))(q, k, v))
    got = jax.jit(lambda q, k, v, kt, vt: [A.attend(q, k, v, "dense"), A.attend(q, kt, vt, "dense"),
                                           jax.grad(loss, (0, 1, 2))(q, k, v)])(q, k, v, kt, vt)
  assert "shard_map" in jaxpr and "all_gather" in jaxpr
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, atol=2e-6)


@pytest.mark.parametrize("kernel,block,step", [("dense", 16, 128), ("dense", 16, 8),
                                               ("blockwise", 512, 128), ("blockwise", 16, 128)])
def test_cached_prefix_attention_reads_only_the_written_keys(kernel, block, step, monkeypatch):
  """A chunk's queries over the first ``length`` (traced) keys of a cache plus its own keys equal
  dense attention over exactly those keys; what lies past ``length`` (here NaN) gets no weight.
  Lengths: none written, inside a block (or prefix step), at a boundary, the whole cache."""
  monkeypatch.setattr(A, "_PREFIX_STEP", step)
  q, k, v = _qkv(12)
  _, ck, cv = _qkv(40, seed=1)
  cached = jax.jit(lambda q, ck, cv, k, v, n: A.attend_cached(q, A.Prefix(ck, cv, n), k, v, kernel,
                                                              block))
  for n in (0, 5, 16, 40):
    poisoned = [c.at[:, n:].set(jnp.nan) for c in (ck, cv)]
    want = A.dense_attention(q, jnp.concatenate([ck[:, :n], k], 1), jnp.concatenate([cv[:, :n], v], 1))
    np.testing.assert_allclose(cached(q, *poisoned, k, v, n), want, atol=2e-6)


def test_dense_cached_attention_switches_among_a_bounded_number_of_prefixes():
  """However long the cache, the dense kernel's cached form compiles at most 17 prefix lengths
  (so a rollout's compile time does not grow with its length), the longest the whole cache."""
  q, k, v = _qkv(12, b=1)
  for n, lengths in ((40, 2), (4000, 17)):
    ck = jnp.zeros((1, n, 2, 8))
    jaxpr = jax.make_jaxpr(lambda n: A.attend_cached(q, A.Prefix(ck, ck, n), k, v, "dense"))(
        jnp.int32(0))
    (switch,) = [e for e in jaxpr.eqns if e.primitive.name == "cond"]
    assert len(switch.params["branches"]) == lengths


@pytest.mark.parametrize("kernel", ["dense", "blockwise"])
def test_cached_prefix_attention_runs_sequence_parallel(kernel):
  from afd_jax import mesh as mesh_lib

  q, k, v = _qkv(12)
  _, ck, cv = _qkv(40, seed=1)
  fn = jax.jit(lambda q, ck, cv, k, v: A.attend_cached(q, A.Prefix(ck, cv, jnp.int32(20)), k, v,
                                                       kernel, 8))
  want = fn(q, ck, cv, k, v)
  with jax.set_mesh(mesh_lib.make_mesh(8, data=1, context=4, tensor=2)):
    got = fn(q, ck, cv, k, v)
  np.testing.assert_allclose(got, want, atol=2e-6)
