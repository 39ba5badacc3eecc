"""``python -m afd_jax.generate`` (``afd_jax/generate.py``): the streamed rollout equals the whole
one, the streaming VAE decoder equals whole-video decoding, and text becomes an MP4 on CPU."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from afd_jax import rollout as rollout_lib
from afd_jax import video
from afd_jax.models import umt5, umt5_checkpoint, wan, wan_checkpoint, wan_vae, wan_vae_checkpoint
from conftest import make_tokenizer, randomize, rel_l2

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("window", [(0, 0), (6, 3)], ids=["global", "window6-sink3"])
def test_the_stream_yields_the_rollouts_chunks(tiny_model, window):
  cfg = rollout_lib.RolloutConfig(chunk_frames=3, window_frames=window[0] or None,
                                  sink_frames=window[1])
  noise = rollout_lib.sample_noise(jax.random.key(0), 2, (12, 4, 6, 16))
  context = jax.random.normal(jax.random.key(1), (2, 7, 32))
  key = jax.random.key(2)
  whole = jax.jit(lambda n, c, k: rollout_lib.rollout(tiny_model, n, c, k, cfg))(noise, context, key)
  chunks = list(rollout_lib.stream(tiny_model, noise, context, key, cfg))
  assert [c.shape for c in chunks] == [(2, 3, 4, 6, 16)] * 4
  assert rel_l2(jnp.concatenate(chunks, 1), whole) < 1e-5


def test_the_stream_decoder_equals_decoding_the_whole_video(small_vae):
  vae = wan_vae_checkpoint.load(small_vae)
  latents = jax.random.normal(jax.random.key(0), (1, 6, 4, 6, 16))
  whole = wan_vae.decode(vae, latents, chunk=1)
  decoder = wan_vae.StreamDecoder(vae)
  parts = [decoder(latents[:, :3]), decoder(latents[:, 3:])]
  assert [p.shape[1] for p in parts] == [9, 12]      # 1 + 4 + 4 pixel frames, then 4 + 4 + 4
  np.testing.assert_allclose(jnp.concatenate(parts, 1), whole, rtol=1e-5, atol=1e-5)


def test_generate_streams_text_to_mp4(tmp_path, small_vae):
  student = wan_checkpoint.save_converted(randomize(wan.init(wan.preset("tiny")), scale=0.1),
                                          tmp_path / "student")
  t5 = umt5_checkpoint.save_converted(umt5.init(umt5.preset("tiny", dim=32)), tmp_path / "t5")
  tokenizer = make_tokenizer(tmp_path)
  run = subprocess.run(
      [sys.executable, "-m", "afd_jax.generate", f"--student={student}", f"--vae={small_vae}",
       f"--t5={t5}", f"--tokenizer={tokenizer}", "--prompt=a red ball", "--prompt=w1 w2",
       "--seeds=0,5", "--frames=21", "--height=32", "--width=48", "--dtype=float32",
       f"--out={tmp_path / 'videos'}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  runs = json.loads((tmp_path / "videos" / "generate.json").read_text())
  assert [(r["prompt"], r["seed"]) for r in runs] == [("a red ball", 0), ("a red ball", 5),
                                                      ("w1 w2", 0), ("w1 w2", 5)]
  for r in runs:
    assert video.read_video(r["video"]).shape == (21, 32, 48, 3)   # 1 + 4 x 5 frames, 8x
    assert 0 < r["first_frame_s"] <= r["seconds"] and r["frames"] == 21
  assert run.stdout.count("first frame after") == 4 and "chunk 2/2 [" in run.stderr
  first, other = (video.read_video(runs[i]["video"]) for i in (0, 1))
  assert not np.array_equal(first, other)              # seeds differ
