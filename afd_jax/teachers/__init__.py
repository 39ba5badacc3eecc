"""Black-box teachers: prompts (and a seed) in, finished videos out. Nothing else is asked of a
teacher: no scores, no intermediate states, no schedule.

Kinds (``config.data.teacher``):

* ``physics``: the built-in procedural renderer (``physics.py``), with its tiny text encoder;
* ``store``: a teacher store built offline from what any teacher returned (``store.py``,
  ``python -m afd_jax.tools.build_teacher_store``);
* ``callable`` / ``http``: an online teacher queried once per (prompt, seed), cached on disk
  (``online.py``);
* ``synthetic``: latent-space travelling waves for tests and the tiny config (``synthetic.py``).

``from_config`` turns the config into a ``TeacherData``: the prompt pool (training prompts plus
held-out evaluation prompts), the teacher latents the trainer reads, and what evaluation needs.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from afd_jax import data as data_lib
from afd_jax import encoders as encoders_lib
from afd_jax import errors

KINDS = ("synthetic", "physics", "store", "callable", "http")


class VideoTeacher(Protocol):
  def __call__(self, prompts: Sequence[str], seed: int) -> np.ndarray:
    """uint8 videos ``[B, T, H, W, 3]``, deterministic per (prompt, seed)."""


class LatentSource(Protocol):
  def latents(self, prompt_ids: np.ndarray, step: int, draw: int = 0) -> np.ndarray:
    """Clean teacher latents ``[B, F, h, w, C]`` (float32) of this step's sample of each prompt
    (``draw``: which of the prompt's K pairings of the step, each with its own pick)."""


@dataclasses.dataclass
class TeacherData:
  """What the trainer reads (``pool``, ``source``) and what evaluation compares against:
  ``reference(prompt_ids, seed)`` gives the true teacher's videos, uint8 pixels when ``encoder``
  can decode latents (``None``: latents are not pixels, e.g. the synthetic teacher)."""

  pool: data_lib.PromptPool
  source: LatentSource
  latent_shape: tuple[int, int, int, int]
  encoder: encoders_lib.LatentEncoder | None = None
  reference: Callable[[np.ndarray, int], np.ndarray] | None = None
  physics_world: Any = None                         # set for the physics teacher
  embed: Callable[[Sequence[str]], np.ndarray] | None = None  # any prompts' contexts (tiny text)


def _expect_latent_shape(config, shape) -> tuple[int, int, int, int]:
  """The teacher decides the latent shape; the config must agree (refused at start if not)."""
  d = config.data
  want = (d.num_frames, d.height, d.width)
  if tuple(shape[:3]) != want:
    raise errors.UserError(f"the teacher's latents are [F, h, w, C] = {list(shape)} but the config "
                     f"asks for data.num_frames, data.height, data.width = {list(want)}; set "
                     f"--config.data.num_frames={shape[0]} --config.data.height={shape[1]} "
                     f"--config.data.width={shape[2]} (and model in_dim/out_dim={shape[3]}).")
  return tuple(shape)


def _prompts_file(path) -> list[str]:
  """Prompts for online teachers: a ``.txt`` (one per line) or ``.jsonl`` (``{"prompt": ...}``)."""
  import json
  path = Path(path)
  if not path.exists():
    raise errors.MissingInput(f"config.data.prompts={str(path)!r} does not exist (a .txt with one "
                            "prompt per line, or a .jsonl with a 'prompt' field per line).")
  try:
    text = path.read_text(encoding="utf-8")
  except (OSError, UnicodeDecodeError) as e:
    raise errors.UserError(f"config.data.prompts={str(path)!r} cannot be read as UTF-8 text "
                           f"({e}).") from e
  prompts = []
  for n, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    if path.suffix != ".jsonl":
      prompts.append(line.strip())
      continue
    try:
      prompt = json.loads(line).get("prompt")
    except (ValueError, AttributeError):
      prompt = None
    if not isinstance(prompt, str) or not prompt.strip():
      raise errors.UserError(f"{path}:{n} is not a JSON object with a non-empty string 'prompt': "
                             f"{line[:80]!r}.")
    prompts.append(prompt)
  if not prompts:
    raise errors.UserError(f"config.data.prompts={str(path)!r} holds no prompts.")
  return prompts


def physics_world(config, true_world: bool = False):
  from afd_jax.teachers import physics
  p = config.physics
  world = physics.PhysicsWorld(size=p.size, num_frames=p.num_frames, fps=p.fps, radius=p.radius,
                               gravity_range=tuple(p.gravity_range),
                               restitution_range=tuple(p.restitution_range))
  return dataclasses.replace(world, gravity_range=(1.0, 1.0),
                             restitution_range=(1.0, 1.0)) if true_world else world


def from_config(config, student_cfg, workdir=None) -> TeacherData:
  """``student_cfg`` (a ``WanConfig``) fixes the text width and the latent channels."""
  d = config.data
  text_dim = student_cfg.text_dim
  if d.teacher not in KINDS:
    raise errors.UserError(f"config.data.teacher={d.teacher!r} is not one of {KINDS}.")
  if d.teacher == "synthetic":
    from afd_jax.teachers.synthetic import SyntheticTeacher
    pool = data_lib.PromptPool.random(d.num_prompts, d.text_length, text_dim, config.seed,
                                      num_eval=d.num_eval_prompts)
    shape = (d.num_frames, d.height, d.width, student_cfg.in_dim)
    return TeacherData(pool, SyntheticTeacher(shape, offset=d.teacher_offset), shape)

  if d.teacher == "store":
    from afd_jax.teachers.store import TeacherStore
    store = TeacherStore(d.store)
    store.check(latent_shape=(d.num_frames, d.height, d.width, student_cfg.in_dim),
                text_shape=(d.text_length, text_dim))
    pool = data_lib.PromptPool(store.embeddings, store.prompts, num_eval=d.num_eval_prompts)
    wan_vae = store.encoder_spec.get("name") == "wan_vae"
    encoder = store.encoder(**({"vae": d.vae} if wan_vae and d.vae else {}))
    reference = lambda ids, seed: np.stack([encoder.decode(x) for x in store.latents(ids, seed)])
    return TeacherData(pool, _StoreSource(store, config.seed), tuple(store.latent_shape), encoder,
                       reference)

  from afd_jax.teachers import physics
  encoder = encoders_lib.from_config(d)
  text = physics.TextEncoder(dim=text_dim, length=d.text_length)
  world = None
  if d.teacher == "physics":
    world = physics_world(config)
    teacher = physics.PhysicsTeacher(world)
    true_teacher = physics.PhysicsTeacher(physics_world(config, true_world=True))
    prompts = physics.sample_prompts(d.num_prompts + d.num_eval_prompts, seed=d.prompt_seed,
                                     max_balls=config.physics.max_balls,
                                     gravities=config.physics.gravity_words)
    video_shape = teacher.video_shape
  else:
    from afd_jax.teachers import online
    cache = Path(d.teacher_cache or Path(workdir or ".") / "teacher_cache")
    if d.teacher == "http":
      teacher = online.HTTPTeacher(d.teacher_url, cache, timeout=d.teacher_timeout_s)
    else:
      teacher = online.CallableTeacher(_import_callable(d.teacher_callable), cache)
    true_teacher = teacher
    prompts = _prompts_file(d.prompts)
    video_shape = tuple(np.asarray(teacher(prompts[:1], 0)).shape[1:])
  shape = _expect_latent_shape(config, encoder.latent_shape(video_shape))
  if shape[3] != student_cfg.in_dim:
    raise errors.UserError(f"the {d.encoder!r} encoder makes {shape[3]}-channel latents but the student "
                     f"takes in_dim={student_cfg.in_dim}; set model.overrides in_dim/out_dim.")
  if d.text_encoder == "umt5":   # Wan's contexts, embedded once per workdir
    from afd_jax import prompts as prompts_lib
    embeddings = prompts_lib.umt5_embeddings(
        prompts, Path(workdir or ".") / "text_embeddings", d.t5, d.tokenizer, d.text_length)
  else:
    embeddings = text(prompts)
  pool = data_lib.PromptPool(embeddings, prompts, num_eval=d.num_eval_prompts)
  source = data_lib.EncodedTeacher(teacher, prompts, encoder, d.teacher_samples, config.seed)
  reference = lambda ids, seed: np.asarray(true_teacher([prompts[i] for i in ids], seed))
  return TeacherData(pool, source, shape, encoder, reference, world,
                     None if d.text_encoder == "umt5" else text)


class _StoreSource:
  def __init__(self, store, seed: int):
    self.store, self.seed = store, seed

  def latents(self, prompt_ids, step, draw: int = 0):
    return self.store.latents(prompt_ids, seed=self.seed * 1_000_003 + step, draw=draw)


def _import_callable(spec: str):
  """``module:function`` imported, or one line naming what is missing."""
  module, _, name = spec.partition(":")
  try:
    fn = getattr(importlib.import_module(module), name)
  except ModuleNotFoundError as e:
    raise errors.UserError(f"config.data.teacher_callable={spec!r}: module {e.name!r} cannot be "
                           "imported; install it or put its folder on PYTHONPATH.") from e
  except AttributeError as e:
    raise errors.UserError(f"config.data.teacher_callable={spec!r}: module {module!r} has no "
                           f"{name!r}.") from e
  if not callable(fn):
    raise errors.UserError(f"config.data.teacher_callable={spec!r} is not callable.")
  return fn
