"""Target transition-rate schedules.

The paper schedules the target ``R`` with a cosine decay from
``R_0 = lambda * sqrt(b_w)`` to 0 over training (``lambda = 5e-3`` was best in
its sweep; a final target above 0 hurt). Any Optax schedule (step -> rate in
``[0, 1]``) can be a target.
"""

from __future__ import annotations

import math

import optax

from talr_optax import _checks

__all__ = ["initial_target", "cosine_target"]


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
                  ) -> optax.Schedule:
  """Cosine decay of the target from ``init_rate`` to ``final_rate``.

  ``R_t = final + 0.5 * (init - final) * (1 + cos(pi * t / T))`` for
  ``t <= T``, then ``final`` (built on ``optax.cosine_decay_schedule``).

  Args:
    init_rate: ``R_0`` in ``(0, 1]``, e.g. :func:`initial_target`.
    total_steps: ``T``, the number of training steps (an int > 0).
    final_rate: the rate reached at ``T``, in ``[0, init_rate]``.

  Returns:
    An ``optax.Schedule``.
  """
  _checks.check_number("init_rate", init_rate, 0.0, 1.0, low_open=True)
  total_steps = _checks.check_int("total_steps", total_steps, 1)
  _checks.check_number("final_rate", final_rate, 0.0, float(init_rate))
  return optax.cosine_decay_schedule(
      init_value=float(init_rate), decay_steps=total_steps,
      alpha=float(final_rate) / float(init_rate))
