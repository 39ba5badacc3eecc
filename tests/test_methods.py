"""What afd_oracle ranks: an unmeasured value counts as the worst, never as a good one; blurred,
it ranks as well as its noise says."""

import numpy as np
import pytest

from afd_jax import methods
from afd_jax.eval import physics as eval_physics
from afd_jax.eval import report


def test_oracle_values_count_an_unmeasured_value_as_the_worst():
  physics = {"gravity_gap_in_chunks": np.array([0.2, np.nan, 0.6]),
             "fall_jitter": np.array([1.5, np.nan, 0.4]),
             "physics_error": np.array([1.0, 2.0, 3.0])}
  np.testing.assert_array_equal(methods.oracle_values(physics, "gravity_gap_in_chunks"),
                                [0.2, 1.0, 0.6])          # a gap's largest possible value
  np.testing.assert_array_equal(methods.oracle_values(physics, "fall_jitter"),
                                [1.5, 1.5, 0.4])          # unbounded: the batch's largest
  np.testing.assert_array_equal(methods.oracle_values(physics, "physics_error"), [1.0, 2.0, 3.0])
  unmeasured = methods.oracle_values({"fall_jitter": np.full(3, np.nan)}, "fall_jitter")
  np.testing.assert_array_equal(unmeasured, np.zeros(3))  # no preference at all
  assert set(methods.ORACLE_SCORES) >= {"physics_error", "chunk_jump", "gravity_gap",
                                        "gravity_gap_in_chunks", "fall_jitter"}


def test_every_oracle_score_is_a_lower_is_better_reading_of_the_evaluator():
  """Each score names a per-video number the evaluator returns (a gap, via its ratio)."""
  for score in methods.ORACLE_SCORES:
    read = methods.GRAVITY_GAPS.get(score, score)
    assert read in ("physics_error", *eval_physics.TERMS, *eval_physics.READINGS), score
    assert report.BETTER[read] == ("one" if score in methods.GRAVITY_GAPS else "lower"), score


def test_blurred_oracle_ranks_each_prompts_rollouts_as_well_as_its_noise_says():
  """The noise is in units of the within-prompt spread, so far-apart prompt levels do not
  drown it, and a prompt's rollouts correlate about 1 / sqrt(1 + noise**2) with the truth."""
  rng = np.random.default_rng(0)
  k, prompts = 4, 4000
  values = rng.normal(size=(prompts, k)) * 0.1 + rng.normal(size=(prompts, 1)) * 10.0
  normal = rng.normal(size=prompts * k)
  np.testing.assert_array_equal(methods.blur_oracle(values.ravel(), 0.0, k, normal),
                                values.ravel())
  for noise in (1.0, 3.0):
    blurred = methods.blur_oracle(values.ravel(), noise, k, normal).reshape(prompts, k)
    a = values - values.mean(1, keepdims=True)
    b = blurred - blurred.mean(1, keepdims=True)
    corr = np.sum(a * b) / np.sqrt(np.sum(a * a) * np.sum(b * b))
    assert corr == pytest.approx(1.0 / np.sqrt(1.0 + noise ** 2), abs=0.02), noise
  # One rollout per prompt: the whole batch is one group, its spread the unit.
  flat = rng.normal(size=1000) * 5.0
  blurred = methods.blur_oracle(flat, 1.0, 1, normal[:1000])
  np.testing.assert_allclose(blurred - flat, np.std(flat, ddof=1) * normal[:1000])
