"""Video files in and out: real mp4 / webm through PyAV, .npy arrays, and every way a file can be
unusable (each must raise ``VideoError`` naming the file)."""

from fractions import Fraction

import av
import numpy as np
import pytest

from afd_jax import video
from afd_jax.teachers import physics

PROMPT = "two red and blue balls thrown left, strong gravity, very bouncy"
WEBM_CODECS = [c for c in ("libvpx-vp9", "libvpx") if c in av.codecs_available]


@pytest.fixture(scope="module")
def frames():
  world = physics.PhysicsWorld(size=32, num_frames=6)
  return physics.PhysicsTeacher(world)([PROMPT], 0)[0]


def write_webm(frames, path, fps=8):
  """webm (VP9 or VP8) written directly with PyAV: the library itself only writes mp4."""
  with av.open(str(path), "w", format="webm") as container:
    stream = container.add_stream(WEBM_CODECS[0], rate=Fraction(fps))
    stream.height, stream.width, stream.pix_fmt = frames.shape[1], frames.shape[2], "yuv420p"
    for f in frames:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
    container.mux(stream.encode())
  return path


def test_mp4_round_trip(frames, tmp_path):
  path = video.write_mp4(frames, tmp_path / "sub" / "v.mp4", fps=8)
  out = video.read_video(path)
  assert out.dtype == np.uint8 and out.shape == frames.shape
  assert np.abs(out.astype(int) - frames).mean() < 4  # lossy, but close
  assert video.video_fps(path) == 8.0


def test_odd_sizes_are_padded(frames, tmp_path):
  odd = np.ascontiguousarray(frames[:, :31, :29])
  out = video.read_video(video.write_mp4(odd, tmp_path / "odd.mp4", fps=8))
  assert out.shape == (6, 32, 30, 3)


@pytest.mark.skipif(not WEBM_CODECS, reason="this FFmpeg build has no VP8/VP9 encoder")
def test_webm(frames, tmp_path):
  out = video.read_video(write_webm(frames, tmp_path / "v.webm"))
  assert out.shape == frames.shape and np.abs(out.astype(int) - frames).mean() < 4


def test_npy(frames, tmp_path):
  np.save(tmp_path / "u8.npy", frames)
  np.testing.assert_array_equal(video.read_video(tmp_path / "u8.npy"), frames)
  np.save(tmp_path / "f.npy", frames / 255.0)
  np.testing.assert_array_equal(video.read_video(tmp_path / "f.npy"), frames)
  assert video.video_fps(tmp_path / "f.npy") is None


@pytest.mark.parametrize("name, content, match", [
    ("range.npy", np.full((2, 4, 4, 3), 2.0), "floats in"),
    ("int16.npy", np.zeros((2, 4, 4, 3), np.int16), "int16"),
    ("gray.npy", np.zeros((2, 4, 4), np.uint8), "shape"),
    ("empty.npy", np.zeros((0, 4, 4, 3), np.uint8), "shape"),
])
def test_bad_npy(tmp_path, name, content, match):
  np.save(tmp_path / name, content)
  with pytest.raises(video.VideoError, match=match) as e:
    video.read_video(tmp_path / name)
  assert name in str(e.value)


def test_unusable_files(frames, tmp_path):
  good = video.write_mp4(frames, tmp_path / "good.mp4", fps=8).read_bytes()
  (tmp_path / "garbage.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
  (tmp_path / "truncated.mp4").write_bytes(good[:len(good) // 2])
  (tmp_path / "truncated.npy").write_bytes(b"\x93NUMPY\x01\x00")
  for name in ("garbage.mp4", "truncated.mp4", "truncated.npy", "missing.mp4"):
    with pytest.raises(video.VideoError) as e:
      video.read_video(tmp_path / name)
    assert name in str(e.value)
  assert isinstance(e.value, ValueError)


def test_write_mp4_rejects_non_uint8(frames, tmp_path):
  with pytest.raises(video.VideoError, match="uint8"):
    video.write_mp4(frames / 255.0, tmp_path / "f.mp4")
