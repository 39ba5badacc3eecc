"""What a trained discriminator ranks one prompt's rollouts by, noise level by noise level.

    python -m afd_jax.tools.disc_ranking --config=configs/demo.py --workdir=runs/demo/afd \\
        [--student=base] [--rollouts=8] [--levels=0,0.3,0.5,0.7] [--out=ranking.json]

With K rollouts per prompt AFD's advantage is centred per prompt, so all it can use is how the
discriminator orders a prompt's own rollouts. This tool loads a run's last checkpoint
(``--workdir``: the method's folder; ``--config`` and its flags: the run's), rolls out
``--rollouts`` videos of each held-out prompt from the base (``--student=base``) or the run's EMA
student (``trained``), and scores them with the run's discriminator two ways: as training scores
them (each rollout its own noise level in U[tau_min, tau_max] and its own noise draw, or one of each
per prompt with ``afd.group_pairs=shared``, and its own RGB gains with ``afd.disc_color_jitter``;
averaged over ``--repeats`` draws), and at each fixed level of ``--levels`` with one draw per prompt
(``afd.score_tau``). For each way it prints the Spearman correlation, over every rollout with scores
and values centred per prompt (the ``diag/spearman_*`` of training), of the score with each negated
physics term, the negated speed gap and the negated brightness: positive where the discriminator
prefers the rollouts with better physics, a pace nearer the teacher's, or darker frames.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # configs/, run from anywhere

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from afd_jax import checkpoint as ckpt_lib  # noqa: E402
from afd_jax import errors, evaluation, flow, methods, steps, train  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "The run's config (physics "
                                          "teacher, a method with a discriminator).")
_WORKDIR = flags.DEFINE_string("workdir", None, "The trained run's method folder (its "
                               "checkpoints/), e.g. runs/demo/afd.", required=True)
_STUDENT = flags.DEFINE_enum("student", "base", ["base", "trained"], "Whose rollouts to rank: "
                             "the base student's or the run's EMA student's.")
_ROLLOUTS = flags.DEFINE_integer("rollouts", 8, "Rollouts of each held-out prompt.")
_LEVELS = flags.DEFINE_list("levels", ["0", "0.3", "0.5", "0.7"], "Fixed noise levels to score at.")
_REPEATS = flags.DEFINE_integer("repeats", 4, "Draws of the training path's noise to average.")
_OUT = flags.DEFINE_string("out", "", "Write the correlations here as JSON (optional).")
SHOWN = ("physics_error", "accel_error", "accel_x_error", "speed_gap", "brightness")


def run(config, workdir, student: str = "base", rollouts: int = 8,
        levels=(0.0, 0.3, 0.5, 0.7), repeats: int = 4) -> dict[str, dict[str, float]]:
  """``{way: {"diag/spearman_<value>": rho}}`` for ``training`` and ``tau=<level>``."""
  if config.method not in methods.WITH_DISC or config.data.teacher != "physics":
    raise errors.UserError(f"disc_ranking needs the physics teacher and a method with a "
                           f"discriminator {methods.WITH_DISC}, got method={config.method!r}, "
                           f"teacher={config.data.teacher!r}.")
  if rollouts < 2 or repeats < 1 or not all(0.0 <= t < 1.0 for t in levels):
    raise errors.UserError(f"--rollouts ({rollouts}) must be >= 2, --repeats ({repeats}) >= 1 "
                           f"and every level in [0, 1) ({list(levels)}).")
  if not ckpt_lib.has_checkpoints(Path(workdir) / "checkpoints"):
    raise errors.UserError(f"no checkpoint in {Path(workdir) / 'checkpoints'}: point --workdir at "
                           "a trained run's method folder (e.g. runs/demo/afd) and pass its config.")
  t = train.Trainer(config, workdir)
  if not t.restore():
    raise errors.UserError(f"no checkpoint in {Path(workdir) / 'checkpoints'} could be restored "
                           "(each was damaged and moved aside); train the run again.")
  params = t.initial_student() if student == "base" else t.state["student"]["ema"]
  ids = t.evaluator.eval_ids()
  x = np.stack([t.evaluator.sample(params, ids, evaluation.SEED + 101 * k)
                for k in range(rollouts)], 1)                       # [prompts, K, F, h, w, C]
  rows = np.repeat(ids, rollouts)                                   # prompt-major, as training
  values = t.rollout_physics(x.reshape(-1, *x.shape[2:]), rows)
  values["brightness"] = np.array([t.data.encoder.decode(v).mean()
                                   for v in x.reshape(-1, *x.shape[2:])])
  values = {k: train.centred_per_prompt(v, rollouts) for k, v in values.items()}
  disc = steps.merged(t.nets.disc_graph, t.nets.lora["disc"], t.frozen["disc"],
                      t.state["disc"]["params"])
  logits = jax.jit(lambda v, tau, c: disc(v, tau * flow.NUM_TRAIN_TIMESTEPS, c))
  contexts = np.asarray(t.pool.embeddings[ids])
  rng = np.random.default_rng(config.seed)

  def scores(tau, eps, gains=None):
    """Logits ``[prompts * K]`` of each prompt's rollouts at levels ``tau [prompts, K]``, noise
    ``eps`` (broadcast to ``[prompts, K, ...]``), RGB ``gains [prompts, K, 3]`` (or none); a
    per-chunk discriminator's last chunk."""
    out = []
    for p in range(len(ids)):
      s = jnp.asarray(tau[p], jnp.float32)
      video = jnp.asarray(x[p]) if gains is None else steps.apply_gains(
          jnp.asarray(x[p]), jnp.asarray(gains[p], x.dtype))
      noisy = flow.add_noise(video, jnp.asarray(np.broadcast_to(eps[p], x[p].shape), x.dtype), s)
      z = logits(noisy, s, jnp.asarray(np.repeat(contexts[p:p + 1], rollouts, 0)))
      out.append(np.asarray(z[:, -1] if z.ndim == 2 else z))
    return train.centred_per_prompt(np.concatenate(out), rollouts)

  a = config.afd
  draws = 1 if a.group_pairs == "shared" else rollouts   # noise draws per prompt, as training

  def as_training():
    tau = rng.uniform(a.disc_tau_min, a.disc_tau_max, (len(ids), draws))
    eps = rng.standard_normal((len(ids), draws, *x.shape[2:])).astype(x.dtype)
    gains = None
    if a.disc_color_jitter:   # the student side of training's own draw
      key = jax.random.key(rng.integers(2**31))
      gains = np.asarray(steps.color_gains(key, x.shape[0] * rollouts, a.disc_color_jitter))
      gains = gains[:, 1].reshape(*x.shape[:2], 3)
    return scores(np.repeat(tau, rollouts // draws, 1), eps, gains)

  training = [train.rank_correlations(as_training(), values) for _ in range(repeats)]
  result = {"training": {k: float(np.mean([r[k] for r in training])) for k in training[0]}}
  for level in levels:
    eps = rng.standard_normal((len(ids), 1, *x.shape[2:])).astype(x.dtype)   # one per prompt
    result[f"tau={level:g}"] = train.rank_correlations(
        scores(np.full((len(ids), rollouts), level), eps), values)
  return result


def main(argv):
  del argv
  config = _CONFIG.value
  result = run(config, _WORKDIR.value, _STUDENT.value, _ROLLOUTS.value,
               tuple(float(v) for v in _LEVELS.value), _REPEATS.value)
  print(f"{_STUDENT.value} student's rollouts, {_ROLLOUTS.value} of each held-out prompt: "
        "Spearman of the score with the negated value, within prompts")
  print(f"{'scored':10s}" + "".join(f"{k:>15s}" for k in SHOWN))
  for way, rhos in result.items():
    print(f"{way:10s}" + "".join(f"{rhos[f'diag/spearman_{k}']:+15.3f}" for k in SHOWN))
  if _OUT.value:
    Path(_OUT.value).parent.mkdir(parents=True, exist_ok=True)
    Path(_OUT.value).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
  errors.run(main)
