"""User errors: what afd_jax refuses on purpose, printed by every command as one line.

A ``UserError`` names the problem and the fix (a config value, a file, a flag, a workdir held by
another run). ``run`` is ``absl.app.run`` for our entry points: it prints a ``UserError`` as one
``afd_jax: ...`` line on stderr and exits with status 2; ``--verbose`` (or ``AFD_JAX_VERBOSE=1``)
shows its traceback. Any other exception is an internal error and keeps its traceback. It also
turns on the persistent compilation cache (``compilation.py``) and, unless ``--verbose``, holds
back libraries' INFO lines (``console.py``) before the command runs.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from afd_jax import compilation
from afd_jax import console

VERBOSE_ENV = "AFD_JAX_VERBOSE"
EXIT_CODE = 2

_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the traceback of user errors too "
                             f"(or set {VERBOSE_ENV}=1).")


class UserError(ValueError):
  """Bad input or state the user must fix; the message says how."""


class MissingInput(UserError, FileNotFoundError):
  """A file or folder the config or a flag names does not exist."""


def verbose() -> bool:
  return _VERBOSE.value or os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def run(main):
  """``app.run(main)``, with user errors (and absl usage errors) as one line and exit code 2."""
  def guarded(argv):
    try:
      console.quiet_libraries(verbose())
      compilation.enable()
      return main(argv)
    except (UserError, app.UsageError) as e:
      if verbose():
        raise
      print(f"afd_jax: {e}", file=sys.stderr, flush=True)
      sys.exit(EXIT_CODE)
  app.run(guarded)
