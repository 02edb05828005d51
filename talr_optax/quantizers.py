"""Uniform quantizers of the paper, in plain ``jax.numpy``.

A quantized weight is stored as an integer *level* ``w_d`` and used by the
network as the fixed-point value ``w_q = w_d / gamma`` (Lee et al., 2025):

* weights, ``b >= 2`` bits: ``w_d = round(clip(gamma * w / s, alpha, beta))``
  with ``alpha = -2^(b-1)``, ``beta = 2^(b-1) - 1``, ``gamma = 2^(b-1)``;
* weights, ``b = 1``: ``w_d = 1[w > 0]`` in ``{0, 1}``, value ``2 * w_d - 1``;
* activations (after a ReLU), ``b`` bits: ``alpha = 0``, ``beta = 2^b - 1``,
  ``gamma = 2^b``.

Gradients pass through ``round`` with the straight-through estimator, so
``d w_q / d w = 1 / s`` inside the clip range and 0 outside. Transitions are
counted on the integer levels of :func:`weight_levels`.

``u = gamma * w / s`` is computed in at least float32, so a bfloat16 weight
gets the level of the same value in float32 (rounding ``u`` to bfloat16 first
would move about one 8-bit level in ten); float results are cast back to the
input's dtype once, at the end.

These functions run on every forward pass, so they check only static
arguments (``bits``); step sizes are checked where they are made
(:func:`levels_fn_from_scales`, the layers' calibration).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from talr_optax import _checks
from talr_optax import _tree

__all__ = [
    "LEVEL_DTYPE",
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
    "level_values",
    "weight_centers",
    "centers_fn_from_scales",
]

# Levels of weights with at most 8 bits fit int8; the optimizer stores them so.
LEVEL_DTYPE = jnp.int8
# Activation levels reach 2^8 - 1 = 255 at 8 bits, which does not fit int8.
_ACTIVATION_LEVEL_DTYPE = jnp.int32


class QuantRange(NamedTuple):
  """Constants of a uniform quantizer: ``round(clip(gamma * x / s, alpha, beta))``."""

  alpha: int
  beta: int
  gamma: int


def weight_range(bits: int) -> QuantRange:
  """Signed range of ``bits``-bit weights; ``bits = 1`` is the binary code {0, 1}."""
  bits = _checks.check_bits("bits", bits)
  if bits == 1:
    return QuantRange(alpha=0, beta=1, gamma=1)
  half = 2 ** (bits - 1)
  return QuantRange(alpha=-half, beta=half - 1, gamma=half)


def activation_range(bits: int) -> QuantRange:
  """Unsigned range of ``bits``-bit activations (inputs after a ReLU)."""
  bits = _checks.check_bits("bits", bits)
  return QuantRange(alpha=0, beta=2**bits - 1, gamma=2**bits)


def _upcast(x: Any) -> jax.Array:
  """``x`` in at least float32 (float64 stays); differentiable."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _like_input(x: Any, value: jax.Array) -> jax.Array:
  """``value`` in the dtype of ``x`` if that is a float dtype."""
  dtype = jnp.result_type(x)
  return value.astype(dtype) if jnp.issubdtype(dtype, jnp.floating) else value


def _scaled(x: jax.Array, scale: jax.typing.ArrayLike, q: QuantRange) -> jax.Array:
  """``clip(gamma * x / s, alpha, beta)``: the level before rounding, >= float32."""
  return jnp.clip(q.gamma * _upcast(x) / scale, q.alpha, q.beta)


def _to_levels(u: jax.Array, dtype: Any) -> jax.Array:
  """Rounds to integer levels; NaN (undefined in an int cast) becomes level 0."""
  u = jnp.round(u)
  return jnp.where(jnp.isnan(u), 0, u).astype(dtype)


def weight_levels(w: jax.Array, scale: jax.typing.ArrayLike, bits: int) -> jax.Array:
  """Integer levels ``w_d`` of weights ``w`` (int8).

  Args:
    w: latent full-precision weights.
    scale: step size ``s`` (> 0), a scalar or an array broadcastable to ``w``.
    bits: weight bit width in ``[1, 8]``.

  Returns:
    int8 levels shaped like ``w``, in ``[-2^(b-1), 2^(b-1) - 1]``, or
    ``{0, 1}`` for ``bits = 1`` (``w = 0`` maps to 0, i.e. to -1). ``+-inf``
    maps to the outer levels; NaN to the level of ``w = 0``, on every backend.
  """
  q = weight_range(bits)
  if bits == 1:
    # round((clip(w/s, -1, 1) + 1) / 2) is exactly 1[w > 0] (ties to even);
    # NaN > 0 is False, so NaN gets level 0 here too.
    return (jnp.asarray(w) > 0).astype(LEVEL_DTYPE)
  return _to_levels(_scaled(w, scale, q), LEVEL_DTYPE)


def activation_levels(x: jax.Array, scale: jax.typing.ArrayLike, bits: int) -> jax.Array:
  """Integer levels ``a_d`` in ``[0, 2^b - 1]`` of non-negative activations (int32)."""
  q = activation_range(bits)
  return _to_levels(_scaled(x, scale, q), _ACTIVATION_LEVEL_DTYPE)


def _round_ste(x: jax.Array) -> jax.Array:
  """``round(x)`` forward, identity backward."""
  return x + jax.lax.stop_gradient(jnp.round(x) - x)


def fake_quant_weight(w: jax.Array, scale: jax.typing.ArrayLike, bits: int, *,
                      multiply_scale: bool) -> jax.Array:
  """Quantized value of ``w`` with straight-through gradients.

  Args:
    w: latent weights.
    scale: step size ``s`` (> 0), scalar or broadcastable to ``w``.
    bits: weight bit width in ``[1, 8]``.
    multiply_scale: required, because the right answer depends on the
      network. ``False`` returns the paper's fixed-point value ``w_d / gamma``
      (``2 w_d - 1`` for binary), right when a batch norm after the layer
      absorbs the scale. ``True`` returns that value times ``s``, the
      magnitude of ``w``: needed without a normalisation after the layer
      (e.g. a transformer's projections). Levels and transitions are the same.

  Returns:
    An array in the dtype of ``w``. Its gradient with respect to ``w`` is
    ``1 / s`` inside the clip range and 0 outside (``1`` with
    ``multiply_scale``).
  """
  q = weight_range(bits)
  _checks.check_bool("multiply_scale", multiply_scale)
  if bits == 1:
    u = jnp.clip(_upcast(w) / scale, -1.0, 1.0)
    value = u + jax.lax.stop_gradient(jnp.where(u > 0, 1.0, -1.0).astype(u.dtype) - u)
  else:
    value = _round_ste(_scaled(w, scale, q)) / q.gamma
  return _like_input(w, value * scale if multiply_scale else value)


def fake_quant_activation(x: jax.Array, scale: jax.typing.ArrayLike, bits: int) -> jax.Array:
  """Quantized activation ``a_d / gamma`` with straight-through gradients.

  Gradients flow to ``x`` (``1/s`` inside the range) and to a learned
  ``scale`` through the clip; no LSQ gradient scaling is applied.
  """
  q = activation_range(bits)
  return _like_input(x, _round_ste(_scaled(x, scale, q)) / q.gamma)


def initial_weight_scale(w: jax.Array, axis: int | tuple[int, ...] | None = None) -> jax.Array:
  """Frozen weight step size ``s = 3 * std(w)``, per tensor or over ``axis``.

  With ``axis`` given, the reduced axes are kept (size 1) so the result
  broadcasts against ``w`` for per-channel scales.
  """
  return 3.0 * jnp.std(jnp.asarray(w), axis=axis, keepdims=axis is not None)


def initial_activation_scale(x: jax.Array) -> jax.Array:
  """Activation step size ``3 * std(x) / sqrt(1 - 2 / pi)`` from a first batch.

  ``sqrt(1 - 2/pi)`` is the std of a half-normal of unit scale: it corrects
  for the ReLU cutting the input distribution in half.
  """
  return 3.0 * jnp.std(jnp.asarray(x)) / math.sqrt(1.0 - 2.0 / math.pi)


def distance_to_transition(w: jax.Array, scale: jax.typing.ArrayLike, bits: int) -> jax.Array:
  """Normalised distance of each weight to its nearest transition point.

  ``0.5 - |u - round(u)|`` with ``u = clip(gamma * w / s, alpha, beta)``: 0 on
  a transition point, 0.5 on a level (and beyond the outer levels). Binary:
  ``min(|w| / s, 1)``.
  """
  q = weight_range(bits)
  if bits == 1:
    return _like_input(w, jnp.minimum(jnp.abs(_upcast(w)) / scale, 1.0))
  u = _scaled(w, scale, q)
  return _like_input(w, 0.5 - jnp.abs(u - jnp.round(u)))


def level_values(levels: jax.Array, scale: jax.typing.ArrayLike, bits: int,
                 dtype: Any = jnp.float32) -> jax.Array:
  """The latent weight value each integer level stands for (its bin centre).

  ``s * w_d / gamma`` for ``bits >= 2`` and ``s * (2 w_d - 1)`` for binary:
  the point of the latent axis that :func:`weight_levels` maps to ``w_d`` and
  that :func:`fake_quant_weight` returns unchanged (times ``gamma / s``
  without ``multiply_scale``). It does not depend on ``multiply_scale``,
  which only scales the layer's output.

  Args:
    levels: integer levels, as :func:`weight_levels` returns.
    scale: step size ``s`` (> 0), scalar or broadcastable to ``levels``.
    bits: weight bit width in ``[1, 8]``.
    dtype: dtype of the result (that of the latent weights).

  Returns:
    An array shaped like ``levels`` (broadcast with ``scale``) in ``dtype``.
  """
  q = weight_range(bits)
  code = jnp.asarray(levels).astype(jnp.float32)
  if bits == 1:
    code = 2.0 * code - 1.0
  return (code * (_upcast(scale) / q.gamma)).astype(dtype)


def weight_centers(w: jax.Array, scale: jax.typing.ArrayLike, bits: int) -> jax.Array:
  """The centre of each weight's bin: the latent value of its current level.

  A weight beyond the outer levels (``|gamma w / s|`` past the clip range,
  ``|w| > s`` for binary) is its own centre: pulling it to the outer level
  would change the clip range, which Nagel et al.'s dampening leaves alone
  (they clip ``w`` to the quantizer's range inside the term).

  Args:
    w: latent weights.
    scale: step size ``s`` (> 0), scalar or broadcastable to ``w``.
    bits: weight bit width in ``[1, 8]``.

  Returns:
    An array in the dtype (and shape) of ``w``.
  """
  q = weight_range(bits)
  w = jnp.asarray(w)
  centers = level_values(weight_levels(w, scale, bits), scale, bits, w.dtype)
  u = q.gamma * _upcast(w) / scale
  beyond = jnp.abs(u) > 1.0 if bits == 1 else (u > q.beta) | (u < q.alpha)
  return jnp.where(beyond, w, centers)


def _check_scale(name: str, scale: Any) -> None:
  """A step size must be finite and > 0 everywhere (checked once, at construction)."""
  try:
    value = np.asarray(jax.device_get(_tree.unbox(scale)))
  except (TypeError, ValueError):
    value = None
  # jnp.issubdtype knows bfloat16, which NumPy calls non-numeric; bools and
  # strings are not step sizes even though NumPy would convert them.
  numeric = value is not None and value.dtype != np.bool_ and jnp.issubdtype(
      value.dtype, jnp.number) and not jnp.issubdtype(value.dtype, jnp.complexfloating)
  if numeric:
    value = value.astype(np.float64)
  if (not numeric or value.size == 0
      or not bool(np.all(np.isfinite(value) & (value > 0)))):
    raise ValueError(
        f"{name} must be a finite step size > 0 (a number or a per-channel array),"
        f" got {name} = {scale!r}.")


class _PerLeaf(NamedTuple):
  """The step size and bit width of every leaf (``None`` for full-precision ones)."""

  treedef: Any
  scales: list[Any]
  bits: list[Optional[int]]

  def flatten(self, params: Any, owner: str, role: str = "levels_fn") -> list[Any]:
    try:
      return self.treedef.flatten_up_to(params)
    except (ValueError, TypeError) as e:
      _checks.raise_if_step_count(params, role)
      raise ValueError(
          f"params do not have the structure of the scales given to {owner}: {e}"
      ) from None


def _per_leaf(scales: Any, bits: Any) -> _PerLeaf:
  """Checks ``scales`` and ``bits`` once, where a levels or centres function is built."""
  scale_leaves, treedef = jax.tree.flatten(scales, is_leaf=lambda x: x is None)
  if all(s is None for s in scale_leaves):
    raise ValueError("scales must hold a step size for at least one leaf, got only None.")
  if isinstance(bits, int) or np.issubdtype(type(bits), np.integer):
    bit_leaves = [None if s is None else _checks.check_bits("bits", bits)
                  for s in scale_leaves]
  else:
    try:
      bit_leaves = treedef.flatten_up_to(bits)
    except (ValueError, TypeError) as e:
      raise ValueError(
          "bits must be an int in [1, 8] or a pytree with the structure of scales;"
          f" got a mismatching pytree: {e}") from None
    bit_leaves = [None if s is None else _checks.check_bits("bits", b)
                  for s, b in zip(scale_leaves, bit_leaves)]
  paths = [p for p, _ in _tree.leaves_with_paths(scales, lambda x: x is None)]
  for path, s in zip(paths, scale_leaves):
    if s is not None:
      _check_scale(f"scales[{path!r}]", s)
  return _PerLeaf(treedef, scale_leaves, bit_leaves)


def levels_fn_from_scales(scales: Any, bits: Any) -> Callable[[Any], Any]:
  """Builds a ``levels_fn`` for :func:`talr_optax.scale_by_talr` in functional code.

  Args:
    scales: a pytree shaped like the params with a step size (a finite number
      > 0, or a per-channel array) for every quantized weight and ``None``
      for full-precision leaves.
    bits: an int in ``[1, 8]`` for all quantized weights, or a pytree like
      ``scales`` with an int per quantized leaf.

  Returns:
    ``levels_fn(params)``: int8 levels for quantized leaves, ``None``
    elsewhere (also for ``optax.MaskedNode`` leaves left by ``optax.masked``).

  Example:
    >>> params = {"w": jnp.ones((3, 4)), "b": jnp.zeros(4)}
    >>> levels_fn = levels_fn_from_scales({"w": 1.0, "b": None}, bits=2)
    >>> levels_fn(params)["w"].dtype
    dtype('int8')
  """
  per_leaf = _per_leaf(scales, bits)

  def levels_fn(params: Any) -> Any:
    param_leaves = per_leaf.flatten(params, "levels_fn_from_scales")
    return per_leaf.treedef.unflatten([
        None if s is None or _tree.is_none_or_masked(p) else
        weight_levels(_tree.unbox(p), s, b)
        for p, s, b in zip(param_leaves, per_leaf.scales, per_leaf.bits)])

  return levels_fn


def centers_fn_from_scales(scales: Any, bits: Any) -> Callable[..., Any]:
  """Builds the ``centers_fn`` of the oscillation remedies from step sizes.

  The companion of :func:`levels_fn_from_scales` (same arguments), for
  :func:`talr_optax.dampen_oscillations` and
  :func:`talr_optax.freeze_oscillations`.

  Args:
    scales: as in :func:`levels_fn_from_scales`.
    bits: as in :func:`levels_fn_from_scales`.

  Returns:
    ``centers_fn(params, levels=None)``: a pytree like ``scales`` with, for
    every quantized leaf, the latent value of each weight's current level
    (:func:`weight_centers`: a weight beyond the outer levels is its own
    centre), or with ``levels`` given (a pytree like ``levels_fn``'s), the
    latent values of those levels (:func:`level_values`); ``None`` elsewhere.
    Results have the dtype of the params.

  Example:
    >>> centers_fn = centers_fn_from_scales({"w": 1.0, "b": None}, bits=2)
    >>> centers_fn({"w": jnp.array([0.3, -0.1]), "b": jnp.zeros(2)})["w"]
    Array([0.5, 0. ], dtype=float32)
  """
  per_leaf = _per_leaf(scales, bits)

  def centers_fn(params: Any, levels: Any = None) -> Any:
    param_leaves = per_leaf.flatten(params, "centers_fn_from_scales", "centers_fn")
    level_leaves = (per_leaf.flatten(levels, "centers_fn_from_scales (levels)", "centers_fn")
                    if levels is not None else [None] * len(param_leaves))
    out = []
    for p, level, s, b in zip(param_leaves, level_leaves, per_leaf.scales, per_leaf.bits):
      if s is None or _tree.is_none_or_masked(p):
        out.append(None)
      elif levels is None:
        out.append(weight_centers(_tree.unbox(p), s, b))
      else:
        out.append(level_values(level, s, b, jnp.result_type(_tree.unbox(p))))
    return per_leaf.treedef.unflatten(out)

  return centers_fn
