"""Oscillation tracking: how often quantized weights flip back and forth.

A weight *oscillates* at an update when its integer level changes in the
direction opposite to its previous change (Nagel et al., 2022). Every weight
keeps the direction of its last change and an exponential moving average of
its oscillations, its *oscillation frequency*. TALR's claim is that scheduling
the transition rate damps oscillations late in training; this monitor
measures that directly, next to a baseline.

Like :func:`talr_optax.track_transitions` it is the last stage of a chain and
measures the changes the final updates cause; it leaves the updates
unchanged. It is opt-in because it keeps per-weight state: 5 bytes per
tracked weight (an int8 direction and a float32 frequency), or only for a
fixed sample with ``sample_size``.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from talr_optax import _checks
from talr_optax import _stage
from talr_optax import counting
from talr_optax._layout import RATE_DTYPE, LevelsFn, RateNames

__all__ = ["TrackOscillationsState", "track_oscillations"]

# A frequency is an EMA of 0/1 events. Float32: with Nagel et al.'s momentum
# 0.999 a float16 frequency near 0.01 moves by under one ulp per step, so most
# steps round away and the error grows to several percent (7 % seen).
_FREQUENCY_DTYPE = jnp.float32
_DIRECTION_DTYPE = jnp.int8


@_stage.declare_state(per_weight=("last_direction", "oscillation_frequency"),
                      per_rate=("mean_oscillation_frequency", "oscillating_fraction",
                                "oscillation_rate"))
class TrackOscillationsState(NamedTuple):
  """State of :func:`track_oscillations` after update ``n``.

  Attributes:
    last_direction: per tracked weight, the sign (-1, 0, +1) of its last level
      change (int8), shaped like the params (``None`` elsewhere).
    oscillation_frequency: per tracked weight, the EMA of its oscillations
      (float32).
    mean_oscillation_frequency: float32 vector, the mean frequency of each
      rate group (a tensor, or a layer of a stacked tensor).
    oscillating_fraction: float32 vector, the fraction of each group's
      weights whose frequency is above ``threshold``.
    oscillation_rate: float32 vector, the fraction of each group's weights
      that oscillated at update ``n``.
    rate_names: the name of each entry of the vectors (static).
  """

  last_direction: Any
  oscillation_frequency: Any
  mean_oscillation_frequency: jax.Array
  oscillating_fraction: jax.Array
  oscillation_rate: jax.Array
  rate_names: RateNames


def track_oscillations(
    levels_fn: LevelsFn,
    *,
    ema_momentum: float = 0.99,
    threshold: float = 0.02,
    layer_axes: Any = None,
    sample_size: Optional[int] = None,
) -> optax.GradientTransformationExtraArgs:
  """Measures weight oscillations per quantized tensor; leaves updates unchanged.

  For update ``n`` and each tracked weight with levels ``w_d(p_n)`` before and
  ``w_d(p_n + u_n)`` after it:

  * ``d_n = sign(w_d(p_n + u_n) - w_d(p_n))``, its direction of change;
  * it oscillates (``o_n = 1``) when ``d_n = -last`` where ``last`` is the
    direction of its previous change (0 before any change);
  * ``f_(n+1) = m f_n + (1 - m) o_n``, its oscillation frequency.

  Per rate group the state holds the mean of ``f``, the fraction of weights
  with ``f > threshold`` and the fraction that oscillated at this update;
  :func:`talr_optax.metrics` reports them as
  ``mean_oscillation_frequency/<name>``, ``oscillating_fraction/<name>`` and
  ``oscillation_rate/<name>``.

  Args:
    levels_fn: as in :func:`talr_optax.scale_by_talr`.
    ema_momentum: EMA momentum ``m`` of the frequency, in ``[0, 1)`` (0.99, as in
      Nagel et al.'s tracking, weighs the last ~100 updates).
    threshold: the frequency above which a weight counts as oscillating, in
      ``[0, 1)``. 0.02 means at least two oscillations in about the last
      ``1 / (1 - m)`` updates.
    layer_axes: as in :func:`talr_optax.scale_by_talr`.
    sample_size: as in :func:`talr_optax.scale_by_talr`: track at most this
      many weights per rate group (on a fixed grid), keeping state for those
      only.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose state is a
    :class:`TrackOscillationsState`.

  References:
    Nagel, Fournarakis, Bondarenko, Blankevoort, `Overcoming Oscillations in
    Quantization-Aware Training <https://arxiv.org/abs/2203.11086>`_, ICML 2022.
  """
  owner = "track_oscillations"
  _stage.check_levels_fn(levels_fn, owner=owner, callables=("levels_fn",))
  _checks.check_number("ema_momentum", ema_momentum, 0.0, 1.0, high_open=True, owner=owner)
  _checks.check_number("threshold", threshold, 0.0, 1.0, high_open=True, owner=owner)
  _checks.check_sample_size(sample_size)
  prologue = _stage.Prologue(owner, TrackOscillationsState, levels_fn, layer_axes=layer_axes,
                             sample_size=sample_size)

  def init_fn(params):
    layout, levels = prologue.init(params)
    # Like the counted levels, so each takes the sharding of its param (an
    # Explicit mesh refuses to mix a replicated state with sharded levels).
    counted = counting.counted(layout, levels)
    per_weight = lambda dtype: layout.per_leaf([counting.zeros_like(c, dtype) for c in counted])
    zeros = lambda: jnp.zeros((layout.num_rates,), RATE_DTYPE)
    return TrackOscillationsState(
        last_direction=per_weight(_DIRECTION_DTYPE),
        oscillation_frequency=per_weight(_FREQUENCY_DTYPE),
        mean_oscillation_frequency=zeros(),
        oscillating_fraction=zeros(),
        oscillation_rate=zeros(),
        rate_names=layout.rate_names,
    )

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    why = "measures the level changes the update causes"
    _stage.require_params(params, owner, why)
    before = counting.levels_of(levels_fn, params)
    layout = prologue.update(state, params, why=why, levels=before)
    # The levels the next step receives: rounded as stored, as track_transitions.
    after = counting.levels_after(levels_fn, params, updates)
    tracked = zip(counting.counted(layout, before), counting.counted(layout, after),
                  counting.stored(layout, state.last_direction, "stored directions"),
                  counting.stored(layout, state.oscillation_frequency, "stored frequencies"))
    last, freqs, flips = zip(*(_track(*x, ema_momentum) for x in tracked))
    return updates, TrackOscillationsState(
        last_direction=layout.per_leaf(last),
        oscillation_frequency=layout.per_leaf([f.astype(_FREQUENCY_DTYPE) for f in freqs]),
        mean_oscillation_frequency=counting.group_means(layout, freqs),
        oscillating_fraction=counting.group_means(layout, [f > threshold for f in freqs]),
        oscillation_rate=counting.group_means(layout, flips),
        rate_names=state.rate_names,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _track(old: jax.Array, new: jax.Array, last: jax.Array, freq: jax.Array,
           m: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One tensor: (direction of the last change, frequency, oscillated now)."""
  direction = jnp.sign(new.astype(jnp.int32) - old.astype(jnp.int32)).astype(_DIRECTION_DTYPE)
  oscillated = (direction * last) == -1  # the opposite of its previous change
  f = m * freq.astype(RATE_DTYPE) + (1.0 - m) * oscillated
  return jnp.where(direction != 0, direction, last), f, oscillated


def state_bytes_per_weight() -> int:
  """Bytes of per-weight state the tracker keeps (direction + frequency)."""
  return int(np.dtype(_DIRECTION_DTYPE).itemsize + np.dtype(_FREQUENCY_DTYPE).itemsize)
