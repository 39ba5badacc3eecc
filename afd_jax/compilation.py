"""A persistent compilation cache for every entry point (the trainer, the tools, the demo): a
restart after preemption, or a second start of the same run, loads the programs it compiled
before instead of compiling them again (minutes at 1.3B). ``--compile_cache=DIR`` moves it,
``--compile_cache=`` turns it off; ``JAX_COMPILATION_CACHE_DIR``, when set, wins."""

from __future__ import annotations

import os
from pathlib import Path

import jax
from absl import flags


def default_dir() -> str:
  """``$XDG_CACHE_HOME/afd_jax/xla`` (``~/.cache/afd_jax/xla``)."""
  root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
  return str(Path(root) / "afd_jax" / "xla")


_CACHE = flags.DEFINE_string("compile_cache", default_dir(), "Persistent compilation cache "
                             "folder (empty: off).")


def enable(path: str | None = None) -> str | None:
  """Caches every compiled program under ``path`` (default: the flag), however short its
  compile. Returns the folder, or None when off."""
  path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or (_CACHE.value if path is None else path)
  if not path:
    return None
  Path(path).mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path
