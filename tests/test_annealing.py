"""delayed_cosine_schedule against the reference code's CosineTempDecay, in NumPy."""

from __future__ import annotations

import numpy as np
import pytest

import talr_optax as talr


def reference(t, t_max, start, end, rel_decay_start):
  decay_start = rel_decay_start * t_max
  if t < decay_start:
    return start
  rel_t = (t - decay_start) / (t_max - decay_start)
  return end + 0.5 * (start - end) * (1 + np.cos(rel_t * np.pi))


@pytest.mark.parametrize("start_fraction", [0.0, 0.25, 0.5])
def test_matches_the_reference_code(start_fraction):
  sched = talr.delayed_cosine_schedule(1e-2, 1e-4, 200, start_fraction=start_fraction)
  for t in (0, 1, 49, 50, 51, 100, 199, 200):
    assert float(sched(t)) == pytest.approx(reference(t, 200, 1e-2, 1e-4, start_fraction),
                                            rel=1e-5)


def test_warm_start_and_bad_input():
  sched = talr.delayed_cosine_schedule(0.04, 0.01, 100, value_before=0.0)
  assert float(sched(24)) == 0.0 and float(sched(25)) == pytest.approx(0.04)
  assert float(sched(100)) == pytest.approx(0.01) and float(sched(500)) == pytest.approx(0.01)
  for kwargs in (dict(init_value=-1.0), dict(final_value=float("nan")), dict(total_steps=0),
                 dict(start_fraction=1.0), dict(value_before=-0.1)):
    args = {**dict(init_value=0.1, final_value=0.0, total_steps=10), **kwargs}
    with pytest.raises(ValueError, match=list(kwargs)[0]):
      talr.delayed_cosine_schedule(**args)
