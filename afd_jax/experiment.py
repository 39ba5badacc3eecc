"""One experiment: a base student, one training method from it, and an evaluation of every system
on held-out prompts (``config.mode = "experiment"``; the README's demo).

The base student is ``config.model.checkpoint``. The method (``config.method``, reported as
``config.experiment.name`` when set, e.g. for ablations) trains from it with the usual trainer in
``WORKDIR/<method>`` (checkpointed, resumable). Then the base, the
trained student (EMA) and the teacher itself (a second set of its videos) are scored against the
same teacher videos with ``afd_jax.eval``, no discriminator involved, and the run writes:

* ``WORKDIR/report.json``: ``{system: {metric: value}}`` for ``config.experiment.systems``;
* ``WORKDIR/samples/systems.gif`` and ``.mp4``: one row per system, one column per prompt;
* ``WORKDIR/plots/*.png``: the method's training curves (discriminator, advantage, losses and
  the held-out metrics over training);
* a before/after table on stdout.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
from absl import logging

from afd_jax import evaluation
from afd_jax import train
from afd_jax import video

TEACHER_SEED = evaluation.SEED + 1  # the teacher's own row: other samples of the same prompts
CURVES = (("disc/accuracy", "disc/bt_loss"), ("r/mean", "adv/clipped_frac"),
          ("nft/loss", "reg/loss", "fm/loss"), ("eval/physics_error",),
          ("eval/frechet_distance",))


def run(config, workdir) -> dict:
  from afd_jax.eval import report as eval_report
  workdir = Path(workdir)
  t0 = time.perf_counter()
  trainer = train.Trainer(config, workdir / config.method)
  base_params = trainer.initial_student()
  ids = trainer.evaluator.eval_ids()
  reference = trainer.evaluator.teacher_videos(ids, evaluation.SEED)
  seed = config.seed + evaluation.SEED
  videos = {}
  for system in config.experiment.systems:
    if system == "base":
      videos[system] = trainer.evaluator.student_videos(base_params, ids, seed)
    elif system == "teacher":
      videos[system] = trainer.evaluator.teacher_videos(ids, TEACHER_SEED)
  name = config.experiment.name or config.method
  if name in config.experiment.systems:
    summary = trainer.run()
    videos[name] = trainer.evaluator.student_videos(trainer.state["student"]["ema"], ids, seed)
  else:
    summary = {}
  videos = {s: videos[s] for s in config.experiment.systems if s in videos}  # config order
  report = {name: trainer.evaluator.score(v, ids, reference) for name, v in videos.items()}

  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "report.json").write_text(json.dumps(report, indent=2))
    n = config.data.batch_size
    grid = eval_report.sample_grid({s: trainer.evaluator.viewable(v[:n]) for s, v in videos.items()})
    video.write_gif(grid, workdir / "samples" / "systems.gif", fps=config.output.fps)
    video.write_mp4(grid, workdir / "samples" / "systems.mp4", fps=config.output.fps)
    metrics_file = workdir / config.method / "metrics.jsonl"
    records = ([json.loads(l) for l in metrics_file.read_text().splitlines()]
               if metrics_file.exists() else [])
    for keys in CURVES:
      keys = [k for k in keys if any(k in r for r in records)]
      if keys:
        eval_report.plot_curves(records, keys,
                                workdir / "plots" / (keys[0].replace("/", "_") + ".png"))
    print(f"held-out prompts: {len(ids)}; rows of samples/systems.gif: {', '.join(videos)}")
    print(eval_report.format_table(report))
  logging.info("experiment done in %.0fs", time.perf_counter() - t0)
  return {"report": report, "train": summary}
