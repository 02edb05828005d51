"""Ready optimizers with TALR: SGDT, AdamT and AdamWT.

Each is a plain ``optax.chain`` of Optax parts ending in
:func:`talr_optax.scale_by_talr`. Quantized weights move by the
transition-adaptive learning rate; leaves whose levels are ``None`` move by
``learning_rate`` (float or schedule).

The structure of a chain depends on which arguments are given, never on their
values (as ``optax.adamw`` always keeps its decay stage): ``weight_decay=0.0``
keeps the decay stage and ``momentum=0.0`` keeps the momentum stage, both then
the identity, and ``None`` drops them. So ``optax.inject_hyperparams`` over
these factories builds the same state as a direct call, and a checkpoint of
one restores into the other.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from talr_optax import _checks
from talr_optax.freezing import freeze_oscillations, threshold_schedule
from talr_optax.transform import LevelsFn, ScalarOrSchedule, scale_by_talr

__all__ = ["sgdt", "adamt", "adamwt"]


def _base_rate(learning_rate: optax.ScalarOrSchedule) -> Any:
  """TALR's base rate: the learning rate, or a schedule's value at step 0."""
  _checks.check_scalar_or_schedule("learning_rate", learning_rate)
  if not callable(learning_rate):
    return learning_rate
  value = learning_rate(jnp.asarray(0, jnp.int32))
  x = _checks.concrete_float(value)
  if x is not None and not (x > 0 and np.isfinite(x)):
    raise ValueError(
        f"learning_rate is a schedule whose value at step 0 is {x!r}, but TALR uses"
        " that value as its base rate U_0 (and the scale of c), which must be in"
        " (0, inf): start the schedule above 0 (e.g. a warmup with init_value > 0).")
  return value


def _talr(learning_rate, target_transition_rate, levels_fn, *, ema_momentum,
          freeze, **talr_args) -> optax.GradientTransformationExtraArgs:
  talr = scale_by_talr(
      target_transition_rate, levels_fn, learning_rate=_base_rate(learning_rate),
      ema_momentum=ema_momentum, fallback_learning_rate=learning_rate, **talr_args)
  threshold, centers_fn, freeze_ema_momentum = freeze
  if threshold is None:
    if centers_fn is not None:
      raise ValueError(
          "centers_fn is for the oscillation freezing, which freeze_threshold=None"
          " leaves out: pass freeze_threshold=... or drop centers_fn.")
    return talr
  if centers_fn is None:
    raise ValueError(
        "freeze_threshold needs centers_fn (e.g. talr_optax.centers_fn_from_scales or"
        " talr_optax.nnx.centers_fn_for) to move a frozen weight to its level.")
  # Checked here, so that the messages name this factory's arguments.
  threshold_schedule(threshold, "freeze_threshold", owner=None)
  _checks.check_number("freeze_ema_momentum", freeze_ema_momentum, 0.0, 1.0, high_open=True)
  # Around TALR, so that TALR counts the snap to the frozen level (freezing.py).
  return freeze_oscillations(levels_fn, centers_fn, threshold,
                             ema_momentum=freeze_ema_momentum,
                             layer_axes=talr_args.get("layer_axes"), inner=talr)


def _chain(name: str, *stages: optax.GradientTransformation
           ) -> optax.GradientTransformationExtraArgs:
  """``optax.chain(*stages)`` whose update says so when given another optimizer's state."""
  tx = optax.chain(*stages)
  kinds = lambda s: tuple(map(type, s)) if isinstance(s, tuple) else (type(s),)
  named = lambda types: tuple(t.__name__ for t in types)
  shapes = lambda tree: tuple(getattr(x, "shape", None) for x in jax.tree.leaves(tree))
  expected_by_params: dict[Any, Any] = {}  # init traced once per params' structure and shapes

  def expected_state(params):
    key = (jax.tree.structure(params), shapes(params))
    if key not in expected_by_params:
      expected_by_params[key] = jax.eval_shape(tx.init, params)
    return expected_by_params[key]

  def update_fn(updates, state, params=None, **extra_args):
    if params is not None:
      expected = expected_state(params)
      if kinds(state) != kinds(expected):
        raise ValueError(
            f"{name} got a state made by another optimizer: it expects states"
            f" {named(kinds(expected))}, got {named(kinds(state))}. Call"
            f" {name}(...).init(params).")
      if shapes(state) != shapes(expected):
        # The TALR stage names the setting (layer_axes, layers, sample_size)...
        jax.eval_shape(lambda s, p: stages[-1].update(p, s, p), state[-1], params)
        raise ValueError(  # ...else another stage's state has other shapes.
            f"{name} got a state whose arrays have other shapes than"
            f" {name}(...).init(params) gives: the params' shapes changed since the state"
            " was made. Call init on these params.")
    return tx.update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(tx.init, update_fn)


def _decay(weight_decay: Optional[float], mask: Any) -> list[optax.GradientTransformation]:
  if weight_decay is None:
    return []
  _checks.check_number("weight_decay", weight_decay, 0.0, np.inf, high_open=True)
  return [optax.add_decayed_weights(weight_decay, mask)]


def sgdt(
    learning_rate: optax.ScalarOrSchedule,
    target_transition_rate: ScalarOrSchedule,
    levels_fn: LevelsFn,
    *,
    momentum: Optional[float] = 0.9,
    nesterov: bool = False,
    weight_decay: Optional[float] = None,
    weight_decay_mask: Optional[Any] = None,
    ema_momentum: Optional[float] = None,
    rule: str = "multiplicative",
    granularity: str = "per_tensor",
    additive_step: Optional[float] = None,
    layer_axes: Any = None,
    sample_size: Optional[int] = None,
    max_talr: Optional[float] = None,
    freeze_threshold: Optional[optax.ScalarOrSchedule] = None,
    centers_fn: Any = None,
    freeze_ema_momentum: float = 0.999,
) -> optax.GradientTransformationExtraArgs:
  """SGD with momentum whose quantized weights move by TALR (SGDT).

  ``chain(add_decayed_weights, trace, scale_by_talr)``: weight decay is added
  to the gradient before momentum (as in PyTorch SGD, the paper's setup).

  Args:
    learning_rate: float > 0 or schedule: the learning rate of full-precision
      leaves; TALR's base rate is its value at step 0.
    target_transition_rate: float in ``[0, 1]`` or schedule, e.g.
      ``cosine_target(initial_target(2), total_steps)``.
    levels_fn: ``params -> levels`` (see :func:`talr_optax.scale_by_talr`).
    momentum: momentum of ``optax.trace``, in ``[0, 1)``; ``None`` drops it.
    nesterov: Nesterov momentum.
    weight_decay: coupled L2 coefficient (>= 0); ``None`` drops the stage.
    weight_decay_mask: mask (pytree or callable) of the leaves to decay.
    ema_momentum: EMA momentum of the transition rate ``K``, in ``[0, 1)``
      (``momentum`` is SGD's); ``None``: :func:`talr_optax.ema_momentum_for`
      of the target's length when the target is a
      :func:`talr_optax.cosine_target`, else 0.99.
    rule: ``"multiplicative"`` or ``"additive"``.
    granularity: ``"per_tensor"`` or ``"global"``.
    additive_step: additive rule only: step of ``U`` per unit of ``R - K``
      (``None``: the base learning rate).
    layer_axes: layer axis of stacked quantized params (see
      :func:`talr_optax.scale_by_talr`).
    sample_size: count transitions on at most this many weights per rate
      group (``None``: all).
    max_talr: ``None``, or the largest TALR learning rate ``U`` (see
      :func:`talr_optax.scale_by_talr`).
    freeze_threshold: ``None``, or freeze oscillating quantized weights with
      :func:`talr_optax.freeze_oscillations` at this threshold (float or
      schedule), wrapped around the TALR stage so that TALR counts the
      frozen weights' snaps.
    centers_fn: with ``freeze_threshold``: the centres function of the
      quantizer (e.g. :func:`talr_optax.centers_fn_from_scales`).
    freeze_ema_momentum: with ``freeze_threshold``: the ``ema_momentum`` of
      the freezing's oscillation and level EMAs (default 0.999, the
      reference code's).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.
  """
  stages = _decay(weight_decay, weight_decay_mask)
  if momentum is not None:
    _checks.check_number("momentum", momentum, 0.0, 1.0, high_open=True)
    _checks.check_bool("nesterov", nesterov)
    stages.append(optax.trace(decay=momentum, nesterov=nesterov))
  stages.append(_talr(learning_rate, target_transition_rate, levels_fn,
                      ema_momentum=ema_momentum, rule=rule, granularity=granularity,
                      additive_step=additive_step, layer_axes=layer_axes, sample_size=sample_size,
                      max_talr=max_talr,
                      freeze=(freeze_threshold, centers_fn, freeze_ema_momentum)))
  return _chain("sgdt", *stages)


def _adam(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
  _checks.check_number("b1", b1, 0.0, 1.0, high_open=True)
  _checks.check_number("b2", b2, 0.0, 1.0, high_open=True)
  _checks.check_number("eps", eps, 0.0, np.inf, high_open=True)
  return optax.scale_by_adam(b1=b1, b2=b2, eps=eps)


def adamt(
    learning_rate: optax.ScalarOrSchedule,
    target_transition_rate: ScalarOrSchedule,
    levels_fn: LevelsFn,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: Optional[float] = None,
    weight_decay_mask: Optional[Any] = None,
    ema_momentum: Optional[float] = None,
    rule: str = "multiplicative",
    granularity: str = "per_tensor",
    additive_step: Optional[float] = None,
    layer_axes: Any = None,
    sample_size: Optional[int] = None,
    max_talr: Optional[float] = None,
    freeze_threshold: Optional[optax.ScalarOrSchedule] = None,
    centers_fn: Any = None,
    freeze_ema_momentum: float = 0.999,
) -> optax.GradientTransformationExtraArgs:
  """Adam whose quantized weights move by TALR (AdamT).

  ``chain(add_decayed_weights, scale_by_adam, scale_by_talr)``: weight decay is
  coupled L2 added to the gradient, as in the authors' AdamT; TALR scales the
  bias-corrected step ``m_hat / (sqrt(v_hat) + eps)``. Arguments as in
  :func:`sgdt`, plus Adam's ``b1``, ``b2`` in ``[0, 1)`` and ``eps >= 0``.
  """
  stages = _decay(weight_decay, weight_decay_mask)
  stages.append(_adam(b1, b2, eps))
  stages.append(_talr(learning_rate, target_transition_rate, levels_fn,
                      ema_momentum=ema_momentum, rule=rule, granularity=granularity,
                      additive_step=additive_step, layer_axes=layer_axes, sample_size=sample_size,
                      max_talr=max_talr,
                      freeze=(freeze_threshold, centers_fn, freeze_ema_momentum)))
  return _chain("adamt", *stages)


def adamwt(
    learning_rate: optax.ScalarOrSchedule,
    target_transition_rate: ScalarOrSchedule,
    levels_fn: LevelsFn,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: Optional[float] = 1e-4,
    weight_decay_mask: Optional[Any] = None,
    ema_momentum: Optional[float] = None,
    rule: str = "multiplicative",
    granularity: str = "per_tensor",
    additive_step: Optional[float] = None,
    layer_axes: Any = None,
    sample_size: Optional[int] = None,
    max_talr: Optional[float] = None,
    freeze_threshold: Optional[optax.ScalarOrSchedule] = None,
    centers_fn: Any = None,
    freeze_ema_momentum: float = 0.999,
) -> optax.GradientTransformationExtraArgs:
  """AdamW whose quantized weights move by TALR (AdamWT).

  ``chain(scale_by_adam, add_decayed_weights, scale_by_talr)``: decoupled
  weight decay as in ``optax.adamw``, scaled by the same learning rate as the
  Adam step (by ``U`` on quantized weights). Arguments as in :func:`adamt`;
  ``weight_decay`` defaults to 1e-4 like ``optax.adamw``.
  """
  stages = [_adam(b1, b2, eps)]
  stages += _decay(weight_decay, weight_decay_mask)
  stages.append(_talr(learning_rate, target_transition_rate, levels_fn,
                      ema_momentum=ema_momentum, rule=rule, granularity=granularity,
                      additive_step=additive_step, layer_axes=layer_axes, sample_size=sample_size,
                      max_talr=max_talr,
                      freeze=(freeze_threshold, centers_fn, freeze_ema_momentum)))
  return _chain("adamwt", *stages)
