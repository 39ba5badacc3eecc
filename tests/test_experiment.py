"""The README's main command in miniature: the demo from the shipped base student, end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from afd_jax.models import wan
from configs import demo

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_base_student_loads_and_matches_the_demo_config():
  model = wan.from_pretrained(demo.BASE_CHECKPOINT)
  c = demo.get_config()
  want = wan.preset(c.model.preset, **c.model.overrides)
  assert model.config.architecture() == want.architecture()


def test_demo_runs_end_to_end_and_reports_every_system(tmp_path):
  """The demo's pipeline on a small random student (the shipped one is checked above; the real
  demo's figures are in the README)."""
  small = ["--config.model.checkpoint=", "--config.model.overrides.dim=32",
           "--config.model.overrides.ffn_dim=64", "--config.model.overrides.num_layers=1",
           "--config.disc.readout_layers=(0,)", "--config.disc.readout_ffn_dim=32",
           "--config.rollout.denoising_steps=(1000.0,500.0)"]
  proc = subprocess.run(
      [sys.executable, "-m", "afd_jax.main", "--config=configs/demo.py", f"--workdir={tmp_path}",
       "--config.train.num_steps=2", "--config.train.eval_every=1", "--config.train.log_every=1",
       "--config.data.num_eval_prompts=4", "--config.data.batch_size=1",
       "--config.mesh.num_devices=1", *small],
      cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((tmp_path / "report.json").read_text())
  assert set(report) == {"base", "afd", "teacher"}
  for system, metrics in report.items():
    for key in ("physics_error", "frechet_distance"):
      assert isinstance(metrics[key], float), (system, key)
  # The teacher scored against its own other samples is the floor of both headline metrics.
  assert report["teacher"]["physics_error"] < report["base"]["physics_error"]
  assert report["teacher"]["frechet_distance"] < report["base"]["frechet_distance"]
  assert "physics_error" in proc.stdout and "teacher" in proc.stdout   # the printed table
  for name in ("systems.gif", "systems.mp4"):
    assert (tmp_path / "samples" / name).stat().st_size > 0
  with Image.open(tmp_path / "samples" / "systems.gif") as gif:
    assert gif.n_frames == 9
  plots = list((tmp_path / "plots").glob("*.png"))
  assert plots and all(Image.open(p).size[0] > 100 for p in plots)
  lines = [json.loads(l) for l in (tmp_path / "afd" / "metrics.jsonl").read_text().splitlines()]
  assert "eval/physics_error" in lines[0] and "disc/accuracy" in lines[0]
  assert 0.0 <= lines[0]["probe/gravity_word"] <= 1.0 and "probe/dimmed" in lines[0]
  # The last evaluation is logged like the others, and it is the report's (same student, noise).
  assert lines[-1]["step"] == 2 and "probe/dimmed" in lines[-1]
  assert lines[-1]["eval/physics_error"] == pytest.approx(report["afd"]["physics_error"])
