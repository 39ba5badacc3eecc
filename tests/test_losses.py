import jax
import jax.numpy as jnp
import numpy as np
import pytest

from afd_jax import flow
from afd_jax import losses as L


def test_bt_loss_accuracy_and_penalty_by_hand():
  t, s = jnp.array([2.0, 0.0, -1.0]), jnp.array([0.0, 0.0, 1.0])
  expected = (np.log1p(np.exp(-2.0)) + np.log(2.0) + np.log1p(np.exp(2.0))) / 3
  np.testing.assert_allclose(L.bt_loss(t, s), expected, rtol=1e-6)
  np.testing.assert_allclose(L.bt_accuracy(t, s), 1 / 3)
  np.testing.assert_allclose(L.finite_difference_penalty(t, t + jnp.array([0.01, 0.0, -0.02]), 0.01),
                             (1 + 0 + 4) / 3, rtol=1e-5)


def test_bt_gradient_separates_teacher_from_student():
  g_t, g_s = jax.grad(L.bt_loss, argnums=(0, 1))(jnp.zeros(2), jnp.zeros(2))
  assert np.all(g_t < 0) and np.all(g_s > 0)  # descent raises teacher logits, lowers student ones


def test_advantage_normalisation_batch_and_per_prompt():
  s = jnp.array([1.0, 2.0, 3.0, 4.0])
  np.testing.assert_allclose(L.normalize_advantages(s), (s - 2.5) / (np.std(s) + 1e-4), rtol=1e-6)
  s = jnp.array([1.0, 3.0, 10.0, 14.0])
  np.testing.assert_allclose(L.normalize_advantages(s, group_size=2),
                             np.array([-1, 1, -2, 2]) / (np.std(s) + 1e-4), rtol=1e-6)
  with pytest.raises(ValueError, match="groups of 3"):
    L.normalize_advantages(s, group_size=3)


def test_teacher_logit_cancels_with_several_rollouts_per_prompt():
  """K rollouts per prompt, prompt-major, each beside its own teacher draw: every rollout is
  scored against its prompt's mean teacher logit, and per-prompt centring removes it, whatever
  the draws; the global std (DiffusionNFT ``global_std``) is over all scores."""
  student = jnp.array([0.3, -0.2, 1.0, 2.0])
  scores = L.paired_scores(jnp.array([0.0, 2.0, 5.0, 5.0]), student, 2)
  np.testing.assert_allclose(scores, [-0.7, -1.2, -4.0, -3.0], rtol=1e-6)
  a = L.normalize_advantages(scores, 2)
  np.testing.assert_allclose(a, np.array([0.25, -0.25, -0.5, 0.5]) / (np.std(scores) + 1e-4),
                             rtol=1e-5)
  b = L.normalize_advantages(L.paired_scores(jnp.array([-3.0, 9.0, 1.0, 0.0]), student, 2), 2)
  np.testing.assert_allclose(a / b, np.full(4, float(a[0] / b[0])), rtol=1e-5)  # same ranking
  np.testing.assert_allclose(L.paired_scores(jnp.array([1.0]), jnp.array([3.0])), [2.0])


def test_per_chunk_scores_are_normalised_chunk_by_chunk():
  """A per-chunk discriminator's ``[B, C]`` logits: each chunk's column is paired and normalised
  exactly as videos' scores are, K = 1 and K = 2."""
  rng = np.random.default_rng(0)
  teacher, student = (jnp.asarray(rng.standard_normal((4, 3)), jnp.float32) for _ in range(2))
  for k in (1, 2):
    both = L.normalize_advantages(L.paired_scores(teacher, student, k), k)
    assert both.shape == (4, 3)
    for c in range(3):
      one = L.normalize_advantages(L.paired_scores(teacher[:, c], student[:, c], k), k)
      np.testing.assert_allclose(both[:, c], one, rtol=1e-5, atol=1e-6)


def test_disc_losses_paired_and_unpaired():
  t, s = jnp.array([2.0, -1.0]), jnp.array([0.0, 1.0])
  sp = lambda x: np.log1p(np.exp(x))
  np.testing.assert_allclose(L.disc_loss("bt", t, s), (sp(-2.0) + sp(2.0)) / 2, rtol=1e-6)
  np.testing.assert_allclose(L.disc_loss("gan", t, s),
                             (sp(-2.0) + sp(1.0)) / 2 + (sp(0.0) + sp(1.0)) / 2, rtol=1e-6)
  # Swapping which student video sits beside which teacher changes only the paired loss.
  swapped = s[::-1]
  assert float(L.disc_loss("bt", t, swapped)) != pytest.approx(float(L.disc_loss("bt", t, s)))
  assert float(L.disc_loss("gan", t, swapped)) == pytest.approx(float(L.disc_loss("gan", t, s)))
  np.testing.assert_allclose(L.relativistic_generator_loss(t, s), (sp(2.0) + sp(-2.0)) / 2,
                             rtol=1e-6)


def test_mismatch_partner_is_the_nearest_other_prompt_same_draw():
  """Prompts 0 and 2 share most of their text, prompt 1 is nearer to 2 than to 0; padding rows
  (zeros) do not matter; with K = 2 draws per prompt each row meets the same draw of its
  partner, never a row of its own prompt."""
  words = np.eye(4, dtype=np.float32)
  prompts = np.stack([
      [words[0], words[1], words[2], 0 * words[0]],
      [words[3], words[3], words[2], 0 * words[0]],
      [words[0], words[1], words[3], 0 * words[0]]])          # [P=3, L=4, D=4]
  np.testing.assert_array_equal(L.mismatch_partners(jnp.asarray(prompts)), [2, 2, 0])
  rows = jnp.asarray(np.repeat(prompts, 2, axis=0))          # prompt-major, K = 2
  np.testing.assert_array_equal(L.mismatch_partners(rows, 2), [4, 5, 4, 5, 0, 1])
  with pytest.raises(ValueError, match="2 prompts"):
    L.mismatch_partners(rows[:2], 2)


@pytest.mark.parametrize("mode,expected", [
    ("all", [-5, -1, 0.5, 5]), ("positive_only", [0, 0, 0.5, 5]),
    ("negative_only", [-5, -1, 0, 0]), ("one_only", [0, 0, 1, 1]), ("binary", [-1, -1, 1, 1])])
def test_advantage_clip_and_modes(mode, expected):
  np.testing.assert_allclose(L.shape_advantages(jnp.array([-7.0, -1.0, 0.5, 6.0]), 5.0, mode),
                             expected)


def test_optimality_probability_and_bad_mode():
  np.testing.assert_allclose(L.optimality_probability(jnp.array([-5.0, 0.0, 2.5, 5.0]), 5.0),
                             [0.0, 0.5, 0.75, 1.0])
  with pytest.raises(ValueError, match="unknown adv_mode"):
    L.shape_advantages(jnp.zeros(2), 5.0, "top_k")


def _nft(v_theta, r, beta=1.0):
  one = lambda a: jnp.asarray(a, jnp.float32).reshape(1, 1, 1, 2, 1)
  x0, x_t, v_old = one([0.0, 0.0]), one([1.0, 1.0]), one([1.0, 1.0])
  return L.nft_loss(one(v_theta), v_old, x_t, x0, jnp.full((1, 1), 0.5), jnp.array([r]),
                    beta=beta, a_max=5.0, chunk_frames=1)[0]


def test_nft_loss_by_hand():
  # v+ = [2, 1] -> x+ = [0, .5]: w+ = .25, L+ = .125/.25 = .5
  # v- = [0, 1] -> x- = [1, .5]: w- = .75, L- = .625/.75 = 5/6
  np.testing.assert_allclose(_nft([2.0, 1.0], 0.8), 5.0 * (0.8 * 0.5 + 0.2 * 5 / 6), rtol=1e-6)


def test_nft_gradient_pulls_toward_good_and_pushes_from_bad_samples():
  rng = np.random.default_rng(0)
  x0 = jnp.asarray(rng.standard_normal((2, 6, 2, 2, 3)), jnp.float32)
  eps = jnp.asarray(rng.standard_normal(x0.shape), jnp.float32)
  sigma = jnp.full((2, 6), 0.6)
  x_t = flow.add_noise(x0, eps, sigma)
  v_old = jnp.asarray(rng.standard_normal(x0.shape), jnp.float32)  # theta == theta_old
  r = jnp.array([1.0, 0.0])

  def loss(v):
    return L.nft_loss(v, v_old, x_t, x0, sigma, r, beta=1.0, a_max=5.0, chunk_frames=3)[0]

  g = jax.grad(loss)(v_old)
  step = v_old - 1e-2 * g
  dist = lambda v, i: float(jnp.sum(jnp.square(flow.x0_from_velocity(x_t, v, sigma)[i] - x0[i])))
  assert dist(step, 0) < dist(v_old, 0)  # r = 1: x0 estimate moves toward its own sample
  assert dist(step, 1) > dist(v_old, 1)  # r = 0: away from it
  half = jax.grad(lambda v: L.nft_loss(v, v_old, x_t, x0, sigma, jnp.full(2, 0.5), beta=1.0,
                                       a_max=5.0, chunk_frames=3)[0])(v_old)
  np.testing.assert_allclose(half, 0.0, atol=1e-6)  # r = 0.5 carries no signal at theta_old


def test_nft_loss_takes_one_optimality_probability_per_chunk():
  """``r [B, C]`` weighs each (sample, chunk) group by its own chunk's r: equal to ``r [B]`` when
  the chunks agree, and a chunk with r = 1 and one with r = 0 pull opposite ways."""
  rng = np.random.default_rng(1)
  x0, eps, v_old = (jnp.asarray(rng.standard_normal((2, 6, 2, 2, 3)), jnp.float32)
                    for _ in range(3))
  sigma = jnp.full((2, 6), 0.6)
  x_t = flow.add_noise(x0, eps, sigma)
  loss = lambda v, r: L.nft_loss(v, v_old, x_t, x0, sigma, r, beta=1.0, a_max=5.0,
                                 chunk_frames=3)[0]
  v = v_old + 0.1
  np.testing.assert_allclose(loss(v, jnp.array([[0.8, 0.8], [0.3, 0.3]])),
                             loss(v, jnp.array([0.8, 0.3])), rtol=1e-6)
  g = jax.grad(loss)(v_old, jnp.array([[1.0, 0.0], [1.0, 0.0]]))
  step = v_old - 1e-2 * g
  dist = lambda v, frames: float(jnp.sum(jnp.square(
      (flow.x0_from_velocity(x_t, v, sigma) - x0)[:, frames])))
  assert dist(step, slice(0, 3)) < dist(v_old, slice(0, 3))   # chunk 0, r = 1: toward its sample
  assert dist(step, slice(3, 6)) > dist(v_old, slice(3, 6))   # chunk 1, r = 0: away from it


def test_regularizer_by_hand():
  np.testing.assert_allclose(L.velocity_regularizer(jnp.array([1.0, 3.0]), jnp.array([0.0, 1.0]),
                                                     1e-4), 1e-4 * 2.5)


def test_noise_levels_are_per_chunk_permutations():
  levels = np.array([1.0, 0.9375, 0.8333, 0.625], np.float32)
  sig = L.permuted_levels(jax.random.key(0), levels, batch=3, chunks=5, passes=4)
  assert sig.shape == (4, 3, 5)
  np.testing.assert_allclose(np.sort(np.asarray(sig), axis=0), np.broadcast_to(
      np.sort(levels)[:, None, None], sig.shape))
  assert len({tuple(np.asarray(sig[:, b, c])) for b in range(3) for c in range(5)}) > 1
  assert L.chunk_to_frames(sig, 3).shape == (4, 3, 15)
  cont = L.continuous_levels(jax.random.key(1), 3, 5, 2, shift=5.0)
  assert cont.shape == (2, 3, 5) and float(cont.min()) > 0.09 and float(cont.max()) < 1.0
  with pytest.raises(ValueError, match="NFT passes"):
    L.permuted_levels(jax.random.key(0), levels, 1, 1, passes=5)
