"""An integer forward pass of an exported model: :func:`integer_model`.

:func:`~talr_optax.nnx.export_integer_model` gives integers and step sizes;
this module runs a model on them the way an integer kernel would: each
quantized layer quantizes its input to integer levels, multiplies them with
the integer weight codes accumulating in int32, and scales the sum once (a
weight-only layer multiplies float inputs by the codes). Every value comes
from the export; the model passed in only supplies the architecture (its
forward code and the layers' static settings: strides, padding, groups).

It shows that the exported integers are the trained model (the outputs equal
the QAT model's fake-quantized forward up to float rounding) and is what the
demo scores. It is not a fast kernel: XLA on CPU runs int32 dots and convs
without int8 packing.
"""

from __future__ import annotations

import typing as tp

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from talr_optax.nnx import export as export_lib
from talr_optax.nnx import layers as layers_lib

__all__ = ["IntegerLayer", "integer_model"]


class _Codes(nnx.Variable):
  """Integer weight codes or a step size of an :class:`IntegerLayer` (not trained)."""


def _conv_padding(padding: tp.Any, ndim: int) -> tp.Any:
  """``nnx.Conv``'s ``padding`` as ``lax.conv_general_dilated`` takes it."""
  if isinstance(padding, str):
    if padding.upper() in ("SAME", "VALID"):
      return padding.upper()
    raise NotImplementedError(
        f"integer_model: conv padding {padding!r} is not supported (SAME, VALID or "
        "explicit padding).")
  if isinstance(padding, int):
    return [(padding, padding)] * ndim
  return [(p, p) if isinstance(p, int) else tuple(p) for p in padding]


class IntegerLayer(nnx.Module):
  """One quantized linear or conv layer computed from its exported integers.

  Args:
    entry: the layer's entry of an export (see
      :mod:`talr_optax.nnx.export`).
    layer: the :class:`~talr_optax.nnx.QuantLinear` /
      :class:`~talr_optax.nnx.QuantConv` it replaces (static settings only;
      none of its values is used).
  """

  def __init__(self, entry: dict[str, tp.Any], layer: layers_lib.QuantLayer):
    if getattr(layer, "mask", None) is not None:
      raise NotImplementedError("integer_model: a conv with a kernel mask is not supported.")
    self.is_conv = isinstance(layer, nnx.Conv)
    if self.is_conv:
      spatial = len(layer.kernel_size)
      self.strides = tuple(np.broadcast_to(layer.strides or 1, spatial).tolist())
      self.padding = _conv_padding(layer.padding, spatial)
      self.input_dilation = tuple(np.broadcast_to(layer.input_dilation or 1, spatial).tolist())
      self.kernel_dilation = tuple(
          np.broadcast_to(layer.kernel_dilation or 1, spatial).tolist())
      self.groups = int(layer.feature_group_count)
    self.multiply_scale = bool(entry["multiply_scale"])
    self.weight_bits = entry.get("weight_bits")
    self.act_bits = entry.get("act_bits")
    stack = layer.stack_shape
    per_layer = lambda v: _Codes(jnp.reshape(jnp.asarray(v, jnp.float32), stack))
    if self.weight_bits is not None:
      levels = jnp.asarray(entry["kernel_levels"], jnp.int32)
      # Binary codes {0, 1} stand for -1 and +1.
      self.codes = _Codes(2 * levels - 1 if self.weight_bits == 1 else levels)
      self.weight_step = per_layer(entry["weight_step"])
      self.weight_gamma = int(entry["weight_gamma"])
    else:
      self.codes = _Codes(jnp.asarray(entry["kernel"]))
    if self.act_bits is not None:
      self.act_step = per_layer(entry["act_step"])
      self.act_gamma = int(entry["act_gamma"])
    bias = entry.get("bias")
    self.bias = nnx.data(None) if bias is None else _Codes(jnp.asarray(bias))

  def _apply(self, x: jax.Array, kernel: jax.Array, out_type: tp.Any) -> jax.Array:
    if not self.is_conv:
      dims = (((x.ndim - 1,), (0,)), ((), ()))
      return jax.lax.dot_general(x, kernel, dims, preferred_element_type=out_type)
    batch_shape, image = x.shape[: x.ndim - kernel.ndim + 1], x.shape[x.ndim - kernel.ndim + 1:]
    x = x.reshape((-1, *image))
    n = x.ndim
    spec = (0, n - 1, *range(1, n - 1))
    numbers = jax.lax.ConvDimensionNumbers(spec, (n - 1, n - 2, *range(n - 2)), spec)
    y = jax.lax.conv_general_dilated(
        x, kernel, self.strides, self.padding, lhs_dilation=self.input_dilation,
        rhs_dilation=self.kernel_dilation, dimension_numbers=numbers,
        feature_group_count=self.groups, preferred_element_type=out_type)
    return y.reshape((*batch_shape, *y.shape[1:]))

  def __call__(self, x: jax.Array) -> jax.Array:
    """The layer's output from integer levels; float32."""
    scale = jnp.float32(1.0)
    if self.act_bits is not None:
      top = 2**self.act_bits - 1
      a = jnp.clip(self.act_gamma * x.astype(jnp.float32) / self.act_step[...], 0, top)
      x = jnp.round(a).astype(jnp.int32)
      scale = scale / self.act_gamma * (self.act_step[...] if self.multiply_scale else 1.0)
    codes = self.codes[...]
    if self.weight_bits is not None:
      scale = scale / self.weight_gamma * (self.weight_step[...] if self.multiply_scale else 1.0)
    if self.act_bits is not None and self.weight_bits is not None:
      y = self._apply(x, codes, jnp.int32).astype(jnp.float32)  # exact integer sums
    else:
      y = self._apply(x.astype(jnp.float32), codes.astype(jnp.float32), jnp.float32)
    y = y * scale
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
    ValueError: ``exported`` is not an export, or its layers do not match
      ``model``'s quantized layers.
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
  floats = jax.tree.map(lambda x: x, params)  # a copy to strip the quantized layers from
  for path, layer in layers_lib.quantized_layers(serving):
    entry, parent = params, floats
    try:
      for key in path:
        entry, parent = entry[_key(entry, key)], parent[_key(parent, key)]
    except KeyError:
      raise ValueError(f"integer_model: exported has no layer at '{'/'.join(map(str, path))}', "
                       "a quantized layer of model: they are different architectures.") from None
    if "multiply_scale" not in entry:
      raise ValueError(f"integer_model: exported layer '{'/'.join(map(str, path))}' is not "
                       "quantized, but model's is.")
    parent.clear()
    _set(serving, path, IntegerLayer(entry, layer))
  state = nnx.state(serving, nnx.Any(nnx.Param, nnx.BatchStat))
  nnx.replace_by_pure_dict(state, _prune(floats))
  nnx.update(serving, state)
  return serving


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
