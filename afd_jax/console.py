"""What a person watching the terminal sees: one short progress line per logged step (a bar,
steps/s, ETA and a handful of chosen numbers; every metric still goes to ``metrics.jsonl`` and
TensorBoard), libraries' INFO chatter (Orbax, JAX) held back unless ``--verbose``, and a closing
summary of where the run's outputs are."""

from __future__ import annotations

import logging as py_logging
import math
import sys
from pathlib import Path

from absl import logging

# (metric, label): the first loss the method logs, then the discriminator and the gradients.
LOSSES = (("nft/loss", "loss"), ("fm/loss", "loss"), ("gan/generator_loss", "loss"),
          ("dmd/loss", "loss"))
CHOSEN = (("disc/bt_loss", "bt"), ("disc/accuracy", "acc"), ("adv/raw_std", "adv_sd"),
          ("student/grad_norm", "|g|"), ("disc/grad_norm", "|g_D|"),
          ("oracle/physics_error", "phys"))
BAR = 12


class _OwnInfoOnly(py_logging.Filter):
  """Passes warnings and errors from anywhere, and afd_jax's own INFO lines."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or "/afd_jax/" in record.pathname.replace("\\", "/")


def quiet_libraries(verbose: bool):
  """Unless ``verbose``, only afd_jax's INFO lines reach the console (Orbax logs about sixty per
  run through absl, JAX a few through logging)."""
  if not verbose:
    logging.get_absl_handler().addFilter(_OwnInfoOnly())


def clock(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f"{h}:{m:02d}:{s:02d}"


def progress_line(step: int, total: int, values: dict, unit: str = "step") -> str:
  """``step 40/120 [####--------] 33% 1.52 it/s ETA 0:00:52 | loss 0.0312 bt 0.652 ...``"""
  done = min(1.0, step / max(total, 1))
  filled = int(round(done * BAR))
  head = (f"{unit} {step}/{total} [{'#' * filled}{'-' * (BAR - filled)}] {100 * done:.0f}% "
          f"{values.get('perf/steps_per_second', float('nan')):.2f} it/s "
          f"ETA {clock(values.get('perf/eta_seconds', float('nan')))}")
  loss = next(((label, values[k]) for k, label in LOSSES if k in values), None)
  shown = ([loss] if loss else []) + [(label, values[k]) for k, label in CHOSEN if k in values]
  return head + (" | " + " ".join(f"{label} {v:.3g}" for label, v in shown) if shown else "")


def show_progress(step: int, total: int, values: dict, unit: str = "step"):
  print(progress_line(step, total, values, unit), file=sys.stderr, flush=True)


def closing_summary(workdir: Path, summary: dict, seconds: float, export: str = "") -> str:
  """Where a finished run put its outputs, and its held-out numbers."""
  workdir = Path(workdir)
  lines = [f"afd_jax: {summary.get('method', 'run')} finished {summary.get('steps', '?')} steps "
           f"in {clock(seconds)}"]
  places = [("checkpoints", workdir / "checkpoints"), ("metrics", workdir / "metrics.jsonl"),
            ("tensorboard", workdir / "tensorboard"), ("samples", summary.get("samples")),
            ("plots", workdir / "plots"), ("config", workdir / "config.json"),
            ("summary", workdir / "summary.json"), ("export", export)]
  lines += [f"  {name:<12}{path}" for name, path in places if path and Path(path).exists()]
  final = {k: v for k, v in summary.items() if k.startswith("eval/") and isinstance(v, float)}
  if final:
    lines.append("  held-out    " + "  ".join(f"{k[5:]} {v:.4g}" for k, v in sorted(final.items())))
  return "\n".join(lines)
