"""The miniature of the paper's table: every method from the same base student, same teacher budget.

    python -m afd_jax.tools.physics_table --workdir=runs/physics_table --seeds=0,1,2,3,4 \\
        --out=docs/results/physics.md

For each seed, from the shipped base student (``configs/demo.py``), every system of
``DEFAULT_ROWS`` trains for the demo's iterations on the same prompts, so each sees the same
teacher videos (``data.teacher_samples`` per prompt): the paper's baselines (SFT, GAN), AFD with
the demo's K rollouts per prompt and with one, the oracle bound (the evaluator's own physics
score in place of the discriminator), a frozen discriminator, positive-only updates, the
discriminator learning-rate sweep and the unpaired GAN discriminator loss (a per-chunk
discriminator on request). DMD needs the teacher's score function, which a black-box teacher
does not give, so it is not a row. Every system, the base student and the teacher's own second
sample set included, is scored on the held-out prompts by ``afd_jax.eval``.

The page gets mean +- std over seeds per metric, the paired gain over the base (per seed, same
evaluation noise) with its spread, what the discriminators rewarded (rank correlations of their
advantage with the rollouts' physics score, from ``metrics.jsonl``), bar plots, the checks of the
paper's claims, and this command. Finished runs are skipped, so an interrupted table resumes
where it stopped.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
from absl import flags, logging

from afd_jax import errors
from afd_jax import experiment
from afd_jax import methods

DISC_LR = {"0": 0.0, "low": 3e-6, "high": 3e-4}   # around the demo's 3e-5

# name -> (method, config overrides, what it is). Every row but the first three is the demo's AFD
# (K rollouts of each prompt) with one change; an ``afd.group_size`` override keeps the demo's
# rollouts per iteration (and so its evaluation noise) with more, or fewer, prompts.
SYSTEMS = {
    "sft": ("sft", {"afd.group_size": 1}, "flow matching on the teacher's videos (off-policy)"),
    "gan": ("gan", {"afd.group_size": 1}, "direct adversarial imitation through the exit step"),
    "afd_k1": ("afd", {"afd.group_size": 1}, "AFD, one rollout of each prompt"),
    "afd": ("afd", {}, "AFD, the demo's recipe: K rollouts of each prompt"),
    "afd_oracle": ("afd_oracle", {}, "NFT driven by the evaluator's physics score (upper bound)"),
    "afd_frozen_disc": ("afd_frozen_disc", {}, "discriminator frozen after its warm-up"),
    "afd_positive_only": ("afd", {"afd.nft_branches": "positive"},
                          "reward-weighted flow matching, no negative branch"),
    **{f"afd_disc_lr_{k}": ("afd", {"optim.disc.lr": v}, f"discriminator lr {v:g}")
       for k, v in DISC_LR.items()},
    "afd_unpaired_loss": ("afd", {"disc.loss": "gan"}, "plain unpaired GAN discriminator loss"),
    "afd_per_chunk": ("afd", {"disc.per_chunk": True},
                      "one discriminator logit and advantage per chunk prefix"),
}
# What the table runs unless ``--only`` says otherwise: issue 13's rows. The per-chunk
# discriminator (the paper's section 6.6 ablation) runs on request.
DEFAULT_ROWS = tuple(name for name in SYSTEMS if name != "afd_per_chunk")
BASELINES = ("sft", "gan")
HEADLINE = ("physics_error", "accel_error", "bounce_error", "frechet_distance", "dynamic_degree",
            "speed_ratio", "sharpness_ratio", "visibility")
GAINS = ("physics_error", "accel_error", "gravity_ratio", "gravity_ratio_in_chunks", "fall_jitter",
         "accel_x_error", "bounce_error", "penetration", "chunk_jump", "frechet_distance",
         "dynamic_degree", "speed_ratio")
DIAGNOSTICS = ("diag/spearman_physics_error", "diag/spearman_accel_error",
               "diag/spearman_accel_x_error", "diag/spearman_bounce_error",
               "diag/spearman_speed_gap", "disc/accuracy", "r/saturated_frac",
               "probe/gravity_word", "probe/color_word", "probe/half_gravity", "probe/dimmed")


def config(seed: int, name: str, steps: int):
  sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
  from configs import demo
  c = demo.get_config()
  method, overrides, _ = SYSTEMS[name]
  c.seed, c.method, c.experiment.name = seed, method, name
  c.experiment.systems = ("teacher", "base", name)
  if steps:
    c.train.num_steps = steps
  if "afd.group_size" in overrides:  # as many rollouts (and evaluation noise) as the demo's
    rows = methods.rollout_rows(c)
    overrides = dict(overrides, **{"data.batch_size": rows // overrides["afd.group_size"]})
  for key, value in overrides.items():
    node, *path = c, *key.split(".")
    for part in path[:-1]:
      node = node[part]
    node[path[-1]] = value
  return c


def run_all(workdir: Path, seeds, names, steps) -> tuple[dict, dict, float]:
  """``({system: {metric: [value per seed]}}, {system: {diagnostic: [mean per seed]}},
  seconds)``; ``seconds`` sums each run's own wall time (kept beside its report), so a table
  finished over several invocations reports the time of all its runs."""
  results, diagnostics, seconds = {}, {}, 0.0
  for seed in seeds:
    for i, name in enumerate(names):
      out = workdir / f"seed_{seed}" / name
      timing = out / "run_seconds.txt"
      if not (out / "report.json").exists():
        t0 = time.perf_counter()
        c = config(seed, name, steps)
        if i:  # teacher and base are the same for every system of a seed: score them once
          c.experiment.systems = (name,)
        experiment.run(c, out)
        elapsed = time.perf_counter() - t0
        timing.write_text(f"{elapsed:.1f}\n")
        logging.warning("seed %d %s: %.1fs", seed, name, elapsed)
      if not timing.exists():
        raise errors.UserError(f"{out} has a report but no run_seconds.txt; write its training "
                               "time there (seconds) or delete the run to redo it.")
      seconds += float(timing.read_text())
      for system, metrics in json.loads((out / "report.json").read_text()).items():
        for k, v in metrics.items():
          results.setdefault(system, {}).setdefault(k, []).append(v)
      records = [json.loads(line) for line in
                 (out / SYSTEMS[name][0] / "metrics.jsonl").read_text().splitlines()]
      for key in DIAGNOSTICS:
        values = [r[key] for r in records if key in r and np.isfinite(r[key])]
        if values:
          diagnostics.setdefault(name, {}).setdefault(key, []).append(float(np.mean(values)))
  return results, diagnostics, seconds


def _fmt(values, digits: int = 3) -> str:
  return f"{np.mean(values):.{digits}g} ± {np.std(values):.2g}"


def _paired(results, name: str, metric: str) -> np.ndarray:
  """Per-seed gain of ``name`` over the base (positive: better), same evaluation noise."""
  from afd_jax.eval.report import BETTER
  base, own = np.asarray(results["base"][metric]), np.asarray(results[name][metric])
  if BETTER.get(metric) == "one":   # a ratio to the teacher's: closer to 1 is better
    return np.abs(base - 1.0) - np.abs(own - 1.0)
  sign = -1.0 if BETTER.get(metric) == "lower" else 1.0
  return sign * (own - base)


def _plot(results, metric: str, path: Path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from afd_jax.eval.report import BETTER
  names = [s for s in ("teacher", "base", *SYSTEMS) if s in results and metric in results[s]]
  mean = [np.mean(results[s][metric]) for s in names]
  std = [np.std(results[s][metric]) for s in names]
  colours = ["0.6", "0.8"] + ["C3" if s in BASELINES else "C2" if s == "afd_oracle" else "C0"
                              for s in names[2:]]
  fig, ax = plt.subplots(figsize=(9, 3.4))
  ax.bar(names, mean, yerr=std, capsize=3, color=colours)
  if "base" in names and BETTER.get(metric) == "lower":  # a collapsed system must not hide the rest
    limit = 3 * mean[names.index("base")]
    for i, m in enumerate(mean):
      if m > limit:
        ax.text(i, 0.95 * limit, f"{m:.3g}", ha="center", va="top", color="white")
    ax.set_ylim(0, min(ax.get_ylim()[1], limit))
  ax.set_ylabel(f"{metric} ({BETTER.get(metric, '')} is better)")
  ax.tick_params(axis="x", labelrotation=35)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def claims(results) -> list[str]:
  """The issue's and the paper's claims, checked on these numbers."""
  out = []
  base, teacher = np.mean(results["base"]["physics_error"]), np.mean(
      results["teacher"]["physics_error"])
  afd = np.mean(results["afd"]["physics_error"])
  closed = (base - afd) / max(base - teacher, 1e-9)
  out.append(f"AFD closes {closed:.0%} of the base -> teacher `physics_error` gap "
             f"({base:.3f} -> {afd:.3f}, teacher {teacher:.3f}): "
             f"{'at least half' if closed >= 0.5 else 'less than half'}.")
  gain = _paired(results, "afd", "accel_error")
  out.append(f"AFD's gravity (`accel_error`) gain over the base: {gain.mean():.3f} ± "
             f"{gain.std():.3f} (paired, over seeds): "
             f"{'more' if gain.mean() > 2 * gain.std() else 'NOT more'} than twice its spread.")
  fd = _paired(results, "afd", "frechet_distance")
  out.append(f"AFD's Fréchet distance vs the base: {-fd.mean():+.4f} ± {fd.std():.4f} "
             f"({'not worse' if fd.mean() >= 0 else 'worse'} on average).")
  for other in BASELINES:
    diff = (np.asarray(results[other]["physics_error"])
            - np.asarray(results["afd"]["physics_error"]))
    out.append(f"AFD vs {other.upper()} on `physics_error` (paired, {other} minus AFD): "
               f"{diff.mean():.3f} ± {diff.std():.3f}: AFD "
               f"{'beats it by more than the spread' if diff.mean() > diff.std() else 'does not beat it by more than the spread'}.")
  return out


def world_sentence(gravity_words, chunk_frames: int) -> str:
  """What the prompts ask of gravity and how the student rolls out, for the page's opening."""
  words = list(gravity_words)
  rollout = ("The student generates frame by frame (`rollout.chunk_frames=1`). " if chunk_frames == 1
             else f"The student generates chunks of {chunk_frames} latent frames. ")
  if len(words) == 1:
    return (f"Gravity is a law of this world: every prompt says \"{words[0]} gravity\" "
            f"(`physics.gravity_words`). {rollout}")
  return f"Prompts ask for {', '.join(words)} gravity (`physics.gravity_words`). {rollout}"


def write_page(results, diagnostics, seeds, steps, seconds: float, out: Path, command: str,
               world: str = ""):
  from afd_jax.eval.report import BETTER
  names = [s for s in ("teacher", "base", *SYSTEMS) if s in results]
  metrics = [k for k in BETTER   # measured somewhere (gravity_slope needs two gravity words)
             if any(np.isfinite(results[s].get(k, [np.nan])).any() for s in names)]
  head = [k for k in HEADLINE if k in metrics]
  table = lambda keys: [f"| system | {' | '.join(keys)} |", "|---" * (len(keys) + 1) + "|"] + [
      f"| {s} | {' | '.join(_fmt(results[s][k]) if k in results[s] else '-' for k in keys)} |"
      for s in names]
  trained = [s for s in names if s in SYSTEMS]
  gain_keys = [k for k in GAINS if k in metrics]   # frame-wise students have no in-chunk readings
  gains = [f"| system | {' | '.join(gain_keys)} |", "|---" * (len(gain_keys) + 1) + "|"] + [
      f"| {s} | {' | '.join(_fmt(_paired(results, s, k)) for k in gain_keys)} |" for s in trained]
  diag = [f"| system | {' | '.join(DIAGNOSTICS)} |", "|---" * (len(DIAGNOSTICS) + 1) + "|"] + [
      f"| {s} | {' | '.join(_fmt(diagnostics[s][k]) if k in diagnostics.get(s, {}) else '-' for k in DIAGNOSTICS)} |"
      for s in trained if s in diagnostics]
  for metric in ("physics_error", "accel_error", "frechet_distance", "dynamic_degree"):
    _plot(results, metric, out.parent / f"physics_{metric}.png")
  page = [
      "# The physics table: AFD in miniature",
      "",
      "Every system starts from the same base student (`configs/demo.py`: a few-step causal "
      "student distilled, as Self-Forcing is, from a flow-matching model of a world whose gravity "
      "and bounciness are randomly wrong) and is trained against the physics teacher for the "
      "same number of iterations on the same prompts, so each method sees the same teacher "
      f"videos. {world}Scores are on held-out prompts, measured without any discriminator "
      f"(`afd_jax/eval`); mean ± std over seeds {', '.join(map(str, seeds))}; for `teacher` and "
      "`base` the spread comes from each seed's evaluation noise and teacher samples.",
      "",
      "```bash",
      command,
      "```",
      "",
      f"{steps} iterations per method; {len(seeds) * len(trained)} training runs, "
      f"{seconds / 60:.0f} minutes of their wall time on this machine ({jax.device_count()} "
      f"{jax.default_backend()} device(s)). DMD, the paper's third baseline, is not a row: it "
      "needs the teacher's score function, which a black-box teacher does not give.",
      "",
      "Systems: " + "; ".join(f"`{s}`: {SYSTEMS[s][2]}" for s in trained) + "."
      + (f" Not run for this page (`--only`): {', '.join(f'`{s}`' for s in SYSTEMS if s not in trained)}."
         if len(trained) < len(SYSTEMS) else ""),
      "",
      "## Headline",
      "",
      *table(head),
      "",
      "## The paper's claims, checked",
      "",
      *[f"- {line}" for line in claims(results)],
      "",
      "## Paired gain over the base (positive: better), mean ± std over seeds",
      "",
      *gains,
      "",
      "## What the discriminators rewarded",
      "",
      "Per logged step, the Spearman rank correlation between each rollout's advantage (GAN: its "
      "paired score) and its negated physics error, three of its parts and the negated speed "
      "gap (`|speed / teacher's speed - 1|`, the teacher's for the same prompt), averaged over "
      "the run, then mean ± std over seeds (positive: the advantage favours the rollouts closer "
      "to the teacher); the discriminator's accuracy and the fraction of saturated r. The "
      "oracle's correlation with `physics_error` is 1 by construction.",
      "",
      *diag,
      "",
      "![physics_error](physics_physics_error.png) ![accel_error](physics_accel_error.png)",
      "![frechet_distance](physics_frechet_distance.png) "
      "![dynamic_degree](physics_dynamic_degree.png)",
      "",
      "## Every metric",
      "",
      *table(metrics),
      "",
  ]
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text("\n".join(page))


def define_flags():
  """The command's flags, defined only when it runs as a program, so that tests can import this
  module beside other tools that define flags of the same names."""
  flags.DEFINE_string("workdir", "runs/physics_table", "Where the runs go.")
  flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Seeds (at least 5).")
  flags.DEFINE_integer("steps", 0, "Iterations per method (0: the demo's).")
  flags.DEFINE_string("out", "docs/results/physics.md", "The results page to write.")
  flags.DEFINE_list("only", [], "Run only these systems (default: every system but "
                    "afd_per_chunk; the page, which needs afd, sft and gan, names the rows left "
                    "out).")


def main(argv):
  del argv
  f = flags.FLAGS
  jax.config.update("jax_compilation_cache_dir", str(Path(f.workdir).absolute() / "jit_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  seeds = [int(s) for s in f.seeds]
  names = f.only or list(DEFAULT_ROWS)
  unknown = sorted(set(names) - set(SYSTEMS))
  if unknown:
    raise errors.UserError(f"--only names unknown systems {unknown}; known: {list(SYSTEMS)}.")
  results, diagnostics, seconds = run_all(Path(f.workdir), seeds, names, f.steps)
  demo = config(seeds[0], "afd", 0)
  steps = f.steps or demo.train.num_steps
  command = "python -m afd_jax.tools.physics_table " + " ".join(sys.argv[1:])
  if len(seeds) < 5 or not {"afd", *BASELINES} <= set(names):
    print(json.dumps({s: {k: float(np.mean(v)) for k, v in m.items()} for s, m in results.items()},
                     indent=1))
    logging.warning("not writing %s: the page needs at least 5 seeds and the systems afd, sft "
                    "and gan.", f.out)
    return
  write_page(results, diagnostics, seeds, steps, seconds, Path(f.out), command,
             world_sentence(demo.physics.gravity_words, demo.rollout.chunk_frames))
  print(Path(f.out).read_text())


if __name__ == "__main__":
  define_flags()
  errors.run(main)
