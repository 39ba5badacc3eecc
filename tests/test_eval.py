"""The evaluation package against ground truth: teacher renders score ~0, every kind of broken
video scores clearly worse on the metric meant to catch it, and the outputs can be looked at."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from afd_jax.eval import disc_probe, frechet, physics, quality, report, tracking
from afd_jax.teachers.physics import PhysicsWorld, parse_prompt, sample_prompts
from afd_jax.video import write_gif

WORLD = PhysicsWorld()
PROMPTS = sample_prompts(12, seed=11)
SINGLE = [p for p in sample_prompts(60, seed=5) if p.startswith("one ")][:6]


def render(centres: np.ndarray, prompt: str, size: int = 32, radius: float = 0.1,
           brightness: float = 1.0) -> np.ndarray:
  """``PhysicsWorld.render`` for given centres ``[T, K, 2]`` (frame heights), so tests can move,
  dim or drop balls; ``test_render_helper_is_the_teachers`` keeps it honest."""
  rgb = parse_prompt(prompt).rgb().astype(np.float32) * brightness
  pix = np.arange(size) + 0.5
  video = np.zeros((len(centres), size, size, 3), np.float32)
  for ball in range(centres.shape[1]):
    x, y = centres[:, ball, 0] * size, centres[:, ball, 1] * size
    if np.isnan(x).all():
      continue  # an erased ball
    d = np.sqrt((pix[None, None, :] - x[:, None, None]) ** 2
                + (pix[None, :, None] - y[:, None, None]) ** 2)
    alpha = np.clip(radius * size + 0.5 - d, 0.0, 1.0)[..., None]
    video = video * (1.0 - alpha) + rgb[ball] * alpha
  return np.round(video).astype(np.uint8)


def blur(videos: np.ndarray, sigma: float = 1.0) -> np.ndarray:
  spatial = (0,) * (videos.ndim - 3) + (sigma, sigma, 0)
  return np.round(ndimage.gaussian_filter(videos.astype(np.float64), spatial, mode="constant")
                  ).astype(np.uint8)


@pytest.fixture(scope="module")
def teacher():
  return np.stack([WORLD.render(p, 1) for p in PROMPTS])


@pytest.fixture(scope="module")
def teacher_physics(teacher):
  return physics.evaluate(teacher, PROMPTS, WORLD)


def test_render_helper_is_the_teachers():
  p = PROMPTS[0]
  np.testing.assert_array_equal(render(WORLD.simulate(p, 3), p), WORLD.render(p, 3))


def test_tracking_matches_ground_truth():
  """Sub-pixel centres on teacher renders: a hundredth of a pixel for a ball on its own, well
  below a pixel when balls overlap (and those frames are flagged)."""
  alone, touching, masses = [], [], []
  for seed, p in enumerate(sample_prompts(24, seed=1)):
    tracks = tracking.track(WORLD.render(p, seed), p, WORLD.radius)
    err = np.linalg.norm(tracks.centres - WORLD.simulate(p, seed), axis=-1) * WORLD.size
    clean = tracks.visible & ~tracks.overlap
    alone.append(err[clean])
    touching.append(err[tracks.visible & tracks.overlap])
    masses.append(tracks.mass[clean])
    assert (tracks.visible | tracks.overlap).mean() > 0.97  # never lost but behind another ball
  alone, touching = np.concatenate(alone), np.concatenate(touching)
  assert alone.size > 100 and touching.size > 100
  assert alone.max() < 0.03, alone.max()
  assert touching.mean() < 0.05 and touching.max() < 0.5, (touching.mean(), touching.max())
  np.testing.assert_allclose(np.concatenate(masses), 1.0, atol=0.05)


def test_tracking_keeps_palette_apart_and_survives_blur_and_dimming():
  """White, yellow and cyan (28 degrees apart) and blue next to cyan (22) never share pixels;
  a blurred ball keeps its centre and mass (blur spreads colour, it does not remove it), a
  half-bright one keeps its centre and shows half the mass."""
  prompt = "three white, yellow and cyan balls dropped, normal gravity, soft"
  centres = np.array([[[0.2, 0.3], [0.5, 0.3], [0.8, 0.3]]] * 3)
  centres[:, :, 1] += np.array([0.0, 0.013, 0.031])[:, None]     # sub-pixel steps
  maps = tracking.color_maps(render(centres, prompt), ("white", "yellow", "cyan", "blue"))
  owner = maps.weights.argmax(-1)
  for k, x in enumerate((0.2, 0.5, 0.8)):
    near = np.zeros((32, 32), bool)
    near[:, int(x * 32) - 5:int(x * 32) + 5] = True
    lit = maps.weights.max(-1) > 0
    assert (owner[:, near] == k)[lit[:, near]].all()              # nobody else claims the ball
  assert maps.weights[..., 3].max() == 0                          # no blue anywhere
  for video, mass in ((render(centres, prompt), 1.0), (blur(render(centres, prompt)), 1.0),
                      (render(centres, prompt, brightness=0.5), 0.5)):
    tracks = tracking.track(video, prompt)
    err = np.abs(tracks.centres - centres) * 32
    assert err.max() < 0.15, err.max()
    np.testing.assert_allclose(tracks.mass, mass, atol=0.1)


def test_blob_count_and_erased_ball():
  prompt = "two red and blue balls thrown left, normal gravity, bouncy"
  centres = np.array([[[0.3, 0.4], [0.7, 0.5]]] * 4)
  assert tracking.blob_count(render(centres, prompt)).tolist() == [2] * 4
  erased = centres.copy()
  erased[:, 1] = np.nan
  scores = quality.video_quality(render(erased, prompt), prompt)
  assert scores["count_error"] == 1.0 and scores["visibility"] == 0.5
  assert scores["color_error"] == pytest.approx(0.5, abs=0.02)   # one of two balls: all gone
  assert quality.video_quality(render(centres, prompt), prompt)["count_error"] == 0.0


def test_teacher_physics_near_zero_and_below_every_broken_video(teacher, teacher_physics):
  """Wrong gravity, frozen, shuffled and noise videos score far worse. A blurred video moves
  correctly, so it stays close to the teacher (tracking is robust to blur): blur is what
  sharpness and the Fréchet distance catch."""
  rows, means = teacher_physics
  assert means["physics_error"] < 0.05 and max(r["physics_error"] for r in rows) < 0.2, means
  assert sum(r["bounces"] for r in rows) >= 5                      # bounces were checked
  rng = np.random.default_rng(0)
  wrong = PhysicsWorld(gravity_range=(0.3, 0.5))
  broken = {
      "wrong_world": np.stack([wrong.render(p, 1) for p in PROMPTS]),
      "frozen": np.repeat(teacher[:, :1], teacher.shape[1], 1),
      "shuffled": teacher[:, rng.permutation(teacher.shape[1])],
      "noise": rng.integers(0, 256, teacher.shape, dtype=np.uint8),
  }
  scores = {k: physics.evaluate(v, PROMPTS, WORLD)[1] for k, v in broken.items()}
  assert physics.evaluate(blur(teacher, 1.5), PROMPTS, WORLD)[1]["physics_error"] < 0.2
  for name, s in scores.items():
    assert s["physics_error"] > 4 * means["physics_error"] + 0.05, (name, s, means)
  assert scores["wrong_world"]["accel_error"] > 0.4               # g scaled by 0.3..0.5
  assert scores["frozen"]["accel_error"] > 0.8
  assert scores["noise"]["physics_error"] == 5.0                  # every ball missing: the cap
  # The gravity a video shows: the teacher's, the wrong world's 0.3..0.5, none in noise.
  for ratio in physics.RATIOS:
    assert abs(means[ratio] - 1.0) < 0.05, means
    assert 0.25 < scores["wrong_world"][ratio] < 0.55, scores["wrong_world"]
    assert np.isnan(scores["noise"][ratio])
  assert means["fall_jitter"] < 0.2 and scores["wrong_world"]["fall_jitter"] < 0.2, means  # 0.08
  assert all(np.isfinite(v) for s in scores.values() for k, v in s.items()
             if k not in physics.READINGS)


def test_gravity_slope_reads_whether_gravity_follows_the_word(teacher_physics):
  """1 for the teacher, about 0 for a world that drops every ball alike whatever the word, the
  scale factor for a world that scales every gravity alike."""
  rows, _ = teacher_physics
  assert len({parse_prompt(p).gravity for p in PROMPTS}) == 3
  assert physics.gravity_slope(rows, PROMPTS) == pytest.approx(1.0, abs=0.05)
  blind = np.stack([WORLD.render(re.sub(r"\w+ gravity", "normal gravity", p), 1) for p in PROMPTS])
  assert abs(physics.gravity_slope(physics.evaluate(blind, PROMPTS, WORLD)[0], PROMPTS)) < 0.1
  half = np.stack([PhysicsWorld(gravity_range=(0.5, 0.5)).render(p, 1) for p in PROMPTS])
  assert physics.gravity_slope(physics.evaluate(half, PROMPTS, WORLD)[0], PROMPTS) \
      == pytest.approx(0.5, abs=0.05)
  weak = [p for p in PROMPTS if "weak" in p]
  assert np.isnan(physics.gravity_slope([rows[PROMPTS.index(p)] for p in weak], weak))


def test_discriminator_probes_tell_a_physics_reader_from_a_looks_reader():
  """A discriminator that knows every true (video, prompt) pair prefers it in every probe; one
  that reads brightness prefers undimmed videos and ignores whether a video fits its prompt (the
  colour word's videos differ in brightness, the others hardly); a constant one is blind to
  everything (0.5: ties count half)."""
  prompts = SINGLE[:4]
  seed = 3
  truth = {(WORLD.render(p, seed).tobytes(), p) for p in prompts}
  perfect = lambda videos, ps: np.array([float((v.tobytes(), p) in truth)
                                         for v, p in zip(videos, ps)])
  looks = lambda videos, ps: videos.reshape(len(videos), -1).mean(-1)
  constant = lambda videos, ps: np.zeros(len(videos))
  probes = disc_probe.probe(perfect, prompts, WORLD, seed)
  assert set(probes) == {"gravity_word", "bounciness_word", "direction_word", "color_word",
                         "half_gravity", "half_bounce", "dimmed"}
  assert all(v == 1.0 for v in probes.values()), probes
  by_looks = disc_probe.probe(looks, prompts, WORLD, seed)
  assert by_looks["dimmed"] == 1.0 and by_looks != probes
  assert all(v == 0.5 for v in disc_probe.probe(constant, prompts, WORLD, seed).values())
  assert disc_probe.other_words("one red ball dropped, weak gravity, soft", "gravity") == [
      "one red ball dropped, normal gravity, soft", "one red ball dropped, strong gravity, soft"]
  assert disc_probe.other_words("two white and red balls dropped, weak gravity, soft", "color") \
      == ["two green and red balls dropped, weak gravity, soft",
          "two blue and red balls dropped, weak gravity, soft"]


def test_restitution_and_penetration():
  prompts = SINGLE
  truth = np.stack([WORLD.render(p, 2) for p in prompts])
  dead = PhysicsWorld(restitution_range=(0.5, 0.5))
  dull = np.stack([dead.render(p, 2) for p in prompts])
  base = physics.evaluate(truth, prompts)[1]
  assert physics.evaluate(dull, prompts)[1]["bounce_error"] > base["bounce_error"] + 0.2
  sunk = np.stack([WORLD.simulate(p, 2) for p in prompts])
  sunk[:, 8:, :, 1] = 1.0 - WORLD.radius / 2                      # half into the floor
  sunk = np.stack([render(c, p) for c, p in zip(sunk, prompts)])
  assert physics.evaluate(sunk, prompts)[1]["penetration"] > 0.2 > base["penetration"] + 0.1


def test_chunk_glitch_is_caught_at_chunk_boundaries_only():
  """A ball that jumps half a pixel where a new chunk starts (frames 3, 6, 9) raises
  chunk_jump; the same jumps one frame later, inside chunks, do not."""
  centres = [WORLD.simulate(p, 4) for p in SINGLE]

  def glitched(starts):
    out = []
    for c, p in zip(centres, SINGLE):
      c = c.copy()
      for s in starts:
        c[s:, :, 0] += 0.5 / WORLD.size
      out.append(render(c, p))
    return np.stack(out)

  clean = physics.evaluate(glitched(()), SINGLE, chunk_frames=3)[1]["chunk_jump"]
  at = physics.evaluate(glitched((3, 6, 9)), SINGLE, chunk_frames=3)[1]["chunk_jump"]
  off = physics.evaluate(glitched((4, 7, 10)), SINGLE, chunk_frames=3)[1]["chunk_jump"]
  assert clean < 0.05 and off < 0.05, (clean, off)
  assert at > 0.3, at


def test_downward_jumps_at_chunk_starts_read_as_gravity_only_across_chunks():
  """A ball that drops 1, 2 and 3 pixels more at the chunk starts (frames 3, 6, 9: a causal
  student falling faster by jumping) shows a larger ``gravity_ratio``; read inside chunks only, its
  gravity is still the teacher's."""
  def jumped(step_px):
    out = []
    for p in SINGLE:
      c = WORLD.simulate(p, 4).copy()
      for i, s in enumerate((3, 6, 9)):   # larger each time, as a faster fall would be
        c[s:, :, 1] += (i + 1) * step_px / WORLD.size
      out.append(render(c, p))
    return np.stack(out)

  clean = physics.evaluate(jumped(0.0), SINGLE, chunk_frames=3)[1]
  down = physics.evaluate(jumped(1.0), SINGLE, chunk_frames=3)[1]
  assert abs(clean["gravity_ratio"] - 1) < 0.05 and abs(clean["gravity_ratio_in_chunks"] - 1) < 0.05
  assert down["gravity_ratio"] > clean["gravity_ratio"] + 0.2, down            # 1.28
  assert abs(down["gravity_ratio_in_chunks"] - 1) < 0.05, down                  # 1.00


def test_a_ball_wobbling_inside_chunks_shows_jitter_not_gravity():
  """Every odd frame 1 pixel higher (a tracked centre that wobbles, as the distilled student's
  does): each chunk's second difference is g +- 2 px, alternating from chunk to chunk, so
  ``fall_jitter`` reads about 2 px over g (g: 0.36-1.4 px / frame**2 here) where the teacher's
  parabola reads about 0."""
  def wobbled(px):
    out = []
    for p in SINGLE:
      c = WORLD.simulate(p, 4).copy()
      c[1::2, :, 1] -= px / WORLD.size
      out.append(render(c, p))
    return np.stack(out)

  clean = physics.evaluate(wobbled(0.0), SINGLE, chunk_frames=3)[1]
  wobbly = physics.evaluate(wobbled(1.0), SINGLE, chunk_frames=3)[1]
  assert clean["fall_jitter"] < 0.05, clean
  assert wobbly["fall_jitter"] > 1.0, wobbly


def test_chunk_profile_tells_a_fall_inside_chunks_from_a_wobble_and_a_drop_at_chunk_starts():
  """A 9-frame free fall (3 chunks of 3, clear of the walls) reads g inside every chunk, a velocity
  that grows by 3 g per chunk and no drop. Moved 2 px down from frame 3 on (a jump where chunk 1
  starts), only the first drop changes, by 2 px; 1 px higher every odd frame, the second
  differences read g + 2 / g - 2 / g + 2 (middle frames 1, 4, 7)."""
  prompt = SINGLE[0]
  g = 0.356                                                  # px / frame**2 (a weak fall)
  t = np.arange(9.0)
  y = 10.0 + 0.5 * g * t ** 2                                # px in a 32 px frame: 10 .. 21.4
  fall = np.stack([np.full(9, 0.5), y / 32], -1)[:, None]    # [T, balls, (x, y)]
  dropped, wobbly = fall.copy(), fall.copy()
  dropped[3:, :, 1] += 2.0 / 32
  wobbly[1::2, :, 1] -= 1.0 / 32
  plain, jumped, shaken = (physics.chunk_profile(render(c, prompt), prompt, WORLD, 3)
                           for c in (fall, dropped, wobbly))
  np.testing.assert_allclose(plain["kink"], [[g, g, g]], atol=0.05)
  np.testing.assert_allclose(np.diff(plain["velocity"]), [[3 * g, 3 * g]], atol=0.05)
  np.testing.assert_allclose(plain["drop"], [[0, 0]], atol=0.05)
  np.testing.assert_allclose(jumped["drop"], [[2, 0]], atol=0.05)
  np.testing.assert_allclose(jumped["kink"], plain["kink"], atol=0.05)
  np.testing.assert_allclose(shaken["kink"], [[g + 2, g - 2, g + 2]], atol=0.1)
  near_walls = physics.chunk_profile(render(fall, prompt), prompt, WORLD, 3, margin_px=8.0)
  assert np.isnan(near_walls["kink"][0, [0, 2]]).all()       # within 8 px of ceiling / floor
  assert np.isfinite(near_walls["kink"][0, 1])
  with pytest.raises(ValueError, match="chunk_frames must be >= 3"):
    physics.chunk_profile(render(fall, prompt), prompt, WORLD, 2)


def test_chunk_profile_reads_the_fall_of_noisy_tracks_without_bias_from_its_margins():
  """A chunk is read only where all its frames are clear of floor and ceiling, which biases the
  second difference of a noisy track (a high last frame kept, a low one dropped). The bias must
  stay well under the fall it reads: teacher tracks with 0.4 px of noise per frame, rendered and
  tracked, read g = 0.4 px / frame**2 to within 0.2 (measured 0.27), and the same tracks made
  straight inside each chunk read 0 to within 0.2 (-0.12)."""
  prompts = [p for p in sample_prompts(200, seed=3, gravities=("normal",)) if p.startswith("one ")]
  world = PhysicsWorld(num_frames=9)
  noise = np.random.default_rng(0).normal(0.0, 0.4 / world.size, (len(prompts), 4, 9))
  kinks = {"fall": [], "straight": []}
  for i, prompt in enumerate(prompts):
    for seed in range(4):
      y = world.simulate(prompt, seed)[:, :1]
      straight = y.copy()
      straight[1::3, :, 1] = (y[0::3, :, 1] + y[2::3, :, 1]) / 2    # middle frames on the chord
      for name, c in (("fall", y), ("straight", straight)):
        c = c.copy()
        c[:, 0, 1] += noise[i, seed]
        k = physics.chunk_profile(render(c, prompt), prompt, world, 3)["kink"]
        kinks[name] += list(k[np.isfinite(k)])
  assert len(kinks["fall"]) > 60, len(kinks["fall"])
  assert abs(np.mean(kinks["fall"]) - 0.4) < 0.2, np.mean(kinks["fall"])
  assert abs(np.mean(kinks["straight"])) < 0.2, np.mean(kinks["straight"])


def test_physics_is_bounded_on_empty_videos_and_rejects_bad_input():
  black = np.zeros((12, 32, 32, 3), np.uint8)
  assert physics.video_physics(black, PROMPTS[0])["physics_error"] == 5.0
  with pytest.raises(ValueError, match=r"uint8 video \[T, H, W, 3\]"):
    physics.video_physics(black.astype(np.float32), PROMPTS[0])
  with pytest.raises(ValueError, match=r"uint8 videos \[N, T, H, W, 3\]"):
    report.evaluate(black, PROMPTS[:1])
  with pytest.raises(ValueError, match="not in the physics grammar"):
    physics.video_physics(black, "a purple ball")


def test_quality_counts_colour_and_sharpness(teacher):
  base = quality.evaluate(teacher, PROMPTS)[1]
  assert base["count_error"] < 0.05 and base["visibility"] > 0.99
  assert base["color_error"] < 0.03 and base["hue_error"] < 1.0 and base["sharpness"] > 0.4
  blurred = quality.evaluate(blur(teacher, 1.0), PROMPTS)[1]
  assert blurred["sharpness"] < 0.75 * base["sharpness"]
  dim = quality.evaluate((teacher * 0.6).astype(np.uint8), PROMPTS)[1]
  assert dim["color_error"] > 0.3 and dim["visibility"] > 0.99
  tinted = teacher.astype(np.int16)
  tinted[..., 2] += (teacher.max(-1) > 0) * 25                    # every ball a little bluer
  tinted = quality.evaluate(np.clip(tinted, 0, 255).astype(np.uint8), PROMPTS)[1]
  assert tinted["hue_error"] > base["hue_error"] + 2.0


def test_frechet_teacher_vs_teacher_is_small_next_to_degraded():
  prompts = sample_prompts(24, seed=3)
  ref = np.stack([WORLD.render(p, 1) for p in prompts])
  other = np.stack([WORLD.render(p, 2) for p in prompts])
  f_ref, f_other = frechet.features(ref), frechet.features(other)
  assert f_ref.shape == (24, frechet.FEATURE_DIM)
  np.testing.assert_array_equal(frechet.features(ref[:5]), f_ref[:5])   # batch-independent
  assert frechet.frechet_distance(f_ref, f_ref) < 1e-6
  same = frechet.frechet_distance(f_other, f_ref)
  rng = np.random.default_rng(0)
  for name, videos in (("blurred", blur(other, 1.0)),
                       ("frozen", np.repeat(other[:, :1], other.shape[1], 1)),
                       ("noise", rng.integers(0, 256, other.shape, dtype=np.uint8))):
    assert frechet.video_frechet(videos, ref) > 1.8 * same, name


def test_report_table_grid_and_curves(teacher, tmp_path):
  reference = np.stack([WORLD.render(p, 2) for p in PROMPTS])
  wrong = np.stack([PhysicsWorld(gravity_range=(0.3, 0.5)).render(p, 1) for p in PROMPTS])
  results = {"teacher": report.evaluate(teacher, PROMPTS, reference=reference),
             "base": report.evaluate(wrong, PROMPTS, reference=reference)}
  assert set(results["teacher"]) == set(report.BETTER)
  assert results["base"]["physics_error"] > 5 * results["teacher"]["physics_error"]
  assert abs(results["teacher"]["sharpness_ratio"] - 1.0) < 0.05
  table = report.format_table(results)
  row = next(line for line in table.splitlines() if line.startswith("physics_error"))
  assert row.split()[2].endswith("*") and not row.split()[3].endswith("*")   # teacher best
  unread = {s: dict(m, fall_jitter=float("nan")) for s, m in results.items()}
  assert "fall_jitter" in table and "fall_jitter" not in report.format_table(unread)
  grid = report.sample_grid({"teacher": teacher[:3], "base": wrong[:3]}, scale=2)
  assert grid.dtype == np.uint8 and grid.shape[0] == teacher.shape[1]
  assert grid.shape[1] == 2 * (64 + 2) + 2 and grid.shape[2] > 3 * (64 + 2)
  gif = write_gif(grid, tmp_path / "grid.gif")
  with Image.open(gif) as im:
    assert im.n_frames == teacher.shape[1] and im.size == (grid.shape[2], grid.shape[1])
  log = tmp_path / "metrics.jsonl"
  log.write_text("".join(json.dumps({"step": s, "eval/physics_error": 1.0 / (s + 1)}) + "\n"
                         for s in range(5)))
  png = report.plot_curves(log, ["eval/physics_error"], tmp_path / "curves.png")
  with Image.open(png) as im:
    assert im.format == "PNG" and im.size[0] > 100
  with pytest.raises(ValueError, match="no record has keys"):
    report.plot_curves(log, ["loss"], tmp_path / "x.png")


def test_motion_metrics_on_known_trajectories():
  """A ball moving at a known constant speed is measured at that speed; a frozen video has none
  and is not dynamic; a copy of the teacher at 60 % of its speed has speed ratio 0.6 and still
  moves (the threshold is half the teacher's slowest); VBench's flickering formula by hand."""
  from afd_jax.eval import motion
  prompt = SINGLE[0]
  t = np.arange(WORLD.num_frames)
  line = np.stack([0.3 + 0.02 * t, np.full(len(t), 0.5)], -1)[:, None]  # 0.02 frame heights / frame
  speed = motion.video_speed(render(line, prompt), prompt, WORLD)
  assert abs(speed - 0.02 * WORLD.fps) < 0.002 * WORLD.fps, speed
  slower = np.stack([0.3 + 0.012 * t, np.full(len(t), 0.5)], -1)[:, None]
  still = np.repeat(line[:1], len(t), axis=0)
  videos = np.stack([render(x, prompt) for x in (line, slower, still)])
  reference = np.stack([render(line, prompt)] * 3)
  out = motion.evaluate(videos[1:2], [prompt], WORLD, reference=reference[:1])
  assert abs(out["speed_ratio"] - 0.6) < 0.02, out
  out = motion.evaluate(videos, [prompt] * 3, WORLD, reference=reference)
  assert out["dynamic_degree"] == pytest.approx(2 / 3)        # the frozen one is not dynamic
  assert motion.temporal_flickering(videos[2]) == 1.0
  frames = np.zeros((3, 4, 4, 3), np.uint8)
  frames[1] = 51                                               # mean |diff| 51 twice: (255-51)/255
  assert motion.temporal_flickering(frames) == pytest.approx(204 / 255)
  assert motion.evaluate(videos, [prompt] * 3, WORLD).keys() == {"speed", "temporal_flickering"}
