"""Makes the physics demo's base student, the way the paper's students were made, in one command:

    python -m afd_jax.tools.physics_base --workdir=runs/physics_base \\
        --out=afd_jax/assets/physics_base

1. ``configs/demo.py:base``: a causal flow-matching model pretrained on a world whose gravity and
   bounciness are randomly wrong (the stand-in for Wan2.1: a good renderer with imperfect
   physics), sampled with many deterministic steps;
2. ``configs/demo.py:distill``: Self-Forcing's recipe, distribution matching distillation (DMD)
   of that model into a few-step causal student with the re-noising KV-cache sampler (the
   stand-in for Self-Forcing / Causal-Forcing: sharp in four steps, wrong in motion).

Both stages generate frame by frame (``rollout.chunk_frames=1``), as the frame-wise Self-Forcing
student does: 42 + 11 minutes on 2 cores. Rerun on 2026-12-07, it rebuilt the shipped checkpoint
bit for bit.

The DMD student is what AFD and the baselines start from. Each stage trains in its own folder
under ``--workdir`` (checkpointed; run the command again to resume) and exports its EMA
network; a stage whose export exists is skipped.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from absl import flags, logging

from afd_jax import errors
from afd_jax import train

_WORKDIR = flags.DEFINE_string("workdir", "runs/physics_base", "Where both stages train.")
_OUT = flags.DEFINE_string("out", "afd_jax/assets/physics_base", "The distilled student.")


def stages(workdir: Path, out: Path):
  """``[(name, config)]`` of the two stages, the second reading the first's export."""
  sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
  from configs import demo
  flow_matching = demo.get_config("base")
  flow_matching.train.export = str(workdir / "flow_matching_export")
  distill = demo.get_config("distill")
  distill.model.checkpoint = flow_matching.train.export
  distill.train.export = str(out)
  return [("flow_matching", flow_matching), ("distill", distill)]


def main(argv):
  del argv
  workdir, out = Path(_WORKDIR.value), Path(_OUT.value)
  for name, config in stages(workdir, out):
    if Path(config.train.export).exists():
      logging.warning("%s: %s exists, skipping the stage.", name, config.train.export)
      continue
    t0 = time.perf_counter()
    summary = train.run(config, workdir / name)
    if "stopped_at" in summary:  # SIGTERM: the same command resumes this stage
      return
    logging.warning("%s: %d steps in %.0f min, held-out physics_error %.3f, exported to %s", name,
                    summary["steps"], (time.perf_counter() - t0) / 60,
                    summary.get("eval/physics_error", float("nan")), config.train.export)


if __name__ == "__main__":
  errors.run(main)
