"""Command-line tools; what more than one of them needs lives here."""

from __future__ import annotations

from pathlib import Path

from afd_jax import errors


def checkpoint_path(flag: str, config) -> str:
  """The Wan checkpoint a tool reads: its ``--checkpoint`` flag, else ``config.model.checkpoint``;
  refused in one line when neither names an existing checkpoint."""
  path = flag or config.model.checkpoint
  if not path or not Path(path).exists():
    raise errors.MissingInput(f"checkpoint {path!r} does not exist; pass --checkpoint=PATH (a "
                              "Wan checkpoint, e.g. afd_jax/assets/physics_base).")
  return path
