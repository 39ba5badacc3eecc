"""metrics.jsonl stays one true history: a resumed run replaces the rows past its restored step."""

import json

from afd_jax import metrics


def _steps(path):
  return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_a_resume_replaces_the_rows_past_its_step(tmp_path):
  writer = metrics.MetricWriter(tmp_path, total_steps=6)
  for step in range(1, 6):
    writer.write(step, {"loss": float(step)})
  writer.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 6, "lo')  # torn by a crash mid-write
  writer = metrics.MetricWriter(tmp_path, total_steps=6, start_step=3)
  for step in range(4, 7):
    writer.write(step, {"loss": 10.0 * step})
  writer.close()
  assert _steps(tmp_path / "metrics.jsonl") == [1, 2, 3, 4, 5, 6]
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["loss"] for r in rows] == [1.0, 2.0, 3.0, 40.0, 50.0, 60.0]
