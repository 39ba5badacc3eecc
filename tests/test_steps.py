import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from afd_jax import steps
from afd_jax.models import discriminator as D
from conftest import randomize

CFG = steps.AFDConfig(nft_passes=2, ema_start=0)


def _trees_equal(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _trees_close(a, b):
  """Equal up to float32 rounding: two programs computing the same values may round apart."""
  return all(np.allclose(x, y, rtol=1e-5, atol=1e-7)
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def batch(inputs):
  latents, context = inputs
  teacher = jnp.asarray(np.random.default_rng(5).standard_normal(latents.shape), jnp.float32)
  return teacher, latents, context


def test_disc_step_changes_only_the_discriminator_and_compiles_once(tiny_model, batch):
  teacher, student_x, context = batch
  disc = randomize(D.init(tiny_model, D.DiscriminatorConfig((0, 1), 96)), seed=4)
  graphdef, params = nnx.split(disc)
  tx = steps.adamw(1e-3)
  opt = tx.init(params)
  fn = jax.jit(steps.make_disc_step(graphdef, tx, CFG))
  before = jax.tree.map(np.asarray, params)
  x_before = np.asarray(student_x)
  new, opt, out = fn(params, opt, teacher, student_x, context, jax.random.key(0))
  new, opt, out = fn(new, opt, teacher, student_x, context, jax.random.key(1))
  assert fn._cache_size() == 1
  assert not _trees_equal(new, before)
  np.testing.assert_array_equal(student_x, x_before)
  m = out["metrics"]
  assert out["teacher_logits"].shape == (2,) and np.isfinite(float(m["disc/loss"]))
  assert 0.0 <= float(m["disc/accuracy"]) <= 1.0

  # A frozen discriminator's scoring step: the same scores, and only the scores (no state copy).
  score = jax.jit(steps.make_disc_step(graphdef, tx, CFG, update=False))
  scored = score(new, teacher, student_x, context, jax.random.key(2))
  assert set(scored) == {"teacher_logits", "student_logits", "metrics"}
  trained = fn(new, opt, teacher, student_x, context, jax.random.key(2))[2]
  np.testing.assert_allclose(scored["teacher_logits"], trained["teacher_logits"], rtol=1e-5)


def test_color_jitter_scales_each_videos_rgb_in_pixel_space(tiny_model, batch):
  gains = steps.color_gains(jax.random.key(3), 4, 0.2)
  assert gains.shape == (4, 2, 3) and len(np.unique(np.asarray(gains))) == 24
  assert np.all((gains >= np.exp(-0.2)) & (gains <= np.exp(0.2)))
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 2, 3, 3, 12)), jnp.float32)
  x = x.at[:, :, 0].set(-1.0)                                  # a black row
  out = np.asarray(steps.apply_gains(x, gains[:, 0]))
  channel_gain = np.asarray(gains[:, 0])[:, np.arange(12) % 3]  # pixel latents: RGB fastest
  np.testing.assert_allclose(out, (np.asarray(x) + 1) * channel_gain[:, None, None, None] - 1,
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out[:, :, 0], -1.0, atol=1e-6)     # black stays black

  # In the discriminator's step: teacher and student of a pair get their own gains, so two
  # equal videos score apart with jitter and alike without; the noise draws do not change.
  teacher, _, context = batch
  disc = randomize(D.init(tiny_model, D.DiscriminatorConfig((0, 1), 96)), seed=4)
  graphdef, params = nnx.split(disc)
  logits = {}
  for amount in (0.0, 0.2):
    score = jax.jit(steps.make_disc_step(graphdef, steps.adamw(1e-3),
                                         dataclasses.replace(CFG, disc_color_jitter=amount),
                                         update=False))
    logits[amount] = score(params, teacher, teacher, context, jax.random.key(1))
  np.testing.assert_array_equal(logits[0.0]["teacher_logits"], logits[0.0]["student_logits"])
  assert not np.allclose(logits[0.2]["teacher_logits"], logits[0.2]["student_logits"])
  with pytest.raises(ValueError, match="disc_color_jitter"):
    steps.AFDConfig(disc_color_jitter=-0.1)


def test_fixed_level_scores_give_a_prompts_rollouts_one_noise_draw(tiny_model, batch):
  """``score_tau``: the advantage's logits are the pre-update discriminator's at that one level,
  with one noise draw per prompt, so two equal rollouts of a prompt score alike (with a draw of
  their own they do not), whatever the training augmentation draws."""
  teacher, student_x, context = batch
  disc = randomize(D.init(tiny_model, D.DiscriminatorConfig((0, 1), 96)), seed=4)
  graphdef, params = nnx.split(disc)
  tx = steps.adamw(1e-3)
  twins = jnp.repeat(student_x[:1], 2, axis=0)          # one prompt's two equal rollouts
  ctx = jnp.repeat(context[:1], 2, axis=0)

  def scores(key=0, **changes):
    cfg = dataclasses.replace(CFG, **{"disc_tau_max": 0.5, **changes})
    return jax.jit(steps.make_disc_step(graphdef, tx, cfg, update=False))(
        params, teacher, twins, ctx, jax.random.key(key))["student_logits"]

  own = scores(group_size=2)
  assert abs(float(own[0] - own[1])) > 1e-4               # the training draws: own level, own noise
  fixed = scores(group_size=2, score_tau=0.4)
  np.testing.assert_array_equal(fixed[0], fixed[1])
  np.testing.assert_array_equal(fixed, scores(group_size=2, score_tau=0.4, disc_tau_max=0.1))
  separate = scores(group_size=1, score_tau=0.4)          # one prompt per pair: its own draw
  assert abs(float(separate[0] - separate[1])) > 1e-4

  # At level 0 the update step returns the clean videos' logits of the pre-update network and the
  # advantage of exactly them.
  cfg = dataclasses.replace(CFG, score_tau=0.0, group_size=2)
  t0 = jnp.zeros((2,))
  step = jax.jit(steps.make_disc_step(graphdef, tx, cfg, with_advantage=True))
  _, _, out = step(params, tx.init(params), teacher, student_x, context, jax.random.key(3))
  np.testing.assert_allclose(out["teacher_logits"], disc(teacher, t0, context), rtol=1e-5)
  np.testing.assert_allclose(out["student_logits"], disc(student_x, t0, context), rtol=1e-5)
  np.testing.assert_allclose(out["advantage"], steps.advantage(
      out["teacher_logits"], out["student_logits"], cfg)[1], rtol=1e-6)
  for bad in (-0.5, 1.0):
    with pytest.raises(ValueError, match="score_tau"):
      steps.AFDConfig(score_tau=bad)


def test_disc_training_separates_teacher_from_student(tiny_model, batch):
  teacher, student_x, context = batch
  disc = D.init(tiny_model, D.DiscriminatorConfig((1,), 96), seed=2)
  graphdef, params = nnx.split(disc)
  tx = steps.adamw(3e-3)
  opt = tx.init(params)
  fn = jax.jit(steps.make_disc_step(graphdef, tx, CFG))
  losses_seen = []
  for i in range(25):
    params, opt, out = fn(params, opt, teacher + 1.0, student_x, context, jax.random.key(i))
    losses_seen.append(float(out["metrics"]["disc/bt_loss"]))
  assert losses_seen[-1] < 0.5 * losses_seen[0], losses_seen
  assert float(out["metrics"]["disc/accuracy"]) == 1.0


def test_mismatch_term_ranks_each_teacher_video_above_the_other_prompts_under_its_prompt(
    tiny_model, batch):
  """``mismatch_weight`` w adds ``w * BT(D(x_T, c), D(x_T', c))``, ``x_T'`` the teacher video of
  the nearest other prompt noised like its pair; the pair's own logits and loss are unchanged."""
  import dataclasses
  from afd_jax import flow, losses
  teacher, student_x, context = batch
  disc = randomize(D.init(tiny_model, D.DiscriminatorConfig((0, 1), 96)), seed=4)
  graphdef, params = nnx.split(disc)
  cfg = dataclasses.replace(CFG, mismatch_weight=0.5)
  key = jax.random.key(3)
  plain, out = (jax.jit(steps.make_disc_step(graphdef, None, c, update=False))(
      params, teacher, student_x, context, key) for c in (CFG, cfg))
  np.testing.assert_allclose(out["teacher_logits"], plain["teacher_logits"], rtol=1e-5)
  np.testing.assert_allclose(out["student_logits"], plain["student_logits"], rtol=1e-5)
  m = out["metrics"]
  np.testing.assert_allclose(m["disc/bt_loss"], plain["metrics"]["disc/bt_loss"], rtol=1e-5)
  # The mismatched logits by hand: batch row 1's teacher video under row 0's prompt, and back.
  k_tau, k_eps, _ = jax.random.split(key, 3)
  tau = jax.random.uniform(k_tau, (2,), minval=CFG.disc_tau_min, maxval=CFG.disc_tau_max)
  eps = jax.random.normal(k_eps, teacher.shape, teacher.dtype)
  swapped = nnx.merge(graphdef, params)(flow.add_noise(teacher[::-1], eps, tau),
                                        tau * flow.NUM_TRAIN_TIMESTEPS, context)
  expected = losses.bt_loss(out["teacher_logits"], swapped)
  np.testing.assert_allclose(m["disc/mismatch_loss"], expected, rtol=1e-5)
  np.testing.assert_allclose(m["disc/loss"], m["disc/bt_loss"] + 0.5 * expected, rtol=1e-5)
  assert float(m["disc/mismatch_accuracy"]) in (0.0, 0.5, 1.0)


def test_advantage_from_logits():
  r, adv, m = steps.advantage(jnp.zeros(4), jnp.array([-2.0, -1.0, 1.0, 2.0]), CFG)
  assert np.all(np.diff(np.asarray(r)) > 0) and abs(float(jnp.mean(r)) - 0.5) < 1e-6
  np.testing.assert_allclose(adv, np.array([-2.0, -1.0, 1.0, 2.0]) / (np.sqrt(2.5) + 1e-4),
                             rtol=1e-6)
  assert set(m) >= {"adv/mean", "adv/clipped_frac", "r/mean"}


def test_student_step_changes_only_the_student_and_compiles_once(tiny_model, batch):
  _, x0, context = batch
  graphdef, params = nnx.split(tiny_model)
  tx = steps.adamw(1e-3)
  student = {"params": params, "opt": tx.init(params), "ema": params}
  old = jax.tree.map(lambda x: x + 0.01, params)
  ref = jax.tree.map(lambda x: x - 0.01, params)
  snapshot = jax.tree.map(np.asarray, (params, old, ref))
  fn = jax.jit(steps.make_student_step(graphdef, tx, CFG))
  r = jnp.array([0.9, 0.1])
  new, metrics = fn(student, old, ref, x0, context, r, jax.random.key(0), 0)
  new, metrics = fn(new, old, ref, x0, context, r, jax.random.key(1), 1)
  assert fn._cache_size() == 1
  assert not _trees_equal(new["params"], snapshot[0])
  assert _trees_equal(old, snapshot[1]) and _trees_equal(ref, snapshot[2])
  assert _trees_equal(new["ema"], new["params"]) is False  # EMA lags behind (decay 0.99)
  for k in ("nft/loss", "reg/loss", "student/grad_norm", "monitor/old_deviate"):
    assert np.isfinite(float(metrics[k])), k


def test_old_policy_schedule_and_update():
  np.testing.assert_allclose([steps.old_policy_eta(k, 1) for k in (0, 100, 500, 900)],
                             [0.0, 0.1, 0.5, 0.5], atol=1e-6)
  np.testing.assert_allclose([steps.old_policy_eta(k, 2) for k in (10, 75, 175, 400)],
                             [0.0, 0.0, 0.75, 0.999], atol=1e-6)
  assert float(steps.old_policy_eta(1000, 0)) == 0.0
  out = steps.update_old({"w": jnp.array([1.0])}, {"w": jnp.array([3.0])}, 0.25)
  np.testing.assert_allclose(out["w"], [2.5])


def test_bad_method_configs_are_refused():
  with pytest.raises(ValueError, match="nft_passes"):
    steps.AFDConfig(nft_passes=5)
  with pytest.raises(ValueError, match="adv_mode"):
    steps.AFDConfig(adv_mode="greedy")
  with pytest.raises(ValueError, match="old_decay_type"):
    steps.AFDConfig(old_decay_type=3)
  with pytest.raises(ValueError, match="positive"):
    steps.AFDConfig(beta=0.0)


def test_micro_batches_accumulate_the_full_batch_gradient(tiny_model, batch):
  """``micro_batches=2`` (one video each) gives the full batch's update, logits and losses: the
  noise and the mismatched teacher videos are drawn for the whole batch first, the gradients
  are averaged (SGD shows them raw). The flow-matching step shares ``steps.accumulate``."""
  import dataclasses
  import optax

  teacher, x0, context = batch
  tx = optax.sgd(1.0)
  key = jax.random.key(7)
  cfgs = [dataclasses.replace(CFG, r1_weight=0.1, r2_weight=0.1, mismatch_weight=0.5,
                              micro_batches=m) for m in (1, 2)]

  disc = randomize(D.init(tiny_model, D.DiscriminatorConfig((0, 1), 96)), seed=4)
  dgraph, dparams = nnx.split(disc)
  disc_out = [jax.jit(steps.make_disc_step(dgraph, tx, c))(dparams, tx.init(dparams), teacher, x0,
                                                          context, key) for c in cfgs]
  graph, params = nnx.split(tiny_model)
  student = {"params": params, "opt": tx.init(params), "ema": params}
  old, ref = (jax.tree.map(lambda x, d=d: x + d, params) for d in (0.01, -0.01))
  r = jnp.array([0.9, 0.1])
  student_out = [jax.jit(steps.make_student_step(graph, tx, c))(student, old, ref, x0, context, r,
                                                               key, 0) for c in cfgs]
  for one, two in (disc_out, student_out):  # float32 sums in another order; R1 and R2
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two)):  # divide differences by sigma
      np.testing.assert_allclose(b, a, rtol=1e-4, atol=5e-5)
  assert float(disc_out[1][2]["metrics"]["disc/r1"]) > 0


def test_a_nonfinite_update_of_finite_gradients_is_rejected():
  """``apply_if_finite`` checks gradients only; an infinite learning rate turns finite gradients
  into non-finite parameters. ``guarded_update`` keeps parameters and optimizer state and counts
  the step as rejected, like a non-finite gradient."""
  params = {"w": jnp.ones((3,))}
  grads = {"w": jnp.full((3,), 0.5)}
  for lr, rejected in ((1e-2, 0), (jnp.inf, 1)):
    tx = optax.apply_if_finite(optax.adamw(lr), max_consecutive_errors=5)
    opt = tx.init(params)
    new, new_opt, _ = steps.guarded_update(tx, grads, opt, params)
    assert int(new_opt.notfinite_count) == rejected
    assert bool(jnp.isfinite(new["w"]).all())
    assert bool((new["w"] == params["w"]).all()) == bool(rejected)


def test_fm_step_text_dropout_trains_dropped_videos_on_the_empty_prompt(tiny_model, batch):
  """A dropped video sees a zero context (the tiny text encoder's empty prompt) and nothing else
  changes: at a dropout near 1 (both rows dropped under this key) the update is the one on zero
  contexts; without dropout the step keeps its draws."""
  teacher, _, context = batch
  graphdef, params = nnx.split(tiny_model)
  tx = optax.sgd(1.0)
  student = {"params": params, "opt": tx.init(params), "ema": params}

  def update(step, ctx):
    new, metrics = step(student, teacher, ctx, jax.random.key(3), 0)
    return new["params"], float(metrics["fm/loss"])

  base = steps.AFDConfig(rollout_timesteps=(1000.0, 750.0, 500.0, 250.0), nft_passes=2)
  plain = jax.jit(steps.make_fm_step(graphdef, tx, base))
  on_empty, loss_empty = update(plain, jnp.zeros_like(context))
  kept, loss_kept = update(plain, context)
  dropped, loss_dropped = update(jax.jit(steps.make_fm_step(
      graphdef, tx, dataclasses.replace(base, text_dropout=0.999))), context)
  assert loss_dropped == pytest.approx(loss_empty, rel=1e-6) and loss_kept != loss_empty
  assert _trees_close(dropped, on_empty) and not _trees_close(kept, on_empty)
