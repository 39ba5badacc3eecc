"""The persistent compilation cache (``afd_jax/compilation.py``): a second start compiles nothing
the first one compiled."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_second_start_compiles_nothing_new(tmp_path):
  cache = tmp_path / "cache"
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # conftest's

  def start(workdir):
    proc = subprocess.run([sys.executable, "-m", "afd_jax.main", "--config=tests/small_config.py",
                           f"--workdir={tmp_path / workdir}", f"--compile_cache={cache}",
                           "--config.train.num_steps=1"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sorted(p.name for p in cache.rglob("*") if p.is_file())

  first = start("first")
  assert len(first) > 5                         # every program of a run, however quick
  assert start("second") == first               # a new run of the same config: all cache hits
