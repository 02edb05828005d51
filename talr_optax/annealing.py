"""The annealing schedule of Nagel et al.'s oscillation remedies.

Their reference code anneals the dampening strength and the freezing
threshold the same way: the initial value for the first part of training,
then a cosine to the final value at the last step. For the freezing it sets
the threshold to 0 (no freezing) before the cosine starts, a warm start.
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import optax

from talr_optax import _checks

__all__ = ["delayed_cosine_schedule"]


def delayed_cosine_schedule(init_value: float, final_value: float, total_steps: int, *,
                            start_fraction: float = 0.25,
                            value_before: Optional[float] = None) -> optax.Schedule:
  r"""Constant, then a cosine from ``init_value`` to ``final_value``.

  With ``t_0 = start_fraction * total_steps``:

  .. math::

    v(t) = v_\text{before} \ (t < t_0), \qquad
    v(t) = v_1 + \tfrac12 (v_0 - v_1) (1 + \cos(\pi (t - t_0) / (T - t_0)))

  as the reference code's ``CosineTempDecay`` (``t_max = T``,
  ``rel_decay_start = start_fraction``).

  Args:
    init_value: ``v_0``, the value where the cosine starts (>= 0).
    final_value: ``v_1``, the value at ``total_steps`` (>= 0).
    total_steps: ``T``, the length of training (an int >= 1).
    start_fraction: where the cosine starts, a fraction of ``T`` in ``[0, 1)``
      (the reference code's default 0.25).
    value_before: the value before the cosine starts (>= 0); ``None`` means
      ``init_value`` (the dampening strength). Pass 0 for the freezing
      threshold (the reference code's warm start: no freezing until then).

  Returns:
    A schedule ``step -> float32``, for
    :func:`talr_optax.dampen_oscillations`'s ``strength`` or
    :func:`talr_optax.freeze_oscillations`'s ``threshold``.
  """
  inf = float("inf")
  _checks.check_number("init_value", init_value, 0.0, inf, high_open=True)
  _checks.check_number("final_value", final_value, 0.0, inf, high_open=True)
  total_steps = _checks.check_int("total_steps", total_steps, 1)
  _checks.check_number("start_fraction", start_fraction, 0.0, 1.0, high_open=True)
  if value_before is not None:
    _checks.check_number("value_before", value_before, 0.0, inf, high_open=True)
  before = init_value if value_before is None else value_before
  start = start_fraction * total_steps
  length = total_steps - start

  def schedule(count):
    t = jnp.asarray(count, jnp.float32)
    rel = jnp.clip((t - start) / length, 0.0, 1.0)
    cosine = final_value + 0.5 * (init_value - final_value) * (1.0 + jnp.cos(jnp.pi * rel))
    return jnp.where(t < start, before, cosine).astype(jnp.float32)

  return schedule
