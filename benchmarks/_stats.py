"""Paired comparisons over seeds: the mean difference and its 95 % t-interval.

Two arms run from the same start on the same data order per seed, so their
difference seed by seed removes what the seeds share. A conclusion comes from
the interval, never from the means alone: an interval below 0 is "better"
(for a metric where lower is better, such as bits per byte), above 0
"worse", across 0 "no detectable difference".
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import stats

BETTER, WORSE, NO_DIFFERENCE = "better", "worse", "no detectable difference"


def paired_interval(diffs: Sequence[float], confidence: float = 0.95) -> dict[str, object]:
  """Mean of paired differences and its Student-t interval.

  Args:
    diffs: one difference per seed (arm minus reference).
    confidence: the interval's coverage, in ``(0, 1)``.

  Returns:
    ``{"n", "mean", "std", "ci": [low, high], "lower_on"}``: ``std`` with
    ``ddof=1``; ``lower_on`` counts the negative differences. With one
    difference the interval is ``[-inf, inf]`` (JSON: ``None`` bounds are
    not used; callers print them as unknown).
  """
  d = np.asarray(diffs, np.float64)
  if d.ndim != 1 or d.size == 0:
    raise ValueError(f"diffs must be a non-empty 1-D sequence, got shape {d.shape}")
  if not 0.0 < confidence < 1.0:
    raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
  mean = float(d.mean())
  if d.size < 2:
    return {"n": 1, "mean": mean, "std": float("nan"), "ci": [-math.inf, math.inf],
            "lower_on": int((d < 0).sum())}
  std = float(d.std(ddof=1))
  half = float(stats.t.ppf(0.5 + confidence / 2, d.size - 1)) * std / math.sqrt(d.size)
  return {"n": int(d.size), "mean": mean, "std": std, "ci": [mean - half, mean + half],
          "lower_on": int((d < 0).sum())}


def conclusion(ci: Sequence[float]) -> str:
  """``"better"`` if the interval is below 0, ``"worse"`` above, else no detectable difference.

  Args:
    ci: ``[low, high]`` of a difference where lower is better.

  Returns:
    One of :data:`BETTER`, :data:`WORSE`, :data:`NO_DIFFERENCE`.
  """
  low, high = ci
  if high < 0:
    return BETTER
  if low > 0:
    return WORSE
  return NO_DIFFERENCE
