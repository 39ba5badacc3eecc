"""Text to watched video: a distilled causal student, the Wan VAE and the umT5 encoder, streamed.

    python -m afd_jax.generate --student S --vae VAE --t5 T5 --tokenizer TOK \
        --prompt "a red ball bouncing" [--prompt ...] [--prompts FILE] --out DIR \
        [--seeds 0,1] [--frames 81 --height 480 --width 832] [--window_frames 0 --sink_frames 0]

``--student``: any layout ``wan.from_pretrained`` reads (a merged LoRA export included). Each
chunk the rollout finishes is decoded at once by the causal VAE (its feature cache makes
chunk-wise decoding equal to decoding the whole video) and appended to ``DIR/<n>_seed<s>.mp4``,
so the first frames exist while later chunks are still being sampled. Long videos roll through a
fixed cache with ``--window_frames`` / ``--sink_frames`` (latent frames). Prints the time to the
first frame and frames per second per video, with a progress bar over chunks.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
from absl import flags

from afd_jax import console
from afd_jax import errors
from afd_jax import prompts as prompts_lib
from afd_jax import rollout as rollout_lib
from afd_jax import video
from afd_jax.models import umt5, wan, wan_vae, wan_vae_checkpoint

_STUDENT = flags.DEFINE_string("student", None, "The causal student (any Wan layout).")
_VAE = flags.DEFINE_string("vae", None, "The Wan2.1 VAE (any layout wan_vae_checkpoint reads).")
_T5 = flags.DEFINE_string("t5", None, "The umT5 encoder (Wan .pth, HF folder or converted).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "The google/umt5-xxl tokenizer folder.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable).")
_PROMPTS = flags.DEFINE_string("prompts", None, "A .txt or .jsonl prompts file.")
_OUT = flags.DEFINE_string("out", None, "Folder for the MP4s.")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds: one video per prompt and seed.")
_FRAMES = flags.DEFINE_integer("frames", 81, "Pixel frames (4k + 1).")
_HEIGHT = flags.DEFINE_integer("height", 480, "Pixel height (multiple of 16).")
_WIDTH = flags.DEFINE_integer("width", 832, "Pixel width (multiple of 16).")
_CHUNK = flags.DEFINE_integer("chunk_frames", 3, "Latent frames per chunk.")
_STEPS = flags.DEFINE_list("denoising_steps", ["1000", "750", "500", "250"], "Timesteps per chunk.")
_SHIFT = flags.DEFINE_float("shift", 5.0, "Timestep shift.")
_WINDOW = flags.DEFINE_integer("window_frames", 0, "Attention window in latent frames (0: all).")
_SINK = flags.DEFINE_integer("sink_frames", 0, "Frames kept at the start of the window.")
_TEXT_LEN = flags.DEFINE_integer("text_len", None, "Tokens per prompt (default: the student's).")
_FPS = flags.DEFINE_float("fps", 16.0, "Frame rate of the MP4s (Wan2.1: 16).")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "Compute dtype of the student and encoder.")


def latent_shape(frames: int, height: int, width: int, vae_cfg, in_dim: int) -> tuple:
  try:
    f, h, w = vae_cfg.latent_shape(frames, height, width)[:3]
  except ValueError as e:
    raise errors.UserError(f"{e} Set --frames/--height/--width to fit.") from e
  if h % 2 or w % 2:
    raise errors.UserError(f"{height}x{width} pixels make {h}x{w} latents; the student's 2x2 "
                           "patches need even latent sizes (pixel sizes multiple of 16).")
  return f, h, w, in_dim


def generate(student, vae, context, seed: int, cfg: rollout_lib.RolloutConfig, shape, path: Path,
             fps: float) -> dict:
  """One video, streamed to ``path``: returns its timing (first frame, frames per second)."""
  t0 = time.perf_counter()
  noise = rollout_lib.sample_noise(jax.random.key(seed), 1, shape)
  decoder = wan_vae.StreamDecoder(vae)
  chunks = shape[0] // cfg.chunk_frames
  first, frames = None, 0
  with video.Mp4Writer(path, fps) as writer:
    for i, clean in enumerate(rollout_lib.stream(student, noise, context[None],
                                                 jax.random.key(seed + 1), cfg)):
      pixels = wan_vae.to_uint8(decoder(clean))[0]
      writer.append(pixels)
      frames += len(pixels)
      first = first or time.perf_counter() - t0
      console.show_progress(i + 1, chunks, unit="chunk", values={
          "perf/steps_per_second": (i + 1) / (time.perf_counter() - t0),
          "perf/eta_seconds": (chunks - i - 1) * (time.perf_counter() - t0) / (i + 1)})
  total = time.perf_counter() - t0
  return {"video": str(path), "first_frame_s": first, "seconds": total, "frames": frames,
          "frames_per_second": frames / total}


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f"unexpected arguments {argv[1:]}")
  texts = list(_PROMPT.value)
  if _PROMPTS.value:
    texts += [p for _, p in prompts_lib.read_prompts(Path(_PROMPTS.value))]
  if not texts:
    raise errors.UserError("give prompts with --prompt TEXT (repeatable) or --prompts FILE.")
  student = wan.from_pretrained(_STUDENT.value, dtype=_DTYPE.value)
  vae = wan_vae_checkpoint.load(_VAE.value)
  shape = latent_shape(_FRAMES.value, _HEIGHT.value, _WIDTH.value, vae.config,
                       student.config.in_dim)
  cfg = rollout_lib.RolloutConfig(
      chunk_frames=_CHUNK.value, denoising_steps=tuple(float(s) for s in _STEPS.value),
      shift=_SHIFT.value, window_frames=_WINDOW.value or None, sink_frames=_SINK.value)
  rollout_lib.plan_cache(shape[0], cfg)   # refuses frames / window that do not fit, now
  encoder = umt5.from_pretrained(_T5.value, dtype=_DTYPE.value)
  if encoder.config.dim != student.config.text_dim:
    raise errors.UserError(f"the text encoder's width {encoder.config.dim} is not the student's "
                           f"text_dim {student.config.text_dim}; pair Wan's umT5 with Wan.")
  text_len = _TEXT_LEN.value or student.config.text_len
  contexts = umt5.encode_prompts(encoder, umt5.load_tokenizer(_TOKENIZER.value), texts, text_len)
  out = Path(_OUT.value)
  runs = []
  for n, (text, context) in enumerate(zip(texts, contexts)):
    for seed in map(int, _SEEDS.value):
      run = generate(student, vae, context, seed, cfg, shape, out / f"{n:03d}_seed{seed}.mp4",
                     _FPS.value)
      runs.append({"prompt": text, "seed": seed, **run})
      print(f"{run['video']}: first frame after {run['first_frame_s']:.2f}s, {run['frames']} "
            f"frames at {run['frames_per_second']:.1f} frames/s  ({text[:60]!r})", flush=True)
  (out / "generate.json").write_text(json.dumps(runs, indent=2))


if __name__ == "__main__":
  flags.mark_flags_as_required(["student", "vae", "t5", "tokenizer", "out"])
  errors.run(main)
