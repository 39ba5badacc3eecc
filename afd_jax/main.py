"""Entry point: ``python -m afd_jax.main --config=configs/tiny.py --workdir=DIR``.

Multi-host: one process per host, started by ``launch/`` (or by hand with
``--coordinator_address=HOST:PORT --num_processes=N --process_id=I``); see ``distributed.py``.

Modes (``config.mode``): ``train`` runs ``config.method`` (afd, sft, afd_frozen_disc, pretrain;
see ``afd_jax/train.py``), resuming from ``DIR/checkpoints`` when present; ``rollout`` samples
videos from the causal student (random or loaded from ``config.model.checkpoint``) for the
teacher's held-out prompts into ``DIR/samples`` with a ``DIR/rollout.json`` summary
(``sampling.py``); ``experiment`` trains ``config.method`` from a
base student and evaluates base, trained student and teacher on held-out prompts into
``DIR/report.json`` (``configs/demo.py``; see ``afd_jax/experiment.py``).
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
from absl import flags, logging
from ml_collections import config_flags

from afd_jax import console
from afd_jax import distributed
from afd_jax import errors
from afd_jax import experiment
from afd_jax import lock
from afd_jax import methods
from afd_jax import sampling
from afd_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Training/sampling config.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (on storage every host sees).",
                                required=True)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", "", "Multi-process runs: HOST:PORT of process 0 (auto-detected on "
    "Cloud TPU and SLURM).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Multi-process runs: process count.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "Multi-process runs: this process's index.")

MODES = ("train", "rollout", "experiment")


def log_environment():
  """Versions and devices, for ``--verbose`` runs."""
  import flax
  import jaxlib
  import optax
  import orbax.checkpoint as ocp
  logging.info("jax %s, jaxlib %s, flax %s, optax %s, orbax %s", jax.__version__,
               jaxlib.__version__, flax.__version__, optax.__version__,
               getattr(ocp, "__version__", "?"))
  logging.info("process %d/%d, devices: %s", jax.process_index(), jax.process_count(), jax.devices())


def main(argv):
  del argv
  config = _CONFIG.value
  if config.mode not in MODES:
    raise errors.UserError(f"config.mode={config.mode!r} is not one of {MODES}.")
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if jax.process_index() != 0:  # one voice: the other hosts log warnings and errors only
    logging.set_verbosity(logging.WARNING)
  workdir = Path(_WORKDIR.value)
  if workdir.exists() and not workdir.is_dir():
    raise errors.UserError(f"--workdir={workdir} is a file; give a folder (it is created if "
                           "missing).")
  if config.mode != "rollout":
    methods.validate(config)
  workdir.mkdir(parents=True, exist_ok=True)
  with lock.WorkdirLock(workdir):  # one run per workdir, refused before anything is built
    run(config, workdir)


def run(config, workdir: Path):
  if errors.verbose():
    log_environment()
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
  if errors.verbose():
    logging.info("config (also in %s):\n%s", workdir / "config.json", config)
  if config.mode == "rollout":
    sampling.run(config, workdir)
    return
  if config.mode == "experiment":
    experiment.run(config, workdir)
    return
  t0 = time.perf_counter()
  summary = train.run(config, workdir)
  if jax.process_index() == 0 and "steps" in summary and "nothing_to_do" not in summary:
    print(console.closing_summary(workdir, summary, time.perf_counter() - t0, config.train.export))


if __name__ == "__main__":
  errors.run(main)
