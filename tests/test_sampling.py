"""``--config.mode=rollout`` (``afd_jax/sampling.py``): the student sampled on the teacher's
held-out prompts, written as videos."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _main(*args):
  return subprocess.run([sys.executable, "-m", "afd_jax.main", *args], cwd=ROOT,
                        capture_output=True, text=True)


def test_rollout_mode_writes_a_sample_video(tmp_path):
  proc = _main("--config=configs/tiny.py", f"--workdir={tmp_path}", "--config.mode=rollout",
               "--config.data.batch_size=2")
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads((tmp_path / "rollout.json").read_text())
  assert summary["latent_shape"] == [2, 6, 4, 6, 16]
  assert summary["prompts"] == ["prompt 64", "prompt 65"]   # the first held-out prompts
  gif = Path(summary["video"])
  assert gif.exists() and gif.read_bytes()[:6] in (b"GIF87a", b"GIF89a")
  assert np.isfinite(np.load(tmp_path / "samples" / "rollout_latents.npy")).all()


def test_rollout_mode_decodes_with_a_vae_to_mp4(tmp_path, small_vae):
  from afd_jax import video
  proc = _main("--config=tests/small_config.py", f"--workdir={tmp_path}", "--config.mode=rollout",
               "--config.data.batch_size=1", "--config.data.num_frames=4",
               "--config.rollout.chunk_frames=2", "--config.data.height=2",
               "--config.data.width=2", f"--config.data.vae={small_vae}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads((tmp_path / "rollout.json").read_text())
  assert summary["latent_shape"] == [1, 4, 2, 2, 16]
  assert video.read_video(summary["video"]).shape == (13, 16, 16, 3)  # 1 + 4 x 3 frames, 8x
