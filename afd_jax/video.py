"""Turning latent videos into files people can watch.

Until a VAE is configured, latents are shown directly: three latent channels as RGB, each scaled
by its own robust range and upsampled with nearest neighbours so structure stays visible.

Teacher videos come and go as files too: ``read_video`` decodes any container FFmpeg reads (via
PyAV) or a ``.npy`` array, ``write_mp4`` writes frames any player shows.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from afd_jax import errors


def latents_to_frames(latents, channels=(0, 1, 2), upscale: int = 8) -> np.ndarray:
  """``[F, H, W, C]`` latents -> ``[F, H*upscale, W*upscale, 3]`` uint8 frames."""
  x = np.asarray(latents, np.float32)[..., list(channels)]
  lo = np.percentile(x, 1, axis=(0, 1, 2), keepdims=True)
  hi = np.percentile(x, 99, axis=(0, 1, 2), keepdims=True)
  x = np.clip((x - lo) / np.maximum(hi - lo, 1e-6), 0.0, 1.0)
  x = x.repeat(upscale, axis=1).repeat(upscale, axis=2)
  return (x * 255).round().astype(np.uint8)


def write_gif(frames: np.ndarray, path, fps: float = 8.0) -> Path:
  """Writes ``[F, H, W, 3]`` uint8 frames as a looping GIF."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  images = [Image.fromarray(f) for f in frames]
  images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
  return path


def tile(videos: np.ndarray, pad: int = 2) -> np.ndarray:
  """``[N, F, H, W, 3]`` -> one ``[F, H, N*(W+pad)-pad, 3]`` video, side by side."""
  n, f, h, w, c = videos.shape
  out = np.full((f, h, n * (w + pad) - pad, c), 255, np.uint8)
  for i in range(n):
    out[:, :, i * (w + pad):i * (w + pad) + w] = videos[i]
  return out


class VideoError(errors.UserError):
  """A video file that cannot be used: missing, unreadable, corrupt, or not uint8 RGB frames."""


def _checked(frames: np.ndarray, path: Path) -> np.ndarray:
  if frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
    raise VideoError(f"video {path} has shape {list(frames.shape)}; expected non-empty RGB frames "
                     "[T, H, W, 3].")
  return frames


def _read_npy(path: Path) -> np.ndarray:
  try:
    x = np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:  # np.load raises these for truncated or non-.npy bytes
    raise VideoError(f"video {path} is not a readable .npy array ({e}); rewrite it with "
                     "np.save.") from e
  x = _checked(x, path)
  if x.dtype == np.uint8:
    return x
  if np.issubdtype(x.dtype, np.floating) and np.isfinite(x).all() and x.min() >= 0 \
      and x.max() <= 1:
    return np.round(x * 255.0).astype(np.uint8)
  raise VideoError(f"video {path} holds {x.dtype} values in [{x.min()}, {x.max()}]; store uint8 "
                   "frames, or floats in [0, 1].")


def _read_container(path: Path) -> np.ndarray:
  try:
    with av.open(str(path)) as container:
      if not container.streams.video:
        raise VideoError(f"video {path} has no video stream.")
      stream = container.streams.video[0]
      stream.thread_type = "AUTO"
      frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
  except av.FFmpegError as e:
    raise VideoError(f"video {path} cannot be decoded ({e}); the file is corrupt, truncated or "
                     "not a video: re-encode or replace it.") from e
  if not frames:
    raise VideoError(f"video {path} holds no decodable frames.")
  if len({f.shape for f in frames}) > 1:
    raise VideoError(f"video {path} changes frame size mid-stream "
                     f"({sorted({f.shape for f in frames})}); re-encode it at one size.")
  return _checked(np.stack(frames), path)


def read_video(path) -> np.ndarray:
  """A video file as uint8 ``[T, H, W, 3]``: any container FFmpeg decodes (mp4, webm, mkv, avi,
  mov, ...; first video stream, every frame), or a ``.npy`` array of uint8 frames or floats in
  [0, 1]. Anything else raises ``VideoError`` naming the file, so callers can skip and report it.
  """
  path = Path(path)
  if not path.is_file():
    raise VideoError(f"video {path} does not exist.")
  return _read_npy(path) if path.suffix.lower() == ".npy" else _read_container(path)


def video_fps(path) -> float | None:
  """The frame rate a container declares; None for ``.npy`` arrays (they carry none)."""
  path = Path(path)
  if path.suffix.lower() == ".npy":
    return None
  try:
    with av.open(str(path)) as container:
      rate = container.streams.video[0].average_rate if container.streams.video else None
  except av.FFmpegError as e:
    raise VideoError(f"video {path} cannot be opened ({e}).") from e
  return float(rate) if rate else None


FITS = {"crop": "the first T frames, bicubic resize (antialiased) to cover H x W, centre crop",
        "stretch": "the first T frames, bicubic resize (antialiased) to H x W",
        "exact": "none: only videos of exactly [T, H, W, 3]"}


def fit(frames: np.ndarray, num_frames: int, height: int, width: int, mode: str) -> np.ndarray:
  """``frames`` as exactly ``[num_frames, height, width, 3]``: the first ``num_frames`` frames,
  resized (bicubic, antialiased when shrinking) to cover the target and centre-cropped
  (``crop``, aspect kept) or resized to it (``stretch``). ``exact`` changes nothing. A video that
  cannot fit (too few frames, or any difference under ``exact``) raises ``VideoError``."""
  if mode not in FITS:
    raise errors.UserError(f"fit mode {mode!r} is not one of {list(FITS)}.")
  t, h, w = frames.shape[:3]
  if (t, h, w) == (num_frames, height, width):
    return frames
  if mode == "exact" or t < num_frames:
    raise VideoError(f"video shape [T, H, W, 3] = {list(frames.shape)}, expected "
                     f"{[num_frames, height, width, 3]}"
                     + (" (fewer frames than wanted)" if t < num_frames else
                        " (--fit crop or stretch resizes and trims)"))
  frames = frames[:num_frames]
  if (h, w) == (height, width):
    return frames
  if mode == "crop":
    scale = max(height / h, width / w)
    size = (max(width, round(w * scale)), max(height, round(h * scale)))
  else:
    size = (width, height)
  resized = np.stack([np.asarray(Image.fromarray(f).resize(size, Image.Resampling.BICUBIC))
                      for f in frames])
  top, left = (size[1] - height) // 2, (size[0] - width) // 2
  return resized[:, top:top + height, left:left + width]


class Mp4Writer:
  """An MP4 written as frames arrive (``with Mp4Writer(path, fps) as w: w.append(frames)``), in
  ``write_mp4``'s format; the size is fixed by the first frames appended."""

  def __init__(self, path, fps: float = 16.0):
    self.path, self.fps = Path(path), fps
    self._container = self._stream = None

  def __enter__(self):
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._container = av.open(str(self.path), "w", format="mp4")
    return self

  def append(self, frames: np.ndarray):
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
      raise VideoError(f"Mp4Writer takes uint8 frames [T, H, W, 3], got {frames.dtype} "
                       f"{list(frames.shape)}.")
    _, h, w, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    if self._stream is None:
      codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
      self._stream = self._container.add_stream(codec,
                                                rate=Fraction(self.fps).limit_denominator(1001))
      self._stream.height, self._stream.width = frames.shape[1], frames.shape[2]
      self._stream.pix_fmt = "yuv420p"
      if codec == "libx264":
        self._stream.options = {"crf": "18"}
      else:  # mpeg4 has no CRF; a generous bit rate keeps it near-lossless
        self._stream.bit_rate = int(8 * frames.shape[1] * frames.shape[2] * self.fps)
    for frame in frames:
      self._container.mux(self._stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))

  def __exit__(self, *exc):
    if self._stream is not None:
      self._container.mux(self._stream.encode())
    self._container.close()


def write_mp4(frames: np.ndarray, path, fps: float = 16.0) -> Path:
  """Writes uint8 ``[T, H, W, 3]`` frames as an H.264 mp4 (MPEG-4 part 2 where this FFmpeg has no
  libx264), yuv420p so that every player shows it.

  yuv420p needs even sizes: an odd height or width gets one more row or column repeating the edge,
  so such a file reads back one pixel larger. H.264 at CRF 18 is close to lossless, not lossless:
  compare against what ``read_video`` returns, not the frames written.
  """
  frames = np.asarray(frames)
  if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or not len(frames):
    raise VideoError(f"write_mp4 takes uint8 frames [T, H, W, 3], got {frames.dtype} "
                     f"{list(frames.shape)}.")
  with Mp4Writer(path, fps) as writer:
    writer.append(frames)
  return Path(path)
