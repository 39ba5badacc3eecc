"""The word-sensitivity tool: a model that reads its prompt changes with every word; one whose
cross-attention is cut changes with none."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from afd_jax.models import wan, wan_checkpoint
from afd_jax.eval import word_sensitivity
from configs import demo
from conftest import randomize

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["one red ball dropped, weak gravity, soft",
           "one blue ball thrown left, strong gravity, very bouncy"]


@pytest.fixture(scope="module")
def reader():
  cfg = wan.WanConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=1, freq_dim=16, in_dim=12,
                      out_dim=12, text_dim=32, text_len=16)
  return randomize(wan.WanModel(cfg, rngs=nnx.Rngs(0)), seed=3)


def test_every_word_moves_a_reading_model_and_none_moves_a_text_blind_one(reader):
  config = demo.get_config()
  table = word_sensitivity.measure(reader, config, PROMPTS, [1000.0, 250.0])
  assert list(table) == ["gravity", "bounciness", "direction", "color"]
  assert all(list(row) == ["features", "t=1000", "t=250"] for row in table.values())
  assert all(v > 1e-4 for row in table.values() for v in row.values())

  graphdef, state = nnx.split(reader)
  cut = lambda path: "['cross_attn']['o']" in jax.tree_util.keystr(path)  # its output layer
  blind = nnx.merge(graphdef, jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.zeros_like(x) if cut(path) else x, state))
  table = word_sensitivity.measure(blind, config, PROMPTS, [1000.0, 250.0])
  assert all(v == 0.0 for row in table.values() for v in row.values())


def test_the_command_prints_the_table_and_names_a_missing_checkpoint(reader, tmp_path):
  path = wan_checkpoint.save_converted(reader, tmp_path / "ckpt")
  out = tmp_path / "table.json"
  cmd = [sys.executable, "-m", "afd_jax.tools.word_sensitivity", "--prompts=3",
         "--timesteps=500"]
  run = subprocess.run([*cmd, f"--checkpoint={path}", f"--out={out}"], cwd=ROOT,
                       capture_output=True, text=True)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "gravity" in run.stdout and "t=500" in run.stdout
  assert set(json.loads(out.read_text())) == {"gravity", "bounciness", "direction", "color"}
  bad = subprocess.run([*cmd, f"--checkpoint={tmp_path / 'none'}"], cwd=ROOT,
                       capture_output=True, text=True)
  assert bad.returncode != 0 and "does not exist; pass --checkpoint" in bad.stderr
