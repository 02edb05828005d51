"""Iterative freezing of oscillating weights (Nagel et al., 2022) as an Optax stage.

Every quantized weight keeps the direction of its last level change, an EMA of
its oscillations (a change opposite to the previous one) and an EMA of its
integer level. When the oscillation EMA passes a threshold, the weight is
frozen at the rounded EMA of its level: its latent value is set to that
level's centre once (the *snap*), and it gets zero updates from then on.

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
from talr_optax import _tree
from talr_optax import counting
from talr_optax._layout import RATE_DTYPE, LevelsFn, RateNames
from talr_optax.dampening import CentersFn, quantized_centers
from talr_optax.quantizers import LEVEL_DTYPE

__all__ = ["FreezeOscillationsState", "freeze_oscillations"]

# The EMAs are float32: with Nagel's momentum of 0.999 a float16 EMA near
# 0.02 moves by about one ulp per step and would round most steps away.
_EMA_DTYPE = jnp.float32
_DIRECTION_DTYPE = jnp.int8


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
    freeze_level_ema: float32 EMA of each weight's integer level.
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
  frozen: Any
  frozen_fraction: jax.Array
  rate_names: RateNames
  inner_state: Any


def _check_threshold(threshold: Any) -> None:
  """A float in (0, 1], or a schedule (its value at step 0 may be 0: off)."""
  if not callable(threshold):
    _checks.check_number("threshold", threshold, 0.0, 1.0, low_open=True)
    return
  x = _checks.concrete_float(threshold(jnp.asarray(0, jnp.int32)))
  if x is not None and not 0.0 <= x <= 1.0:
    raise ValueError(
        "threshold must be an oscillation frequency in [0, 1] (0: no freezing at"
        f" that step); it is a schedule whose value at step 0 is {x!r}.")


def freeze_oscillations(
    levels_fn: LevelsFn,
    centers_fn: CentersFn,
    threshold: optax.ScalarOrSchedule,
    *,
    ema_momentum: float = 0.999,
    layer_axes: Any = None,
    inner: Optional[optax.GradientTransformation] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Freezes weights whose oscillation frequency passes ``threshold``.

  At update ``n`` the params ``p_n`` have levels ``x_n = w_d(p_n)``; with
  ``a = 1 - ema_momentum`` and, per weight (Nagel et al.'s reference code,
  one update for each of its forward passes):

  * ``s_n = sign(x_n - x_(n-1))``, and it oscillated (``o_n = 1``) when
    ``s_n = -d`` for ``d`` the direction of its last change (0 before any);
  * ``f_n = a o_n + (1 - a) f_(n-1)``, its oscillation frequency;
  * if ``threshold(n) > 0``: a weight not yet frozen with ``f_n >
    threshold(n)`` is frozen at level ``round(e_(n-1))``, then ``e_n = a x_n
    + (1 - a) e_(n-1)`` (``e`` starts at the levels of ``init``'s params and
    is not updated while the threshold is 0, as in the reference code).

  A weight frozen at update ``n`` whose level differs from its frozen level
  is moved to that level's centre (``centers_fn(params, levels)``) by this
  update, so the forward pass after update ``n`` uses the frozen level, as
  in the reference code; every frozen weight gets zero updates otherwise.
  A weight is frozen once, as the paper describes. (The reference code
  assigns the rounded EMA again at every step while the frequency stays
  above the threshold; with an EMA near a half-integer that moves a frozen
  weight back and forth between two levels, which the paper's freezing
  rules out.)

  Usage. With a plain optimizer, last: ``optax.chain(optax.adamw(1e-3),
  freeze_oscillations(levels_fn, centers_fn, 0.02))``. With TALR, around the
  TALR stage, so that it counts what is applied::

    optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(1e-4),
                freeze_oscillations(levels_fn, centers_fn, 0.02,
                                    inner=scale_by_talr(R, levels_fn, learning_rate=lr)))

  (``sgdt``/``adamt``/``adamwt`` take ``freeze_threshold=`` for this.)

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
      in ``(0, 1]`` or a schedule (Nagel et al.'s:
      ``delayed_cosine_schedule(th0, th1, total_steps, value_before=0.0)``).
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
  _checks.check_callable("levels_fn", levels_fn, "a function params -> levels")
  _checks.check_callable("centers_fn", centers_fn,
                         "a function (params, levels=None) -> centres")
  _check_threshold(threshold)
  _checks.check_number("ema_momentum", ema_momentum, 0.0, 1.0, high_open=True)
  if inner is not None and not (callable(getattr(inner, "init", None))
                                and callable(getattr(inner, "update", None))):
    raise ValueError(
        "inner must be an optax.GradientTransformation (the stage that applies the"
        f" learning rate), got inner of type {type(inner).__name__}.")
  inner = optax.identity() if inner is None else inner
  threshold_fn = threshold if callable(threshold) else (lambda count: threshold)
  a = 1.0 - ema_momentum  # the reference code's momentum: the weight of the new value

  def init_fn(params):
    layout, levels, _ = _groups(levels_fn, params, layer_axes, init=True)
    _check_centers(params)
    per_weight = lambda fn: layout.treedef.unflatten([
        None if q is None else fn(levels[q.position]) for q in layout.leaves])
    return FreezeOscillationsState(
        freeze_count=jnp.zeros((), jnp.int32),
        freeze_prev_levels=per_weight(lambda x: x),
        freeze_direction=per_weight(lambda x: jnp.zeros(x.shape, _DIRECTION_DTYPE)),
        freeze_frequency=per_weight(lambda x: jnp.zeros(x.shape, _EMA_DTYPE)),
        freeze_level_ema=per_weight(lambda x: x.astype(_EMA_DTYPE)),
        frozen=per_weight(lambda x: jnp.zeros(x.shape, jnp.bool_)),
        frozen_fraction=jnp.zeros((len(layout.names),), RATE_DTYPE),
        rate_names=RateNames(layout.names),
        inner_state=inner.init(params),
    )

  def _check_centers(params):
    quantized_centers(centers_fn, params, "freeze_oscillations")

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(
          "freeze_oscillations tracks the levels of the params, so it needs them:"
          " call tx.update(updates, state, params).")
    if not isinstance(state, FreezeOscillationsState):
      raise ValueError(
          "state must be the FreezeOscillationsState of this transformation, got"
          f" {type(state).__name__}: was the state made by another optimizer?")
    layout, levels, treedef = _groups(levels_fn, params, layer_axes, init=False)
    stored = [_match(treedef, tree, "stored freezing state") for tree in (
        state.freeze_prev_levels, state.freeze_direction, state.freeze_frequency,
        state.freeze_level_ema, state.frozen)]
    thr = jnp.asarray(threshold_fn(state.freeze_count), _EMA_DTYPE)
    on = thr > 0  # False for NaN too
    new = {name: [None] * len(layout.leaves) for name in
           ("prev", "direction", "frequency", "ema", "frozen", "target", "snap")}
    for q in layout.leaves:
      if q is None:
        continue
      i = q.position
      step = _step(levels[i], *(tree[i] for tree in stored), a=a, thr=thr, on=on)
      for name, value in zip(("prev", "direction", "frequency", "ema", "frozen", "target",
                              "snap"), step):
        new[name][i] = value
    center_leaves = _frozen_centers(centers_fn, params, treedef, new["target"])
    param_leaves = _match(treedef, params, "params")
    update_leaves = _match(treedef, updates, "updates")
    masked, snapped, snaps = [], [], []
    for i, (g, p, c) in enumerate(zip(update_leaves, param_leaves, center_leaves)):
      frozen, snap = new["frozen"][i], new["snap"][i]
      if frozen is None or _tree.is_none_or_masked(g):
        masked.append(g)
        snapped.append(p)
        snaps.append(None)
        continue
      p = _tree.unbox(p)
      move = jnp.where(snap, c.astype(g.dtype) - p.astype(g.dtype), 0).astype(g.dtype)
      masked.append(jnp.where(frozen, jnp.zeros_like(g), g))
      snapped.append(jnp.where(snap, (p + move).astype(p.dtype), p))
      snaps.append(move)
    inner_updates, inner_state = inner.update(
        treedef.unflatten(masked), state.inner_state, treedef.unflatten(snapped),
        **extra_args)
    final = [u if s is None else jnp.where(f, s, u).astype(u.dtype)
             for u, s, f in zip(_match(treedef, inner_updates, "inner's updates"),
                                snaps, new["frozen"])]
    frozen_leaves = [new["frozen"][q.position] for q in layout.leaves if q is not None]
    return treedef.unflatten(final), FreezeOscillationsState(
        freeze_count=optax.safe_increment(state.freeze_count),
        freeze_prev_levels=treedef.unflatten(new["prev"]),
        freeze_direction=treedef.unflatten(new["direction"]),
        freeze_frequency=treedef.unflatten(new["frequency"]),
        freeze_level_ema=treedef.unflatten(new["ema"]),
        frozen=treedef.unflatten(new["frozen"]),
        frozen_fraction=_frozen_fraction(layout, frozen_leaves),
        rate_names=state.rate_names,
        inner_state=inner_state,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# The one place that uses the private layout of the rate groups: which leaves
# are quantized, their names, the per-group means.
def _groups(levels_fn: LevelsFn, params: Any, layer_axes: Any, *, init: bool
            ) -> tuple[_layout.Layout, list[Any], Any]:
  """The layout, the int8 levels leaves of ``params`` and the levels' treedef."""
  measure = dict(layer_axes=layer_axes, sample_size=None, global_rate=False)
  if init:
    layout, levels = counting.init_levels(levels_fn, params, name="freeze_oscillations",
                                          **measure)
  else:
    levels = counting.levels_of(levels_fn, params)
    layout = _layout.build(levels, params, **measure)
  return layout, layout.match(levels, "levels"), layout.treedef


def _frozen_fraction(layout: _layout.Layout, frozen: list[jax.Array]) -> jax.Array:
  """The fraction of frozen weights of each rate group (float32 vector)."""
  return counting.group_means(layout, frozen)


def _match(treedef: Any, tree: Any, what: str) -> list[Any]:
  """Subtrees of ``tree`` at the leaves of the levels."""
  try:
    return treedef.flatten_up_to(tree)
  except (ValueError, TypeError) as e:
    raise ValueError(
        f"freeze_oscillations: the {what} do not have the structure of the levels"
        f" levels_fn returns for the params. ({e})") from None


def _frozen_centers(centers_fn: CentersFn, params: Any, treedef: Any, targets: list[Any]
                    ) -> list[Any]:
  """``centers_fn(params, levels)`` at the leaves of the levels, checked."""
  centers = centers_fn(params, treedef.unflatten(targets))
  try:
    leaves = treedef.flatten_up_to(centers)
  except (ValueError, TypeError) as e:
    raise ValueError(
        "freeze_oscillations: centers_fn(params, levels) returned a pytree whose"
        " structure does not match the levels: it must return a pytree with the"
        f" structure of params, an array per quantized leaf and None elsewhere. ({e})"
    ) from None
  for i, (c, level) in enumerate(zip(leaves, targets)):
    if level is not None and getattr(c, "shape", None) != level.shape:
      raise ValueError(
          f"freeze_oscillations: centers_fn(params, levels) returned"
          f" {type(c).__name__} of shape {getattr(c, 'shape', None)} at leaf {i}, where"
          f" the levels have shape {level.shape}: it must return the value of each"
          " given level.")
  return leaves


def _step(x, prev, direction, frequency, ema, frozen, *, a, thr, on):
  """One tensor's recursion; returns its new state, target levels and snap mask."""
  x32 = x.astype(jnp.int32)
  change = jnp.sign(x32 - _tree.unbox(prev).astype(jnp.int32))
  direction = _tree.unbox(direction)
  oscillated = (direction.astype(jnp.int32) * change) == -1
  # The reference code's order of operations, so float32 results match it.
  frequency = a * oscillated.astype(_EMA_DTYPE) + (1.0 - a) * _tree.unbox(frequency)
  direction = jnp.where(change != 0, change, direction).astype(_DIRECTION_DTYPE)
  ema = _tree.unbox(ema)
  frozen = _tree.unbox(frozen)
  newly = on & (frequency > thr) & ~frozen
  target = jnp.where(newly, jnp.round(ema).astype(jnp.int32), x32)
  ema = jnp.where(on, a * x32.astype(_EMA_DTYPE) + (1.0 - a) * ema, ema)
  frozen = frozen | newly
  return (x.astype(LEVEL_DTYPE), direction, frequency.astype(_EMA_DTYPE),
          ema.astype(_EMA_DTYPE), frozen, target.astype(LEVEL_DTYPE), newly & (target != x32))


def state_bytes_per_weight() -> int:
  """Bytes of per-weight state: levels, direction, two float32 EMAs, frozen flag."""
  return int(np.dtype(LEVEL_DTYPE).itemsize + np.dtype(_DIRECTION_DTYPE).itemsize
             + 2 * np.dtype(_EMA_DTYPE).itemsize + np.dtype(np.bool_).itemsize)
