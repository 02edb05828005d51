"""Ready optimizers with TALR: SGDT, AdamT and AdamWT.

Each is a plain ``optax.chain`` of Optax parts with :func:`scale_by_talr` as
the last stage. Quantized weights move by the transition-adaptive learning
rate; the leaves for which ``levels_fn`` returns ``None`` keep
``learning_rate`` (float or schedule).
"""

from __future__ import annotations

from typing import Any, Optional

import jax.numpy as jnp
import numpy as np
import optax

from talr_optax.transform import (
    LevelsFn,
    ScalarOrSchedule,
    _check_number,
    _check_scalar_or_schedule,
    _concrete_float,
    scale_by_talr,
)

__all__ = ["sgdt", "adamt", "adamwt"]


def _base_rate(learning_rate: ScalarOrSchedule) -> Any:
  """TALR's base rate: the learning rate, or a schedule's value at step 0."""
  if callable(learning_rate):
    value = learning_rate(jnp.asarray(0, jnp.int32))
    x = _concrete_float(value)
    if x is not None and not (x > 0 and np.isfinite(x)):
      raise ValueError(
          "learning_rate is a schedule whose value at step 0 is"
          f" {x!r}, but TALR uses that value as its base rate U_0 (and the scale"
          " of c), which must be in (0, inf): start the schedule above 0 (e.g. a"
          " warmup with init_value > 0)."
      )
    return value
  return learning_rate


def _is_zero(value: Any) -> bool:
  """True for a Python number equal to 0.

  Arrays (e.g. hyperparameters re-injected by ``optax.inject_hyperparams``,
  traced in ``update``) keep their stage even when 0, so that ``init`` and
  ``update`` build the same chain; a stage with coefficient 0 is the identity.
  """
  return isinstance(value, (int, float)) and value == 0


def _talr_stage(learning_rate, target_transition_rate, levels_fn, ema_momentum,
                rule, granularity, rate):
  _check_scalar_or_schedule("learning_rate", learning_rate, low_open=True)
  # scale_by_talr calls it `momentum`, which here names the SGD momentum.
  _check_number("ema_momentum", ema_momentum, 0.0, 1.0, low_open=False, high_open=True)
  return scale_by_talr(
      target_transition_rate,
      levels_fn,
      learning_rate=_base_rate(learning_rate),
      rule=rule,
      momentum=ema_momentum,
      rate=rate,
      granularity=granularity,
      fallback_learning_rate=learning_rate,
  )


def _decay(weight_decay: float, mask: Any) -> list[optax.GradientTransformation]:
  _check_number("weight_decay", weight_decay, 0.0, np.inf, low_open=False, high_open=True)
  return [] if _is_zero(weight_decay) else [optax.add_decayed_weights(weight_decay, mask)]


def sgdt(
    learning_rate: ScalarOrSchedule,
    target_transition_rate: ScalarOrSchedule,
    levels_fn: LevelsFn,
    *,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    weight_decay_mask: Optional[Any] = None,
    ema_momentum: float = 0.99,
    rule: str = "multiplicative",
    granularity: str = "per_tensor",
    rate: Optional[float] = None,
) -> optax.GradientTransformationExtraArgs:
  """SGD with momentum whose quantized weights move by TALR (SGDT).

  ``chain(add_decayed_weights, trace, scale_by_talr)``: weight decay is added
  to the gradient before momentum (as in PyTorch SGD, the paper's setup).

  Args:
    learning_rate: float > 0 or schedule. Learning rate of full-precision
      leaves; TALR's base rate is its value at step 0.
    target_transition_rate: float in ``[0, 1]`` or schedule, e.g.
      ``cosine_target(initial_target(2), total_steps)``.
    levels_fn: ``params -> levels`` (see :func:`scale_by_talr`).
    momentum: momentum of ``optax.trace``, in ``[0, 1)``; a Python 0 drops
      the stage (an array 0, e.g. under ``optax.inject_hyperparams``, keeps it
      with the same result).
    nesterov: Nesterov momentum.
    weight_decay: coupled L2 coefficient (>= 0).
    weight_decay_mask: mask (pytree or callable) of the leaves to decay.
    ema_momentum: EMA momentum of the transition rate, in ``[0, 1)``.
    rule: ``"multiplicative"`` or ``"additive"``.
    granularity: ``"per_tensor"`` or ``"global"``.
    rate: additive rule only: step of ``U`` (None: the base learning rate).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.
  """
  _check_number("momentum", momentum, 0.0, 1.0, low_open=False, high_open=True)
  if not isinstance(nesterov, bool):
    raise ValueError(f"nesterov must be a bool, got nesterov = {nesterov!r}.")
  stages = _decay(weight_decay, weight_decay_mask)
  if not _is_zero(momentum):
    stages.append(optax.trace(decay=momentum, nesterov=nesterov))
  stages.append(_talr_stage(learning_rate, target_transition_rate, levels_fn,
                            ema_momentum, rule, granularity, rate))
  return optax.chain(*stages)


def _adam_args(b1: float, b2: float, eps: float) -> None:
  _check_number("b1", b1, 0.0, 1.0, low_open=False, high_open=True)
  _check_number("b2", b2, 0.0, 1.0, low_open=False, high_open=True)
  _check_number("eps", eps, 0.0, np.inf, low_open=False, high_open=True)


def adamt(
    learning_rate: ScalarOrSchedule,
    target_transition_rate: ScalarOrSchedule,
    levels_fn: LevelsFn,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    weight_decay_mask: Optional[Any] = None,
    ema_momentum: float = 0.99,
    rule: str = "multiplicative",
    granularity: str = "per_tensor",
    rate: Optional[float] = None,
) -> optax.GradientTransformationExtraArgs:
  """Adam whose quantized weights move by TALR (AdamT).

  ``chain(add_decayed_weights, scale_by_adam, scale_by_talr)``: weight decay is
  coupled L2 added to the gradient, as in the authors' AdamT; TALR scales the
  bias-corrected step ``m_hat / (sqrt(v_hat) + eps)``. Arguments as in
  :func:`sgdt`, plus Adam's ``b1``, ``b2`` in ``[0, 1)`` and ``eps`` >= 0.
  """
  _adam_args(b1, b2, eps)
  stages = _decay(weight_decay, weight_decay_mask)
  stages.append(optax.scale_by_adam(b1=b1, b2=b2, eps=eps))
  stages.append(_talr_stage(learning_rate, target_transition_rate, levels_fn,
                            ema_momentum, rule, granularity, rate))
  return optax.chain(*stages)


def adamwt(
    learning_rate: ScalarOrSchedule,
    target_transition_rate: ScalarOrSchedule,
    levels_fn: LevelsFn,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    weight_decay_mask: Optional[Any] = None,
    ema_momentum: float = 0.99,
    rule: str = "multiplicative",
    granularity: str = "per_tensor",
    rate: Optional[float] = None,
) -> optax.GradientTransformationExtraArgs:
  """AdamW whose quantized weights move by TALR (AdamWT).

  ``chain(scale_by_adam, add_decayed_weights, scale_by_talr)``: decoupled
  weight decay as in ``optax.adamw`` (the decay term is scaled by the same
  learning rate as the Adam step, i.e. by ``U`` on quantized weights).
  Arguments as in :func:`adamt`; ``weight_decay`` defaults to 1e-4 like
  ``optax.adamw``.
  """
  _adam_args(b1, b2, eps)
  stages = [optax.scale_by_adam(b1=b1, b2=b2, eps=eps)]
  stages += _decay(weight_decay, weight_decay_mask)
  stages.append(_talr_stage(learning_rate, target_transition_rate, levels_fn,
                            ema_momentum, rule, granularity, rate))
  return optax.chain(*stages)
