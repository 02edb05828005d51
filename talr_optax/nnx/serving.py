"""An integer forward pass of an exported model: :func:`integer_model`.

:func:`~talr_optax.nnx.export_integer_model` gives integers and step sizes;
this module runs a model on them the way an integer kernel would: each
quantized layer quantizes its input to integer levels, runs ``nnx.Conv`` /
``nnx.Linear``'s own forward on them and the integer weight codes with int32
operands and accumulation, and scales the sum once (a weight-only layer
multiplies float inputs by the codes). Reusing Flax's forward serves every
setting a layer trains with: any padding (also ``CIRCULAR``, ``REFLECT``,
``CAUSAL``), dilations, groups, a kernel mask (a float mask, which makes the
codes floats, is applied and accumulated in float32).

Every value comes from the export; the model passed in only supplies the
architecture (its forward code and the layers' static settings). It must be
the architecture that was exported: :func:`integer_model` refuses a model
whose quantized layers, bit widths or kernel shapes differ, which it would
otherwise serve with the model's own (e.g. random) values.

It shows that the exported integers are the trained model (the outputs equal
the QAT model's fake-quantized forward up to float rounding) and is what the
demo scores. It is not a fast kernel: XLA on CPU runs int32 dots and convs
without int8 packing.
"""

from __future__ import annotations

import functools
import typing as tp

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn import dtypes

from talr_optax.nnx import export as export_lib
from talr_optax.nnx import layers as layers_lib

__all__ = ["IntegerLayer", "integer_model"]


class _Codes(nnx.Variable):
  """Integer weight codes or a step size of an :class:`IntegerLayer` (not trained)."""


# Flax casts a layer's operands to an inexact dtype by default; with
# ``inexact=False`` int32 input levels and codes stay int32.
_promote_to_int = functools.partial(dtypes.promote_dtype, inexact=False)


def _flax_layer(layer: layers_lib.QuantLayer, codes: jax.Array,
                integer: bool) -> nnx.Conv | nnx.Linear:
  """The ``nnx.Conv`` / ``nnx.Linear`` of ``layer``'s static settings, computing on ``codes``.

  Its forward is Flax's own (padding modes, dilations, groups, mask, batch
  axes, an injected ``conv_general_dilated`` / ``dot_general``), with int32
  operands and accumulation if ``integer``, else float32.
  """
  numeric = dict(
      use_bias=False,  # added after the scaling, in float
      precision=layer.precision,
      kernel_init=nnx.initializers.zeros_init(),  # replaced by the codes below
      rngs=nnx.Rngs(0))
  if integer:
    numeric.update(dtype=None, param_dtype=jnp.int32, promote_dtype=_promote_to_int,
                   preferred_element_type=jnp.int32)
  else:
    numeric.update(dtype=jnp.float32, param_dtype=jnp.float32)
  if isinstance(layer, nnx.Conv):
    flax_layer = nnx.Conv(
        layer.in_features, layer.out_features, layer.kernel_size, layer.strides,
        padding=layer.padding, input_dilation=layer.input_dilation,
        kernel_dilation=layer.kernel_dilation,
        feature_group_count=layer.feature_group_count, mask=layer.mask,
        conv_general_dilated=layer.conv_general_dilated, **numeric)
  else:
    flax_layer = nnx.Linear(layer.in_features, layer.out_features,
                            dot_general=layer.dot_general, **numeric)
  # Shaped like the exported kernel: (L, ...) for stacked layers, which
  # nnx.scan slices as it slices the QAT kernel.
  flax_layer.kernel = _Codes(codes.astype(jnp.int32 if integer else jnp.float32))
  return flax_layer


class IntegerLayer(nnx.Module):
  """One quantized linear or conv layer computed from its exported integers.

  The layer quantizes its input to integer levels, runs ``nnx.Conv`` /
  ``nnx.Linear``'s forward on them and the integer weight codes (int32
  operands and accumulation when both are integers), scales the sums once and
  adds the bias. Every setting ``QuantConv`` trains with (any padding,
  strides, dilations, groups, a kernel mask) is served the same way; a float
  mask makes the codes floats, so that layer computes in float32.

  Args:
    entry: the layer's entry of an export (see
      :mod:`talr_optax.nnx.export`).
    layer: the :class:`~talr_optax.nnx.QuantLinear` /
      :class:`~talr_optax.nnx.QuantConv` it replaces (static settings only;
      none of its values is used).
  """

  def __init__(self, entry: dict[str, tp.Any], layer: layers_lib.QuantLayer):
    self.multiply_scale = bool(_setting(entry, "multiply_scale"))
    self.weight_bits = _setting(entry, "weight_bits")
    self.act_bits = _setting(entry, "act_bits")
    stack = layer.stack_shape
    per_layer = lambda v: _Codes(jnp.reshape(jnp.asarray(v, jnp.float32), stack))
    if self.weight_bits is not None:
      levels = jnp.asarray(entry["kernel_levels"], jnp.int32)
      # Binary codes {0, 1} stand for -1 and +1.
      codes = 2 * levels - 1 if self.weight_bits == 1 else levels
      self.weight_step = per_layer(entry["weight_step"])
      self.weight_gamma = _setting(entry, "weight_gamma")
    else:
      codes = jnp.asarray(entry["kernel"])
    if self.act_bits is not None:
      self.act_step = per_layer(entry["act_step"])
      self.act_gamma = _setting(entry, "act_gamma")
    # Exact integer sums need integer codes: a float mask multiplies them
    # into floats, as it multiplies the QAT kernel.
    mask = getattr(layer, "mask", None)
    integer = (self.weight_bits is not None and self.act_bits is not None
               and (mask is None or jnp.issubdtype(jnp.asarray(mask).dtype, jnp.integer)))
    self.layer = _flax_layer(layer, codes, integer)
    bias = entry.get("bias")
    self.bias = nnx.data(None) if bias is None else _Codes(jnp.asarray(bias))

  def __call__(self, x: jax.Array, out_sharding: tp.Any = None) -> jax.Array:
    """The layer's output from integer levels; float32.

    Args:
      x: the input, shaped as for the layer it replaces.
      out_sharding: as ``nnx.Conv`` / ``nnx.Linear``.

    Returns:
      The output, float32.
    """
    scale = jnp.float32(1.0)
    if self.act_bits is not None:
      top = 2**self.act_bits - 1
      a = jnp.clip(self.act_gamma * x.astype(jnp.float32) / self.act_step[...], 0, top)
      x = jnp.round(a).astype(jnp.int32)
      scale = scale / self.act_gamma * (self.act_step[...] if self.multiply_scale else 1.0)
    if self.weight_bits is not None:
      scale = scale / self.weight_gamma * (self.weight_step[...] if self.multiply_scale else 1.0)
    # Flax's promote_dtype casts x: int32 levels stay int32 for int32 codes.
    y = self.layer(x, out_sharding=out_sharding).astype(jnp.float32) * scale
    if self.bias is not None:
      y = y + self.bias[...]
    return y


def _set(model: nnx.Module, path: tuple[tp.Any, ...], value: nnx.Module) -> None:
  parent = model
  for key in path[:-1]:
    parent = parent[key] if isinstance(key, int) else getattr(parent, key)
  if isinstance(path[-1], int):
    parent[path[-1]] = value
  else:
    setattr(parent, path[-1], value)


def integer_model(exported: dict[str, tp.Any], model: nnx.Module) -> nnx.Module:
  """A copy of ``model`` that computes from ``exported``, its quantized layers in integers.

  Example::

    >>> import jax
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from talr_optax import nnx as tnnx
    >>> model = tnnx.SmallCNN(weight_bits=2, act_bits=2, rngs=nnx.Rngs(0))
    >>> images = jax.random.uniform(jax.random.key(0), (8, 8, 8, 1))
    >>> _ = model(images)  # a training forward calibrates
    >>> model.eval()
    >>> exported = tnnx.export_integer_model(model)
    >>> serving = tnnx.integer_model(
    ...     exported, tnnx.SmallCNN(weight_bits=2, act_bits=2, rngs=nnx.Rngs(1)))
    >>> type(serving.conv2).__name__, serving(images).shape
    ('IntegerLayer', (8, 10))
    >>> expected = model(images)  # the QAT forward, up to float rounding
    >>> error = jnp.max(jnp.abs(serving(images) - expected))
    >>> bool(error <= 1e-5 * jnp.max(jnp.abs(expected)))
    True

    A model built with other settings than the exported one is refused:

    >>> tnnx.integer_model(exported, tnnx.SmallCNN(weight_bits=None, act_bits=None,
    ...                                             rngs=nnx.Rngs(1)))
    ... # doctest: +ELLIPSIS, +NORMALIZE_WHITESPACE
    Traceback (most recent call last):
    ValueError: integer_model: model's layers do not match exported's: 'conv2': not
    quantized in model (weight_bits=None, act_bits=None), quantized in exported
    (weight_bits=2, act_bits=2); ...

  Args:
    exported: what :func:`~talr_optax.nnx.export_integer_model` returned (or
      its Orbax restore).
    model: a model of the same architecture (e.g. freshly built with the same
      arguments); it is not modified and none of its values is used.

  Returns:
    A new module in evaluation mode: every quantized layer replaced by an
    :class:`IntegerLayer`, every other param and batch statistic set from
    ``exported``. Call it like ``model``.

  Raises:
    ValueError: ``exported`` is not an export; or ``model``'s layers do not
      match it (each mismatch named by its layer path): a layer quantized in
      one and not in the other (e.g. ``model`` built with ``weight_bits=None``,
      whose own random kernels would be served) or missing in the other;
      other ``weight_bits``, ``act_bits`` or ``multiply_scale``; another
      kernel shape; a bias in one only.
  """
  if not isinstance(exported, dict) or "params" not in exported:
    raise ValueError("integer_model: exported must be what export_integer_model returned "
                     f"(a dict with 'params'), got {type(exported).__name__}.")
  version = int(np.asarray(exported.get("export_version", -1)))
  if version != export_lib.EXPORT_VERSION:
    raise ValueError(f"integer_model: export_version {version} is not supported "
                     f"(this version reads {export_lib.EXPORT_VERSION}).")
  serving = nnx.clone(model)
  serving.eval()
  params = exported["params"]
  _check_layers(params, serving)
  floats = jax.tree.map(lambda x: x, params)  # a copy to strip the quantized layers from
  for path, layer in layers_lib.quantized_layers(serving):
    entry, parent = params, floats
    for key in path:
      entry, parent = entry[_key(entry, key)], parent[_key(parent, key)]
    parent.clear()
    _set(serving, path, IntegerLayer(entry, layer))
  state = nnx.state(serving, nnx.Any(nnx.Param, nnx.BatchStat))
  nnx.replace_by_pure_dict(state, _prune(floats))
  nnx.update(serving, state)
  return serving


def _bits(weight_bits: int | None, act_bits: int | None) -> str:
  return f"weight_bits={weight_bits}, act_bits={act_bits}"


def _setting(entry: dict[str, tp.Any], key: str) -> int | None:
  """An int setting of an exported layer (NumPy after an Orbax restore), or ``None``."""
  return int(np.asarray(entry[key])) if key in entry else None


def _exported_layers(tree: dict[tp.Any, tp.Any], prefix: tuple[tp.Any, ...] = ()
                    ) -> dict[tuple[str, ...], dict[str, tp.Any]]:
  """The quantized layers' entries of an export, by path (keys as strings)."""
  found = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      path = (*prefix, str(key))
      if "multiply_scale" in value:
        found[path] = value
      else:
        found.update(_exported_layers(value, path))
  return found


def _layer_problems(name: str, entry: dict[str, tp.Any],
                    layer: layers_lib.QuantLayer) -> list[str]:
  """How a quantized layer of the model differs from its exported entry."""
  problems = []
  for key, value in (("weight_bits", layer.weight_bits), ("act_bits", layer.act_bits)):
    if _setting(entry, key) != value:
      problems.append(f"'{name}': {key} is {value} in model, {_setting(entry, key)} in exported")
  if bool(_setting(entry, "multiply_scale")) != layer.multiply_scale:
    problems.append(f"'{name}': multiply_scale is {layer.multiply_scale} in model, "
                    f"{bool(_setting(entry, 'multiply_scale'))} in exported")
  kernel = entry.get("kernel_levels", entry.get("kernel"))
  if kernel is not None and tuple(np.shape(kernel)) != tuple(layer.kernel.shape):
    problems.append(f"'{name}': kernel shape {tuple(layer.kernel.shape)} in model, "
                    f"{tuple(np.shape(kernel))} in exported")
  if ("bias" in entry) != (getattr(layer, "bias", None) is not None):
    where = ("model", "exported") if "bias" not in entry else ("exported", "model")
    problems.append(f"'{name}': a bias in {where[0]}, none in {where[1]}")
  return problems


def _check_layers(params: dict[tp.Any, tp.Any], model: nnx.Module) -> None:
  """Raises a ``ValueError`` unless ``model``'s quantized layers are the export's.

  Serving a layer the export does not quantize would use ``model``'s own
  (random) values; serving other bit widths, a different model.
  """
  exported = _exported_layers(params)
  modules = {tuple(map(str, path)): module for path, module in nnx.iter_modules(model)}
  quantized = {tuple(map(str, path)): layer
               for path, layer in layers_lib.quantized_layers(model)}
  problems = []
  for path, entry in exported.items():
    if path in quantized:
      continue
    bits = _bits(_setting(entry, "weight_bits"), _setting(entry, "act_bits"))
    module = modules.get(path)
    if module is None:
      model_side = "model has no layer there"
    elif isinstance(module, layers_lib.QuantLayer):
      model_side = f"not quantized in model ({_bits(module.weight_bits, module.act_bits)})"
    else:
      model_side = (f"not quantized in model (its {type(module).__name__} is not a "
                    "QuantConv/QuantLinear)")
    problems.append(f"'{'/'.join(path)}': {model_side}, quantized in exported ({bits})")
  for path, layer in quantized.items():
    name = "/".join(path)
    if path in exported:
      problems += _layer_problems(name, exported[path], layer)
      continue
    entry = params
    for key in path:
      entry = entry.get(_key(entry, key)) if isinstance(entry, dict) else None
    exported_side = "exported has no layer there" if entry is None else "not quantized in exported"
    problems.append(f"'{name}': quantized in model "
                    f"({_bits(layer.weight_bits, layer.act_bits)}), {exported_side}")
  if problems:
    more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
    raise ValueError(
        f"integer_model: model's layers do not match exported's: {'; '.join(problems[:5])}"
        f"{more}. Build model with the architecture and bit widths exported was trained "
        "with (e.g. the same constructor arguments).")


def _key(tree: dict[tp.Any, tp.Any], key: tp.Any) -> tp.Any:
  """``key``, or its string form (an Orbax restore may turn int keys into strings)."""
  return key if key in tree else str(key)


def _prune(tree: tp.Any) -> tp.Any:
  """``tree`` without empty dicts and quantizer entries, with int keys where digits."""
  if not isinstance(tree, dict):
    return jnp.asarray(tree)
  out = {}
  for key, value in tree.items():
    if key in export_lib.QUANTIZER_KEYS:
      continue
    value = _prune(value)
    if isinstance(value, dict) and not value:
      continue
    out[int(key) if isinstance(key, str) and key.isdigit() else key] = value
  return out
