"""The table tool's bookkeeping on stand-in runs (the real runs are the demo's, tested in
test_experiment): resume, summed run times, paired gains, the claims and the page."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from afd_jax import errors
from afd_jax.eval.report import BETTER
from afd_jax.tools import physics_table as T
from afd_jax.tools import plan  # noqa: F401  (its --out too: the table defines flags only as a program)

ROOT = Path(__file__).resolve().parents[1]

SEEDS = (0, 1, 2, 3, 4)
NAMES = ("sft", "gan", "afd")


def _fake_run(calls):
  """Writes what ``experiment.run`` writes that the tool reads: every system's scores and the
  trained method's metrics.jsonl. AFD closes about 60 % of the gap, with a clear gravity gain."""
  def run(config, out):
    calls.append((config.seed, config.experiment.name, tuple(config.experiment.systems)))
    seed, name = config.seed, config.experiment.name
    noise = 0.01 * seed
    scores = {"teacher": (0.0, 0.0, 1.0), "base": (1.0 + noise, 0.8, 0.4),
              "sft": (1.8, 0.9, 0.5), "gan": (1.0, 0.8, 0.4),
              "afd": (0.4 + noise, 0.5 + 2 * noise, 0.7)}
    report = {s: {**dict.fromkeys(BETTER, 0.5), "physics_error": p, "accel_error": a,
                  "gravity_ratio": g}
              for s, (p, a, g) in scores.items() if s in config.experiment.systems}
    out.mkdir(parents=True)
    (out / "report.json").write_text(json.dumps(report))
    (out / config.method).mkdir()
    rows = [{"step": 1, "diag/spearman_physics_error": 0.1 * seed}, {"step": 2}]
    (out / config.method / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)))
  return run


def test_runs_resume_sum_their_times_and_score_teacher_and_base_once(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(T.experiment, "run", _fake_run(calls))
  results, diagnostics, seconds = T.run_all(tmp_path, SEEDS, NAMES, 7)
  assert len(calls) == 15 and seconds >= 0
  assert [c[2] for c in calls[:3]] == [("teacher", "base", "sft"), ("gan",), ("afd",)]
  assert results["base"]["physics_error"] == pytest.approx([1.0, 1.01, 1.02, 1.03, 1.04])
  assert diagnostics["afd"]["diag/spearman_physics_error"] == pytest.approx([0, .1, .2, .3, .4])
  for seed in SEEDS:   # the recorded times are what a later invocation sums
    for name in NAMES:
      (tmp_path / f"seed_{seed}" / name / "run_seconds.txt").write_text("60\n")
  again, _, seconds = T.run_all(tmp_path, SEEDS, NAMES, 7)
  assert len(calls) == 15 and seconds == 15 * 60 and again == results   # nothing reran
  (tmp_path / "seed_3" / "gan" / "run_seconds.txt").unlink()
  with pytest.raises(errors.UserError, match="run_seconds.txt"):
    T.run_all(tmp_path, SEEDS, NAMES, 7)


def test_every_system_rolls_out_as_many_videos_and_is_evaluated_on_the_same_noise():
  """The demo's AFD rolls out K videos of each of its prompts; the rows with one rollout per
  prompt (SFT trains on as many teacher videos) take K times as many prompts, so every system
  rolls out (and evaluates in batches of) the same number of videos."""
  from afd_jax import methods
  rows = {name: methods.rollout_rows(T.config(0, name, 5)) for name in T.SYSTEMS}
  assert set(rows.values()) == {8}
  assert set(T.DEFAULT_ROWS) == {   # issue 13's rows; the per-chunk ablation runs on request
      "sft", "gan", "afd", "afd_k1", "afd_oracle", "afd_frozen_disc", "afd_positive_only",
      "afd_disc_lr_0", "afd_disc_lr_low", "afd_disc_lr_high", "afd_unpaired_loss"}
  shape = lambda name: (lambda c: (c.afd.group_size, c.data.batch_size, c.train.num_steps))(
      T.config(0, name, 5))
  assert shape("afd") == shape("afd_oracle") == shape("afd_disc_lr_0") == (4, 2, 5)
  assert shape("afd_k1") == shape("sft") == shape("gan") == (1, 8, 5)


def test_claims_and_page(tmp_path, monkeypatch):
  monkeypatch.setattr(T.experiment, "run", _fake_run([]))
  results, diagnostics, _ = T.run_all(tmp_path / "runs", SEEDS, NAMES, 7)
  gain = T._paired(results, "afd", "gravity_ratio")       # |0.4 - 1| - |0.7 - 1|
  np.testing.assert_allclose(gain, 0.3)
  lines = T.claims(results)
  assert lines[0].startswith("AFD closes 59% of the base -> teacher `physics_error` gap")
  assert "at least half" in lines[0]
  assert "more than twice its spread" in lines[1] and "NOT" not in lines[1]
  assert "AFD beats it by more than the spread" in lines[3]        # SFT
  assert "does not beat it" not in lines[3]
  out = tmp_path / "page" / "physics.md"
  T.write_page(results, diagnostics, SEEDS, 7, 900.0, out, "python -m the-command",
               T.world_sentence(("normal",), 1))
  page = out.read_text()
  assert "python -m the-command" in page and "15 training runs, 15 minutes" in page
  assert 'every prompt says "normal gravity"' in page and "DMD" in page
  assert "frame by frame (`rollout.chunk_frames=1`)" in page
  assert "Not run for this page" in page and "`afd_oracle`" in page
  assert (out.parent / "physics_accel_error.png").stat().st_size > 0


def test_the_command_writes_the_page_from_finished_runs(tmp_path, monkeypatch):
  monkeypatch.setattr(T.experiment, "run", _fake_run([]))
  T.run_all(tmp_path / "runs", SEEDS, NAMES, 7)
  out = tmp_path / "physics.md"
  done = subprocess.run(
      [sys.executable, "-m", "afd_jax.tools.physics_table", f"--workdir={tmp_path / 'runs'}",
       "--only=sft,gan,afd", "--steps=7", f"--out={out}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "--only=sft,gan,afd --steps=7" in out.read_text()
  assert 'every prompt says "normal gravity"' in out.read_text()   # the demo's world
  assert "frame by frame" in out.read_text()
