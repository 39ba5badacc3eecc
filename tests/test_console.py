"""The console (``afd_jax/console.py``): one short progress line, libraries' INFO held back, the
closing summary. A real run's console: test_train.py (preemption test)."""

import logging

from afd_jax import console


def test_the_progress_line_is_short_and_shows_the_chosen_numbers():
  values = {"perf/steps_per_second": 1.5, "perf/eta_seconds": 52.0, "nft/loss": 0.03125,
            "student/loss": 0.5, "disc/bt_loss": 0.652, "disc/accuracy": 0.8125,
            "adv/raw_std": 0.98, "student/grad_norm": 1.21, "disc/grad_norm": 3.4,
            **{f"other/{i}": float(i) for i in range(30)}}
  line = console.progress_line(40, 120, values)
  assert line.startswith("step 40/120 [####--------] 33% 1.50 it/s ETA 0:00:52 | ")
  assert "loss 0.0312 bt 0.652 acc 0.812 adv_sd 0.98 |g| 1.21 |g_D| 3.4" in line
  assert len(line) <= 120 and "other" not in line
  assert console.progress_line(1, 4, {"fm/loss": 2.0}).endswith("ETA ? | loss 2")


def test_libraries_info_lines_are_held_back_but_not_warnings_or_ours():
  keep = console._OwnInfoOnly().filter
  record = lambda level, path: logging.LogRecord("absl", level, path, 1, "m", None, None)
  assert keep(record(logging.INFO, "/site-packages/afd_jax/train.py"))
  assert not keep(record(logging.INFO, "/site-packages/orbax/checkpoint/checkpoint_manager.py"))
  assert keep(record(logging.WARNING, "/site-packages/orbax/checkpoint/checkpoint_manager.py"))


def test_the_closing_summary_says_where_everything_is(tmp_path):
  (tmp_path / "checkpoints").mkdir()
  (tmp_path / "metrics.jsonl").write_text("")
  text = console.closing_summary(tmp_path, {"method": "afd", "steps": 20, "eval/gap": 0.5,
                                            "samples": str(tmp_path / "absent.gif")}, 83.0)
  assert text.splitlines()[0] == "afd_jax: afd finished 20 steps in 0:01:23"
  assert f"checkpoints {tmp_path / 'checkpoints'}" in text and "metrics" in text
  assert "absent" not in text and "held-out    gap 0.5" in text
