"""Target transition-rate schedules.

The paper schedules the target ``R`` with a cosine decay from
``R_0 = lambda * sqrt(b_w)`` to 0 over training (``lambda = 5e-3`` was best in
its sweep; a final target above 0 hurt). Any Optax schedule (step -> rate in
``[0, 1]``) can be a target. :func:`measured_target` needs no ``R_0``: it
measures the rate the base learning rate gives in the first updates and
decays the target from there.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import optax

from talr_optax import _checks

__all__ = ["initial_target", "cosine_target", "measured_target", "TargetSchedule",
           "ema_momentum_for", "DEFAULT_EMA_MOMENTUM"]

# The paper's EMA momentum: K averages over about 100 steps.
DEFAULT_EMA_MOMENTUM = 0.99
# The rule's horizon 1 / (1 - m) is this fraction of the run, between 10 steps (the count of
# one step is noisy: K must average several) and the paper's 100.
_HORIZON_FRACTION = 1 / 50
_MIN_HORIZON, _MAX_HORIZON = 10.0, 100.0


@dataclasses.dataclass(frozen=True)
class TargetSchedule:
  """A target schedule that knows the length of the run it was built for.

  Called like any Optax schedule (``step -> rate``). ``scale_by_talr`` and the
  ready optimizers read ``total_steps`` to pick the EMA momentum when
  ``ema_momentum=None`` (see :func:`ema_momentum_for`).

  A *measured* target (``measure_steps > 0``, from :func:`measured_target`)
  has no rate of its own before training: ``schedule`` is then the target
  relative to ``R_0`` (1 at step 0), and :func:`talr_optax.scale_by_talr`
  measures ``R_0`` in the first ``measure_steps`` updates. Called directly,
  it returns that relative value.

  Attributes:
    schedule: the schedule itself (relative to ``R_0`` when measured).
    total_steps: the number of steps of the run.
    measure_steps: 0, or the number of first updates whose mean transition
      rate is ``R_0``.
    measure_pooled: one ``R_0`` for every rate group (their size-weighted
      mean), instead of each group's own.
    measure_fraction: ``R_0`` is this fraction of the measured rate, in
      ``(0, 1]``.
  """

  schedule: Callable[[Any], Any]
  total_steps: int
  measure_steps: int = 0
  measure_pooled: bool = False
  measure_fraction: float = 1.0

  def __post_init__(self):
    _checks.check_callable("schedule", self.schedule, "a function step -> rate",
                           owner="TargetSchedule")
    _checks.check_int("total_steps", self.total_steps, 1)
    _checks.check_int("measure_steps", self.measure_steps, 0, self.total_steps)
    _checks.check_bool("measure_pooled", self.measure_pooled)
    _checks.check_number("measure_fraction", self.measure_fraction, 0.0, 1.0, low_open=True)

  @property
  def measured(self) -> bool:
    """Whether ``R_0`` is measured in the first updates."""
    return self.measure_steps > 0

  def __call__(self, count: Any) -> Any:
    return self.schedule(count)


def ema_momentum_for(total_steps: int) -> float:
  """The EMA momentum of ``K`` for a run of ``total_steps`` steps.

  ``m = 1 - 1/h`` with the horizon ``h = T / 50`` clipped to ``[10, 100]``:
  ``K`` averages over 2 % of the run, over the paper's 100 steps (``m =
  0.99``) in runs of 5000 steps and more, and over at least 10 steps (``m =
  0.9``) in runs of 500 steps and fewer. A longer horizon lags the falling
  cosine target in a short run (``U`` changes by at most 1 % per step); a
  shorter one follows the noise of the per-step count.

  Args:
    total_steps: ``T``, the run's length (an int > 0).

  Returns:
    ``m`` in ``[0.9, 0.99]``: 0.95 for ``T = 1000``, 0.99 for ``T >= 5000``.
  """
  total_steps = _checks.check_int("total_steps", total_steps, 1)
  horizon = min(_MAX_HORIZON, max(_MIN_HORIZON, total_steps * _HORIZON_FRACTION))
  return 1.0 - 1.0 / horizon


def resolve_ema_momentum(ema_momentum: Optional[float], target: Any) -> float:
  """``ema_momentum``, or for ``None`` the rule for the target's length (0.99 if unknown).

  Args:
    ema_momentum: a momentum in ``[0, 1)`` or ``None``.
    target: the target transition rate (a :class:`TargetSchedule` knows its
      length; a float or another schedule does not).

  Returns:
    The momentum to use (not validated here when given).
  """
  if ema_momentum is not None:
    return ema_momentum
  if isinstance(target, TargetSchedule):
    return ema_momentum_for(target.total_steps)
  return DEFAULT_EMA_MOMENTUM


def initial_target(bits: int, lam: float = 5e-3) -> float:
  """Initial target transition rate ``R_0 = lam * sqrt(bits)``.

  Args:
    bits: weight bit width in ``[1, 8]``.
    lam: the paper's ``lambda``, in ``(0, 1]``; 5e-3 was best in its sweep.

  Returns:
    ``R_0`` as a Python float (``5e-3 * sqrt(2) = 7.07e-3`` for W2).
  """
  bits = _checks.check_bits("bits", bits)
  _checks.check_number("lam", lam, 0.0, 1.0, low_open=True)
  rate = float(lam) * math.sqrt(bits)
  if rate > 1:
    raise ValueError(f"lam * sqrt(bits) = {rate:g} is not a rate in [0, 1]; lower lam.")
  return rate


def cosine_target(init_rate: float, total_steps: int, final_rate: float = 0.0
                  ) -> TargetSchedule:
  """Cosine decay of the target from ``init_rate`` to ``final_rate``.

  ``R_t = final + 0.5 * (init - final) * (1 + cos(pi * t / T))`` for
  ``t <= T``, then ``final`` (built on ``optax.cosine_decay_schedule``).

  Args:
    init_rate: ``R_0`` in ``(0, 1]``, e.g. :func:`initial_target`.
    total_steps: ``T``, the number of training steps (an int > 0).
    final_rate: the rate reached at ``T``, in ``[0, init_rate]``.

  Returns:
    A :class:`TargetSchedule` (an Optax schedule that records ``total_steps``).
  """
  _checks.check_number("init_rate", init_rate, 0.0, 1.0, low_open=True)
  total_steps = _checks.check_int("total_steps", total_steps, 1)
  _checks.check_number("final_rate", final_rate, 0.0, float(init_rate))
  return TargetSchedule(optax.cosine_decay_schedule(
      init_value=float(init_rate), decay_steps=total_steps,
      alpha=float(final_rate) / float(init_rate)), total_steps)


def measured_target(total_steps: int, *, measure_steps: Optional[int] = None,
                    fraction: float = 0.5) -> TargetSchedule:
  """A cosine target from the transition rate the base learning rate gives.

  :func:`talr_optax.scale_by_talr` (and the ready optimizers) run the first
  ``W = measure_steps`` updates at the base learning rate ``U_0``, measuring
  each rate group's transition rate; ``K`` is their running mean. After
  update ``W - 1``, ``R_0`` is ``fraction`` times that mean (at least one
  transition per group in the ``W`` updates), and the target is the cosine
  ``R_t = R_0 (1 + cos(pi t / T)) / 2``, followed by TALR as usual.

  So ``R_0`` is not tuned: it follows from the learning rate you would use
  without TALR, and TALR then decays the *rate of change* of the quantized
  network with a cosine, instead of the learning rate. ``fraction=0.5`` is
  the rule the study chose on its tuning seed among three (docs/study.md):
  the first updates of QAT change levels faster than the run can sustain.

  Args:
    total_steps: ``T``, the number of training steps (an int > 0).
    measure_steps: ``W`` in ``[1, T]``; ``None``: the EMA horizon of
      :func:`ema_momentum_for` (``T / 50`` in ``[10, 100]``, at most ``T``).
    fraction: ``R_0`` over the measured rate, in ``(0, 1]``.

  Returns:
    A measured :class:`TargetSchedule`.
  """
  total_steps = _checks.check_int("total_steps", total_steps, 1)
  if measure_steps is None:
    measure_steps = min(total_steps, round(1.0 / (1.0 - ema_momentum_for(total_steps))))
  measure_steps = _checks.check_int("measure_steps", measure_steps, 1, total_steps)
  return TargetSchedule(optax.cosine_decay_schedule(1.0, total_steps), total_steps,
                        measure_steps=measure_steps, measure_fraction=fraction)
