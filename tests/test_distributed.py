"""Multi-host runs: two processes on localhost with a real coordinator train together and
checkpoint; one process with 8 devices restores the checkpoint and continues the same run."""

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from afd_jax import checkpoint as ckpt_lib
from afd_jax import distributed
from afd_jax import train
from conftest import assert_same_run
from small_config import get_config as config

ROOT = Path(__file__).resolve().parents[1]
# One chunk (3 latent frames) keeps the compiles short; test_mesh covers two chunks sharded.
MESH = {"mesh.num_devices": 8, "mesh.data": 2, "mesh.fsdp": 4, "data.num_frames": 3}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_flags_must_come_together():
  with pytest.raises(ValueError, match="need all three of --coordinator_address"):
    distributed.initialize("localhost:1234", 2)
  with pytest.raises(ValueError, match=r"--process_id=2 must lie in \[0, --num_processes=2\)"):
    distributed.initialize("localhost:1234", 2, 2)
  with pytest.raises(ValueError, match="must be HOST:PORT"):
    distributed.initialize("localhost", 2, 0)


def test_cluster_detection(monkeypatch):
  for var in ("TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    monkeypatch.delenv(var, raising=False)
  assert distributed.detected_cluster() is None
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1v-0")  # a single-host TPU VM: nothing to join
  assert distributed.detected_cluster() is None
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1v-0,t1v-1")
  assert distributed.detected_cluster() == "tpu"
  monkeypatch.delenv("TPU_WORKER_HOSTNAMES")
  monkeypatch.setenv("SLURM_JOB_ID", "42")
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert distributed.detected_cluster() == "slurm"


def test_two_processes_train_checkpoint_and_one_process_continues(tmp_path, caplog):
  """Two processes of 4 devices (one 2 x 4 mesh) train 4 steps, checkpointing at 2 and 4. One
  process of 8 devices restores step 2 and trains to 4: the same run, to float tolerance (the
  processes reduce across hosts in another order)."""
  work = tmp_path / "two"
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS=os.environ["XLA_FLAGS"].replace("device_count=8", "device_count=4"))
  flags = [f"--config.{k}={v}" for k, v in {**MESH, "train.num_steps": 4,
                                              "train.checkpoint_every": 2}.items()]
  procs = [subprocess.Popen(
      [sys.executable, "-m", "afd_jax.main", "--config=tests/small_config.py", f"--workdir={work}",
       f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}",
       *flags], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"process {i}:\n{out[-4000:]}"
  assert "process 0 of 2: 4 local / 8 global devices" in outs[0]
  assert "it/s" in outs[0] and "it/s" not in outs[1]  # progress from process 0 only
  lines = (work / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(l)["step"] for l in lines] == [1, 2, 3, 4]  # one writer, not two
  assert sorted(p.name for p in (work / "checkpoints").iterdir()) == ["2", "4"]

  cont = tmp_path / "one"
  shutil.copytree(work / "checkpoints", cont / "checkpoints",
                  ignore=lambda d, names: ["4"] if Path(d) == work / "checkpoints" else [])
  caplog.set_level(logging.INFO)
  resumed = train.Trainer(config(**MESH, **{"train.num_steps": 4}), cont)
  resumed.run()
  assert "resumed from step 2" in caplog.text
  ckpt = ckpt_lib.Checkpointer(work / "checkpoints")
  step, two_processes, _ = ckpt.restore(ckpt_lib.abstract_like(resumed.state,
                                                               resumed.state_sharding))
  ckpt.close()
  assert step == 4
  assert_same_run(two_processes, resumed.state, resumed.config)
