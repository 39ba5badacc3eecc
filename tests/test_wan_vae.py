"""The Wan VAE against the PyTorch reference (diffusers AutoencoderKLWan), in float32."""

import numpy as np
import pytest

from afd_jax import encoders, video
from afd_jax.models import wan_vae, wan_vae_checkpoint
from conftest import rel_l2

torch = pytest.importorskip("torch")

# 13 frames: the first alone, then 3 chunks of 4 (the chunked path carries its cache twice). The
# store, trainer and rollout tests use the same shapes, so they share the compiled programs.
T, H, W = 13, 16, 16


def _channels_last(x):
  return x.permute(0, 2, 3, 4, 1).numpy()


@pytest.fixture(scope="module")
def case(diffusers_vae):
  """The reference's encode (moments) and decode of a random clip and random latents."""
  model, path = diffusers_vae
  gen = torch.Generator().manual_seed(1)
  x = torch.rand(1, 3, T, H, W, generator=gen) * 2 - 1
  z = torch.randn(1, 16, 4, H // 8, W // 8, generator=gen)
  model.disable_tiling()
  with torch.no_grad():
    moments, pixels = model._encode(x), model.decode(z).sample
  mean, std = np.asarray(wan_vae.LATENTS_MEAN), np.asarray(wan_vae.LATENTS_STD)
  return dict(vae=wan_vae_checkpoint.load(path), x=_channels_last(x),
              moments=_channels_last(moments), z=(_channels_last(z) - mean) / std,
              pixels=_channels_last(pixels))


@pytest.mark.parametrize("chunk", [1, 2, 0], ids=["chunk1", "chunk2_with_tail", "whole"])
def test_encode_and_decode_match_diffusers(case, chunk):
  vae = case["vae"]
  moments = wan_vae.encode_moments(vae, case["x"], chunk=chunk)
  assert moments.shape == (1, 4, 2, 2, 32)
  assert rel_l2(moments, case["moments"]) < 1e-4
  mu = case["moments"][..., :16]
  normalised = (mu - np.asarray(wan_vae.LATENTS_MEAN)) / np.asarray(wan_vae.LATENTS_STD)
  assert rel_l2(wan_vae.encode(vae, case["x"], chunk=chunk), normalised) < 1e-4
  pixels = wan_vae.decode(vae, case["z"], chunk=chunk)
  assert pixels.shape == (1, T, H, W, 3)
  assert rel_l2(pixels, case["pixels"]) < 1e-4


def test_tiling_matches_diffusers_tiling(diffusers_vae):
  model, path = diffusers_vae
  gen = torch.Generator().manual_seed(2)
  x = torch.rand(1, 3, 5, 16, 48, generator=gen) * 2 - 1       # three tiles across
  z = torch.randn(1, 16, 2, 2, 6, generator=gen)
  with torch.no_grad():
    whole = _channels_last(model._encode(x))
    model.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32,
                        tile_sample_stride_height=16, tile_sample_stride_width=16)
    try:
      moments, pixels = _channels_last(model._encode(x)), _channels_last(model.decode(z).sample)
    finally:
      model.disable_tiling()
  vae, tiling = wan_vae_checkpoint.load(path), wan_vae.Tiling(size=32, stride=16)
  got = wan_vae.encode_moments(vae, _channels_last(x), tiling=tiling)
  assert rel_l2(got, moments) < 1e-4 and rel_l2(moments, whole) > 1e-2  # tiling is not a no-op
  mean, std = np.asarray(wan_vae.LATENTS_MEAN), np.asarray(wan_vae.LATENTS_STD)
  got = wan_vae.decode(vae, (_channels_last(z) - mean) / std, tiling=tiling)
  assert rel_l2(got, pixels) < 1e-4


def test_sampling_uses_the_posterior_spread(case):
  import jax
  vae = case["vae"]
  mean = wan_vae.encode(vae, case["x"])
  a = wan_vae.encode(vae, case["x"], key=jax.random.key(0))
  b = wan_vae.encode(vae, case["x"], key=jax.random.key(1))
  sigma = np.exp(0.5 * np.clip(case["moments"][..., 16:], -30, 20)) / np.asarray(
      wan_vae.LATENTS_STD)
  z = (np.asarray(a) - np.asarray(mean)) / sigma  # standard normal if sampled correctly
  assert abs(z.mean()) < 0.1 and abs(z.std() - 1) < 0.1
  assert not np.allclose(a, b)


def test_round_trip_of_a_real_mp4_chunked_and_whole(case, diffusers_vae, tmp_path):
  _, path = diffusers_vae
  rng = np.random.default_rng(0)
  frames = rng.uniform(0, 255, (T, H // 4, W // 4, 3)).astype(np.uint8).repeat(4, 1).repeat(4, 2)
  mp4 = video.write_mp4(frames, tmp_path / "clip.mp4", fps=16)
  frames = video.read_video(mp4)
  assert frames.shape == (T, H, W, 3)
  chunked, whole = encoders.WanVAEEncoder(str(path)), encoders.WanVAEEncoder(str(path), chunk=0)
  assert chunked.latent_shape(frames.shape) == (4, 2, 2, 16)
  latents = chunked.encode(frames)
  assert latents.shape == (4, 2, 2, 16) and latents.dtype == np.float32
  assert rel_l2(whole.encode(frames), latents) < 1e-5
  out = chunked.decode(latents)
  assert out.shape == frames.shape and out.dtype == np.uint8
  pixels = np.asarray(wan_vae.decode(chunked.vae, latents[None]))
  assert pixels.min() >= -1 and pixels.max() <= 1 and pixels.min() < pixels.max()
  assert rel_l2(wan_vae.decode(whole.vae, latents[None], chunk=0), pixels) < 1e-5
  assert chunked.spec == {"name": "wan_vae", "vae": str(path.absolute()), "chunk": 1, "tile": 0,
                          "tile_stride": 0, "dtype": "float32"}
  assert encoders.make(**chunked.spec).latent_shape(frames.shape) == (4, 2, 2, 16)


def test_bad_input_is_refused_with_the_fix(case):
  vae = case["vae"]
  with pytest.raises(ValueError, match=r"12 frames is not of the form 4k\+1.*trim to 9 or 13"):
    wan_vae.encode(vae, np.zeros((1, 12, H, W, 3), np.float32))
  with pytest.raises(ValueError, match="20x44 are not divisible by the spatial stride 8.*16x40"):
    wan_vae.encode(vae, np.zeros((1, 5, 20, 44, 3), np.float32))
  with pytest.raises(ValueError, match=r"channel-last \[B, T, H, W, 3\]"):
    wan_vae.encode(vae, np.zeros((1, 3, 5, H, W), np.float32))
  with pytest.raises(ValueError, match=r"latents must be channel-last \[B, T, H, W, 16\]"):
    wan_vae.decode(vae, np.zeros((1, 4, 2, 2, 8), np.float32))
  with pytest.raises(ValueError, match="multiples of 8"):
    wan_vae.encode(vae, np.zeros((1, 5, 64, 64, 3), np.float32), tiling=wan_vae.Tiling(36, 24))
  with pytest.raises(ValueError, match="chunk=-1"):
    wan_vae.decode(vae, case["z"], chunk=-1)
  with pytest.raises(FileNotFoundError, match="config.data.vae"):
    encoders.WanVAEEncoder("/nonexistent/vae")
