"""What afd_oracle ranks: an unmeasured value counts as the worst, never as a good one."""

import numpy as np

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
