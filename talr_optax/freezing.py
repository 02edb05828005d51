"""Iterative freezing of oscillating weights (Nagel et al., 2022) as an Optax stage.

Every quantized weight keeps the direction of its last level change, an EMA of
its oscillations (a change opposite to the previous one) and an EMA of its
integer level. When the oscillation EMA passes a threshold, the weight is
frozen at the rounded EMA of its level: its latent value is set to that
level's centre once (the *snap*), and it gets zero updates from then on.

As in the authors' tracker, which starts at its first call, everything the
stage remembers about levels starts from the params of the first update, not
from those ``init`` saw (an optimizer may be built before the pretrained
weights are loaded), and the level EMA is created at the first update whose
threshold is above 0, from that update's levels.

Order with TALR. :func:`talr_optax.scale_by_talr` counts the levels of
``params + updates`` at its own stage, so nothing after it may change the
updates. The freezing therefore wraps the stage that applies the learning
rate (``inner``): the frozen weights' incoming updates are zeroed, ``inner``
is called with the params *after the snap*, and the snap is added to its
output. So ``inner``'s ``params + updates`` is exactly what is applied, the
snap's level change included, and TALR counts it at the step it happens.
Without ``inner`` the stage goes last, after a plain optimizer.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from talr_optax import _checks
from talr_optax import _layout
from talr_optax import _stage
from talr_optax import _tree
from talr_optax import counting
from talr_optax._layout import RATE_DTYPE, LevelsFn, RateNames
from talr_optax.quantizers import LEVEL_DTYPE

__all__ = ["FreezeOscillationsState", "freeze_oscillations"]

# The EMAs are float32: with Nagel's momentum of 0.999 a float16 EMA near
# 0.02 moves by about one ulp per step and would round most steps away.
_EMA_DTYPE = jnp.float32
_DIRECTION_DTYPE = jnp.int8
_CALLABLES = ("levels_fn", "centers_fn", "inner")
_OWNER = "freeze_oscillations"


@_stage.declare_state(
    per_weight=("freeze_prev_levels", "freeze_direction", "freeze_frequency",
                "freeze_level_ema", "frozen"),
    per_rate=("frozen_fraction",),
    nested=("inner_state",))
class FreezeOscillationsState(NamedTuple):
  """State of :func:`freeze_oscillations` after update ``n``.

  Per-weight fields are shaped like the params at quantized leaves and
  ``None`` elsewhere: 11 bytes per quantized weight in all.

  Attributes:
    freeze_count: number of updates done (int32), the step of a threshold
      schedule.
    freeze_prev_levels: int8 levels of the params update ``n`` received.
    freeze_direction: int8 sign (-1, 0, +1) of each weight's last level change.
    freeze_frequency: float32 EMA of each weight's oscillations.
    freeze_level_ema: float32 EMA of each weight's integer level (meaningless
      until ``freeze_level_ema_started``).
    freeze_level_ema_started: bool, whether an update with a threshold above
      0 has created the level EMA.
    frozen: bool, the frozen weights.
    frozen_fraction: float32 vector, the fraction of each rate group's weights
      that are frozen (a tensor, or a layer of a stacked tensor).
    rate_names: the name of each entry of ``frozen_fraction`` (static).
    inner_state: the state of ``inner`` (``optax.EmptyState()`` without one).
  """

  freeze_count: jax.Array
  freeze_prev_levels: Any
  freeze_direction: Any
  freeze_frequency: Any
  freeze_level_ema: Any
  freeze_level_ema_started: jax.Array
  frozen: Any
  frozen_fraction: jax.Array
  rate_names: RateNames
  inner_state: Any


class _Tracked(NamedTuple):
  """One tensor's new tracking state, and the levels its newly frozen weights keep."""

  levels: jax.Array
  direction: jax.Array
  frequency: jax.Array
  level_ema: jax.Array
  frozen: jax.Array
  frozen_levels: jax.Array  # the level each weight is frozen at (its own level if not newly)
  snap: jax.Array  # newly frozen at another level than its own: moved this update


def freeze_oscillations(
    levels_fn: LevelsFn,
    centers_fn: Any,
    threshold: optax.ScalarOrSchedule,
    *,
    ema_momentum: float = 0.999,
    layer_axes: Any = None,
    inner: Optional[optax.GradientTransformation] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Freezes weights whose oscillation frequency passes ``threshold``.

  At update ``n`` the params ``p_n`` have levels ``x_n = w_d(p_n)``; with
  ``a = 1 - ema_momentum`` and, per weight (Nagel et al.'s reference code,
  one update for each of its forward passes; tracking starts at update 0,
  with ``x_(-1) = x_0``):

  * ``s_n = sign(x_n - x_(n-1))``, and it oscillated (``o_n = 1``) when
    ``s_n = -d`` for ``d`` the direction of its last change (0 before any);
  * ``f_n = a o_n + (1 - a) f_(n-1)``, its oscillation frequency;
  * if ``threshold(n) > 0``: the level EMA is created as ``e = x_n`` if no
    earlier update had a threshold above 0 (the reference code's
    ``check_init``: under a warm start, from the levels when freezing
    begins); a weight not yet frozen with ``f_n > threshold(n)`` is frozen
    at level ``round(e)``; then ``e = a x_n + (1 - a) e``.

  A weight frozen at update ``n`` whose level differs from its frozen level
  is moved to that level's centre (``centers_fn(params, levels)``) by this
  update, so the forward pass after update ``n`` uses the frozen level, as
  in the reference code; a weight frozen at its own level keeps its latent
  value. Every frozen weight gets zero updates otherwise. A weight is frozen
  once, as the paper describes. (The reference code assigns the rounded EMA
  again at every step while the frequency stays above the threshold; with an
  EMA near a half-integer that moves a frozen weight back and forth between
  two levels, which the paper's freezing rules out.)

  Usage. With a plain optimizer, last: ``optax.chain(optax.adamw(1e-3),
  freeze_oscillations(levels_fn, centers_fn, 0.02))``. With TALR, around the
  TALR stage, so that it counts what is applied::

    optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(1e-4),
                freeze_oscillations(levels_fn, centers_fn, 0.02,
                                    inner=scale_by_talr(R, levels_fn, learning_rate=lr)))

  (``sgdt``/``adamt``/``adamwt`` take ``freeze_threshold=`` for this.) The
  authors' schedule: ``delayed_cosine_schedule(0.1, th1, total_steps,
  value_before=0.0)`` (no freezing for the first quarter, then a cosine from
  0.1 to ``th1``).

  Under ``optax.inject_hyperparams`` pass ``static_args=("levels_fn",
  "centers_fn", "inner")``: it treats callables as schedules.

  Safe behaviour: a threshold schedule's value ``<= 0`` or NaN turns the
  freezing off at that step (tracking goes on). The snap lands on the level
  centre in the params' dtype; in bfloat16 at 7 or 8 bits the rounding of
  the centre may leave the weight one level off its frozen level, which is
  then the level it keeps (see docs/oscillations.md).

  Args:
    levels_fn: ``params -> levels`` as in :func:`talr_optax.scale_by_talr`.
    centers_fn: ``(params, levels) -> latent values of those levels``, e.g.
      :func:`talr_optax.centers_fn_from_scales`,
      :func:`talr_optax.nnx.centers_fn_for`.
    threshold: oscillation frequency above which a weight is frozen, a float
      in ``(0, 1]`` or a schedule whose values are in ``[0, 1]``.
    ema_momentum: EMA momentum ``m`` of the frequency and level EMAs, in
      ``[0, 1)``; the reference code's ``momentum`` is ``1 - m``, and the
      default 0.999 is its default 0.001 (an average over about 1000
      updates: a short run needs less). Nagel et al. advise ``1 - m`` at
      most a half to a third of the threshold.
    layer_axes: as in :func:`talr_optax.scale_by_talr`: the frozen fraction
      is reported per layer of a stacked tensor.
    inner: the stage that applies the learning rate (e.g.
      :func:`talr_optax.scale_by_talr`, ``optax.scale_by_learning_rate``):
      it must map a zero update to zero. ``None``: the identity.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose state is a
    :class:`FreezeOscillationsState`.

  References:
    Nagel, Fournarakis, Bondarenko, Blankevoort, `Overcoming Oscillations in
    Quantization-Aware Training <https://arxiv.org/abs/2203.11086>`_, ICML 2022.
  """
  _stage.check_levels_fn(levels_fn, owner=_OWNER, callables=_CALLABLES)
  _stage.check_centers_fn(centers_fn, owner=_OWNER, callables=_CALLABLES, with_levels=True)
  threshold_fn = threshold_schedule(threshold)
  _checks.check_number("ema_momentum", ema_momentum, 0.0, 1.0, high_open=True, owner=_OWNER)
  _stage.check_inner(inner, owner=_OWNER)
  # Extra arguments (e.g. the loss) reach inner only if it takes them.
  inner = optax.with_extra_args_support(optax.identity() if inner is None else inner)
  a = 1.0 - ema_momentum  # the reference code's momentum: the weight of the new value
  prologue = _stage.Prologue(_OWNER, FreezeOscillationsState, levels_fn,
                             layer_axes=layer_axes)

  def init_fn(params):
    layout, levels = prologue.init(params)
    _stage.centers_of(centers_fn, params, _OWNER)
    # Shapes only: tracking starts at the first update. Like the levels, so
    # each takes the sharding of its param (an Explicit mesh refuses to mix).
    like = lambda dtype: layout.per_leaf(
        [counting.zeros_like(x, dtype) for x in counting.counted(layout, levels)])
    return FreezeOscillationsState(
        freeze_count=jnp.zeros((), jnp.int32),
        freeze_prev_levels=like(LEVEL_DTYPE),
        freeze_direction=like(_DIRECTION_DTYPE),
        freeze_frequency=like(_EMA_DTYPE),
        freeze_level_ema=like(_EMA_DTYPE),
        freeze_level_ema_started=jnp.zeros((), jnp.bool_),
        frozen=like(jnp.bool_),
        frozen_fraction=jnp.zeros((layout.num_rates,), RATE_DTYPE),
        rate_names=layout.rate_names,
        inner_state=inner.init(params),
    )

  def update_fn(updates, state, params=None, **extra_args):
    why = "tracks the levels of the params"
    _stage.require_params(params, _OWNER, why)
    levels = counting.levels_of(levels_fn, params)
    layout = prologue.update(state, params, why=why, levels=levels)
    thr = jnp.asarray(threshold_fn(state.freeze_count), _EMA_DTYPE)
    on = thr > 0  # False for NaN too
    # 1. Each weight's oscillations and level EMA; which freeze now, at which level.
    tracked = _track(layout, levels, state, a=a, thr=thr, on=on)
    # 2. Newly frozen weights move to their frozen level's centre.
    snapped, snaps = _snap(layout, centers_fn, params, tracked)
    # 3. The learning rate stage sees the snapped params and no update of a frozen weight.
    frozen = [t.frozen for t in tracked]
    inner_updates, inner_state = inner.update(
        _zero_frozen(layout, updates, frozen), state.inner_state, snapped, **extra_args)
    return _add_snaps(layout, inner_updates, snaps, frozen), FreezeOscillationsState(
        freeze_count=optax.safe_increment(state.freeze_count),
        freeze_prev_levels=layout.per_leaf([t.levels for t in tracked]),
        freeze_direction=layout.per_leaf([t.direction for t in tracked]),
        freeze_frequency=layout.per_leaf([t.frequency for t in tracked]),
        freeze_level_ema=layout.per_leaf([t.level_ema for t in tracked]),
        freeze_level_ema_started=state.freeze_level_ema_started | on,
        frozen=layout.per_leaf(frozen),
        frozen_fraction=counting.group_means(layout, frozen),
        rate_names=state.rate_names,
        inner_state=inner_state,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def threshold_schedule(threshold: Any, name: str = "threshold", owner: str = _OWNER
                       ) -> _stage.Schedule:
  """A frequency in (0, 1], or a schedule of one (its value 0 turns freezing off)."""
  return _stage.schedule(name, threshold, 0.0, 1.0, low_open=True, schedule_low=0.0,
                         what="an oscillation frequency", owner=owner)


def _track(layout: _layout.Layout, levels: Any, state: FreezeOscillationsState, *,
           a: float, thr: jax.Array, on: jax.Array) -> list[_Tracked]:
  """The recursion of every quantized tensor at this update (see the factory's docstring)."""
  first = state.freeze_count == 0
  started = state.freeze_level_ema_started
  stored = lambda field, what: counting.stored(layout, getattr(state, field), what)
  return [_track_tensor(x, *old, a=a, thr=thr, on=on, first=first, started=started)
          for x, *old in zip(
              counting.counted(layout, levels),
              stored("freeze_prev_levels", "stored levels"),
              stored("freeze_direction", "stored directions"),
              stored("freeze_frequency", "stored frequencies"),
              stored("freeze_level_ema", "stored level EMAs"),
              stored("frozen", "stored frozen masks"))]


def _track_tensor(x, prev, direction, frequency, ema, frozen, *, a, thr, on, first, started
                  ) -> _Tracked:
  x32 = x.astype(jnp.int32)
  prev = jnp.where(first, x32, prev.astype(jnp.int32))  # tracking starts at update 0
  change = jnp.sign(x32 - prev)
  oscillated = (direction.astype(jnp.int32) * change) == -1
  # The reference code's order of operations, so float32 results match it.
  frequency = a * oscillated.astype(_EMA_DTYPE) + (1.0 - a) * frequency
  direction = jnp.where(change != 0, change, direction).astype(_DIRECTION_DTYPE)
  ema = jnp.where(started, ema, x32.astype(_EMA_DTYPE))  # created when freezing begins
  newly = on & (frequency > thr) & ~frozen
  target = jnp.where(newly, jnp.round(ema).astype(jnp.int32), x32)
  ema = jnp.where(on, a * x32.astype(_EMA_DTYPE) + (1.0 - a) * ema, ema)
  return _Tracked(x.astype(LEVEL_DTYPE), direction, frequency.astype(_EMA_DTYPE),
                  ema.astype(_EMA_DTYPE), frozen | newly, target.astype(LEVEL_DTYPE),
                  newly & (target != x32))


def _snap(layout: _layout.Layout, centers_fn: Any, params: Any, tracked: list[_Tracked]
          ) -> tuple[Any, list[Optional[jax.Array]]]:
  """The params after the snap, and each quantized leaf's snap (as an update)."""
  frozen_levels = layout.per_leaf([t.frozen_levels for t in tracked])
  _, _, centers = _stage.centers_of(centers_fn, params, _OWNER, levels=frozen_levels)
  param_leaves = layout.match(params, "params")
  new_params, snaps = list(param_leaves), []
  for q, t in zip(layout.quantized, tracked):
    p = _tree.unbox(param_leaves[q.position])
    c = centers[q.position]
    move = jnp.where(t.snap, c.astype(p.dtype) - p, jnp.zeros_like(p))
    new_params[q.position] = jnp.where(t.snap, (p + move).astype(p.dtype), p)
    snaps.append(move)
  return layout.treedef.unflatten(new_params), snaps


def _zero_frozen(layout: _layout.Layout, updates: Any, frozen: list[jax.Array]) -> Any:
  """``updates`` with those of frozen weights set to 0."""
  leaves = layout.match(updates, "updates")
  for q, f in zip(layout.quantized, frozen):
    g = leaves[q.position]
    if not _tree.is_none_or_masked(g):
      leaves[q.position] = jnp.where(f, jnp.zeros_like(g), g)
  return layout.treedef.unflatten(leaves)


def _add_snaps(layout: _layout.Layout, updates: Any, snaps: list[jax.Array],
               frozen: list[jax.Array]) -> Any:
  """``inner``'s updates, with each frozen weight's exactly its snap (0 once frozen)."""
  leaves = layout.match(updates, "inner's updates")
  for q, snap, f in zip(layout.quantized, snaps, frozen):
    u = leaves[q.position]
    if not _tree.is_none_or_masked(u):
      leaves[q.position] = jnp.where(f, snap.astype(u.dtype), u)
  return layout.treedef.unflatten(leaves)


def state_bytes_per_weight() -> int:
  """Bytes of per-weight state: levels, direction, two float32 EMAs, frozen flag."""
  return int(np.dtype(LEVEL_DTYPE).itemsize + np.dtype(_DIRECTION_DTYPE).itemsize
             + 2 * np.dtype(_EMA_DTYPE).itemsize + np.dtype(np.bool_).itemsize)
