"""The fall profile (``afd_jax.tools.fall_profile``) on a small random student: the teacher's chunks read its gravity, the
student's shapes and bookkeeping hold, and a config it cannot track is refused."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from afd_jax import errors
from afd_jax.eval import fall_profile
from configs import demo, tiny
from small_config import override

SMALL = {"model.checkpoint": "", "model.overrides.dim": 32, "model.overrides.ffn_dim": 64,
         "model.overrides.num_layers": 1, "rollout.denoising_steps": (1000.0, 500.0),
         "rollout.chunk_frames": 3,
         "data.batch_size": 4, "data.num_eval_prompts": 4, "mesh.num_devices": 1}


def test_the_teacher_reads_its_gravity_in_every_chunk_and_the_student_is_profiled():
  config = override(demo.get_config(), **SMALL)
  profile = fall_profile.profile(config, rollouts=2, batches=1, margin_px=4.0)
  assert profile["rollouts"] == 8                           # 4 prompts x 2 rollouts
  g = 0.8 * config.physics.size / config.physics.fps ** 2   # "normal gravity", px / frame**2
  kink = profile["teacher"]["kink"]
  read = np.array(kink["read"]) > 0
  assert read.any()
  np.testing.assert_allclose(np.array(kink["mean"])[read], g, atol=0.05)
  for who in ("student", "teacher"):
    assert {k: len(v["mean"]) for k, v in profile[who].items()} == {"kink": 3, "velocity": 3,
                                                                    "drop": 2}
  assert set(profile["student_kink_correlation"]) == {"0-1", "0-2", "1-2"}


def test_a_world_without_one_tracked_ball_or_a_frame_wise_student_is_refused():
  with pytest.raises(errors.UserError, match="needs the physics teacher"):
    fall_profile.profile(tiny.get_config(), rollouts=2, batches=1, margin_px=4.0)
  with pytest.raises(errors.UserError, match="--config.rollout.chunk_frames=3"):
    fall_profile.profile(demo.get_config(), rollouts=2, batches=1, margin_px=4.0)


def test_the_command_refuses_a_missing_checkpoint_in_one_line():
  run = subprocess.run([sys.executable, "-m", "afd_jax.tools.fall_profile",
                        "--checkpoint=/nonexistent/ckpt"], cwd=Path(__file__).resolve().parents[1],
                       capture_output=True, text=True)
  assert run.returncode == 2 and "does not exist; pass --checkpoint=PATH" in run.stderr
  assert len(run.stderr.strip().splitlines()) == 1, run.stderr
