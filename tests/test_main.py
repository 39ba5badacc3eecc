import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _main(*args, cwd=ROOT):
  return subprocess.run([sys.executable, "-m", "afd_jax.main", *args], cwd=cwd,
                        capture_output=True, text=True)


def _one_line(proc, message):
  """A user error: exit code 2, one ``afd_jax:`` line on stderr, no traceback."""
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith("afd_jax: ") and message in lines[0], lines


def test_user_errors_are_one_line_with_exit_code_2(tmp_path):
  """Bad config values (the model overrides included: every field an error names can be set from
  the command line), an unknown mode and a workdir that is a file, all before compiling."""
  (tmp_path / "file").write_text("")
  for args, message in (
      (["--config.data.num_frames=8"], "not a multiple of"),
      (["--config.mode=serve"], "config.mode"),
      (["--config.model.overrides.in_dim=48", "--config.train.keep_last=0"], "keep_last=0"),
      ([f"--workdir={tmp_path / 'file'}"], "is a file"),
  ):
    _one_line(_main("--config=configs/tiny.py", f"--workdir={tmp_path / 'run'}", *args), message)
  verbose = _main("--config=configs/tiny.py", f"--workdir={tmp_path / 'run'}",
                  "--config.mode=serve", "--verbose")
  assert verbose.returncode != 0 and "Traceback" in verbose.stderr


def test_wan_ar_config_names_what_is_missing_before_compiling(tmp_path):
  proc = _main("--config=configs/wan_ar.py", f"--workdir={tmp_path}")
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  assert "config.model.checkpoint='checkpoints/student_1.3b' does not exist" in proc.stderr
  assert "python -m afd_jax.tools.convert_wan SRC DST" in proc.stderr
  assert "config.data.vae='checkpoints/wan_vae' does not exist" in proc.stderr
  assert "afd_jax.tools.convert_wan_vae" in proc.stderr
  assert not (tmp_path / "checkpoints").exists()
