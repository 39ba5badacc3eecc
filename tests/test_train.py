"""The trainer: config errors, preemption (SIGTERM, SIGKILL) with bit-identical resume, corrupt
checkpoints, non-finite updates. Sharded and multi-host runs: test_mesh.py, test_distributed.py.

Runs share a persistent compilation cache (set in conftest), so repeated programs compile once.
"""

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from afd_jax import checkpoint as ckpt_lib
from afd_jax import data
from afd_jax import errors
from afd_jax import methods
from afd_jax import optim
from afd_jax import state as state_lib
from afd_jax import steps
from afd_jax import train
from afd_jax import video
from afd_jax.models import wan, wan_checkpoint
from afd_jax.teachers import physics
from configs import demo
from configs import tiny
from small_config import override

ROOT = Path(__file__).resolve().parents[1]


def small_config(**overrides):
  c = tiny.get_config()
  c.train.num_steps = 4
  c.train.checkpoint_every = 2
  c.afd.nft_passes = 2
  c.data.num_frames = 3  # one chunk: causal structure is tested in test_wan / test_rollout
  c.mesh.num_devices = 1
  return override(c, **overrides)


def _flags(overrides):
  return [f"--config.{k}={v}" for k, v in overrides.items()]


def _run(workdir, **overrides):
  base = {"train.num_steps": 4, "train.checkpoint_every": 2, "afd.nft_passes": 2,
          "data.num_frames": 3, "mesh.num_devices": 1}
  base.update(overrides)
  return subprocess.run([sys.executable, "-m", "afd_jax.main", "--config=configs/tiny.py",
                         f"--workdir={workdir}", *_flags(base)], cwd=ROOT, capture_output=True,
                        text=True, env=dict(os.environ))


@pytest.mark.parametrize("key,value,message", [
    ("method", "dpo", "config.method"),
    ("train.num_steps", 0, "num_steps"),
    ("data.num_frames", 5, "not a multiple of config.rollout.chunk_frames"),
    ("data.height", 5, "must be even"),
    ("afd.group_size", 0, "group_size"),
    ("disc.loss", "hinge", "disc.loss"),
    ("disc.input", "flow", "disc.input='flow' is not one of"),
    ("afd.disc_lead_steps", 5, "disc_lead_steps=5: the discriminator's head start needs"),
    ("afd.disc_steps", 0, "disc_steps=0 must be an integer >= 1"),
    ("afd.student_steps", 0, "student_steps=0 must be an integer >= 1"),
    ("afd.group_pairs", "mixed", "group_pairs='mixed' must be 'own'"),
    ("afd.disc_color_jitter", 0.1, "disc_color_jitter=0.1 scales RGB channels, which only pixel"),
    ("afd.exit_step", "first", "exit_step"),
    ("data.teacher", "veo", "teacher"),
    ("model.checkpoint", "/nonexistent/wan", "convert_wan"),
    ("train.keep_last", 0, "keep_last=0 must be an integer >= 1"),
    ("train.log_every", 0, "log_every"),
    ("train.eval_every", -1, "eval_every"),
    ("train.checkpoint_every", -2, "checkpoint_every"),
    ("train.max_nonfinite", 0, "max_nonfinite"),
    ("train.micro_batches", 0, "micro_batches"),
    ("optim.student.lr", 0.0, r"optim.student.lr=0.0 must be a finite number > 0"),
    ("optim.student.lr", -1e-4, "optim.student.lr"),
    ("optim.student.lr", float("nan"), "optim.student.lr=nan"),
    ("optim.disc.lr", float("inf"), "optim.disc.lr=inf must be a finite number >= 0"),
    ("data.batch_size", 0, "data.batch_size=0 must be positive"),
    ("data.num_frames", 0, "data.num_frames=0 must be positive"),
    ("rollout.chunk_frames", 0, "rollout.chunk_frames=0 must be positive"),
    ("data.height", -2, "data.height=-2 must be positive"),
])
def test_config_errors_name_the_field(key, value, message):
  with pytest.raises(errors.UserError, match=message) as e:
    methods.validate(small_config(**{key: value}))
  assert "\n" not in str(e.value)  # one problem, one line


def test_a_coarse_discriminator_input_needs_a_pool_that_divides_the_grid_and_whole_videos():
  with pytest.raises(errors.UserError, match="coarse_pool=5 must be an integer >= 1 dividing"):
    methods.validate(small_config(**{"disc.input": "coarse", "disc.coarse_pool": 5}))
  with pytest.raises(errors.UserError, match="use per_chunk=False"):
    methods.validate(small_config(**{"disc.input": "coarse", "disc.per_chunk": True}))


def test_a_zero_discriminator_lr_is_an_ablation_not_an_error():
  methods.validate(small_config(**{"optim.disc.lr": 0.0}))


def test_group_size_needs_rollouts_and_the_oracle_a_physics_teacher_and_score():
  with pytest.raises(ValueError, match="group_size=2: 'sft' trains on teacher videos"):
    methods.validate(small_config(method="sft", **{"afd.group_size": 2}))
  with pytest.raises(ValueError, match="afd_oracle.*physics"):
    methods.validate(small_config(method="afd_oracle"))
  with pytest.raises(ValueError, match="oracle_score='gravity'.*accel_error"):
    methods.validate(small_config(**{"afd.oracle_score": "gravity"}))
  with pytest.raises(ValueError, match="oracle_noise=-1.0 must be >= 0"):
    methods.validate(small_config(method="afd_oracle", **{"afd.oracle_noise": -1.0}))
  with pytest.raises(ValueError, match="oracle_noise=1.0 blurs.*method='afd' has no oracle"):
    methods.validate(small_config(**{"afd.oracle_noise": 1.0}))


def test_an_experiment_refuses_systems_it_would_silently_not_train():
  """The demo lists 'afd'; run as the oracle it would train nothing and report the base."""
  c = demo.get_config()
  c.method = "afd_oracle"
  with pytest.raises(ValueError, match=r"names \['afd'\].*experiment.name=afd or list 'afd_oracle'"):
    methods.validate(c)
  c.experiment.name = "afd"
  methods.validate(c)
  c.experiment.name, c.experiment.systems = "", ("teacher", "base")  # scoring only is fine
  methods.validate(c)


def test_text_dropout_and_guidance_need_their_methods_and_the_tiny_text_encoder():
  methods.validate(small_config(method="pretrain", **{"pretrain.text_dropout": 0.1}))
  methods.validate(small_config(method="dmd", **{"dmd.guidance_scale": 3.0,
                                                 "model.checkpoint": str(Path(__file__))}))
  with pytest.raises(ValueError, match="text_dropout=1.0 must lie in"):
    methods.validate(small_config(method="pretrain", **{"pretrain.text_dropout": 1.0}))
  with pytest.raises(ValueError, match="text_dropout=0.1: only flow-matching methods"):
    methods.validate(small_config(**{"pretrain.text_dropout": 0.1}))
  with pytest.raises(ValueError, match="guidance_scale=3.0: only method 'dmd'"):
    methods.validate(small_config(**{"dmd.guidance_scale": 3.0}))
  with pytest.raises(ValueError, match="guidance_scale=0.0 must be a positive number"):
    methods.validate(small_config(**{"dmd.guidance_scale": 0.0}))
  with pytest.raises(ValueError, match="umT5's empty prompt is not zero"):
    methods.validate(small_config(method="pretrain", **{
        "pretrain.text_dropout": 0.1, "data.text_encoder": "umt5",
        "data.t5": str(Path(__file__)), "data.tokenizer": str(Path(__file__).parent)}))


def test_mismatched_prompts_need_a_discriminator_and_two_prompts():
  methods.validate(small_config(**{"disc.mismatch_weight": 0.5}))
  with pytest.raises(ValueError, match="'sft' trains no discriminator"):
    methods.validate(small_config(method="sft", **{"disc.mismatch_weight": 0.5}))
  with pytest.raises(ValueError, match="batch_size=1 must be >= 2"):
    methods.validate(small_config(**{"disc.mismatch_weight": 0.5, "data.batch_size": 1}))
  with pytest.raises(ValueError, match="mismatch_weight=-1.0 must be >= 0"):
    methods.validate(small_config(**{"disc.mismatch_weight": -1.0}))


def test_per_chunk_scores_need_a_discriminator():
  methods.validate(small_config(**{"disc.per_chunk": True}))
  with pytest.raises(ValueError, match="per_chunk: 'sft' trains no discriminator"):
    methods.validate(small_config(method="sft", **{"disc.per_chunk": True}))


def test_the_discriminators_head_start_trains_it_alone(tmp_path):
  """``afd.disc_lead_steps=1``: iteration 0 rolls out and trains the discriminator only, the
  student untouched; iteration 1 updates both. Only AFD's discriminator can lead."""
  trainer = train.Trainer(small_config(**{"afd.disc_lead_steps": 1}), tmp_path)
  copy = lambda name: jax.tree.map(np.array, trainer.state[name]["params"])
  changed = lambda a, b: max(float(np.abs(x - np.asarray(y)).max())
                             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  student, disc = copy("student"), copy("disc")
  with jax.set_mesh(trainer.mesh):
    metrics = trainer._iteration(0, trainer._host_batch(0))
    assert changed(student, trainer.state["student"]["params"]) == 0.0
    assert changed(disc, trainer.state["disc"]["params"]) > 0.0
    assert "disc/accuracy" in metrics and "nft/loss" not in metrics
    metrics = trainer._iteration(1, trainer._host_batch(1))
  assert changed(student, trainer.state["student"]["params"]) > 0.0 and "nft/loss" in metrics
  with pytest.raises(errors.UserError, match="disc_lead_steps=1: the discriminator's head start"):
    methods.validate(small_config(method="gan", **{"afd.disc_lead_steps": 1}))


def test_the_update_ratio_trains_the_discriminator_k_times_and_scores_with_the_first(tmp_path):
  """``afd.disc_steps=2``: two discriminator updates on the iteration's pairs; the advantage, and
  so the student's update, come from the first's pre-update scores, as with one update."""
  runs = {}
  for k in (1, 2):
    trainer = train.Trainer(small_config(**{"afd.disc_steps": k}), tmp_path / str(k))
    with jax.set_mesh(trainer.mesh):
      metrics = trainer._iteration(0, trainer._host_batch(0))
    runs[k] = metrics, {name: jax.tree.map(np.array, trainer.state[name]["params"])
                        for name in ("student", "disc")}
  (one, params_one), (two, params_two) = runs[1], runs[2]
  for key in ("adv/raw_mean", "adv/raw_std", "disc/accuracy", "disc/bt_loss", "nft/loss"):
    np.testing.assert_allclose(two[key], one[key], rtol=1e-6, err_msg=key)
  gap = lambda name: max(float(np.abs(a - b).max()) for a, b in zip(
      jax.tree.leaves(params_one[name]), jax.tree.leaves(params_two[name])))
  assert gap("student") < 1e-6 and gap("disc") > 0.0


def test_student_steps_update_k_times_on_one_rollout_and_move_the_old_policy_once(tmp_path):
  """``afd.student_steps=2``: the discriminator trains and scores as with one student step, the
  student takes two optimizer steps on the iteration's rollouts, and the old policy moves once,
  after them, by DiffusionNFT's decay at the optimizer-step count. Refused outside NFT methods."""
  runs = {}
  for k in (1, 2):
    trainer = train.Trainer(small_config(**{"afd.student_steps": k, "optim.student.lr": 1e-2}),
                            tmp_path / str(k))   # steps large against float32 rounding
    old = jax.tree.map(np.array, trainer.state["old"])
    with jax.set_mesh(trainer.mesh):
      metrics = trainer._iteration(0, trainer._host_batch(0))
    student = trainer.state["student"]
    runs[k] = (metrics, old, jax.tree.map(np.array, student["params"]),
               jax.tree.map(np.array, trainer.state["old"]),
               jax.tree.map(np.array, trainer.state["disc"]["params"]),
               {int(c) for _, c in optax.tree.get_all_with_path(student["opt"], "count")})
  (one, old0, params_one, _, disc_one, count_one), (two, _, params_two, old_two, disc_two,
                                                    count_two) = runs[1], runs[2]
  for key in ("adv/raw_mean", "adv/raw_std", "disc/accuracy", "disc/bt_loss"):
    np.testing.assert_allclose(two[key], one[key], rtol=1e-6, err_msg=key)
  gap = lambda a, b: max(float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a),
                                                                     jax.tree.leaves(b)))
  assert (count_one, count_two) == ({1}, {2})   # Adam's and the schedule's step counts
  assert gap(disc_one, disc_two) == 0.0 and gap(params_one, params_two) > 0.0
  eta = float(steps.old_policy_eta(2, small_config().afd.old_decay_type))
  assert 0.0 < eta < 1.0
  moved_once = jax.tree.map(lambda o, p: eta * o + (1.0 - eta) * p, old0, params_two)
  assert gap(old_two, moved_once) < 0.05 * eta * gap(old0, params_two)   # not eta/2, not twice
  with pytest.raises(errors.UserError, match="student_steps=2 must be an integer >= 1, and 1 "
                                             "unless the method is one of"):
    methods.validate(small_config(method="gan", **{"afd.student_steps": 2}))


def test_group_rows_are_prompt_major_with_a_teacher_draw_each(tmp_path):
  """K = 2 rollouts per prompt: rows 2i and 2i+1 share prompt i's text and each is paired with
  its own teacher draw (draw 0 is the one K = 1 reads); the discriminator, the advantage and the
  student step run on 2 B rows, and evaluation samples 2 B prompts at a time: K = 2 with B / 2
  prompts evaluates on the very noise K = 1 with B prompts does (the table's paired gains)."""
  cfg = small_config(**{"afd.group_size": 2, "data.batch_size": 4, "train.num_steps": 1,
                        "train.checkpoint_every": 0})
  trainer = train.Trainer(cfg, tmp_path / "k2")
  context, teacher = trainer._host_batch(0)
  assert context.shape[0] == teacher.shape[0] == 8
  np.testing.assert_array_equal(context[0::2], context[1::2])
  assert not np.allclose(teacher[0::2], teacher[1::2])
  one = train.Trainer(small_config(**{"data.batch_size": 4}), tmp_path / "k1")
  single_context, single_teacher = one._host_batch(0)
  np.testing.assert_array_equal(context[0::2], single_context)
  np.testing.assert_array_equal(teacher[0::2], single_teacher)
  np.testing.assert_array_equal(trainer.step_ids(0), np.repeat(one.step_ids(0), 2))
  half = train.Trainer(small_config(**{"afd.group_size": 2, "data.batch_size": 2}), tmp_path / "h")
  ids, params = one.evaluator.eval_ids(), one.state["student"]["ema"]
  np.testing.assert_array_equal(half.evaluator.sample(params, ids, 7),
                                one.evaluator.sample(params, ids, 7))
  summary = trainer.run()
  assert np.isfinite(summary["nft/loss"]) and "eval/property_gap" in summary


def test_shared_group_pairs_meet_one_teacher_draw_under_one_noise(tmp_path):
  """``afd.group_pairs=shared``: a prompt's K pairs meet one teacher video (K = 1's draw) under
  one augmentation draw, so the teacher's logits are equal within the group and the per-prompt
  centred advantage ranks only the rollouts' own logits; with ``own`` they are not."""
  teacher_logits = {}
  for pairs in ("own", "shared"):
    cfg = small_config(**{"afd.group_size": 2, "data.batch_size": 4, "afd.group_pairs": pairs,
                          "afd.disc_tau_max": 0.5})
    trainer = train.Trainer(cfg, tmp_path / pairs)
    context, teacher = trainer._host_batch(0)
    if pairs == "shared":
      np.testing.assert_array_equal(teacher[0::2], teacher[1::2])
      np.testing.assert_array_equal(teacher[0::2], draw_0)
    draw_0 = teacher[0::2]
    with jax.set_mesh(trainer.mesh):
      context, teacher = map(trainer._to_global, (context, teacher))
      out = trainer.fns.score(trainer.state["disc"]["params"], teacher, teacher[::-1], context,
                              jax.random.key(0), trainer.frozen["disc"])
    teacher_logits[pairs] = np.asarray(out["teacher_logits"])
  assert not np.allclose(teacher_logits["own"][0::2], teacher_logits["own"][1::2], atol=1e-4)
  np.testing.assert_allclose(teacher_logits["shared"][0::2], teacher_logits["shared"][1::2],
                             atol=1e-6)


@pytest.mark.parametrize("score,noise", [("physics_error", 0.0), ("gravity_gap_in_chunks", 2.0)])
def test_oracle_advantage_is_the_normalised_negated_physics_score(tmp_path, monkeypatch, score,
                                                                   noise):
  """``afd_oracle`` scores every rollout with the evaluator (no discriminator in the state), and
  the NFT step receives exactly the advantage of the chosen score (``afd.oracle_score``: the
  physics error, one of its terms or a gravity gap, an unmeasured gap counting as 1); its rank
  correlation with that score is 1. With ``afd.oracle_noise`` the advantage is that of the
  blurred score, while the logged oracle reading and the diagnostics stay those of the truth."""
  import dataclasses
  import scipy.stats
  from afd_jax import losses
  cfg = override(demo.get_config(), method="afd_oracle", **{
      "model.checkpoint": "", "model.overrides.dim": 32, "model.overrides.ffn_dim": 64,
      "model.overrides.num_layers": 1, "rollout.denoising_steps": (1000.0, 500.0),
      "data.batch_size": 4, "afd.group_size": 1, "data.num_eval_prompts": 4, "mesh.num_devices": 1,
      "train.num_steps": 1, "train.checkpoint_every": 0, "afd.oracle_score": score,
      "afd.oracle_noise": noise})
  cfg.mode = "train"
  trainer = train.Trainer(cfg, tmp_path)
  assert "disc" not in trainer.state and {"old", "ref"} <= set(trainer.state)
  seen, measure, student = {}, trainer.rollout_physics, trainer.fns.student

  def physics_spy(latents, ids):  # measured, then made distinct per term and per rollout
    rng = np.random.default_rng(0)
    seen["physics"] = {k: rng.permutation(len(v)) * 0.1 + 0.05
                       for k, v in measure(latents, ids).items()}
    seen["physics"]["gravity_gap_in_chunks"][0] = np.nan   # no ball flew three frames
    return seen["physics"]

  def student_spy(student_state, old, ref, x0, context, r, *rest):
    seen["r"] = np.asarray(r)
    return student(student_state, old, ref, x0, context, r, *rest)

  def blur_spy(values, amount, group_size, normal):
    seen["blurred"] = blur(values, amount, group_size, normal)
    seen["normal"] = normal
    return seen["blurred"]

  blur = train.methods.blur_oracle
  monkeypatch.setattr(train.methods, "blur_oracle", blur_spy)
  trainer.rollout_physics = physics_spy
  trainer.fns = dataclasses.replace(trainer.fns, student=student_spy)
  with jax.set_mesh(trainer.mesh):
    metrics = trainer._iteration(0, trainer._host_batch(0))
  metrics.update(trainer._pop_diagnostics())
  errors = np.nan_to_num(seen["physics"][score], nan=1.0)
  ranked = seen.get("blurred", errors)
  assert ("blurred" in seen) == bool(noise)
  expected = losses.optimality_probability(np.clip(
      (-ranked - np.mean(-ranked)) / (np.std(ranked) + 1e-4), -5, 5), 5.0)
  np.testing.assert_allclose(seen["r"], expected, rtol=1e-5)
  assert metrics[f"oracle/{score}"] == pytest.approx(np.mean(errors))
  assert metrics["oracle/physics_error"] == pytest.approx(np.mean(seen["physics"]["physics_error"]))
  measured = ~np.isnan(seen["physics"][score])          # the diagnostics leave the rest out
  truth = scipy.stats.spearmanr(ranked[measured], errors[measured])[0]
  assert metrics[f"diag/spearman_{score}"] == pytest.approx(truth)
  if noise:
    assert np.std(seen["normal"]) > 0.3 and not np.allclose(ranked, errors)
  else:
    assert metrics[f"diag/spearman_{score}"] == pytest.approx(1.0)


def test_with_k_rollouts_per_prompt_the_diagnostics_rank_each_prompts_own_rollouts():
  """K > 1 centres the advantage per prompt, so the diagnostics centre the physics scores per
  prompt too: an advantage that ranks every prompt's rollouts correctly correlates 1 however far
  apart the prompts' own levels lie (pooled, it would not), and a prompt with no measured
  rollout stays unmeasured."""
  from types import SimpleNamespace
  errors = np.array([1.0, 1.3, 1.1, 5.0, 5.4, 4.9])          # two prompts, K = 3
  advantage = np.repeat(errors.reshape(2, 3).mean(1), 3) - errors   # the oracle's, unscaled
  window = lambda k: SimpleNamespace(config=SimpleNamespace(afd=SimpleNamespace(group_size=k)),
                                     _diagnostics=[(advantage, {"physics_error": errors})])
  within = train.Trainer._pop_diagnostics(window(3))["diag/spearman_physics_error"]
  pooled = train.Trainer._pop_diagnostics(window(1))["diag/spearman_physics_error"]
  assert within == pytest.approx(1.0) and pooled < 0.75
  np.testing.assert_allclose(train.centred_per_prompt(np.array([np.nan, np.nan, 1.0, 2.0]), 2),
                             [np.nan, np.nan, -0.5, 0.5])


def test_rollout_physics_reads_the_speed_gap_to_the_teacher(tmp_path):
  """The diagnostics' ``speed_gap``: 0 for the teacher's own video of the prompt, 1 for a ball
  that stands still, and for a slowed video (its first half, each frame twice) one minus its
  speed over the teacher's for that prompt."""
  cfg = override(demo.get_config(), **{
      "model.checkpoint": "", "model.overrides.dim": 32, "model.overrides.ffn_dim": 64,
      "model.overrides.num_layers": 1, "disc.readout_layers": (0,), "data.batch_size": 4,
      "afd.group_size": 1,
      "data.num_eval_prompts": 4, "mesh.num_devices": 1, "train.checkpoint_every": 0})
  cfg.mode = "train"
  trainer = train.Trainer(cfg, tmp_path)
  ids = trainer.step_ids(0)[:3]
  world = trainer.data.physics_world
  own, still, slow = (world.render(trainer.pool.prompts[i], 0) for i in ids)
  still = np.repeat(still[:1], len(still), 0)
  slow = slow[np.arange(len(slow)) // 2]               # every frame twice: half the speed
  latents = np.stack([trainer.data.encoder.encode(v) for v in (own, still, slow)])
  gap = trainer.rollout_physics(latents, ids)["speed_gap"]
  assert gap[0] == pytest.approx(0.0, abs=1e-6) and gap[1] == pytest.approx(1.0)
  from afd_jax.eval import motion
  prompt = trainer.pool.prompts[ids[2]]
  half = motion.video_speed(slow, prompt, world) / motion.video_speed(
      world.render(prompt, 0), prompt, world)
  assert gap[2] == pytest.approx(1.0 - half, rel=1e-5) and half < 0.7


def test_a_per_chunk_discriminator_gives_each_chunk_its_own_r(tmp_path):
  """``disc.per_chunk``: the discriminator scores every chunk's prefix, the student step gets
  ``r [B, chunks]`` from those logits column by column, the diagnostics pool one advantage per
  rollout and the probes read the last chunk's logit (the whole video)."""
  import dataclasses
  from scipy import stats
  from afd_jax import losses
  cfg = override(demo.get_config(), **{
      "model.checkpoint": "", "model.overrides.dim": 32, "model.overrides.ffn_dim": 64,
      "model.overrides.num_layers": 1, "disc.readout_layers": (0,), "disc.per_chunk": True,
      "rollout.chunk_frames": 3, "rollout.denoising_steps": (1000.0, 500.0), "afd.nft_passes": 1,
      "data.batch_size": 4, "afd.group_size": 1, "data.num_eval_prompts": 4, "mesh.num_devices": 1,
      "train.num_steps": 1, "train.checkpoint_every": 0})
  cfg.mode = "train"
  trainer = train.Trainer(cfg, tmp_path)
  seen, disc, student = {}, trainer.fns.disc, trainer.fns.student

  def disc_spy(*args):
    out = disc(*args)
    seen["logits"] = np.asarray(out[2]["teacher_logits"]), np.asarray(out[2]["student_logits"])
    return out

  def student_spy(student_state, old, ref, x0, context, r, *rest):
    seen["r"] = np.asarray(r)
    return student(student_state, old, ref, x0, context, r, *rest)

  errors = np.array([0.4, 0.1, 0.3, 0.2])
  trainer.rollout_physics = lambda latents, ids: {"physics_error": errors}
  trainer.fns = dataclasses.replace(trainer.fns, disc=disc_spy, student=student_spy)
  with jax.set_mesh(trainer.mesh):
    metrics = trainer._iteration(0, trainer._host_batch(0))
  metrics.update(trainer._pop_diagnostics())
  teacher, student_logits = seen["logits"]
  assert teacher.shape == student_logits.shape == seen["r"].shape == (4, 3)
  adv = np.asarray(losses.normalize_advantages(losses.paired_scores(teacher, student_logits)))
  np.testing.assert_allclose(seen["r"], losses.optimality_probability(np.clip(adv, -5, 5), 5.0),
                             rtol=1e-5, atol=1e-6)
  assert np.isfinite(metrics["nft/loss"])
  assert metrics["diag/spearman_physics_error"] == pytest.approx(
      stats.spearmanr(adv.mean(1), -errors).statistic)
  prompts = [trainer.pool.prompts[i] for i in trainer.evaluator.eval_ids()[:2]]
  videos = np.stack([trainer.data.physics_world.render(p, 0) for p in prompts])
  assert trainer.disc_logits(videos, prompts).shape == (2,)


@pytest.mark.parametrize("method,keys,state", [
    ("gan", ("gan/generator_loss", "disc/accuracy", "student/grad_norm"), {"disc"}),
    ("dmd", ("dmd/loss", "dmd/gradient", "critic/fm_loss", "student/grad_norm"), {"critic", "ref"}),
])
def test_generator_methods_train_through_the_exit_step(tmp_path, method, keys, state):
  """The GAN baseline and DMD distillation run end to end: a training rollout with a random exit
  step, the critic (discriminator or fake score), the student's update (DMD: every second step,
  ``dmd.critic_ratio``), with the state they need and nothing else."""
  cfg = small_config(method=method, **{"dmd.critic_ratio": 2, "train.checkpoint_every": 0})
  if method == "dmd":  # distils a score model: here a random tiny student, saved as a checkpoint
    with pytest.raises(ValueError, match="dmd.*model.checkpoint"):
      methods.validate(cfg)
    cfg.model.checkpoint = str(wan_checkpoint.save_converted(
        wan.init(wan.preset("tiny"), seed=3), tmp_path / "score"))
  trainer = train.Trainer(cfg, tmp_path)
  assert set(trainer.state) == {"student", "step", "rng", *state}
  trainer.run()
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  for key in keys:
    assert np.isfinite(lines[-1][key]), key
  assert float(lines[-1]["student/update_norm"]) > 0


def test_preemption_and_kill_resume_bit_identically(tmp_path, caplog):
  """SIGTERM saves and exits; SIGKILL loses only the work since the last checkpoint; the resumed
  run ends with exactly the state of an uninterrupted one."""
  train.Trainer(small_config(), tmp_path / "straight").run()  # in-process: same config as _run
  reference = json.loads((tmp_path / "straight" / "summary.json").read_text())

  work = tmp_path / "interrupted"
  term = _run(work, **{"debug.term_at_step": 1})
  assert term.returncode == 0, term.stderr[-3000:]
  assert "stopped after step 1 on SIGTERM" in term.stderr
  # The console: a progress line, no library INFO chatter, the resolved config in the workdir.
  assert "step 1/4 [###-" in term.stderr and "checkpoint_manager.py" not in term.stderr
  assert json.loads((work / "config.json").read_text())["method"] == "afd"
  killed = _run(work, **{"debug.kill_at_step": 3})
  assert killed.returncode == -9
  assert "resumed from step 1" in killed.stderr
  # Step 2's asynchronous save may or may not have finished before the kill: either way the run
  # resumes from a complete checkpoint (in-process, with the same config).
  with caplog.at_level(logging.INFO):
    final = train.Trainer(small_config(), work).run()
  assert "resumed from step" in caplog.text
  assert final["state_digest"] == reference["state_digest"]

  lines = [json.loads(l) for l in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines] == [1, 2, 3, 4]
  for key in ("disc/bt_loss", "disc/accuracy", "disc/teacher_logit", "disc/student_logit",
              "adv/mean", "adv/std", "adv/clipped_frac", "r/mean", "nft/loss", "nft/positive",
              "nft/negative", "reg/loss", "student/grad_norm", "disc/grad_norm", "student/lr",
              "time/rollout_s", "time/score_s", "time/student_s", "perf/steps_per_second"):
    assert key in lines[-1], key
  assert list((tmp_path / "straight" / "tensorboard").iterdir())
  assert Path(reference["samples"]).exists()

  interrupted = [json.loads(l)["step"] for l in (work / "metrics.jsonl").read_text().splitlines()]
  assert interrupted == [1, 2, 3, 4]  # rows past each restored step were replaced, not repeated

  with pytest.raises(errors.UserError, match="method: afd -> sft"):
    train.Trainer(small_config(method="sft"), work).run()


HANGING_TEACHER = """
import os, time
from afd_jax.teachers import physics

def teacher(prompts, seed):
  if os.path.exists(os.environ["AFD_TEST_HANG"]):
    time.sleep(3600)  # a teacher service that stopped answering
  return physics.PhysicsTeacher(physics.PhysicsWorld(size=8, num_frames=3))(prompts, seed)
"""


def test_sigterm_while_the_teacher_hangs_saves_and_exits_and_a_second_run_is_refused(tmp_path):
  """A run on an online teacher that stops answering: a second trainer on the same workdir is
  refused in one line naming the first; SIGTERM still saves a checkpoint and exits promptly."""
  (tmp_path / "hanging_teacher.py").write_text(HANGING_TEACHER)
  (tmp_path / "prompts.txt").write_text("\n".join(physics.sample_prompts(12, max_balls=1)))
  hang, work = tmp_path / "hang", tmp_path / "run"
  args = [sys.executable, "-m", "afd_jax.main", "--config=configs/tiny.py", f"--workdir={work}",
          *_flags({"method": "sft", "data.teacher": "callable",
                   "data.teacher_callable": "hanging_teacher:teacher",
                   "data.prompts": tmp_path / "prompts.txt", "data.teacher_samples": 0,
                   "data.teacher_cache": tmp_path / "cache", "data.num_eval_prompts": 2,
                   "data.text_length": 16, "data.encoder_patch": 2, "data.num_frames": 3,
                   "data.height": 4, "data.width": 4, "data.batch_size": 2,
                   "model.overrides.in_dim": 12, "model.overrides.out_dim": 12,
                   "train.num_steps": 1000, "train.checkpoint_every": 0, "mesh.num_devices": 1})]
  env = dict(os.environ, AFD_TEST_HANG=str(hang),
             PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
  first = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
  try:
    metrics_file = work / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= 2):
      assert first.poll() is None and time.time() < deadline, first.communicate()[1][-3000:]
      time.sleep(0.2)
    hang.touch()
    second = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [l for l in second.stderr.splitlines() if l.strip()]
    assert second.returncode == 2 and len(lines) == 1, second.stderr[-3000:]
    assert f"is in use by another run (pid {first.pid} on " in lines[0]
    time.sleep(2)  # the trainer has used its prefetched batches and waits for the teacher
    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=60)
  finally:
    first.kill()
  assert first.returncode == 0, stderr[-3000:]
  stopped = int(re.search(r"stopped after step (\d+) on SIGTERM", stderr).group(1))
  assert ckpt_lib.Checkpointer(work / "checkpoints").steps() == [stopped]


def test_a_damaged_latest_checkpoint_is_moved_aside_and_the_run_continues(tmp_path, caplog):
  """Step 4 is damaged: the resumed run restores step 2, moves step 4 aside (kept, and says
  where), trains through step 4 again and on to 6, and a later resume finds step 6."""
  train.Trainer(small_config(method="sft"), tmp_path).run()
  for f in (tmp_path / "checkpoints" / "4" / "state").rglob("*"):
    if f.is_file():
      f.write_bytes(b"corrupt")
  with caplog.at_level(logging.ERROR):
    summary = train.Trainer(small_config(method="sft", **{"train.num_steps": 6}), tmp_path).run()
  assert summary["steps"] == 6
  assert "checkpoints_damaged/4" in caplog.text
  assert (tmp_path / "checkpoints_damaged" / "4" / "state").is_dir()
  assert ckpt_lib.Checkpointer(tmp_path / "checkpoints").steps()[-2:] == [4, 6]
  steps = [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert steps == [1, 2, 3, 4, 5, 6]

  samples = sorted((tmp_path / "samples").rglob("*"))
  again = train.Trainer(small_config(method="sft", **{"train.num_steps": 4}), tmp_path)
  assert "nothing to train" in again.run()["nothing_to_do"]
  assert sorted((tmp_path / "samples").rglob("*")) == samples  # nothing else is written
  assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 6


def test_a_resume_with_another_model_or_batch_says_what_changed(tmp_path):
  train.Trainer(small_config(method="sft", **{"train.num_steps": 2}), tmp_path).run()
  for change, message in (({"model.overrides.dim": 128, "model.overrides.ffn_dim": 256},
                           "model.dim: 64 -> 128; model.ffn_dim: 128 -> 256"),
                          ({"data.batch_size": 4}, "data.batch_size: 8 -> 4")):
    cfg = small_config(method="sft", **{"train.num_steps": 4, **change})
    with pytest.raises(errors.UserError, match=message):
      train.Trainer(cfg, tmp_path).run()
  assert not (tmp_path / "checkpoints_damaged").exists()  # not mistaken for damage


def test_nonfinite_updates_are_rejected_then_stop_the_run(tmp_path):
  cfg = small_config(**{"debug.nan_at_step": 1, "train.num_steps": 3, "train.checkpoint_every": 0})
  trainer = train.Trainer(cfg, tmp_path)
  trainer.run()
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [l["student/rejected"] for l in lines] == [0.0, 1.0, 0.0]

  cfg = small_config(**{"debug.nan_at_step": 0, "train.max_nonfinite": 1})
  with pytest.raises(errors.UserError, match="step none, checked finite"):
    train.Trainer(cfg, tmp_path / "stop").run()


def test_an_overflowing_learning_rate_leaves_the_parameters_finite_and_stops(tmp_path):
  """The gradients are finite but the update is not (1e39 passes the config's check as a Python
  float and overflows float32): the parameters stay as they were, the step counts as rejected,
  and a non-finite state is never saved as a checkpoint."""
  cfg = small_config(method="sft", **{"optim.student.lr": 1e39, "train.max_nonfinite": 2})
  trainer = train.Trainer(cfg, tmp_path)
  before = trainer.copy(trainer.state["student"]["params"])
  with pytest.raises(errors.UserError, match="2 consecutive non-finite updates"):
    trainer.run()
  assert not ckpt_lib.nonfinite(trainer.state)
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(trainer.state["student"]["params"])):
    np.testing.assert_array_equal(a, b)
  assert not ckpt_lib.Checkpointer(tmp_path / "checkpoints").steps()

  trainer.state["student"]["params"] = jax.tree.map(lambda x: x * np.nan,
                                                    trainer.state["student"]["params"])
  trainer._good_step = 0
  ckpt = ckpt_lib.Checkpointer(tmp_path / "checkpoints")
  with pytest.raises(errors.UserError, match="non-finite values.*not saved"):
    trainer._save(ckpt, 1)
  ckpt.close()
  assert not ckpt_lib.Checkpointer(tmp_path / "checkpoints").steps()


def test_a_failed_save_stops_the_run_in_one_line_and_keeps_the_earlier_step(tmp_path,
                                                                            monkeypatch):
  import orbax.checkpoint as ocp
  real = ocp.CheckpointManager.save

  def disk_full_at_4(self, step, *args, **kwargs):
    if step == 4:
      raise OSError(28, "No space left on device")
    return real(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", disk_full_at_4)
  with pytest.raises(ckpt_lib.CheckpointError, match="step 4.*No space left.*intact") as e:
    train.Trainer(small_config(method="sft"), tmp_path).run()
  assert "\n" not in str(e.value)
  monkeypatch.undo()
  assert ckpt_lib.Checkpointer(tmp_path / "checkpoints").steps() == [2]


def test_afd_moves_the_student_toward_the_teacher(tmp_path):
  """The synthetic teacher's videos carry a +1 offset on one latent channel; the random student's
  do not. 300 AFD iterations close most of that gap, measured on held-out prompts from rollouts
  of the EMA student, with no discriminator involved (2026-11-21: 0.94 -> 0.41)."""
  cfg = small_config(**{"train.num_steps": 300, "train.checkpoint_every": 0, "train.log_every": 100,
                        "afd.ema_decay": 0.9})
  trainer = train.Trainer(cfg, tmp_path)
  before = trainer.evaluate(0)["eval/property_gap"]
  after = trainer.run()["eval/property_gap"]
  assert before > 0.8
  assert after < 0.6 * before, (before, after)


def test_frozen_discriminator_blocks_and_head_groups(tiny_model, inputs):
  """Frozen trunk blocks do not move at all (no weight decay either); the trunk's unused output
  head never moves; readouts and head learn at their own learning rate."""
  from flax import nnx
  from afd_jax import steps
  from afd_jax.models import discriminator as D
  latents, context = inputs
  disc = D.init(tiny_model, D.DiscriminatorConfig((1,), 96, freeze_below=1))
  graphdef, params = nnx.split(disc)
  params = nnx.to_pure_dict(params)
  o = small_config().optim.disc
  o.head_lr_multiplier = 0.0
  tx = optim.disc_optimizer(o, freeze_below=1, max_nonfinite=5)
  step = jax.jit(steps.make_disc_step(graphdef, tx, steps.AFDConfig()))
  new, _, _ = step(params, tx.init(params), latents + 1.0, latents, context, jax.random.key(0))
  blocks, new_blocks = params["trunk"]["blocks"], new["trunk"]["blocks"]
  for a, b in zip(jax.tree.leaves(blocks), jax.tree.leaves(new_blocks)):
    np.testing.assert_array_equal(a[0], b[0])                    # block 0 frozen
  assert any(not np.array_equal(a[1], b[1])
             for a, b in zip(jax.tree.leaves(blocks), jax.tree.leaves(new_blocks)))
  for part in (["trunk", "head"], ["trunk", "patch_embedding"], ["readouts"], ["head_out"]):
    a, b = params, new
    for k in part:
      a, b = a[k], b[k]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(x, y)                         # frozen, or lr x 0


def _physics_store(path, prompts, encoder, world, text_length=16, text_dim=32, spec=None):
  from afd_jax.teachers import store as store_lib
  text = physics.TextEncoder(dim=text_dim, length=text_length)(prompts)
  records = [store_lib.Record(p, i, s, text[i], encoder.encode(world.render(p, s)))
             for i, p in enumerate(prompts) for s in range(2)]
  return store_lib.build_store(records, path, encoder=spec or encoder.spec, fps=world.fps)


def test_training_reads_a_wan_vae_store_and_writes_decoded_samples(tmp_path, small_vae):
  """A store of Wan VAE latents built on another machine (its recorded VAE path is not here):
  config.data.vae points at the local VAE, evaluation decodes teacher and student latents to
  pixels and writes one MP4 per prompt; a store that does not fit the config is refused."""
  from afd_jax import encoders
  prompts = physics.sample_prompts(12, max_balls=1)
  world = physics.PhysicsWorld(size=16, num_frames=13, radius=0.2)  # -> 4 x 2 x 2 latents
  vae = encoders.WanVAEEncoder(str(small_vae))
  store = _physics_store(tmp_path / "store", prompts, vae, world,
                         spec={**vae.spec, "vae": "/elsewhere/wan_vae"})
  cfg = small_config(method="sft", **{"data.teacher": "store", "data.store": str(store),
                                      "data.vae": str(small_vae), "data.num_eval_prompts": 4,
                                      "data.batch_size": 4, "data.text_length": 16,
                                      "data.num_frames": 4, "rollout.chunk_frames": 2,
                                      "data.height": 2, "data.width": 2, "train.num_steps": 1,
                                      "train.checkpoint_every": 0, "output.max_videos": 2})
  trainer = train.Trainer(cfg, tmp_path / "run")
  assert trainer.pool.prompts == prompts and trainer.pool.num_train == 8
  assert trainer.data.encoder.path == str(small_vae.absolute())
  batch = trainer._host_batch(0)[1]
  ids = data.batch_ids(0, 4, 8, cfg.seed)
  np.testing.assert_array_equal(batch, trainer.data.source.latents(ids, 0))
  summary = trainer.run()
  assert np.isfinite(summary["eval/frechet_distance"]) and np.isfinite(summary["fm/loss"])
  samples = sorted((tmp_path / "run" / "samples" / "step_000001").glob("prompt_*.mp4"))
  assert len(samples) == 2
  assert video.read_video(samples[0]).shape == (13, 2 * 16 + 2, 16, 3)  # teacher above student

  cfg.data.vae = ""
  with pytest.raises(FileNotFoundError, match="/elsewhere/wan_vae.*config.data.vae"):
    train.Trainer(cfg, tmp_path / "no_vae")
  cfg.data.vae, cfg.data.height, cfg.data.width = str(small_vae), 6, 6
  with pytest.raises(ValueError, match="build_teacher_store"):
    train.Trainer(cfg, tmp_path / "mismatch")


@pytest.mark.parametrize("abstract", [True, False])
def test_the_discriminator_takes_the_models_runtime_settings(tmp_path, abstract):
  """With ``disc.checkpoint`` set, the trunk is loaded with ``config.model``'s dtype, remat policy,
  attention kernel and layer scan, as the student is (and as the planner plans it)."""
  trunk = wan_checkpoint.save_converted(wan.init(wan.preset("tiny"), seed=5), tmp_path / "trunk")
  cfg = small_config(**{"disc.checkpoint": str(trunk), "model.dtype": "bfloat16",
                        "model.remat_policy": "full", "model.attention_kernel": "blockwise",
                        "model.scan_layers": False})
  student = state_lib.build_student(cfg, abstract=abstract)
  disc = state_lib.build_discriminator(cfg, student, abstract=abstract)
  for model in (student, disc.trunk):
    c = model.config
    assert (c.dtype, c.remat_policy, c.attention_kernel, c.scan_layers) == (
        "bfloat16", "full", "blockwise", False)
