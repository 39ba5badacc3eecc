"""The discriminator-capacity tool end to end on a small random discriminator."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_disc_capacity_trains_on_word_swaps_or_falls_and_writes_the_probe_curve(tmp_path):
  out = tmp_path / "curve.json"
  small = ["--config.model.checkpoint=", "--config.model.overrides.dim=32",
           "--config.model.overrides.ffn_dim=64", "--config.model.overrides.num_layers=1",
           "--config.disc.readout_layers=(0,)", "--config.disc.readout_ffn_dim=32",
           "--config.data.batch_size=2", "--config.afd.group_size=1",
           "--config.data.num_eval_prompts=4",
           "--config.mesh.num_devices=1", "--config.optim.disc.lr=1e-3"]
  run = subprocess.run(
      [sys.executable, "-m", "afd_jax.tools.disc_capacity", "--config=configs/demo.py",
       "--steps=2", "--eval_every=1", "--word=bounciness", f"--out={out}", *small],
      cwd=ROOT, capture_output=True, text=True)
  assert run.returncode == 0, run.stderr[-3000:]
  curve = json.loads(out.read_text())
  assert [c["step"] for c in curve] == [0, 1, 2]
  assert all(0.0 <= c[k] <= 1.0 for c in curve for k in c if k != "step")
  assert "train_accuracy" not in curve[0] and "train_accuracy" in curve[1]
  assert curve[0] != curve[-1]                       # the discriminator trained
  assert "step 2: train_accuracy" in run.stdout and "gravity_word" in run.stdout
  assert all("fall" not in c for c in curve)

  # The fall alone: the other video is the same prompt's with its gravity scaled.
  fall = subprocess.run(
      [sys.executable, "-m", "afd_jax.tools.disc_capacity", "--config=configs/demo.py",
       "--steps=1", "--eval_every=1", "--word=fall", "--fall_scale=0.5", f"--out={out}", *small],
      cwd=ROOT, capture_output=True, text=True)
  assert fall.returncode == 0, fall.stderr[-3000:]
  curve = json.loads(out.read_text())
  assert [c["step"] for c in curve] == [0, 1]
  assert all(0.0 <= c["fall"] <= 1.0 for c in curve) and curve[0] != curve[1]
  assert "step 1: train_accuracy" in fall.stdout and "fall" in fall.stdout

  bad = subprocess.run([sys.executable, "-m", "afd_jax.tools.disc_capacity",
                        "--config=configs/tiny.py", "--steps=1"], cwd=ROOT, capture_output=True,
                       text=True)
  assert bad.returncode == 2 and "needs the physics teacher" in bad.stderr
