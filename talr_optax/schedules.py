"""Target transition-rate schedules.

The paper schedules the target ``R`` with a cosine decay from
``R_0 = lambda * sqrt(b_w)`` to 0 over training (``lambda = 5e-3`` was best in
its sweep). Any Optax schedule (step count -> rate in ``[0, 1]``) can be used
as a target.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import optax

from talr_optax.quantizers import validate_bits

__all__ = ["initial_target", "cosine_target"]


def _is_real(x) -> bool:
  """A real Python or NumPy number (not bool); NaN passes, range checks reject it."""
  return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def initial_target(bits: int, lam: float = 5e-3) -> float:
  """Initial target transition rate ``R_0 = lam * sqrt(bits)``.

  Args:
    bits: weight bit width in ``[1, 8]``.
    lam: the paper's ``lambda`` (> 0); 5e-3 was best in its sweep.

  Returns:
    ``R_0`` as a Python float (e.g. ``5e-3 * sqrt(2) = 7.07e-3`` for W2).
  """
  bits = validate_bits(bits)
  if not _is_real(lam) or not 0 < lam <= 1:
    raise ValueError(f"lam must be a number in (0, 1], got lam = {lam!r}.")
  rate = float(lam) * math.sqrt(bits)
  if rate > 1:
    raise ValueError(
        f"lam * sqrt(bits) = {rate:g} is not a rate in [0, 1]; lower lam."
    )
  return rate


def cosine_target(
    init_rate: float, total_steps: int, final_rate: float = 0.0
) -> optax.Schedule:
  """Cosine decay of the target from ``init_rate`` to ``final_rate``.

  ``R_t = final + 0.5 * (init - final) * (1 + cos(pi * t / T))`` for
  ``t <= T``, then ``final``.

  Args:
    init_rate: ``R_0`` in ``(0, 1]``, e.g. :func:`initial_target`.
    total_steps: ``T``, number of training steps (int > 0).
    final_rate: rate reached at ``T``, in ``[0, init_rate]``; the paper found
      a final target above 0 hurt.

  Returns:
    An ``optax.Schedule`` (built on ``optax.cosine_decay_schedule``).
  """
  if not _is_real(init_rate) or not 0 < init_rate <= 1:
    raise ValueError(f"init_rate must be a number in (0, 1], got init_rate = {init_rate!r}.")
  if (isinstance(total_steps, (bool, np.bool_))
      or not isinstance(total_steps, numbers.Integral) or total_steps <= 0):
    raise ValueError(
        f"total_steps must be an integer > 0, got total_steps = {total_steps!r}."
    )
  if not _is_real(final_rate) or not 0 <= final_rate <= init_rate:
    raise ValueError(
        f"final_rate must be a number in [0, init_rate = {init_rate}], got"
        f" final_rate = {final_rate!r}."
    )
  return optax.cosine_decay_schedule(
      init_value=float(init_rate), decay_steps=int(total_steps),
      alpha=float(final_rate) / float(init_rate)
  )
