"""The GPU suite's smoke mode: every section runs on tiny shapes on the CPU, with only what the
device image has (no tensorboardX, av, array-record, TFDS; the model, rollout, steps and VAE
import without ml_collections too), writes one JSON record per section, and keeps to its
deadline."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ABSENT_ON_DEVICE = ("tensorboardX", "av", "array_record", "tensorflow_datasets", "tensorflow")

# Runs a script (or imports modules) as the device image would: the packages it lacks fail to import.
_BLOCK = """
import runpy, sys
class Absent:
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in {blocked!r}:
      raise ImportError(f"{{name}} is not installed on the device image")
sys.meta_path.insert(0, Absent())
sys.argv = {argv!r}
{body}
"""


# As `python benchmarks/gpu_suite.py` runs it: the script's folder first on the path.
SUITE = "sys.path.insert(0, 'benchmarks'); runpy.run_path('benchmarks/gpu_suite.py', run_name='__main__')"


def _run(blocked, argv, body, cwd=ROOT):
  code = _BLOCK.format(blocked=set(blocked), argv=argv, body=body)
  # One CPU device, as the suite sees one GPU; conftest's cheap LLVM flags (a third less compiling).
  xla = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f)
  return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                        env={"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla,
                             "PATH": "/usr/bin:/bin"}, timeout=600)


def _records(out):
  return {r["section"]: r for r in map(json.loads, (out / "gpu_suite.jsonl").read_text().splitlines())}


def test_the_smoke_suite_runs_every_section_without_the_packages_the_device_lacks(tmp_path):
  argv = ["gpu_suite.py", "--smoke", "--out", str(tmp_path)]
  done = _run(ABSENT_ON_DEVICE, argv, SUITE)
  assert done.returncode == 0, done.stderr[-3000:]
  rec = _records(tmp_path)
  assert list(rec) == ["env", "matmul", "attention", "chunk_forward", "rollout", "afd_iteration",
                       "afd_iteration_lora", "vae_decode"]
  failed = {k: r.get("error") for k, r in rec.items() if r["status"] != "ok"}
  assert not failed, failed
  attention = {(r["keys"], r["kernel"]): r for r in rec["attention"]["rows"]}
  assert "error" in attention[(18, "cudnn")]            # no cuDNN on a CPU: recorded, fallen back
  assert rec["attention"]["kernel_for_later_sections"] in ("blockwise", "dense")
  assert all(r["rel_l2_vs_fp32_dense"] < 0.02 for r in attention.values() if "ms" in r)  # bf16
  assert [r["chunk"] for r in rec["chunk_forward"]["rows"]] == [0, 1]
  assert rec["rollout"]["compile_s"] > 0 and rec["rollout"]["seconds"] > 0
  for name, rank in (("afd_iteration", 0), ("afd_iteration_lora", 4)):
    r = rec[name]
    assert r["lora_rank"] == rank and r["loss_finite"]
    assert set(r["compile_s"]) == {"rollout", "disc", "student"}   # three programs per iteration
    assert min(r["rollout_s"], r["disc_s"], r["student_s"]) > 0
  assert rec["vae_decode"]["latents"] == [2, 2, 2]


def test_the_model_rollout_steps_and_vae_import_without_ml_collections():
  body = ("import afd_jax.models.wan, afd_jax.models.wan_vae, afd_jax.rollout, afd_jax.steps, "
          "afd_jax.programs, afd_jax.state, afd_jax.flops")
  done = _run(ABSENT_ON_DEVICE + ("ml_collections",), ["-c"], body)
  assert done.returncode == 0, done.stderr[-3000:]


def test_sections_that_would_pass_the_deadline_are_skipped_and_recorded(tmp_path):
  argv = ["gpu_suite.py", "--smoke", "--out", str(tmp_path), "--deadline_s", "0.5"]
  done = _run((), argv, SUITE)
  assert done.returncode == 0, done.stderr[-3000:]
  rec = _records(tmp_path)
  assert rec["env"]["status"] == "ok" and len(rec) == 8
  assert all(r["status"] == "skipped" and "deadline" in r["reason"]
             for k, r in rec.items() if k != "env")
