"""Uniform quantizers of the paper, written in plain ``jax.numpy``.

A quantized weight is stored as an integer *level* ``w_d`` and used by the
network as the fixed-point value ``w_q = w_d / gamma`` (Lee et al., 2025, and
``METHOD.md`` of this project):

* weights, ``b >= 2`` bits: ``w_d = round(clip(gamma * w / s, alpha, beta))``
  with ``alpha = -2^(b-1)``, ``beta = 2^(b-1) - 1``, ``gamma = 2^(b-1)``;
* weights, ``b = 1``: ``w_d = 1[w > 0]`` in ``{0, 1}``, value ``2 * w_d - 1``;
* activations (after ReLU), ``b`` bits: ``alpha = 0``, ``beta = 2^b - 1``,
  ``gamma = 2^b``.

The step size ``s`` is not multiplied back by default (a batch norm after the
layer absorbs it). Gradients pass through ``round`` with the straight-through
estimator, so ``d w_q / d w = 1 / s`` inside the clip range and 0 outside.

The transition rate that ``talr_optax`` schedules is counted on the integer
levels returned by :func:`weight_levels`.

Low-precision inputs: ``u = gamma * w / s`` is always computed in float32 (or
float64 for float64 inputs), never in bfloat16 / float16, so the levels of a
bfloat16 weight are those of the same value in float32 (rounding ``u`` to
bfloat16 first would move about one 8-bit level in ten). Float results
(:func:`fake_quant_weight`, :func:`fake_quant_activation`,
:func:`distance_to_transition`) are cast back to the input's dtype once, at
the end; gradients flow through the casts.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "QuantRange",
    "weight_range",
    "activation_range",
    "weight_levels",
    "activation_levels",
    "fake_quant_weight",
    "fake_quant_activation",
    "initial_weight_scale",
    "initial_activation_scale",
    "distance_to_transition",
    "levels_fn_from_scales",
    "validate_bits",
]

# Levels of weights with at most 8 bits fit int8; the optimizer stores them so.
LEVEL_DTYPE = jnp.int8
# Activation levels reach 2^8 - 1 = 255 at 8 bits, which does not fit int8.
ACTIVATION_LEVEL_DTYPE = jnp.int32


class QuantRange(NamedTuple):
  """Static constants of a uniform quantizer: ``round(clip(gamma*x/s, alpha, beta))``."""

  alpha: int
  beta: int
  gamma: int


def validate_bits(bits: Any, name: str = "bits") -> int:
  """Returns ``bits`` as an ``int`` or raises a ``ValueError`` naming ``name``."""
  if (isinstance(bits, (bool, np.bool_)) or not isinstance(bits, numbers.Integral)
      or not 1 <= bits <= 8):
    raise ValueError(
        f"{name} must be an integer in [1, 8], got {name} = {bits!r}."
    )
  return int(bits)


def weight_range(bits: int) -> QuantRange:
  """Signed range of ``bits``-bit weights; ``bits = 1`` is the binary code {0, 1}."""
  bits = validate_bits(bits)
  if bits == 1:
    return QuantRange(alpha=0, beta=1, gamma=1)
  half = 2 ** (bits - 1)
  return QuantRange(alpha=-half, beta=half - 1, gamma=half)


def activation_range(bits: int) -> QuantRange:
  """Unsigned range of ``bits``-bit activations (inputs after a ReLU)."""
  bits = validate_bits(bits)
  return QuantRange(alpha=0, beta=2**bits - 1, gamma=2**bits)


def _check_input(x: Any, name: str) -> None:
  """Rejects what is not a numeric array before JAX fails deep inside an op."""
  if isinstance(x, optax.MaskedNode):
    raise ValueError(
        f"{name} is an optax.MaskedNode: under optax.masked / optax.partition a"
        " levels_fn receives MaskedNode for the leaves outside its group and"
        " must return None for them (levels_fn_from_scales does)."
    )
  ok = isinstance(x, (jax.Array, np.ndarray, np.generic, int, float)) or hasattr(
      x, "__jax_array__")
  if ok and not isinstance(x, (bool, np.bool_)):
    try:
      ok = jnp.issubdtype(jnp.result_type(x), jnp.number)
    except TypeError:
      ok = False
  else:
    ok = False
  if not ok:
    kind = getattr(x, "dtype", type(x).__name__)
    raise ValueError(
        f"{name} must be a numeric array, got {name} of type {kind}:"
        f" {str(x)[:80]}"
    )


def _check_scale(scale: jax.typing.ArrayLike, name: str = "scale",
                 like: Any = None) -> None:
  """Rejects non-positive step sizes when their value is known (not traced).

  With ``like`` given, also rejects a shape that does not broadcast to it.
  """
  if like is not None and hasattr(scale, "shape"):
    shape, target = tuple(np.shape(scale)), tuple(np.shape(like))
    try:
      fits = np.broadcast_shapes(shape, target) == target
    except ValueError:
      fits = False
    if not fits:
      raise ValueError(
          f"{name} has shape {shape}, which does not broadcast to the input's"
          f" shape {target}: pass a scalar or a per-channel array with size-1"
          " axes, e.g. initial_weight_scale(w, axis=...)."
      )
  if isinstance(scale, jax.core.Tracer):
    return
  try:
    value = np.asarray(scale)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{name} must be a positive number or array, got {scale!r}.") from e
  # jnp.issubdtype knows bfloat16 (an ml_dtypes type NumPy calls non-numeric).
  if value.dtype == np.bool_ or not jnp.issubdtype(value.dtype, jnp.number):
    raise ValueError(f"{name} must be a positive number or array, got {scale!r}.")
  if value.size and not bool(np.all(value > 0)):
    raise ValueError(
        f"{name} must be > 0 everywhere (the quantizer step size), got "
        f"min({name}) = {float(np.min(value))}."
    )


def _compute_dtype(x: Any) -> Any:
  """Dtype the quantizer computes ``u = gamma * x / s`` in: at least float32.

  bfloat16 has an 8-bit significand, so ``gamma * x / s`` rounded to bfloat16
  and then rounded to an integer level is a double rounding (at 8 bits about
  one weight in ten would get another level than the same value in float32).
  float64 (under ``jax_enable_x64``) stays float64.
  """
  return jnp.promote_types(jnp.result_type(x), jnp.float32)


def _upcast(x: Any) -> jax.Array:
  """``x`` in :func:`_compute_dtype`; differentiable (the cast's transpose casts back)."""
  return jnp.asarray(x).astype(_compute_dtype(x))


def _output_dtype(x: Any, computed: jax.Array) -> Any:
  """Dtype of a quantizer's float result: that of the input if it is a float."""
  dtype = jnp.result_type(x)
  return dtype if jnp.issubdtype(dtype, jnp.floating) else computed.dtype


def _scaled(x: jax.Array, scale: jax.typing.ArrayLike, q: QuantRange) -> jax.Array:
  """``clip(gamma * x / s, alpha, beta)``: the level before rounding, >= float32."""
  return jnp.clip(q.gamma * _upcast(x) / scale, q.alpha, q.beta)


def _to_levels(u: jax.Array, dtype: Any) -> jax.Array:
  """Rounds to integer levels; NaN (undefined in an int cast) becomes level 0."""
  u = jnp.round(u)
  return jnp.where(jnp.isnan(u), 0, u).astype(dtype)


def weight_levels(
    w: jax.Array, scale: jax.typing.ArrayLike, bits: int
) -> jax.Array:
  """Integer levels ``w_d`` of weights ``w`` (int8).

  Args:
    w: latent full-precision weights.
    scale: step size ``s`` (> 0), a scalar or an array broadcastable to ``w``
      (per channel).
    bits: weight bit width in ``[1, 8]``.

  Returns:
    An int8 array shaped like ``w``: levels in ``[-2^(b-1), 2^(b-1) - 1]``,
    or ``{0, 1}`` for ``bits = 1`` (``w = 0`` maps to 0, i.e. to -1).
    ``+-inf`` maps to the outer levels; NaN to the level of ``w = 0`` (0),
    the same on every backend (a NaN cast to int is undefined in XLA).
  """
  q = weight_range(bits)
  _check_input(w, "w")
  _check_scale(scale, like=w)
  if bits == 1:
    # round((clip(w/s, -1, 1) + 1) / 2) is exactly 1[w > 0] (ties to even),
    # and NaN > 0 is False: NaN gets level 0 here too.
    return (w > 0).astype(LEVEL_DTYPE)
  return _to_levels(_scaled(w, scale, q), LEVEL_DTYPE)


def activation_levels(
    x: jax.Array, scale: jax.typing.ArrayLike, bits: int
) -> jax.Array:
  """Integer levels ``a_d`` in ``[0, 2^b - 1]`` of non-negative activations (int32).

  NaN maps to level 0, as in :func:`weight_levels`.
  """
  q = activation_range(bits)
  _check_input(x, "x")
  _check_scale(scale, like=x)
  return _to_levels(_scaled(x, scale, q), ACTIVATION_LEVEL_DTYPE)


def _round_ste(x: jax.Array) -> jax.Array:
  """``round(x)`` in the forward pass, identity in the backward pass."""
  return x + jax.lax.stop_gradient(jnp.round(x) - x)


def fake_quant_weight(
    w: jax.Array,
    scale: jax.typing.ArrayLike,
    bits: int,
    *,
    multiply_scale: bool = False,
) -> jax.Array:
  """Quantized value ``w_q`` of ``w`` with straight-through gradients.

  Args:
    w: latent weights.
    scale: step size ``s`` (> 0), scalar or broadcastable to ``w``.
    bits: weight bit width in ``[1, 8]``.
    multiply_scale: if True return ``w_q * s`` (for layers without a batch
      norm after them). The levels and the transitions do not change.

  Returns:
    ``w_d / gamma`` (``2 * w_d - 1`` for binary), dtype of ``w`` (computed
    in float32 for bfloat16 / float16 ``w``, then cast once). Its gradient
    with respect to ``w`` is ``1 / s`` inside the clip range and 0 outside
    (``1`` inside when ``multiply_scale``).
  """
  q = weight_range(bits)
  _check_input(w, "w")
  _check_scale(scale, like=w)
  if bits == 1:
    u = jnp.clip(_upcast(w) / scale, -1.0, 1.0)
    value = u + jax.lax.stop_gradient(jnp.where(w > 0, 1.0, -1.0).astype(u.dtype) - u)
  else:
    value = _round_ste(_scaled(w, scale, q)) / q.gamma
  # Computed in >= float32 and rounded to the input dtype once, at the end.
  value = value * scale if multiply_scale else value
  return value.astype(_output_dtype(w, value))


def fake_quant_activation(
    x: jax.Array, scale: jax.typing.ArrayLike, bits: int
) -> jax.Array:
  """Quantized activation ``a_d / gamma`` with straight-through gradients.

  Gradients flow to ``x`` (``1/s`` inside the range) and to a learned ``scale``
  through the clip; no LSQ gradient scaling is applied.
  """
  q = activation_range(bits)
  _check_input(x, "x")
  _check_scale(scale, like=x)
  value = _round_ste(_scaled(x, scale, q)) / q.gamma
  return value.astype(_output_dtype(x, value))


def initial_weight_scale(w: jax.Array, axis: int | tuple[int, ...] | None = None) -> jax.Array:
  """Frozen weight step size ``s = 3 * std(w)``, per tensor or over ``axis``.

  With ``axis`` given, the reduced axes are kept (size 1) so the result
  broadcasts against ``w`` for per-channel scales.
  """
  w = jnp.asarray(w)
  return 3.0 * jnp.std(w, axis=axis, keepdims=axis is not None)


def initial_activation_scale(x: jax.Array) -> jax.Array:
  """Activation step size ``3 * std(x) / sqrt(1 - 2 / pi)`` from a first batch.

  ``sqrt(1 - 2/pi)`` is the std of a half-normal of unit scale: it corrects for
  the ReLU cutting the input distribution in half.
  """
  return 3.0 * jnp.std(jnp.asarray(x)) / math.sqrt(1.0 - 2.0 / math.pi)


def distance_to_transition(
    w: jax.Array, scale: jax.typing.ArrayLike, bits: int
) -> jax.Array:
  """Normalised distance of each weight to its nearest transition point.

  ``0.5 - |u - round(u)|`` with ``u = clip(gamma * w / s, alpha, beta)``: 0 on a
  transition point, 0.5 on a level (and beyond the outer levels). Binary:
  ``min(|w| / s, 1)``.
  """
  q = weight_range(bits)
  _check_input(w, "w")
  _check_scale(scale, like=w)
  if bits == 1:
    dist = jnp.minimum(jnp.abs(_upcast(w)) / scale, 1.0)
  else:
    u = _scaled(w, scale, q)
    dist = 0.5 - jnp.abs(u - jnp.round(u))
  return dist.astype(_output_dtype(w, dist))


def _is_none(x: Any) -> bool:
  return x is None


def raise_if_step_count(params: Any) -> None:
  """Raises a hint when a ``levels_fn`` receives a step count instead of params.

  ``optax.inject_hyperparams`` treats every callable argument as a schedule
  and calls it with the step count unless it is named in ``static_args``.
  """
  if getattr(params, "shape", None) == () and jnp.issubdtype(
      getattr(params, "dtype", np.float32), jnp.integer):
    raise ValueError(
        "levels_fn was called with a step count instead of params: under"
        " optax.inject_hyperparams pass static_args=('levels_fn',), since"
        " it treats every callable argument as a schedule."
    )


def levels_fn_from_scales(
    scales: Any, bits: Any
) -> Callable[[Any], Any]:
  """Builds a ``levels_fn`` for :func:`talr_optax.scale_by_talr` in functional code.

  Args:
    scales: a pytree shaped like the params with a step size (scalar or
      per-channel array, > 0) for every quantized weight and ``None`` for
      full-precision leaves.
    bits: an int in ``[1, 8]`` for all quantized weights, or a pytree like
      ``scales`` with an int per quantized leaf.

  Returns:
    ``levels_fn(params)``: int8 levels for quantized leaves, ``None`` elsewhere
    (also for ``optax.MaskedNode`` leaves left by ``optax.masked``).

  Example:
    >>> params = {"w": jnp.ones((3, 4)), "b": jnp.zeros(4)}
    >>> levels_fn = levels_fn_from_scales({"w": 1.0, "b": None}, bits=2)
    >>> levels_fn(params)["w"].dtype
    dtype('int8')
  """
  scale_leaves, treedef = jax.tree.flatten(scales, is_leaf=_is_none)
  if all(s is None for s in scale_leaves):
    raise ValueError("scales must hold a step size for at least one leaf, got only None.")
  if isinstance(bits, numbers.Integral) and not isinstance(bits, (bool, np.bool_)):
    bit_leaves = [None if s is None else validate_bits(bits) for s in scale_leaves]
  else:
    try:
      bit_leaves = treedef.flatten_up_to(bits)
    except (ValueError, TypeError) as e:
      raise ValueError(
          "bits must be an int in [1, 8] or a pytree with the structure of "
          f"scales; got a mismatching pytree: {e}"
      ) from e
    for s, b in zip(scale_leaves, bit_leaves):
      if s is not None:
        validate_bits(b)
  for i, s in enumerate(scale_leaves):
    if s is not None:
      _check_scale(s, name=f"scales[{i}]")

  def levels_fn(params: Any) -> Any:
    try:
      param_leaves = treedef.flatten_up_to(params)
    except (ValueError, TypeError) as e:
      raise_if_step_count(params)
      raise ValueError(
          f"params do not have the structure of the scales given to "
          f"levels_fn_from_scales: {e}"
      ) from e
    out = []
    for p, s, b in zip(param_leaves, scale_leaves, bit_leaves):
      if s is None or p is None or isinstance(p, optax.MaskedNode):
        out.append(None)
      else:
        out.append(weight_levels(p, s, b))
    return treedef.unflatten(out)

  return levels_fn
