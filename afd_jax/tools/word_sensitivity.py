"""Which prompt words does a Wan checkpoint read? Its outputs with one physics word changed.

    python -m afd_jax.tools.word_sensitivity --checkpoint=afd_jax/assets/physics_base

On the physics teacher's videos of ``--prompts`` grammar prompts (the demo's world and text
encoder, ``--config``), noised to each level in ``--timesteps``, it runs the model (block-causal,
as the student samples) under each prompt and under the prompt with one word changed
(``eval.disc_probe.other_words``: every other gravity, bounciness and direction, two other
colours), and reports the relative change ``|v' - v| / |v|`` of the predicted velocity, and of
the last block's features on the clean video (what a discriminator trunk starts from):
``afd_jax.eval.word_sensitivity.measure``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # configs/, run from anywhere

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from afd_jax import errors, tools  # noqa: E402
from afd_jax.eval.word_sensitivity import measure  # noqa: E402
from afd_jax.models import wan  # noqa: E402
from afd_jax.teachers import physics  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "The physics world, "
                                          "encoder and text encoder the checkpoint was made for.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "", "A Wan checkpoint (default: the config's "
                                  "model.checkpoint).")
_PROMPTS = flags.DEFINE_integer("prompts", 48, "Grammar prompts measured.")
_TIMESTEPS = flags.DEFINE_list("timesteps", ["1000", "750", "500", "250"], "Noise levels.")
_OUT = flags.DEFINE_string("out", "", "Write the table here as JSON (optional).")


def main(argv):
  del argv
  config = _CONFIG.value
  path = tools.checkpoint_path(_CHECKPOINT.value, config)
  if config.data.teacher != "physics" or config.data.text_encoder != "tiny":
    raise errors.UserError("word_sensitivity changes physics-grammar words: it needs a config "
                           "with data.teacher='physics' and the tiny text encoder (e.g. "
                           "configs/demo.py).")
  model = wan.from_pretrained(path)
  prompts = physics.sample_prompts(_PROMPTS.value, seed=config.seed + 1,
                                   max_balls=config.physics.max_balls)
  table = measure(model, config, prompts, [float(t) for t in _TIMESTEPS.value])
  columns = list(next(iter(table.values())))
  print(f"{'word':12s}" + "".join(f"{c:>10s}" for c in columns))
  for word, row in table.items():
    print(f"{word:12s}" + "".join(f"{row[c]:10.4f}" for c in columns))
  if _OUT.value:
    Path(_OUT.value).parent.mkdir(parents=True, exist_ok=True)
    Path(_OUT.value).write_text(json.dumps(table, indent=1) + "\n")


if __name__ == "__main__":
  errors.run(main)
