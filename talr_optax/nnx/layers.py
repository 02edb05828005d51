"""Quantized Flax NNX layers: ``QuantConv`` and ``QuantLinear``.

Both quantize their *input activations* (unsigned, the input is expected to come
from a ReLU) and their *kernel* with the uniform quantizers of
:mod:`talr_optax.quantizers`, with straight-through gradients. ``bits=None``
keeps that side full precision, so the same classes build the full-precision
model that QAT starts from.

Quantizer state, per layer (METHOD.md, section 2):

* ``weight_scale`` (:class:`WeightScale`, a plain ``nnx.Variable``): the frozen
  weight step size ``s = 3 * std(w)``. It is not an ``nnx.Param``, so
  ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` never sees or updates it.
* ``act_scale`` (:class:`ActivationScale`, an ``nnx.Param`` subclass): the
  learned activation step size, initialised to ``3 * std(x) / sqrt(1 - 2/pi)``
  of the first batch. Its own type lets ``param_labels`` route it to its own
  optimizer group.
* ``calibrated`` (:class:`Calibrated`, a boolean ``nnx.Variable``): whether the
  two scales above hold their initial values yet.

Calibration is state, not Python control flow, so it works under ``nnx.jit``:
every forward computes ``jnp.where(calibrated, stored, fresh)``; a forward in
training mode (``deterministic=False``, what ``model.train()`` sets) writes the
result back and sets ``calibrated = True``, so the scales are set once, by the
first training forward, and frozen afterwards. A forward in evaluation mode
(``model.eval()``) uses fresh scales for an uncalibrated layer but stores
nothing. :func:`talr_optax.nnx.calibrate` forces (re)calibration from a batch,
e.g. after loading pretrained full-precision weights.
"""

from __future__ import annotations

import numbers
import typing as tp

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn import initializers
from flax.typing import Dtype, Initializer

from talr_optax import quantizers

__all__ = [
    "ACCEPTED_BITS",
    "WeightScale",
    "ActivationScale",
    "Calibrated",
    "QuantConv",
    "QuantLinear",
    "QuantLayer",
    "quantized_layers",
    "validate_layer_bits",
    "fresh_weight_scale",
    "fresh_activation_scale",
]

# Bit widths the layers accept; ``None`` means full precision.
ACCEPTED_BITS = (1, 2, 3, 4, 8)

# Floor for a freshly computed step size: an all-zero kernel or batch has
# std 0, and a zero step size would divide by zero in the quantizer.
_MIN_SCALE = 1e-8

default_kernel_init = initializers.lecun_normal()
default_bias_init = initializers.zeros_init()


class WeightScale(nnx.Variable):
  """Frozen weight step size ``s`` of a quantized layer; never trained."""


class ActivationScale(nnx.Param):
  """Learned step size of a layer's input activations (its own optimizer group)."""


class Calibrated(nnx.Variable):
  """Boolean flag: the layer's step sizes hold their initial values."""


def _is_int(x: tp.Any) -> bool:
  """A Python or NumPy integer, not a bool."""
  return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def validate_layer_bits(bits: tp.Any, name: str) -> int | None:
  """Returns ``bits`` if it is in ``ACCEPTED_BITS`` or ``None``, else raises.

  Args:
    bits: the bit width to check (a Python or NumPy integer, or ``None``).
    name: the argument name quoted in the error.

  Returns:
    ``bits`` as a Python ``int``, or ``None``.

  Raises:
    ValueError: naming ``name`` and the accepted values.
  """
  if bits is None:
    return None
  if not _is_int(bits) or int(bits) not in ACCEPTED_BITS:
    accepted = ", ".join(str(b) for b in ACCEPTED_BITS)
    raise ValueError(
        f"{name} must be one of {accepted} or None (full precision), got "
        f"{name} = {bits!r}."
    )
  return int(bits)


def _check_positive_int(value: tp.Any, name: str, owner: str) -> int:
  """``value`` as an ``int`` if it is an integer >= 1, else a ``ValueError``."""
  if not _is_int(value) or value < 1:
    raise ValueError(f"{owner}: {name} must be an integer >= 1, got {name} = {value!r}.")
  return int(value)


def _check_bool(value: tp.Any, name: str, owner: str) -> bool:
  """``value`` as a ``bool`` if it is one (Python or NumPy), else a ``ValueError``."""
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{owner}: {name} must be True or False, got {name} = {value!r}.")
  return bool(value)


def _check_rngs(rngs: tp.Any, owner: str) -> nnx.Rngs:
  """Rejects anything but an ``nnx.Rngs`` before a parameter is drawn."""
  if not isinstance(rngs, nnx.Rngs):
    raise TypeError(
        f"{owner}: rngs must be an nnx.Rngs, e.g. rngs=nnx.Rngs(0), got "
        f"rngs of type {type(rngs).__name__}: {str(rngs)[:60]}"
    )
  return rngs


def _check_float_dtype(dtype: tp.Any, name: str, owner: str, allow_none: bool) -> None:
  if dtype is None and allow_none:
    return
  try:
    ok = jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
  except TypeError:
    ok = False
  if not ok:
    none = " or None" if allow_none else ""
    raise ValueError(
        f"{owner}: {name} must be a floating dtype (e.g. jnp.float32, "
        f"jnp.bfloat16){none}, got {name} = {dtype!r}."
    )


def _check_callable(fn: tp.Any, name: str, owner: str) -> None:
  if not callable(fn):
    raise TypeError(
        f"{owner}: {name} must be an initializer, fn(key, shape, dtype) -> array, "
        f"got {name} of type {type(fn).__name__}."
    )


def _check_common(owner: str, *, in_features, out_features, weight_bits, act_bits, use_bias,
                  multiply_scale, deterministic, dtype, param_dtype, kernel_init, bias_init,
                  rngs) -> tuple[int, int]:
  """Checks of the arguments QuantConv and QuantLinear share; returns the sizes."""
  validate_layer_bits(weight_bits, "weight_bits")
  validate_layer_bits(act_bits, "act_bits")
  in_features = _check_positive_int(in_features, "in_features", owner)
  out_features = _check_positive_int(out_features, "out_features", owner)
  for name, value in (("use_bias", use_bias), ("multiply_scale", multiply_scale),
                      ("deterministic", deterministic)):
    _check_bool(value, name, owner)
  _check_float_dtype(dtype, "dtype", owner, allow_none=True)
  _check_float_dtype(param_dtype, "param_dtype", owner, allow_none=False)
  _check_callable(kernel_init, "kernel_init", owner)
  _check_callable(bias_init, "bias_init", owner)
  _check_rngs(rngs, owner)
  return in_features, out_features


def _int_tuple(value: tp.Any, name: str, owner: str, rank: int | None,
               minimum: int) -> tuple[int, ...]:
  """An int (repeated ``rank`` times) or a sequence of ints, each >= ``minimum``."""
  if _is_int(value):
    values = (value,) * (rank or 2)
  elif isinstance(value, tp.Sequence) and not isinstance(value, str):
    values = tuple(value)
  else:
    values = None
  shape = f"{rank} integers" if rank else "a non-empty sequence of integers"
  if (values is None or not values or (rank is not None and len(values) != rank)
      or not all(_is_int(v) and v >= minimum for v in values)):
    raise ValueError(
        f"{owner}: {name} must be an integer >= {minimum} or {shape} >= {minimum}"
        f", got {name} = {value!r}."
    )
  return tuple(int(v) for v in values)


_PADDING_STRINGS = ("SAME", "SAME_LOWER", "VALID")


def _check_padding(padding: tp.Any, rank: int, owner: str) -> str | list[tuple[int, int]]:
  """``'SAME'``, ``'SAME_LOWER'``, ``'VALID'``, an int >= 0 or ``rank`` (low, high) pairs."""
  if isinstance(padding, str) and padding.upper() in _PADDING_STRINGS:
    return padding.upper()
  if _is_int(padding) and padding >= 0:
    return [(int(padding), int(padding))] * rank
  if isinstance(padding, tp.Sequence) and not isinstance(padding, str):
    pairs = list(padding)
    if len(pairs) == rank and all(
        isinstance(p, tp.Sequence) and len(p) == 2 and all(_is_int(v) and v >= 0 for v in p)
        for p in pairs):
      return [(int(lo), int(hi)) for lo, hi in pairs]
  raise ValueError(
      f"{owner}: padding must be one of {', '.join(repr(p) for p in _PADDING_STRINGS)}, "
      f"an integer >= 0, or {rank} (low, high) pairs of integers >= 0 (one per spatial "
      f"axis), got padding = {padding!r}."
  )


def _check_inputs(inputs: tp.Any, owner: str, in_features: int,
                  ndim: int | None = None, shape_doc: str = "") -> None:
  """Rejects a non-array, or an array of another rank or feature size, at the call."""
  if not hasattr(inputs, "shape") or not hasattr(inputs, "dtype"):
    raise TypeError(
        f"{owner}: inputs must be an array (jax.Array or numpy.ndarray) of shape "
        f"{shape_doc}, got inputs of type {type(inputs).__name__}."
    )
  shape = tuple(inputs.shape)
  if (ndim is not None and len(shape) != ndim) or not shape or shape[-1] != in_features:
    raise ValueError(
        f"{owner}: inputs must have shape {shape_doc} with in_features = {in_features}, "
        f"got inputs of shape {shape}."
    )


def fresh_weight_scale(kernel: jax.Array) -> jax.Array:
  """The weight step size calibration freezes: ``3 * std(kernel)`` (per tensor)."""
  return jnp.maximum(quantizers.initial_weight_scale(kernel), _MIN_SCALE)


def fresh_activation_scale(x: jax.Array) -> jax.Array:
  """The first activation step size: ``3 * std(x) / sqrt(1 - 2/pi)``."""
  return jnp.maximum(quantizers.initial_activation_scale(x), _MIN_SCALE)


class QuantLayer(nnx.Module):
  """Quantizer state and logic shared by :class:`QuantConv` and :class:`QuantLinear`.

  Subclasses create ``self.kernel`` and then call :meth:`_init_quantizers`.
  """

  kernel: nnx.Param
  weight_bits: int | None
  act_bits: int | None
  deterministic: bool

  def _init_quantizers(
      self,
      *,
      weight_bits: int | None,
      act_bits: int | None,
      multiply_scale: bool,
      deterministic: bool,
      param_dtype: Dtype,
  ) -> None:
    self.weight_bits = validate_layer_bits(weight_bits, "weight_bits")
    self.act_bits = validate_layer_bits(act_bits, "act_bits")
    self.multiply_scale = multiply_scale
    self.deterministic = deterministic
    # Placeholders until calibration; 0 makes an unset scale easy to spot.
    if self.weight_bits is not None:
      self.weight_scale = WeightScale(jnp.zeros((), param_dtype))
    else:
      self.weight_scale = nnx.data(None)
    if self.act_bits is not None:
      self.act_scale = ActivationScale(jnp.zeros((), param_dtype))
    else:
      self.act_scale = nnx.data(None)
    if self.is_quantized:
      self.calibrated = Calibrated(jnp.array(False))
    else:
      self.calibrated = nnx.data(None)

  @property
  def is_quantized(self) -> bool:
    """True if the kernel or the input is quantized."""
    return self.weight_bits is not None or self.act_bits is not None

  def set_view(self, deterministic: bool | None = None) -> None:
    """Used by ``nnx.view``: ``deterministic=True`` stops calibration writes."""
    if deterministic is not None:
      self.deterministic = deterministic

  def current_weight_scale(self) -> jax.Array:
    """The weight step size a forward pass would use now (frozen or fresh)."""
    if self.weight_bits is None:
      raise ValueError("current_weight_scale needs weight_bits, got weight_bits = None.")
    fresh = fresh_weight_scale(self.kernel[...])
    return jnp.where(self.calibrated[...], self.weight_scale[...], fresh)

  def levels(self) -> jax.Array:
    """Integer (int8) levels of the current kernel under the current weight scale."""
    return quantizers.weight_levels(
        self.kernel[...], self.current_weight_scale(), self.weight_bits
    )

  def _quantize(self, inputs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns ``(x_q, w_q)``; in training mode stores first-call scales."""
    kernel = self.kernel[...]
    if not self.is_quantized:
      return inputs, kernel
    calibrated = self.calibrated[...]
    x, w = inputs, kernel
    if self.act_bits is not None:
      stored = self.act_scale[...]
      scale = jnp.where(calibrated, stored, fresh_activation_scale(inputs))
      if not self.deterministic:
        self.act_scale[...] = scale
      # Value of the fresh scale, gradient of the parameter: as if the
      # parameter had been set before this forward (the reference behaviour).
      scale = stored + jax.lax.stop_gradient(scale - stored)
      x = quantizers.fake_quant_activation(inputs, scale, self.act_bits)
    if self.weight_bits is not None:
      # A constant for the STE: no gradient flows through std(kernel) on the
      # calibrating forward.
      scale = jax.lax.stop_gradient(
          jnp.where(calibrated, self.weight_scale[...], fresh_weight_scale(kernel))
      )
      if not self.deterministic:
        self.weight_scale[...] = scale
      w = quantizers.fake_quant_weight(
          kernel, scale, self.weight_bits, multiply_scale=self.multiply_scale
      )
    if not self.deterministic:
      self.calibrated[...] = jnp.array(True)
    return x, w


class QuantConv(QuantLayer):
  """Convolution with quantized input activations and kernel.

  Channels-last (NHWC for 2-D) like ``nnx.Conv``; its ``kernel`` and ``bias``
  have the same names and shapes, so a full-precision ``nnx.Conv`` checkpoint
  loads into it.

  Example::

    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> conv = QuantConv(in_features=3, out_features=4, kernel_size=3,
    ...                  weight_bits=2, act_bits=2, rngs=nnx.Rngs(0))
    >>> conv(jnp.ones((1, 8, 8, 3))).shape
    (1, 8, 8, 4)

  Args:
    in_features: number of input channels (>= 1).
    out_features: number of output channels (>= 1).
    kernel_size: a non-empty sequence of ints >= 1, or an int for a square
      2-D kernel (unlike ``nnx.Conv``, where an int means a 1-D kernel).
    strides: an int >= 1 or one int >= 1 per spatial axis (default 1).
    padding: ``'SAME'``, ``'SAME_LOWER'``, ``'VALID'``, an int >= 0, or one
      ``(low, high)`` pair of ints >= 0 per spatial axis.
    weight_bits: kernel bits in ``{1, 2, 3, 4, 8}``; ``None`` keeps it full
      precision.
    act_bits: input activation bits in ``{1, 2, 3, 4, 8}``; ``None`` keeps
      the input full precision.
    use_bias: add a full-precision bias (default False: a batch norm follows).
    multiply_scale: multiply the quantized kernel by its step size (for a
      layer without a batch norm after it). Levels are unchanged.
    deterministic: evaluation mode (no calibration writes); ``model.train()``
      and ``model.eval()`` set it.
    dtype: computation dtype (default: that of the inputs and params).
    param_dtype: dtype of the parameters and scales.
    kernel_init: kernel initializer.
    bias_init: bias initializer.
    rngs: random number generators (``rngs.params()`` draws the kernel).

  Raises:
    ValueError: an argument out of its range (named in the message), checked
      before any parameter is drawn; at the call, ``inputs`` of another rank
      or feature size.
    TypeError: ``rngs`` that is not an ``nnx.Rngs``, an initializer that is
      not callable; at the call, ``inputs`` that is not an array.
  """

  def __init__(
      self,
      *,
      in_features: int,
      out_features: int,
      kernel_size: int | tp.Sequence[int],
      strides: int | tp.Sequence[int] = 1,
      padding: str | int | tp.Sequence[tuple[int, int]] = "SAME",
      weight_bits: int | None,
      act_bits: int | None,
      use_bias: bool = False,
      multiply_scale: bool = False,
      deterministic: bool = False,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      kernel_init: Initializer = default_kernel_init,
      bias_init: Initializer = default_bias_init,
      rngs: nnx.Rngs,
  ):
    # Validate before drawing any random numbers.
    in_features, out_features = _check_common(
        "QuantConv", in_features=in_features, out_features=out_features,
        weight_bits=weight_bits, act_bits=act_bits, use_bias=use_bias,
        multiply_scale=multiply_scale, deterministic=deterministic, dtype=dtype,
        param_dtype=param_dtype, kernel_init=kernel_init, bias_init=bias_init, rngs=rngs)
    kernel_size = _int_tuple(kernel_size, "kernel_size", "QuantConv", None, 1)
    rank = len(kernel_size)
    self.kernel_size = kernel_size
    self.strides = _int_tuple(strides, "strides", "QuantConv", rank, 1)
    self.padding = _check_padding(padding, rank, "QuantConv")
    self.in_features = in_features
    self.out_features = out_features
    self.use_bias = use_bias
    self.dtype = dtype
    self.kernel = nnx.Param(
        kernel_init(rngs.params(), (*kernel_size, in_features, out_features), param_dtype)
    )
    if use_bias:
      self.bias = nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype))
    else:
      self.bias = nnx.data(None)
    self._init_quantizers(
        weight_bits=weight_bits,
        act_bits=act_bits,
        multiply_scale=multiply_scale,
        deterministic=deterministic,
        param_dtype=param_dtype,
    )

  def __call__(self, inputs: jax.Array) -> jax.Array:
    """Quantizes input and kernel, then convolves.

    Args:
      inputs: ``(batch, *spatial, in_features)``, non-negative if ``act_bits``
        is set (negative values clip to level 0).

    Returns:
      ``(batch, *spatial_out, out_features)``.
    """
    rank = len(self.kernel_size)
    _check_inputs(inputs, "QuantConv", self.in_features, rank + 2,
                  f"(batch, {rank} spatial axes, features)")
    x, kernel = self._quantize(inputs)
    dtype = self.dtype or jnp.result_type(x, kernel)
    spatial = tuple(range(1, rank + 1))
    # Channels-last input/output, (spatial..., in, out) kernel, as nnx.Conv.
    dimension_numbers = jax.lax.ConvDimensionNumbers(
        lhs_spec=(0, rank + 1, *spatial),
        rhs_spec=(rank + 1, rank, *range(rank)),
        out_spec=(0, rank + 1, *spatial),
    )
    y = jax.lax.conv_general_dilated(
        x.astype(dtype),
        kernel.astype(dtype),
        window_strides=self.strides,
        padding=self.padding,
        dimension_numbers=dimension_numbers,
    )
    if self.bias is not None:
      y = y + self.bias[...].astype(dtype)
    return y


class QuantLinear(QuantLayer):
  """Dense layer over the last axis with quantized input and kernel.

  Its ``kernel`` (``(in_features, out_features)``) and ``bias`` match
  ``nnx.Linear``.

  Args:
    in_features: input size (>= 1).
    out_features: output size (>= 1).
    weight_bits: kernel bits in ``{1, 2, 3, 4, 8}`` or ``None``.
    act_bits: input activation bits in ``{1, 2, 3, 4, 8}`` or ``None``.
    use_bias: add a full-precision bias (default True).
    multiply_scale: multiply the quantized kernel by its step size.
    deterministic: evaluation mode (no calibration writes).
    dtype: computation dtype (default: that of the inputs and params).
    param_dtype: dtype of the parameters and scales.
    kernel_init: kernel initializer.
    bias_init: bias initializer.
    rngs: random number generators.

  Raises:
    ValueError, TypeError: as :class:`QuantConv`.
  """

  def __init__(
      self,
      *,
      in_features: int,
      out_features: int,
      weight_bits: int | None,
      act_bits: int | None,
      use_bias: bool = True,
      multiply_scale: bool = False,
      deterministic: bool = False,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      kernel_init: Initializer = default_kernel_init,
      bias_init: Initializer = default_bias_init,
      rngs: nnx.Rngs,
  ):
    in_features, out_features = _check_common(
        "QuantLinear", in_features=in_features, out_features=out_features,
        weight_bits=weight_bits, act_bits=act_bits, use_bias=use_bias,
        multiply_scale=multiply_scale, deterministic=deterministic, dtype=dtype,
        param_dtype=param_dtype, kernel_init=kernel_init, bias_init=bias_init, rngs=rngs)
    self.in_features = in_features
    self.out_features = out_features
    self.use_bias = use_bias
    self.dtype = dtype
    self.kernel = nnx.Param(
        kernel_init(rngs.params(), (in_features, out_features), param_dtype)
    )
    if use_bias:
      self.bias = nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype))
    else:
      self.bias = nnx.data(None)
    self._init_quantizers(
        weight_bits=weight_bits,
        act_bits=act_bits,
        multiply_scale=multiply_scale,
        deterministic=deterministic,
        param_dtype=param_dtype,
    )

  def __call__(self, inputs: jax.Array) -> jax.Array:
    """Quantizes input and kernel, then applies ``x @ w + b``.

    Args:
      inputs: ``(..., in_features)``.

    Returns:
      ``(..., out_features)``.
    """
    _check_inputs(inputs, "QuantLinear", self.in_features, None, "(..., in_features)")
    x, kernel = self._quantize(inputs)
    dtype = self.dtype or jnp.result_type(x, kernel)
    y = jnp.dot(x.astype(dtype), kernel.astype(dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(dtype)
    return y


def quantized_layers(model: nnx.Module) -> list[tuple[tuple[tp.Any, ...], QuantLayer]]:
  """All :class:`QuantLayer` s of ``model`` that quantize something, with paths.

  Args:
    model: any NNX module.

  Returns:
    ``[(path, layer), ...]`` in ``nnx.iter_modules`` order; ``path`` is the
    tuple of attribute names / list indices leading to the layer.
  """
  return [
      (tuple(path), module)
      for path, module in nnx.iter_modules(model)
      if isinstance(module, QuantLayer) and module.is_quantized
  ]
