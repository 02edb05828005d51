"""Quantized Flax NNX layers: ``QuantConv`` and ``QuantLinear``.

They are ``nnx.Conv`` and ``nnx.Linear`` (subclasses: same constructor
arguments, parameters, paths and forward computation) that quantize their
*input activations* (unsigned: the input is expected to come from a ReLU) and
their *kernel* with the uniform quantizers of :mod:`talr_optax.quantizers`,
with straight-through gradients. ``weight_bits=None`` / ``act_bits=None`` keep
that side full precision; with both ``None`` a layer computes exactly what the
Flax layer computes, so the same classes build the full-precision model that
quantization-aware training starts from.

Quantizer state, per layer, as in Lee et al., "Scheduling Weight Transitions
for Quantization-Aware Training" (ICCV 2025):

* ``weight_scale`` (:class:`WeightScale`, a plain ``nnx.Variable``): the frozen
  weight step size ``s = 3 * std(w)``. It is not an ``nnx.Param``, so
  ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` never sees or updates it; the
  integer levels ``round(clip(gamma * w / s))`` whose transitions TALR counts
  are measured on this fixed grid.
* ``act_scale`` (:class:`ActivationScale`, an ``nnx.Param`` subclass): the
  learned activation step size, initialised to ``3 * std(x) / sqrt(1 - 2/pi)``
  of the first batch. Its own type lets ``param_labels`` route it to its own
  optimizer group.
* ``calibrated`` (:class:`Calibrated`, a boolean ``nnx.Variable``): whether the
  two scales above hold their initial values yet.

Calibration is state, not Python control flow, so it works under ``nnx.jit``
and ``nnx.scan``: every forward computes ``jnp.where(calibrated, stored,
fresh)``; a forward in training mode (``deterministic=False``, what
``model.train()`` sets) writes the result back and sets ``calibrated = True``,
so the scales are set once, by the first training forward, and frozen
afterwards. A forward in evaluation mode (``model.eval()``) uses fresh scales
for an uncalibrated layer but stores nothing. :func:`talr_optax.nnx.calibrate`
forces (re)calibration from a batch, e.g. after loading pretrained weights.

A batch that defines no step size (empty, or with std 0 such as an all-zero
batch) or an all-zero kernel does not calibrate the layer: it keeps its
placeholder step sizes (1.0) for that forward and stays uncalibrated, so the
next training batch calibrates it. Its state and outputs stay finite.

Stacked layers: a layer created under ``nnx.vmap`` (one kernel of shape
``(L, ...)`` for ``L`` layers, applied with ``nnx.scan``) gets one weight
scale, activation scale and flag per layer, shape ``(L,)``. Inside the scan
each step sees one layer's slices and calibrates it on its own input.
"""

from __future__ import annotations

import numbers
import typing as tp

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from talr_optax import _checks
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
    "check_rngs",
    "fresh_weight_scale",
    "fresh_activation_scale",
]

# Bit widths the layers accept; ``None`` means full precision.
ACCEPTED_BITS = (1, 2, 3, 4, 8)

# Step size of an uncalibrated layer: any positive number keeps the forward
# finite; it is replaced by the first batch that defines a step size.
_PLACEHOLDER_SCALE = 1.0


class WeightScale(nnx.Variable):
  """Frozen weight step size ``s`` of a quantized layer; never trained."""


class ActivationScale(nnx.Param):
  """Learned step size of a layer's input activations (its own optimizer group)."""


class Calibrated(nnx.Variable):
  """Boolean flag: the layer's step sizes hold their initial values."""


def validate_layer_bits(bits: tp.Any, name: str, owner: str | None = None) -> int | None:
  """Returns ``bits`` if it is in ``ACCEPTED_BITS`` or ``None``, else raises.

  Args:
    bits: the bit width to check (a Python or NumPy integer, or ``None`` for
      full precision).
    name: the argument name quoted in the error.
    owner: the class or function quoted in front of the error, if any.

  Returns:
    ``bits`` as a Python ``int``, or ``None``.

  Raises:
    ValueError: naming ``name`` and the accepted values.
  """
  if bits is None:
    return None
  bits = _checks.check_int(name, bits, 1, 8, owner=owner)
  return _checks.check_choice(name, bits, ACCEPTED_BITS, owner=owner)


def check_rngs(rngs: tp.Any, owner: str) -> None:
  """Raises a ``TypeError`` unless ``rngs`` is an ``nnx.Rngs``.

  Flax itself would fail later, inside an initializer call, with
  "'int' object has no attribute 'params'".
  """
  if not isinstance(rngs, nnx.Rngs):
    raise TypeError(
        f"{owner}: rngs must be an nnx.Rngs, e.g. rngs=nnx.Rngs(0), got rngs of type "
        f"{type(rngs).__name__}."
    )


def fresh_weight_scale(kernel: jax.Array, kernel_ndim: int | None = None) -> jax.Array:
  """The weight step size calibration freezes: ``3 * std(kernel)`` per layer.

  Args:
    kernel: one layer's kernel, or ``L`` layers' kernels stacked on leading axes.
    kernel_ndim: rank of one layer's kernel (default: ``kernel.ndim``).

  Returns:
    A scalar, or one step size per layer (shape: the leading stack axes).
    0 for a constant kernel, which no forward calibrates from.
  """
  kernel = jnp.asarray(kernel)
  kernel_ndim = kernel.ndim if kernel_ndim is None else kernel_ndim
  axes = tuple(range(kernel.ndim - kernel_ndim, kernel.ndim))
  return jnp.squeeze(quantizers.initial_weight_scale(kernel, axis=axes), axes)


def fresh_activation_scale(x: jax.Array) -> jax.Array:
  """The first activation step size: ``3 * std(x) / sqrt(1 - 2/pi)``.

  0 for a constant batch and NaN for an empty one: neither calibrates a layer.
  """
  return quantizers.initial_activation_scale(x)


def _usable(scale: jax.Array) -> jax.Array:
  """True where ``scale`` is a step size the quantizer can divide by."""
  return jnp.isfinite(scale) & (scale > 0)


def _per_layer(x: jax.Array, kernel_ndim: int) -> jax.Array:
  """``(L,)`` per-layer values as ``(L, 1, ..., 1)``, to broadcast against a stacked kernel."""
  return jnp.reshape(x, jnp.shape(x) + (1,) * kernel_ndim)


class QuantLayer(nnx.Module):
  """Quantizer state and logic shared by :class:`QuantConv` and :class:`QuantLinear`.

  Subclasses build the Flax layer first and then call :meth:`_init_quantizers`.
  """

  kernel: nnx.Param
  kernel_ndim: int
  weight_bits: int | None
  act_bits: int | None
  multiply_scale: bool
  deterministic: bool

  def _init_quantizers(
      self,
      *,
      weight_bits: int | None,
      act_bits: int | None,
      multiply_scale: bool | None,
      deterministic: bool,
      kernel_ndim: int,
  ) -> None:
    self.weight_bits = weight_bits
    self.act_bits = act_bits
    self.multiply_scale = bool(multiply_scale)
    self.deterministic = deterministic
    self.kernel_ndim = kernel_ndim
    placeholder = jnp.asarray(_PLACEHOLDER_SCALE, self.param_dtype)
    if weight_bits is not None:
      self.weight_scale = WeightScale(placeholder)
    else:
      self.weight_scale = nnx.data(None)
    if act_bits is not None:
      self.act_scale = ActivationScale(placeholder)
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

  @property
  def stack_shape(self) -> tuple[int, ...]:
    """``()`` for one layer; ``(L,)`` for ``L`` layers created under ``nnx.vmap``."""
    return tuple(self.kernel.shape[: len(self.kernel.shape) - self.kernel_ndim])

  def set_view(self, deterministic: bool | None = None) -> None:
    """Used by ``nnx.view``: ``deterministic=True`` stops calibration writes."""
    if deterministic is not None:
      self.deterministic = deterministic

  def weight_scale_for(self, kernel: jax.Array | None = None) -> jax.Array:
    """The weight step size(s) a forward pass would quantize ``kernel`` with now.

    Args:
      kernel: this layer's kernel (default) or another value of it (same shape).

    Returns:
      The frozen scale of each calibrated layer; for an uncalibrated one the
      scale its calibration would freeze (``3 * std(kernel)``, or the
      placeholder for a constant kernel). Shaped to broadcast against
      ``kernel`` (``(L, 1, ..., 1)`` for a stacked kernel).

    Raises:
      ValueError: if the layer's kernel is not quantized (``weight_bits=None``).
    """
    if self.weight_bits is None:
      raise ValueError("weight_scale_for needs weight_bits, got weight_bits = None.")
    kernel = self.kernel[...] if kernel is None else kernel
    calibrated, stored = self.calibrated[...], self.weight_scale[...]
    if not isinstance(calibrated, jax.core.Tracer) and np.all(np.asarray(calibrated)):
      # Known to be frozen: skip the fresh std (which a caller tracing
      # ``kernel``, e.g. levels_fn in a jitted update, would compute every step).
      return _per_layer(stored, self.kernel_ndim)
    fresh = fresh_weight_scale(kernel, self.kernel_ndim)
    keep = calibrated | ~_usable(fresh)
    return _per_layer(jnp.where(keep, stored, fresh), self.kernel_ndim)

  def levels(self) -> jax.Array:
    """Integer (int8) levels of the current kernel under :meth:`weight_scale_for`."""
    return quantizers.weight_levels(self.kernel[...], self.weight_scale_for(), self.weight_bits)

  def _quantize(self, inputs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns ``(x_q, w_q)``; in training mode stores first-batch scales."""
    kernel = self.kernel[...]
    if not self.is_quantized:
      return inputs, kernel
    calibrated = self.calibrated[...]
    fresh_w = fresh_weight_scale(kernel) if self.weight_bits is not None else None
    fresh_a = fresh_activation_scale(inputs) if self.act_bits is not None else None
    # An empty or constant batch (or kernel) defines no step size: keep the
    # placeholder and let a later batch calibrate.
    usable = jnp.all(jnp.stack([_usable(s) for s in (fresh_w, fresh_a) if s is not None]))
    take_fresh = ~calibrated & usable
    x, w = inputs, kernel
    if self.act_bits is not None:
      stored = self.act_scale[...]
      scale = jnp.where(take_fresh, fresh_a, stored)
      if not self.deterministic:
        self.act_scale[...] = scale
      # Value of the fresh scale, gradient of the parameter: as if the
      # parameter had been set before this forward (the reference behaviour).
      scale = stored + jax.lax.stop_gradient(scale - stored)
      x = quantizers.fake_quant_activation(inputs, scale, self.act_bits)
      if self.multiply_scale:
        x = x * scale
    if self.weight_bits is not None:
      # A constant for the STE: no gradient flows through std(kernel) on the
      # calibrating forward.
      scale = jax.lax.stop_gradient(jnp.where(take_fresh, fresh_w, self.weight_scale[...]))
      if not self.deterministic:
        self.weight_scale[...] = scale
      w = quantizers.fake_quant_weight(
          kernel, scale, self.weight_bits, multiply_scale=self.multiply_scale)
    if not self.deterministic:
      self.calibrated[...] = calibrated | usable
    return x, w


class _WithKernel:
  """``layer`` as Flax's forward sees it, with ``kernel[...]`` reading ``kernel``.

  Lets ``nnx.Conv.__call__`` / ``nnx.Linear.__call__`` (padding modes, masks,
  dtype promotion, batch axes, injected ops) run unchanged on the quantized
  kernel instead of the latent one.
  """

  def __init__(self, layer: nnx.Module, kernel: jax.Array):
    self._layer = layer
    self.kernel = kernel  # an array: kernel[...] is the array itself

  def __getattr__(self, name: str) -> tp.Any:
    return getattr(self._layer, name)


def _check_quantizer_args(owner: str, *, in_features: tp.Any, out_features: tp.Any,
                          weight_bits: tp.Any, act_bits: tp.Any, multiply_scale: tp.Any,
                          deterministic: tp.Any, rngs: tp.Any) -> tuple[int | None, int | None]:
  """Checks the arguments Flax does not check, before any parameter is drawn.

  Returns ``(weight_bits, act_bits)`` as ints or ``None``.
  """
  _checks.check_int("in_features", in_features, owner=owner)
  _checks.check_int("out_features", out_features, owner=owner)
  weight_bits = validate_layer_bits(weight_bits, "weight_bits", owner)
  act_bits = validate_layer_bits(act_bits, "act_bits", owner)
  if (weight_bits is not None or act_bits is not None) and multiply_scale is None:
    raise ValueError(
        f"{owner}: multiply_scale must be given (True or False) for a quantized layer: "
        "False when a batch norm follows the layer and absorbs the step size (the "
        "paper's conv nets), True when nothing does (e.g. a transformer's linear "
        "layers), so that the output keeps the scale of a full-precision layer."
    )
  if multiply_scale is not None:
    _checks.check_bool("multiply_scale", multiply_scale, owner=owner)
  _checks.check_bool("deterministic", deterministic, owner=owner)
  check_rngs(rngs, owner)
  return weight_bits, act_bits


class QuantConv(QuantLayer, nnx.Conv):
  """``nnx.Conv`` with quantized input activations and kernel.

  Takes every argument of ``nnx.Conv`` with the same meaning and default
  (``kernel_size=(3, 3)`` for a 2-D conv, an int is a 1-D kernel; ``strides``,
  ``padding``, ``input_dilation``, ``kernel_dilation``,
  ``feature_group_count`` (``= in_features`` for a depthwise conv),
  ``use_bias``, ``mask``, ``dtype``, ``param_dtype``, ``precision``,
  ``kernel_init``, ``bias_init``, ``conv_general_dilated``, ``promote_dtype``,
  ``preferred_element_type``, ``kernel_metadata``, ``bias_metadata``), plus
  the quantizer arguments below. Its ``kernel`` and ``bias`` have the same
  names and shapes, so an ``nnx.Conv`` checkpoint loads into it.

  The forward is ``nnx.Conv``'s on ``(x_q, w_q)``: the input and kernel are
  quantized first; a ``mask`` then multiplies the quantized kernel.

  Example::

    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> conv = QuantConv(3, 4, kernel_size=(3, 3), use_bias=False,
    ...                  weight_bits=2, act_bits=2, multiply_scale=False,
    ...                  rngs=nnx.Rngs(0))
    >>> conv(jnp.ones((1, 8, 8, 3))).shape
    (1, 8, 8, 4)

  Args:
    in_features: number of input channels (>= 1).
    out_features: number of output channels (>= 1).
    kernel_size: as ``nnx.Conv``; entries >= 1.
    strides: as ``nnx.Conv``.
    weight_bits: kernel bits in ``{1, 2, 3, 4, 8}``; ``None`` keeps it full
      precision.
    act_bits: input activation bits in ``{1, 2, 3, 4, 8}``; ``None`` keeps
      the input full precision. Inputs are quantized unsigned: negative
      values clip to level 0.
    multiply_scale: required for a quantized layer. ``False``: the quantized
      values are ``w_d / gamma`` and ``a_d / gamma`` (the paper's conv nets,
      where the batch norm after the conv absorbs the step sizes). ``True``:
      they are multiplied back by their step sizes (``w_q ~ w``, ``x_q ~ x``)
      for a layer without a normalization after it. Levels do not change.
    deterministic: evaluation mode (no calibration writes); ``model.train()``
      and ``model.eval()`` set it.
    rngs: random number generators (``rngs.params()`` draws the kernel).
    **kwargs: the other keyword arguments of ``nnx.Conv``.

  Raises:
    ValueError: bits outside the accepted values, ``multiply_scale`` missing
      for a quantized layer, a size or ``kernel_size`` entry not an int >= 1,
      ``feature_group_count`` not dividing both feature counts (named in the
      message), checked before any parameter is drawn.
    TypeError: ``rngs`` that is not an ``nnx.Rngs``.
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      kernel_size: int | tp.Sequence[int],
      strides: int | tp.Sequence[int] | None = 1,
      *,
      weight_bits: int | None,
      act_bits: int | None,
      multiply_scale: bool | None = None,
      deterministic: bool = False,
      rngs: nnx.Rngs,
      **kwargs: tp.Any,
  ):
    owner = "QuantConv"
    weight_bits, act_bits = _check_quantizer_args(
        owner, in_features=in_features, out_features=out_features, weight_bits=weight_bits,
        act_bits=act_bits, multiply_scale=multiply_scale, deterministic=deterministic,
        rngs=rngs)
    # An int is a 1-D kernel, as in nnx.Conv.
    sizes = (kernel_size,) if isinstance(kernel_size, numbers.Integral) else tuple(kernel_size)
    if not sizes:
      raise ValueError(
          f"{owner}: kernel_size must not be empty, got kernel_size = {kernel_size!r}.")
    for size in sizes:
      _checks.check_int("kernel_size", size, owner=owner)
    groups = _checks.check_int("feature_group_count", kwargs.get("feature_group_count", 1),
                               owner=owner)
    if in_features % groups or out_features % groups:
      raise ValueError(
          f"{owner}: feature_group_count must divide in_features and out_features (a "
          f"depthwise conv has feature_group_count = in_features), got feature_group_count "
          f"= {groups}, in_features = {in_features}, out_features = {out_features}."
      )
    super().__init__(int(in_features), int(out_features), sizes, strides, rngs=rngs, **kwargs)
    self._init_quantizers(
        weight_bits=weight_bits,
        act_bits=act_bits,
        multiply_scale=multiply_scale,
        deterministic=deterministic,
        kernel_ndim=len(sizes) + 2,
    )

  def __call__(self, inputs: jax.Array, out_sharding: tp.Any = None) -> jax.Array:
    """Quantizes input and kernel, then convolves as ``nnx.Conv``.

    Args:
      inputs: ``(*batch, *spatial, in_features)``, channels last; expected
        non-negative if ``act_bits`` is set.
      out_sharding: as ``nnx.Conv``.

    Returns:
      ``(*batch, *spatial_out, out_features)``.
    """
    x, w = self._quantize(inputs)
    return nnx.Conv.__call__(_WithKernel(self, w), x, out_sharding=out_sharding)


class QuantLinear(QuantLayer, nnx.Linear):
  """``nnx.Linear`` with quantized input activations and kernel.

  Takes every argument of ``nnx.Linear`` with the same meaning and default
  (``use_bias``, ``dtype``, ``param_dtype``, ``precision``, ``kernel_init``,
  ``bias_init``, ``dot_general``, ``promote_dtype``,
  ``preferred_element_type``, ``kernel_metadata``, ``bias_metadata``), plus
  the quantizer arguments of :class:`QuantConv`. Its ``kernel``
  (``(in_features, out_features)``) and ``bias`` match ``nnx.Linear``.

  Example::

    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> layer = QuantLinear(16, 4, weight_bits=4, act_bits=None,
    ...                     multiply_scale=True, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((2, 3, 16))).shape
    (2, 3, 4)

  Args:
    in_features: input size (>= 1).
    out_features: output size (>= 1).
    weight_bits: kernel bits in ``{1, 2, 3, 4, 8}`` or ``None``.
    act_bits: input activation bits in ``{1, 2, 3, 4, 8}`` or ``None``
      (unsigned: for inputs that come from a ReLU).
    multiply_scale: required for a quantized layer; see :class:`QuantConv`.
      ``True`` for a layer no normalization follows.
    deterministic: evaluation mode (no calibration writes).
    rngs: random number generators.
    **kwargs: the other keyword arguments of ``nnx.Linear``.

  Raises:
    ValueError, TypeError: as :class:`QuantConv`.
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      *,
      weight_bits: int | None,
      act_bits: int | None,
      multiply_scale: bool | None = None,
      deterministic: bool = False,
      rngs: nnx.Rngs,
      **kwargs: tp.Any,
  ):
    weight_bits, act_bits = _check_quantizer_args(
        "QuantLinear", in_features=in_features, out_features=out_features,
        weight_bits=weight_bits, act_bits=act_bits, multiply_scale=multiply_scale,
        deterministic=deterministic, rngs=rngs)
    super().__init__(int(in_features), int(out_features), rngs=rngs, **kwargs)
    self._init_quantizers(
        weight_bits=weight_bits,
        act_bits=act_bits,
        multiply_scale=multiply_scale,
        deterministic=deterministic,
        kernel_ndim=2,
    )

  def __call__(self, inputs: jax.Array, out_sharding: tp.Any = None) -> jax.Array:
    """Quantizes input and kernel, then applies ``x_q @ w_q + b`` as ``nnx.Linear``.

    Args:
      inputs: ``(..., in_features)``.
      out_sharding: as ``nnx.Linear``.

    Returns:
      ``(..., out_features)``.
    """
    x, w = self._quantize(inputs)
    return nnx.Linear.__call__(_WithKernel(self, w), x, out_sharding=out_sharding)


def quantized_layers(model: nnx.Module) -> list[tuple[tuple[tp.Any, ...], QuantLayer]]:
  """All :class:`QuantLayer` s of ``model`` that quantize something, with paths.

  Args:
    model: any NNX module.

  Returns:
    ``[(path, layer), ...]`` in ``nnx.iter_modules`` order; ``path`` is the
    tuple of attribute names / list indices leading to the layer. A layer
    created under ``nnx.vmap`` appears once, with stacked variables.
  """
  return [
      (tuple(path), module)
      for path, module in nnx.iter_modules(model)
      if isinstance(module, QuantLayer) and module.is_quantized
  ]
