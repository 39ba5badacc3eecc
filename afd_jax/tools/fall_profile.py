"""Does a student's ball fall inside its chunks, or only between them? Its motion chunk by chunk.

    python -m afd_jax.tools.fall_profile --checkpoint=CKPT --config.rollout.chunk_frames=3

(a chunk-wise student: the shipped demo base generates frame by frame, where there is no inside
of a chunk to read).

Prints, per chunk, the mean and spread of the ball's vertical second difference and velocity
inside each chunk and its drop at each chunk start, over ``--rollouts`` rollouts of each of
``--batches`` batches of the config's training prompts, beside the teacher's (on its parabolas:
``g`` px / frame**2, a velocity growing by ``chunk_frames * g`` per chunk, no drop), and how the
chunks of one rollout correlate (``afd_jax.eval.fall_profile``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # configs/, run from anywhere

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from afd_jax import errors, tools  # noqa: E402
from afd_jax.eval.fall_profile import profile as fall_profile  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "The physics world, "
                                          "sampler and text encoder the checkpoint was made for.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "", "A Wan checkpoint (default: the config's "
                                  "model.checkpoint).")
_ROLLOUTS = flags.DEFINE_integer("rollouts", 8, "Rollouts per prompt.")
_BATCHES = flags.DEFINE_integer("batches", 4, "Batches of config.data.batch_size prompts.")
_MARGIN = flags.DEFINE_float("margin_px", 4.0, "Readings this close to the floor or ceiling are "
                             "left out.")
_OUT = flags.DEFINE_string("out", "", "Write the profile here as JSON (optional).")


def main(argv):
  del argv
  config = _CONFIG.value
  config.model.checkpoint = tools.checkpoint_path(_CHECKPOINT.value, config)
  profile = fall_profile(config, _ROLLOUTS.value, _BATCHES.value, _MARGIN.value)
  print(f"{'per chunk (px, frames)':28s}{'mean':>24s}{'std':>24s}{'robust std':>24s}")
  for quantity in profile["student"]:
    for who in ("student", "teacher"):
      row = profile[who][quantity]
      cells = ["/".join(f"{v:.2f}" for v in row[k]) for k in ("mean", "std", "robust_std")]
      print(f"{quantity + ', ' + who:28s}" + "".join(f"{c:>24s}" for c in cells))
  print("student kink, chunk-to-chunk correlation: " + ", ".join(
      f"{k}: {v['r']:.2f} ({v['rollouts']})" for k, v in profile["student_kink_correlation"].items()))
  if _OUT.value:
    Path(_OUT.value).parent.mkdir(parents=True, exist_ok=True)
    Path(_OUT.value).write_text(json.dumps(profile, indent=1) + "\n")


if __name__ == "__main__":
  errors.run(main)
