"""Transition-adaptive learning rate (TALR) as an Optax transformation.

In quantization-aware training the network only changes when a latent weight
crosses a transition point of its quantizer. :func:`scale_by_talr` scales the
updates of every quantized tensor by its own learning rate ``U``, counts the
fraction ``k`` of its weights whose integer level the update changes, smooths
it into ``K``, and adapts ``U`` so that ``K`` follows a scheduled target
transition rate ``R`` (Lee et al., 2025).

The update uses ``U`` from the transitions of earlier updates; the transitions
it causes are counted afterwards and set the next ``U``. So the update never
waits for the count, the recursion is the authors' step for step (first step
included), and the transformation is the last stage of a chain: it applies
the learning rate and sees the final updates.

:func:`track_transitions` measures ``k`` and ``K`` the same way without
changing the updates, for a baseline to compare with.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from talr_optax import _checks
from talr_optax import _layout
from talr_optax import _stage
from talr_optax import _tree
from talr_optax import counting
from talr_optax import schedules
from talr_optax._layout import RATE_DTYPE, LevelsFn, RateNames

__all__ = [
    "RateNames",
    "ScaleByTALRState",
    "TrackTransitionsState",
    "scale_by_talr",
    "track_transitions",
]

ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]

# Guards R / K in the multiplicative rule, as in the authors' code.
_EPS = 1e-8
# Largest float32. A tensor that stops moving (zero gradient, weights beyond
# the clip range) multiplies c by up to m + (1 - m) R / 1e-8 per step; c and
# U saturate here instead of overflowing to inf (and inf * 0 = NaN).
_RATE_MAX = float(np.finfo(np.float32).max)


@_stage.declare_state(
    per_weight=("prev_levels",),
    per_rate=("transition_rate", "ema_transition_rate", "target_transition_rate",
              "initial_target_rate", "talr", "talr_scale"))
class ScaleByTALRState(NamedTuple):
  """State of :func:`scale_by_talr` after update ``n`` (``talr_count = n + 1``).

  Rate fields are float32 vectors with one entry per rate group, named by
  ``rate_names``: a quantized tensor, each layer of a stacked tensor
  (``layer_axes``), or one pooled entry (``granularity="global"``).

  Attributes:
    talr_count: number of updates done (int32).
    prev_levels: int8 levels of the params the update produced (the counted
      subset with ``sample_size``), shaped like the params, ``None`` elsewhere.
    transition_rate: ``k_n``, fraction of weights whose level update ``n``
      changed.
    ema_transition_rate: ``K_(n+1)``, exponential moving average of ``k``.
    target_transition_rate: ``R(n+1)``, the target ``U_(n+1)`` was set for.
    initial_target_rate: ``R_0``; with a measured target
      (:func:`talr_optax.measured_target`), 0 until it is measured.
    talr: ``U_(n+1)``, the learning rate of the next update.
    talr_scale: ``c_(n+1)``, ``U / learning_rate`` (multiplicative rule; 1
      with the additive rule).
    rate_names: the name of each entry of the rate vectors (static).
  """

  talr_count: jax.Array
  prev_levels: Any
  transition_rate: jax.Array
  ema_transition_rate: jax.Array
  target_transition_rate: jax.Array
  initial_target_rate: jax.Array
  talr: jax.Array
  talr_scale: jax.Array
  rate_names: RateNames


@_stage.declare_state(per_weight=("prev_levels",),
                      per_rate=("transition_rate", "ema_transition_rate"))
class TrackTransitionsState(NamedTuple):
  """State of :func:`track_transitions` (fields as in :class:`ScaleByTALRState`).

  ``tracking_count`` is the number of updates done (int32).
  """

  tracking_count: jax.Array
  prev_levels: Any
  transition_rate: jax.Array
  ema_transition_rate: jax.Array
  rate_names: RateNames


def _sanitize_target(value: Any) -> jax.Array:
  """The target as used: clipped to [0, 1], NaN as 0 (a schedule cannot raise in jit)."""
  r = jnp.asarray(value, RATE_DTYPE)
  return jnp.clip(jnp.nan_to_num(r, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)


def _target_schedule(value: ScalarOrSchedule, name: str, owner: str) -> _stage.Schedule:
  """A rate in [0, 1] (a fraction of weights per step), or a schedule of one."""
  return _stage.schedule(name, value, 0.0, 1.0, what="a rate", owner=owner)


def _check_measure(levels_fn: Any, ema_momentum: Any, sample_size: Any, owner: str,
                   callables: tuple[str, ...]) -> None:
  _stage.check_levels_fn(levels_fn, owner=owner, callables=callables)
  _checks.check_number("ema_momentum", ema_momentum, 0.0, 1.0, high_open=True, owner=owner)
  _checks.check_sample_size(sample_size)


def _scale(g: jax.Array, lr: jax.Array) -> jax.Array:
  """``-lr * g`` in the dtype of ``g``, multiplied in at least float32.

  A large ``U`` cast to float16 first would be inf, and inf times a zero
  gradient NaN; rounding once at the end avoids it.
  """
  compute = jnp.promote_types(g.dtype, RATE_DTYPE)
  return (-lr.astype(compute) * g.astype(compute)).astype(g.dtype)


def scale_by_talr(
    target_transition_rate: ScalarOrSchedule,
    levels_fn: LevelsFn,
    *,
    learning_rate: float,
    rule: str = "multiplicative",
    ema_momentum: Optional[float] = None,
    additive_step: Optional[float] = None,
    granularity: str = "per_tensor",
    fallback_learning_rate: Optional[optax.ScalarOrSchedule] = None,
    layer_axes: Any = None,
    sample_size: Optional[int] = None,
    max_talr: Optional[float] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Scales updates of quantized weights by the transition-adaptive learning rate.

  The last stage of an ``optax.chain``, in place of
  ``optax.scale_by_learning_rate``: it applies the learning rate and counts the
  transitions of the updates it returns, so nothing may change them after it.

  For update ``n = 0, 1, ...`` and each rate group (a quantized tensor, a
  layer of a stacked tensor, or all of them pooled):

  .. math::

    u_n &= -U_n \, g_n \qquad (U_0 = \text{lr},\ K_0 = R(0),\ c_0 = 1) \\
    k_n &= \#\{w_d(p_n) \ne w_d(p_n + u_n)\} / N \\
    K_{n+1} &= m K_n + (1 - m) k_n \\
    c_{n+1} &= m c_n + (1 - m) c_n R(n+1) / (K_{n+1} + 10^{-8}), \quad
      U_{n+1} = \text{lr} \cdot c_{n+1} \quad \text{(multiplicative)} \\
    U_{n+1} &= \max(0, U_n + \eta (R(n+1) - K_{n+1})) \quad \text{(additive)}

  ``w_d`` are the integer levels ``levels_fn`` gives, ``p_n + u_n`` is what
  ``optax.apply_updates`` returns (dtype cast included), and its levels are
  stored for the next count. The update never depends on the count of its own
  step.

  Safe behaviour. A target outside ``[0, 1]`` is clipped to it and a NaN
  target counts as 0 (a schedule cannot raise under jit). Rates are computed
  from integer levels only: a NaN gradient makes its weight's level that of
  ``w = 0`` (one burst of transitions) but never makes a rate non-finite, and
  ``c`` and ``U`` saturate at the largest float32. A quantized leaf with no
  weights has no rate; its (empty) update passes through. Wrap the optimizer
  in ``optax.apply_if_finite`` to skip non-finite steps.

  Args:
    target_transition_rate: ``R`` in ``[0, 1]``, a float or a schedule (step
      -> rate), e.g. :func:`talr_optax.cosine_target`.
    levels_fn: ``params -> levels``, a pytree with the structure of params
      holding integer levels (values that fit int8) for every quantized
      weight and ``None`` elsewhere (also for ``optax.MaskedNode`` leaves).
    learning_rate: base learning rate (> 0): ``U_0``, and the scale of ``c``.
    rule: ``"multiplicative"`` (the authors' code) or ``"additive"`` (the
      paper's Eq. 11).
    ema_momentum: momentum ``m`` of the exponential moving average ``K`` of the
      transition rate, in ``[0, 1)``; also the smoothing of ``c`` in the
      multiplicative rule. ``K`` reflects about the last ``1 / (1 - m)`` updates.
      ``None``: :func:`talr_optax.ema_momentum_for` of the target's length if
      it knows it (:func:`talr_optax.cosine_target` does), else 0.99.
    additive_step: additive rule only: the step ``eta`` by which ``U`` moves per
      unit of ``R - K`` (> 0); ``None`` means ``learning_rate``.
    granularity: ``"per_tensor"`` (one ``U`` per quantized tensor, as in the
      authors' code) or ``"global"`` (one rate pooled over all of them).
    fallback_learning_rate: learning rate (float or schedule) for leaves whose
      levels are ``None``. Required if there are any; or route them to
      another optimizer with ``optax.partition``.
    layer_axes: for stacked (scanned) layers: a pytree with the structure of
      params, or a prefix of it, holding an int axis or ``None``, or a
      callable ``params -> such a pytree`` (as ``optax.masked``'s mask).
      Each slice of a quantized leaf along its axis gets its own ``k``,
      ``K`` and ``U``.
    sample_size: ``None`` counts every weight. An int ``N`` counts a rate
      group with more than ``N`` weights on a fixed grid of at most ``N`` of
      them (see :func:`talr_optax.counting.sample_strides`) and stores only
      their levels.
    max_talr: ``None``, or the largest ``U`` (``>= learning_rate``): ``U``
      and ``c`` stop there. When the gradient of the quantized weights
      vanishes, ``U`` grows to keep ``K`` at ``R``; if the gradient comes back
      while ``U`` is large, one update can move many weights at once.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose state is a
    :class:`ScaleByTALRState`.

  References:
    Lee, Jeon, Kim, Ham, `Scheduling Weight Transitions for Quantization-Aware
    Training <https://arxiv.org/abs/2404.19248>`_, ICCV 2025.
  """
  owner = "scale_by_talr"
  ema_momentum = schedules.resolve_ema_momentum(ema_momentum, target_transition_rate)
  _check_talr_arguments(levels_fn, learning_rate, rule, ema_momentum, additive_step,
                        granularity, layer_axes, sample_size, max_talr)
  target_fn = _target_schedule(target_transition_rate, "target_transition_rate", owner)
  fallback_fn = None if fallback_learning_rate is None else _stage.schedule(
      "fallback_learning_rate", fallback_learning_rate, 0.0, np.inf, low_open=True,
      high_open=True, owner=owner)
  adapt = _adaptation(rule, ema_momentum, learning_rate,
                      eta=learning_rate if additive_step is None else additive_step,
                      max_talr=_RATE_MAX if max_talr is None else max_talr)
  measuring = _Measuring.of(target_transition_rate)
  prologue = _stage.Prologue(owner, ScaleByTALRState, levels_fn, layer_axes=layer_axes,
                             sample_size=sample_size, global_rate=granularity == "global")

  def init_fn(params):
    layout, levels = prologue.init(params)
    if fallback_fn is None:
      _require_no_unquantized_leaf(layout, levels, params)
    r0 = 0.0 if measuring else _sanitize_target(target_fn(jnp.asarray(0, jnp.int32)))
    # A separate buffer per field, so the state can be donated after init.
    fill = lambda v: jnp.full((layout.num_rates,), v, RATE_DTYPE)
    return ScaleByTALRState(
        talr_count=jnp.zeros((), jnp.int32),
        prev_levels=layout.per_leaf(counting.counted(layout, levels)),
        transition_rate=fill(0.0),
        ema_transition_rate=fill(r0),
        target_transition_rate=fill(r0),
        initial_target_rate=fill(r0),
        talr=fill(jnp.asarray(learning_rate, RATE_DTYPE)),
        talr_scale=fill(1.0),
        rate_names=layout.rate_names,
    )

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    layout = prologue.update(state, params, why="counts the transitions its update causes")
    n = state.talr_count
    fallback = None if fallback_fn is None else jnp.asarray(fallback_fn(n), RATE_DTYPE)
    # 1. The update, from U_n alone: it never waits for this step's count.
    updates = _scale_updates(layout, updates, state.talr, fallback)
    # 2. The transitions it causes set U_(n+1), for the target R(n+1).
    k, prev_levels = counting.rates_since(
        layout, counting.levels_after(levels_fn, params, updates), state.prev_levels)
    n1 = optax.safe_increment(n)
    K = _smooth(k, state.ema_transition_rate, n1, ema_momentum, measuring)
    r0, R = _target(measuring, layout, target_fn, state.initial_target_rate, K, n1)
    U, c = adapt(K, state.talr, state.talr_scale, R)
    if measuring:  # no adaptation until R_0 is known: U stays at the base learning rate
      U, c = (jnp.where(n1 < measuring.steps, old, new) for old, new in
              ((state.talr, U), (state.talr_scale, c)))
    return updates, ScaleByTALRState(
        talr_count=n1,
        prev_levels=prev_levels,
        transition_rate=k,
        ema_transition_rate=K,
        target_transition_rate=R,
        initial_target_rate=r0,
        talr=U,
        talr_scale=c,
        rate_names=state.rate_names,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_talr_arguments(levels_fn, learning_rate, rule, ema_momentum, additive_step,
                          granularity, layer_axes, sample_size, max_talr) -> None:
  """The checks of :func:`scale_by_talr`'s arguments, each naming the argument."""
  _check_measure(levels_fn, ema_momentum, sample_size, "scale_by_talr", ("levels_fn",))
  _checks.check_number("learning_rate", learning_rate, 0.0, np.inf,
                       low_open=True, high_open=True)
  _checks.check_choice("rule", rule, ("multiplicative", "additive"))
  _checks.check_choice("granularity", granularity, ("per_tensor", "global"))
  if additive_step is not None:
    if rule != "additive":
      raise ValueError(
          f"additive_step is the step of the additive rule; with rule={rule!r} it would"
          " be ignored. Pass rule='additive' or leave additive_step=None.")
    _checks.check_number("additive_step", additive_step, 0.0, np.inf, low_open=True,
                         high_open=True)
  if layer_axes is not None and granularity == "global":
    raise ValueError(
        "layer_axes gives each layer its own rate, which granularity='global'"
        " pools into one: pass one or the other.")
  if max_talr is not None:
    low = _checks.concrete_float(learning_rate)
    _checks.check_number("max_talr", max_talr, 0.0 if low is None else low, np.inf,
                         high_open=True, owner="scale_by_talr")


class _Measuring(NamedTuple):
  """How a measured target (:func:`talr_optax.measured_target`) sets ``R_0``."""

  steps: int
  pooled: bool
  fraction: float

  @classmethod
  def of(cls, target: Any) -> Optional["_Measuring"]:
    if isinstance(target, schedules.TargetSchedule) and target.measured:
      return cls(target.measure_steps, target.measure_pooled, target.measure_fraction)
    return None


def _smooth(k: jax.Array, K: jax.Array, n1: jax.Array, m: float,
            measuring: Optional[_Measuring]) -> jax.Array:
  """``K_(n+1)``: the EMA of ``k``; while a target is measured, the running mean of ``k``."""
  ema = m * K + (1.0 - m) * k
  if measuring:
    mean = K + (k - K) / n1.astype(RATE_DTYPE)
    ema = jnp.where(n1 <= measuring.steps, mean, ema)
  return ema.astype(RATE_DTYPE)


def _target(measuring: Optional[_Measuring], layout: _layout.Layout, target_fn: Any,
            r0: jax.Array, K: jax.Array, n1: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(R_0, R(n+1))`` per rate group.

  A measured target takes ``R_0`` from ``K`` (the running mean of ``k``) after
  update ``W - 1``: per group, or pooled weighted by the groups' sizes, times
  ``fraction``, and at least one transition per group in the ``W`` updates.
  Until then ``R`` is ``K`` itself.
  """
  shape = _sanitize_target(target_fn(n1))
  if not measuring:
    return r0, jnp.broadcast_to(shape, K.shape)
  measured = K
  if measuring.pooled:
    sizes = np.array([q.weights_per_rate for q in layout.quantized for _ in range(q.num_rates)]
                     if not layout.global_rate else [1.0], np.float64)
    measured = jnp.broadcast_to(jnp.sum(K * jnp.asarray(sizes / sizes.sum(), RATE_DTYPE)),
                                K.shape)
  counted = np.array([q.counted_per_rate for q in layout.quantized for _ in range(q.num_rates)]
                     if not layout.global_rate else
                     [sum(q.counted_per_rate * q.num_rates for q in layout.quantized)],
                     np.float64)
  floor = jnp.asarray(1.0 / (counted * measuring.steps), RATE_DTYPE)
  now = jnp.maximum(measuring.fraction * measured, floor).astype(RATE_DTYPE)
  r0 = jnp.where(n1 == measuring.steps, now, r0)
  R = jnp.where(n1 < measuring.steps, K, _sanitize_target(r0 * shape))
  return r0, R.astype(RATE_DTYPE)


def _adaptation(rule: str, m: float, learning_rate: Any, eta: Any, max_talr: Any):
  """``(K_(n+1), U_n, c_n, R(n+1)) -> (U_(n+1), c_(n+1))`` of the rule, ``U <= max_talr``."""

  def adapt(K, U, c, R):
    if rule == "additive":
      U = jnp.clip(U + eta * (R - K), 0.0, max_talr)
    else:
      c = jnp.minimum(m * c + (1.0 - m) * c * R / (K + _EPS), max_talr / learning_rate)
      c = jnp.minimum(c, _RATE_MAX)
      U = jnp.minimum(learning_rate * c, max_talr)
    return U.astype(RATE_DTYPE), c.astype(RATE_DTYPE)

  return adapt


def _require_no_unquantized_leaf(layout: _layout.Layout, levels: Any, params: Any) -> None:
  """Without a fallback learning rate, every param leaf must be quantized."""
  unquantized = [
      i for i, (level, p) in enumerate(zip(layout.match(levels, "levels"),
                                           layout.match(params, "params")))
      if _tree.is_none_or_masked(level) and not _tree.is_none_or_masked(p)]
  if unquantized:
    raise ValueError(
        f"levels_fn returned None for {len(unquantized)} param leaves (e.g. leaf"
        f" {unquantized[0]}), which scale_by_talr cannot scale by a transition"
        " rate: pass fallback_learning_rate=..., or route them to another"
        " optimizer with optax.partition.")


def _scale_updates(layout: _layout.Layout, updates: Any, talr: jax.Array,
                   fallback: Optional[jax.Array]) -> Any:
  """``-U * g`` on quantized leaves (per tensor or layer), ``-fallback * g`` elsewhere."""
  scaled = []
  for q, u in zip(layout.leaves, layout.match(updates, "updates")):
    if _tree.is_none_or_masked(u) or _layout.has_no_weights(u):
      scaled.append(u)
    elif q is not None:
      scaled.append(jax.tree.map(lambda g, q=q: _scale(g, layout.rate_of(talr, q, g.ndim)), u))
    elif fallback is not None:
      scaled.append(jax.tree.map(lambda g: _scale(g, fallback), u))
    else:
      raise ValueError(
          "an update leaf is not quantized and no fallback_learning_rate was"
          " given: pass fallback_learning_rate=... or use optax.partition.")
  return layout.treedef.unflatten(scaled)


def track_transitions(
    levels_fn: LevelsFn,
    initial_rate: ScalarOrSchedule,
    *,
    ema_momentum: Optional[float] = None,
    layer_axes: Any = None,
    sample_size: Optional[int] = None,
) -> optax.GradientTransformationExtraArgs:
  """Measures transition rates like :func:`scale_by_talr`; leaves updates unchanged.

  The last stage of a chain (e.g. ``optax.chain(optax.sgd(0.1),
  track_transitions(levels_fn, target))``): it counts the transitions of the
  final updates. After update ``n`` its state holds ``k_n`` and ``K_(n+1)``,
  aligned with the state of :func:`scale_by_talr`, so a baseline's ``K`` and
  TALR's ``K`` can share a plot. :func:`talr_optax.metrics` finds its fields.

  Args:
    levels_fn: as in :func:`scale_by_talr`.
    initial_rate: ``K_0`` in ``[0, 1]``, a float or a schedule whose value at
      step 0 is used. Pass the target given to :func:`scale_by_talr` so both
      ``K`` start at ``R(0)``; with a measured target
      (:func:`talr_optax.measured_target`) ``K`` is, like TALR's, the running
      mean of ``k`` over its first updates, then the EMA.
    ema_momentum: EMA momentum ``m`` of ``K``, in ``[0, 1)``; ``None``: as in
      :func:`scale_by_talr`, from ``initial_rate``.
    layer_axes: as in :func:`scale_by_talr`.
    sample_size: as in :func:`scale_by_talr`.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose state is a
    :class:`TrackTransitionsState`.
  """
  owner = "track_transitions"
  ema_momentum = schedules.resolve_ema_momentum(ema_momentum, initial_rate)
  _check_measure(levels_fn, ema_momentum, sample_size, owner, ("levels_fn",))
  measuring = _Measuring.of(initial_rate)
  k0 = 0.0 if measuring else _target_schedule(initial_rate, "initial_rate", owner)(
      jnp.asarray(0, jnp.int32))
  prologue = _stage.Prologue(owner, TrackTransitionsState, levels_fn, layer_axes=layer_axes,
                             sample_size=sample_size)

  def init_fn(params):
    layout, levels = prologue.init(params)
    fill = lambda v: jnp.full((layout.num_rates,), v, RATE_DTYPE)
    return TrackTransitionsState(
        tracking_count=jnp.zeros((), jnp.int32),
        prev_levels=layout.per_leaf(counting.counted(layout, levels)),
        transition_rate=fill(0.0),
        ema_transition_rate=fill(_sanitize_target(k0)),
        rate_names=layout.rate_names,
    )

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    require = "counts the transitions of the updates"
    _stage.require_params(params, owner, require)
    levels = counting.levels_after(levels_fn, params, updates)
    layout = prologue.update(state, params, why=require, levels=levels)
    k, prev_levels = counting.rates_since(layout, levels, state.prev_levels)
    n1 = optax.safe_increment(state.tracking_count)
    K = _smooth(k, state.ema_transition_rate, n1, ema_momentum, measuring)
    return updates, TrackTransitionsState(n1, prev_levels, k, K, state.rate_names)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
