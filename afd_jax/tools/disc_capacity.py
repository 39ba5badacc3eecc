"""Can the discriminator learn to read the prompt's physics when told directly, and how fast?

    python -m afd_jax.tools.disc_capacity --config=configs/demo.py --steps=800 \\
        --config.optim.disc.lr=3e-4 --out=runs/disc_capacity.json

A fresh discriminator, built exactly as the training run builds it (``--config``: trunk from the
base student, readouts, optimizer, noise augmentation), takes BT steps on teacher-only pairs:
under each training prompt, the teacher's video of that prompt above the teacher's video of the
prompt with another ``--word``, each other value as likely (``eval.disc_probe.other_words``;
same seed), so an unconditional preference fits about half of them. Every ``--eval_every``
steps it reports its accuracy on the window's training pairs (each scored before the update on
it, so on unseen pairs of training prompts) and runs the held-out probes of ``eval.disc_probe``.
Inside AFD the same cue must be found from teacher-versus-student pairs alone, so the steps this
needs are a lower bound on the AFD iterations that can teach it.

``--word=fall`` asks the plainer question, whether it can see the fall at all: the other video
is the same prompt's rendered with its gravity scaled by ``--fall_scale`` (the base student's
average error by default), of another launch as AFD's pairs are (``--same_launch``: the same
one), so the fall is the only systematic difference; the curve then also holds ``fall``, the
held-out prompts' accuracy on such pairs.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # configs/, run from anywhere

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from afd_jax import data as data_lib  # noqa: E402
from afd_jax import errors, evaluation, methods, train  # noqa: E402
from afd_jax import mesh as mesh_lib  # noqa: E402
from afd_jax.eval import disc_probe  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Training config (physics "
                                          "teacher, a method with a discriminator).")
_STEPS = flags.DEFINE_integer("steps", 800, "Discriminator steps.")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 50, "Probe every this many steps.")
_WORD = flags.DEFINE_enum("word", "gravity", ["gravity", "bounciness", "direction", "color",
                                              "fall"],
                          "The prompt word whose video the discriminator must rank below (fall: "
                          "the same prompt with its gravity scaled by --fall_scale).")
_FALL_SCALE = flags.DEFINE_float("fall_scale", 0.73, "--word=fall: the other video's gravity "
                                 "factor (default: the base student's average gravity ratio).")
_SAME_LAUNCH = flags.DEFINE_bool("same_launch", False, "--word=fall: the other video shares the "
                                 "right one's launch (otherwise another, as in AFD's pairs).")
_OUT = flags.DEFINE_string("out", "", "Write the probe curve here as JSON (optional).")


def run(config, steps: int, eval_every: int, word: str, fall_scale: float = 0.73,
        same_launch: bool = False) -> list[dict]:
  """``[{"step": s, "train_accuracy": a, **probes}]`` at step 0 and every ``eval_every`` steps;
  ``a``: the window's accuracy on its training pairs, each scored before its update."""
  config.mode = "train"
  with tempfile.TemporaryDirectory() as workdir:
    t = train.Trainer(config, workdir)
    if "disc" not in t.state or t.data.physics_world is None or t.data.embed is None:
      raise errors.UserError("disc_capacity needs the physics teacher with the tiny text encoder "
                             "and a method with a discriminator (e.g. --config=configs/demo.py).")
    world, rows = t.data.physics_world, methods.rollout_rows(t.config)
    sharding = mesh_lib.batch_sharding(t.mesh)
    train_prompts = t.pool.prompts[:t.pool.num_train]
    held_out = [t.pool.prompts[i] for i in t.evaluator.eval_ids()]
    rng = np.random.default_rng(config.seed)
    fallen = dataclasses.replace(world, gravity_range=(fall_scale, fall_scale))
    other_seed = (lambda seed: seed) if same_launch else (lambda seed: seed + 100_003)

    def probes() -> dict:
      out = disc_probe.probe(t.disc_logits, held_out, world, evaluation.SEED)
      if word == "fall":
        seed = evaluation.SEED
        right = t.disc_logits([world.render(p, seed) for p in held_out], held_out)
        wrong = t.disc_logits([fallen.render(p, other_seed(seed)) for p in held_out], held_out)
        out["fall"] = disc_probe.preference(right, wrong)
      return out

    curve = [{"step": 0, **probes()}]
    fitted = []   # pre-update accuracy on this window's training pairs
    with jax.set_mesh(t.mesh):
      for step in range(1, steps + 1):
        prompts = [train_prompts[i] for i in rng.choice(len(train_prompts), rows, replace=False)]
        right = [t.data.encoder.encode(world.render(p, step)) for p in prompts]
        if word == "fall":
          wrong = [t.data.encoder.encode(fallen.render(p, other_seed(step))) for p in prompts]
        else:
          others = [str(rng.choice(disc_probe.other_words(p, word))) for p in prompts]
          wrong = [t.data.encoder.encode(world.render(p, step)) for p in others]
        x_right, x_wrong, context = (jax.make_array_from_process_local_data(
            sharding, data_lib.host_slice(np.stack(a))) for a in (right, wrong,
                                                                  t.data.embed(prompts)))
        disc = t.state["disc"]
        params, opt, out = t.fns.disc(disc["params"], disc["opt"], x_right, x_wrong, context,
                                      jax.random.key(step), t.frozen["disc"])
        t.state["disc"] = {"params": params, "opt": opt}
        fitted.append(float(out["metrics"]["disc/accuracy"]))
        if step % eval_every == 0 or step == steps:
          curve.append({"step": step, "train_accuracy": float(np.mean(fitted)), **probes()})
          fitted = []
          print(f"step {step}: " + ", ".join(f"{k} {v:.2f}" for k, v in curve[-1].items()
                                             if k != "step"), flush=True)
  return curve


def main(argv):
  del argv
  curve = run(_CONFIG.value, _STEPS.value, _EVAL_EVERY.value, _WORD.value, _FALL_SCALE.value,
              _SAME_LAUNCH.value)
  if _OUT.value:
    Path(_OUT.value).parent.mkdir(parents=True, exist_ok=True)
    Path(_OUT.value).write_text(json.dumps(curve, indent=1) + "\n")


if __name__ == "__main__":
  errors.run(main)
