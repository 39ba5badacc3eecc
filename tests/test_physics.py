"""The built-in physics teacher: grammar, determinism, the physics it renders, the text encoder."""

import numpy as np
import pytest

from afd_jax import encoders
from afd_jax.teachers import physics as P


def test_grammar_round_trip_and_errors():
  prompts = P.sample_prompts(200, seed=3)
  assert len(set(prompts)) == 200
  assert prompts == P.sample_prompts(200, seed=3)
  for p in prompts:
    assert P.parse_prompt(p).prompt() == p
  scene = P.parse_prompt("two red and blue balls thrown left, strong gravity, very bouncy")
  assert scene.colors == ("red", "blue") and scene.g == P.GRAVITY["strong"]
  assert scene.restitution == P.BOUNCINESS["very bouncy"] and scene.direction == "thrown left"
  for bad in ("two red balls dropped, weak gravity, soft",          # count mismatch
              "one purple ball dropped, weak gravity, soft",         # unknown colour
              "one red ball dropped, sideways gravity, soft",        # unknown gravity
              "two red and red balls dropped, weak gravity, soft"):  # repeated colour
    with pytest.raises(ValueError, match="physics grammar"):
      P.parse_prompt(bad)


def test_prompts_can_fix_gravity_as_a_law_of_the_world():
  """``gravities`` restricts the word; the default draws exactly the prompts it always drew."""
  lawful = P.sample_prompts(84, seed=0, max_balls=1, gravities=("normal",))
  assert len(set(lawful)) == 84 == 7 * 4 * 3   # every one-ball scene under normal gravity
  assert all(P.parse_prompt(p).gravity == "normal" for p in lawful)
  assert P.sample_prompts(3, seed=2) == [   # as drawn before the option existed
      "one cyan ball dropped, weak gravity, very bouncy",
      "one magenta ball thrown left, normal gravity, very bouncy",
      "three blue, magenta and yellow balls thrown up, weak gravity, soft"]
  assert {P.parse_prompt(p).gravity for p in P.sample_prompts(30, seed=2)} == set(P.GRAVITY)
  for bad in ((), ("sideways",), ("weak", "weak")):
    with pytest.raises(ValueError, match="gravity words"):
      P.sample_prompts(4, gravities=bad)
  with pytest.raises(ValueError, match="the grammar has 84"):
    P.sample_prompts(85, max_balls=1, gravities=("normal",))


def test_rendering_is_deterministic_per_prompt_and_seed():
  teacher = P.PhysicsTeacher(P.PhysicsWorld(num_frames=6))
  prompts = P.sample_prompts(3, seed=0)
  a, b, c = teacher(prompts, 0), teacher(prompts, 0), teacher(prompts, 1)
  assert a.shape == (3, 6, 32, 32, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_free_fall_has_the_prompted_gravity_and_bounces_lose_energy():
  world = P.PhysicsWorld(num_frames=40, fps=20.0)
  dt = 1.0 / world.fps
  for gravity in P.GRAVITY:
    prompt = f"one red ball dropped, {gravity} gravity, soft"
    y = world.simulate(prompt, seed=0)[:, 0, 1]
    free = y < 1.0 - world.radius - 0.02           # frames well above the floor
    first = np.argmin(free) if not free.all() else len(y)
    accel = np.diff(y[:first], 2) / dt ** 2
    np.testing.assert_allclose(accel, P.GRAVITY[gravity], rtol=0.02)
  y = world.simulate("one red ball dropped, strong gravity, soft", seed=0)[:, 0, 1]
  assert y.max() <= 1.0 - world.radius + 1e-9       # never through the floor
  bounce = np.argmax(np.diff(y) < 0)                # first upward motion
  assert 0 < bounce < len(y) - 1


def test_a_wrong_world_scales_gravity():
  prompt = "one green ball dropped, normal gravity, soft"
  true = P.PhysicsWorld(num_frames=8).simulate(prompt, 0)[:, 0, 1]
  weak = P.PhysicsWorld(num_frames=8, gravity_range=(0.5, 0.5)).simulate(prompt, 0)[:, 0, 1]
  np.testing.assert_allclose(np.diff(weak, 2), 0.5 * np.diff(true, 2), rtol=0.05)


def test_rendered_balls_have_their_colours_where_simulated():
  world = P.PhysicsWorld(num_frames=4)
  prompt = "two yellow and cyan balls thrown right, weak gravity, bouncy"
  video, centres = world.render(prompt, 5), world.simulate(prompt, 5)
  for ball, colour in enumerate(P.parse_prompt(prompt).colors):
    x, y = (centres[0, ball] * world.size).astype(int)
    np.testing.assert_array_equal(video[0, y, x], P.COLORS[colour])


def test_text_encoder_is_deterministic_and_zero_padded():
  enc = P.TextEncoder(dim=32, length=16)
  prompts = ["one red ball dropped, weak gravity, soft", "one blue ball dropped, weak gravity, soft"]
  e = enc(prompts)
  assert e.shape == (2, 16, 32) and e.dtype == np.float32
  np.testing.assert_array_equal(e, P.TextEncoder(dim=32, length=16)(prompts))
  n = len(enc.tokens(prompts[0]))
  assert np.all(e[:, n:] == 0) and np.all(np.abs(e[:, :n]).sum(-1) > 0)
  assert not np.allclose(e[0], e[1])                # the colour word changes the embedding
  with pytest.raises(ValueError, match="text_length"):
    P.TextEncoder(length=4)(prompts)


def test_pixel_encoder_round_trip_and_errors():
  enc = encoders.make("pixels", patch=4)
  video = P.PhysicsWorld(num_frames=3).render("one red ball dropped, weak gravity, soft", 0)
  latents = enc.encode(video)
  assert latents.shape == enc.latent_shape(video.shape) == (3, 8, 8, 48)
  assert latents.min() >= -1 and latents.max() <= 1
  np.testing.assert_array_equal(enc.decode(latents), video)
  with pytest.raises(ValueError, match="divisible by the encoder patch"):
    enc.latent_shape((3, 30, 32, 3))
  with pytest.raises(ValueError, match="unknown latent encoder"):
    encoders.make("vae")


def test_encoder_from_config_builds_the_wan_vae_for_video_teachers(small_vae):
  import ml_collections
  data = ml_collections.ConfigDict({"encoder": "wan_vae", "vae": str(small_vae), "vae_chunk": 2,
                                    "vae_tile": 64, "encoder_patch": 4})
  enc = encoders.from_config(data)
  assert enc.name == "wan_vae" and enc.spatial_stride == 8
  assert enc.latent_shape((81, 480, 832, 3)) == (21, 60, 104, 16)
  assert (enc.spec["chunk"], enc.spec["tile"], enc.spec["tile_stride"]) == (2, 64, 48)
  with pytest.raises(ValueError, match="not of the form 4k\\+1"):
    enc.latent_shape((12, 32, 32, 3))
  data.encoder = "pixels"
  assert encoders.from_config(data).spec == {"name": "pixels", "patch": 4}
