"""The discriminator-ranking tool end to end on a one-step AFD run of a small random student."""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--config=configs/demo.py", "--config.model.checkpoint=",
         "--config.model.overrides.dim=32", "--config.model.overrides.ffn_dim=64",
         "--config.model.overrides.num_layers=1", "--config.disc.readout_layers=(0,)",
         "--config.disc.readout_ffn_dim=32", "--config.data.batch_size=2",
         "--config.afd.group_size=1", "--config.data.num_eval_prompts=4",
         "--config.mesh.num_devices=1"]


def _tool(*flags):
  return subprocess.run([sys.executable, "-m", "afd_jax.tools.disc_ranking", *SMALL, *flags],
                        cwd=ROOT, capture_output=True, text=True)


def test_disc_ranking_scores_each_prompts_rollouts_as_training_and_at_fixed_levels(tmp_path):
  run_dir = tmp_path / "afd"
  trained = subprocess.run(
      [sys.executable, "-m", "afd_jax.main", *SMALL, f"--workdir={run_dir}", "--config.mode=train",
       "--config.train.num_steps=1", "--config.train.checkpoint_every=1"],
      cwd=ROOT, capture_output=True, text=True)
  assert trained.returncode == 0, trained.stderr[-3000:]

  out = tmp_path / "ranking.json"
  run = _tool(f"--workdir={run_dir}", "--rollouts=3", "--levels=0,0.5", "--repeats=2",
              f"--out={out}")
  assert run.returncode == 0, run.stderr[-3000:]
  result = json.loads(out.read_text())
  assert list(result) == ["training", "tau=0", "tau=0.5"]
  for rhos in result.values():
    assert {"diag/spearman_physics_error", "diag/spearman_speed_gap",
            "diag/spearman_brightness"} <= set(rhos)
    assert all(math.isnan(r) or -1.0 <= r <= 1.0 for r in rhos.values())
  # Random rollouts differ in brightness, so every way of scoring ranks them by it somehow.
  assert all(not math.isnan(r["diag/spearman_brightness"]) for r in result.values())
  assert "scored" in run.stdout and "tau=0.5" in run.stdout

  # As training draws them with one noise draw per prompt and colour gains: other scores.
  shared = tmp_path / "shared.json"
  run = _tool(f"--workdir={run_dir}", "--rollouts=3", "--levels=0,0.5", "--repeats=2",
              f"--out={shared}", "--config.afd.group_pairs=shared",
              "--config.afd.disc_color_jitter=0.5")
  assert run.returncode == 0, run.stderr[-3000:]
  again = json.loads(shared.read_text())
  assert again["tau=0"] == result["tau=0"]   # clean, ungained scores: as afd.score_tau=0 reads
  assert again["training"] != result["training"]

  empty = _tool(f"--workdir={tmp_path / 'none'}")
  assert empty.returncode == 2 and "no checkpoint in" in empty.stderr
  bad = _tool(f"--workdir={run_dir}", "--rollouts=1")
  assert bad.returncode == 2 and "--rollouts (1) must be >= 2" in bad.stderr
