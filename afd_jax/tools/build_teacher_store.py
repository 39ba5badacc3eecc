"""Build a teacher store from videos a teacher already made (any model, any machine).

    python -m afd_jax.tools.build_teacher_store --prompts prompts.jsonl --videos DIR --out STORE
        [--text_embeddings tiny|umt5|DIR] [--encoder pixels --patch 4 | --encoder wan_vae
        --vae PATH]
        [--num_frames T --height H --width W] [--fit crop|stretch|exact] [--fps FPS] [--overwrite]

``prompts.jsonl`` holds one JSON object per line: ``prompt`` (required), ``id`` (default: the line
number, from 0), ``videos`` (paths relative to ``--videos``; default: every ``DIR/<id>.<ext>``,
``DIR/<id>_<k>.<ext>`` and ``DIR/<id>/*.<ext>`` for ext in mp4, webm, mkv, avi, mov, npy, each
one sample of the prompt) and ``embedding`` (a ``.npy`` ``[L, D]``, relative to the prompts file;
default ``--text_embeddings DIR/<id>.npy``). ``--text_embeddings tiny`` (the default) embeds the
prompts with the built-in tiny text encoder instead (``--text_dim``, ``--text_length``);
``--text_embeddings umt5`` with Wan's umT5 (``--t5``, ``--tokenizer``; ``--text_length`` 512),
batched, into ``--text_cache`` (default ``OUT_text``, kept: a rebuild reuses it) first, as
``python -m afd_jax.tools.embed_prompts`` does.

Videos end up with one shape, from the flags or, for the ones not given, from the first readable
video: ``--fit crop`` (the default) keeps a video's first ``T`` frames and resizes it to cover
``H x W``, centre-cropping the rest; ``stretch`` resizes without keeping the aspect; ``exact``
takes only videos of exactly that shape. ``--encoder wan_vae`` encodes with the Wan2.1 VAE
(``T = 4k + 1``, ``H`` and ``W`` multiples of 8, e.g. 81 x 480 x 832 -> 21 x 60 x 104 x 16);
the fit, the shape and the VAE are recorded in the store's metadata. A missing, unreadable or
too short video (or one of another shape, under ``exact``), and a prompt without any usable video
or with a bad embedding, is skipped, and listed with the reason in the printed summary and in
``STORE/report.json``; kept prompts get contiguous prompt ids 0..N-1 (``report.json`` maps them
back to the prompts file's ids). Nothing usable at all exits non-zero.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from absl import flags, logging

from afd_jax import encoders, video
from afd_jax import errors
from afd_jax import prompts as prompts_lib
from afd_jax.prompts import Entry
from afd_jax.teachers import physics
from afd_jax.teachers import store as store_lib

EXTENSIONS = ("mp4", "webm", "mkv", "avi", "mov", "npy")

_PROMPTS = flags.DEFINE_string("prompts", None, "JSON lines: prompt, optional id, videos, "
                               "embedding.")
_VIDEOS = flags.DEFINE_string("videos", None, "Folder of the teacher's videos.")
_OUT = flags.DEFINE_string("out", None, "The store directory to create.")
_TEXT = flags.DEFINE_string("text_embeddings", "tiny", "'tiny' (built-in text encoder), 'umt5' "
                            "(Wan's, --t5 --tokenizer) or a folder of <id>.npy [L, D] embeddings.")
_TEXT_DIM = flags.DEFINE_integer("text_dim", 32, "Tiny text encoder width.")
_TEXT_LENGTH = flags.DEFINE_integer("text_length", None, "Tokens per prompt (tiny: 16, umt5: 512).")
_T5 = flags.DEFINE_string("t5", None, "umt5: the encoder (Wan .pth, HF folder or converted).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "umt5: the google/umt5-xxl tokenizer folder.")
_TEXT_CACHE = flags.DEFINE_string("text_cache", None, "umt5: where the embeddings are written "
                                  "(default OUT_text).")
_ENCODER = flags.DEFINE_string("encoder", "pixels", f"Latent encoder {sorted(encoders.ENCODERS)}.")
_PATCH = flags.DEFINE_integer("patch", 4, "Pixel encoder patch size.")
_VAE = flags.DEFINE_string("vae", None, "wan_vae: the VAE checkpoint (Wan2.1_VAE.pth, a diffusers "
                           "vae/ folder, or a convert_wan_vae folder).")
_VAE_CHUNK = flags.DEFINE_integer("vae_chunk", 1, "wan_vae: latent frames encoded at a time "
                                  "(0: whole videos; more memory).")
_VAE_TILE = flags.DEFINE_integer("vae_tile", 0, "wan_vae: spatial tiles of this many pixels for "
                                 "large frames (0: whole frames).")
_FIT = flags.DEFINE_enum("fit", "crop", list(video.FITS), "How videos of another shape are made to fit: "
                         "first T frames, resized to cover and centre-cropped (crop) or resized "
                         "(stretch); exact skips them.")
_NUM_FRAMES = flags.DEFINE_integer("num_frames", None, "Expected frames per video.")
_HEIGHT = flags.DEFINE_integer("height", None, "Expected video height.")
_WIDTH = flags.DEFINE_integer("width", None, "Expected video width.")
_FPS = flags.DEFINE_float("fps", None, "Frame rate to record (default: the first video's).")
_NAME = flags.DEFINE_string("name", "teacher_store", "TFDS dataset name (shard file prefix).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing store at --out.")


def _is_video(path: Path) -> bool:
  return path.is_file() and path.suffix[1:].lower() in EXTENSIONS


def index_videos(root: Path) -> dict[str, list[Path]]:
  """``root``'s own videos by the prompt id their names give, listed once (not once per prompt):
  ``<id>.<ext>`` and ``<id>_<k>.<ext>`` (the latter also under the id ``<id>_<k>``)."""
  index: dict[str, list[Path]] = {}
  for path in sorted(root.iterdir()):
    if _is_video(path):
      numbered = re.fullmatch(r"(.+)_\d+", path.stem)
      for key in {path.stem, numbered.group(1) if numbered else path.stem}:
        index.setdefault(key, []).append(path)
  return index


def find_videos(entry: Entry, root: Path, index: dict[str, list[Path]]) -> list[Path]:
  if entry.videos is not None:
    return [root / v for v in entry.videos]
  folder = root / entry.key
  inside = sorted(p for p in folder.iterdir() if _is_video(p)) if folder.is_dir() else []
  return index.get(entry.key, []) + inside


class Builder:
  """Turns prompts into store records, recording every skip with its reason."""

  def __init__(self, entries: list[Entry], root: Path, index: dict[str, list[Path]], encoder,
               text_encoder, text_dir, expected: tuple[int, int, int, int] | None,
               fit: str = "crop"):
    self.entries, self.root, self.index, self.encoder = entries, root, index, encoder
    self.text_encoder, self.text_dir, self.expected = text_encoder, text_dir, expected
    self.fit = fit
    self.fitted: dict[str, list[int]] = {}  # path -> original shape, for videos fit changed
    self.text_shape: tuple[int, ...] | None = None
    self.num_prompts = 0
    self.skipped: list[dict] = []
    self.written: list[dict] = []

  def skip(self, entry: Entry, path, reason: str):
    self.skipped.append({"prompt_id": entry.key, "path": str(path) if path else None,
                         "reason": reason})

  def embedding(self, entry: Entry) -> np.ndarray | None:
    if self.text_encoder is not None:
      try:
        return self.text_encoder([entry.prompt])[0]
      except ValueError as e:
        self.skip(entry, None, f"bad embedding: {e}")
        return None
    path = Path(entry.embedding or self.text_dir / f"{entry.key}.npy")
    try:
      x = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
      self.skip(entry, path, f"bad embedding: cannot read a .npy array ({e})")
      return None
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.floating) or not np.isfinite(x).all():
      self.skip(entry, path, f"bad embedding: {x.dtype} {list(x.shape)}, need finite floats [L, D]")
      return None
    if self.text_shape is not None and x.shape != self.text_shape:
      self.skip(entry, path, f"bad embedding: shape {list(x.shape)} but earlier prompts have "
                             f"{list(self.text_shape)}")
      return None
    return x.astype(np.float32)

  def frames(self, entry: Entry, path: Path) -> np.ndarray | None:
    try:
      frames = video.read_video(path)
    except video.VideoError as e:
      self.skip(entry, path, str(e))
      return None
    try:
      fitted = video.fit(frames, *self.expected[:3], self.fit)
    except video.VideoError as e:
      self.skip(entry, path, f"{e}; see --num_frames/--height/--width and --fit")
      return None
    if fitted.shape != frames.shape:
      self.fitted[str(path)] = list(frames.shape)
    return fitted

  def records(self) -> Iterator[store_lib.Record]:
    for entry in self.entries:
      paths = find_videos(entry, self.root, self.index)
      if not paths:
        self.skip(entry, self.root, "no video found (looked for <id>.<ext>, <id>_<k>.<ext>, "
                                    f"<id>/*.<ext> with ext in {', '.join(EXTENSIONS)})")
        continue
      text = self.embedding(entry)
      if text is None:
        continue
      samples = []
      for path in paths:
        frames = self.frames(entry, path)
        if frames is not None:
          samples.append((path, self.encoder.encode(frames)))
      if not samples:
        self.skip(entry, None, f"no usable video among {len(paths)}")
        continue
      self.text_shape, prompt_id = text.shape, self.num_prompts
      self.num_prompts += 1
      for k, (path, latents) in enumerate(samples):
        self.written.append({"prompt_id": prompt_id, "id": entry.key, "sample": k,
                             "path": str(path)})
        yield store_lib.Record(entry.prompt, prompt_id, k, text, latents)
      logging.info("%s -> prompt id %d: %d samples", entry.key, prompt_id, len(samples))

  def report(self) -> dict:
    return {"written": len(self.written), "prompts": self.num_prompts, "skipped": self.skipped,
            "samples": [{**s, "fitted_from": self.fitted.get(s["path"])} for s in self.written]}


def first_video(entries: list[Entry], root: Path,
                index: dict[str, list[Path]]) -> tuple[tuple[int, ...], float | None] | None:
  """Shape and frame rate of the first readable video: the defaults for what flags leave open."""
  for entry in entries:
    for path in find_videos(entry, root, index):
      try:
        return video.read_video(path).shape, video.video_fps(path)
      except video.VideoError:
        continue
  return None


def summary(builder: Builder, out: Path | None) -> str:
  lines = [f"wrote {len(builder.written)} samples of {builder.num_prompts} prompts"
           + (f" to {out}" if out else "") + f"; skipped {len(builder.skipped)}"
           + (":" if builder.skipped else ".")]
  lines += [f"  {s['prompt_id']}: {s['path'] or '-'}: {s['reason']}" for s in builder.skipped]
  if out:
    lines.append(f"report: {out / 'report.json'}")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f"unexpected arguments {argv[1:]}")
  prompts, root, out = Path(_PROMPTS.value), Path(_VIDEOS.value), Path(_OUT.value)
  if not prompts.is_file() or not root.is_dir():
    raise errors.UserError(f"--prompts {prompts} must be a file and --videos {root} a folder.")
  tiny, text_dir = _TEXT.value == "tiny", Path(_TEXT.value)
  if _TEXT.value not in ("tiny", "umt5") and not text_dir.is_dir():
    raise errors.UserError(f"--text_embeddings {_TEXT.value} is neither 'tiny', 'umt5' nor a "
                           "folder.")
  if _TEXT.value == "umt5" and not (_T5.value and _TOKENIZER.value):
    raise errors.UserError("--text_embeddings umt5 needs --t5 (the encoder) and --tokenizer.")
  store_lib.ensure_writable(out, _OVERWRITE.value)
  entries = prompts_lib.load_prompts(prompts)
  if _TEXT.value == "umt5":
    from afd_jax.models import umt5
    text_dir = Path(_TEXT_CACHE.value or f"{out}_text")
    prompts_lib.write_embeddings([(e.key, e.prompt) for e in entries if not e.embedding],
                                   text_dir, umt5.from_pretrained(_T5.value),
                                   umt5.load_tokenizer(_TOKENIZER.value), _TEXT_LENGTH.value or 512)
  encoder = encoders.from_options(_ENCODER.value, patch=_PATCH.value, vae=_VAE.value,
                                  vae_chunk=_VAE_CHUNK.value, vae_tile=_VAE_TILE.value)
  index = index_videos(root)
  first = first_video(entries, root, index)
  shape = latent_shape = None  # stay None only when no video is readable: all are skipped
  if first is not None:
    flagged = (_NUM_FRAMES.value, _HEIGHT.value, _WIDTH.value)
    shape = tuple(f or s for f, s in zip(flagged, first[0][:3])) + (3,)
    try:
      latent_shape = encoder.latent_shape(shape)
    except ValueError as e:
      raise errors.UserError(f"{e} Set --num_frames/--height/--width (or --patch) to fit.") from e
  builder = Builder(entries, root, index, encoder,
                    physics.TextEncoder(_TEXT_DIM.value, _TEXT_LENGTH.value or 16) if tiny
                    else None,
                    None if tiny else text_dir, shape, _FIT.value)
  text_source = (f"tiny (dim {_TEXT_DIM.value}, length {_TEXT_LENGTH.value or 16})" if tiny
                 else f"umt5 {_T5.value} -> {text_dir.resolve()}" if _TEXT.value == "umt5"
                 else str(text_dir.resolve()))
  t0 = time.perf_counter()
  try:
    store_lib.build_store(
        builder.records(), out, encoder=encoder.spec,
        fps=_FPS.value or (first[1] if first else None),
        metadata={"video_shape": shape and list(shape), "text_encoder": text_source,
                  "prompts_file": str(prompts.resolve()),
                  "preprocess": {"fit": _FIT.value, "how": video.FITS[_FIT.value],
                                 "pixels": "uint8 / 127.5 - 1, in [-1, 1]"}},
        name=_NAME.value, overwrite=_OVERWRITE.value, extra_json={"report.json": builder.report})
  except store_lib.StoreError:
    print(summary(builder, None))
    raise
  print(summary(builder, out))
  print(f"{out}: latents {list(latent_shape)}, text {list(builder.text_shape)}, video "
        f"{list(shape)}, built in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
  flags.mark_flags_as_required(["prompts", "videos", "out"])
  errors.run(main)
