"""From a QAT model to the integers that are served: :func:`export_integer_model`.

The levels TALR counts transitions on (``levels_fn_for(model)``) are the
integers a quantized layer multiplies by; this module hands them out, with the
step sizes and conventions needed to use them, as a plain pytree: nested
``dict`` s keyed like ``nnx.state(model)`` (attribute names, list indices),
whose leaves are NumPy arrays and Python ints, under ``"params"``, next to
``"export_version"``. Orbax saves and restores it, and a serving program
reads it without ``talr_optax`` (the tests serve a small model from an Orbax
checkpoint in NumPy alone); :func:`~talr_optax.nnx.integer_model` serves any
model of this package from it.

A quantized layer's entry (at the layer's path under ``"params"``) holds, instead of its float
``kernel`` and quantizer state:

* ``kernel_levels``: int8, the kernel's levels ``w_d``, shaped like the kernel
  (``(L, ...)`` for ``L`` layers stacked under ``nnx.vmap``);
* ``weight_step``: the frozen step size ``s_w`` (float, shape ``()``, or
  ``(L,)`` for stacked layers), ``weight_bits`` and ``weight_gamma``
  (``2^(b-1)``; 1 for ``b = 1``);
* if the input is quantized: ``act_step`` ``s_a`` (shape ``()`` or ``(L,)``),
  ``act_bits`` and ``act_gamma`` (``2^b``);
* ``multiply_scale``: 1 or 0, the layer's convention (below);
* every other param of the layer (``bias``) as a float array.

A layer with only its input quantized keeps its float ``kernel``. Float layers
keep their params, batch norms their statistics (``mean``, ``var``).

Conventions, for ``b >= 2`` weight bits (``weight_bits = 1``: ``kernel_levels``
are binary codes ``{0, 1}`` standing for ``q = 2 w_d - 1`` in ``{-1, +1}``;
otherwise ``q = w_d``):

* input levels: ``a = round(clip(act_gamma * x / act_step, 0, 2^act_bits - 1))``;
* the layer computes ``acc = sum(a * q)`` (exact in int32), then
  ``y = acc * c + bias`` with ``c = 1 / (act_gamma * weight_gamma)``, times
  ``act_step * weight_step`` if ``multiply_scale``;
* without input quantization: ``y = (x @ q) / weight_gamma`` (times
  ``weight_step`` if ``multiply_scale``) ``+ bias``.

This is exactly the fake-quantized forward of
:class:`~talr_optax.nnx.QuantConv` / :class:`~talr_optax.nnx.QuantLinear`,
up to float rounding.
"""

from __future__ import annotations

import typing as tp

import jax
import numpy as np
from flax import nnx

from talr_optax import quantizers
from talr_optax.nnx import labels
from talr_optax.nnx import layers as layers_lib

__all__ = ["EXPORT_VERSION", "QUANTIZER_KEYS", "export_integer_model"]

# Bumped when the layout or a convention of the export changes.
EXPORT_VERSION = 1

# Keys a quantized layer's entry may hold besides its float params.
QUANTIZER_KEYS = ("kernel_levels", "weight_step", "weight_bits", "weight_gamma",
                  "act_step", "act_bits", "act_gamma", "multiply_scale")

_QUANTIZER_STATE = (layers_lib.WeightScale, layers_lib.ActivationScale,
                    layers_lib.Calibrated)


def _name(path: tuple[tp.Any, ...]) -> str:
  return "/".join(str(p) for p in path) or "<the model>"


def _check_model(model: tp.Any) -> None:
  if not isinstance(model, nnx.Module):
    raise TypeError(
        "export_integer_model: model must be an nnx.Module with QuantConv/QuantLinear "
        f"layers (e.g. a SmallCNN or TransformerLM), got model of type "
        f"{type(model).__name__}.")
  if labels._is_qwix_model(model):  # pylint: disable=protected-access
    raise ValueError(
        f"export_integer_model: {type(model).__name__} is a Qwix model "
        "(qwix.quantize_model). Serve it with Qwix's own post-training path: "
        "qwix.quantize_model(model, qwix.PtqProvider(rules), x) on the trained weights, "
        "as in docs/qwix.md ('Serving').")


def _step(layer_path: tuple[tp.Any, ...], kind: str, value: tp.Any) -> np.ndarray:
  """A stored step size as a NumPy array; must be finite and > 0 everywhere."""
  step = np.asarray(jax.device_get(value))
  if not bool(np.all(np.isfinite(step) & (step > 0))):
    raise ValueError(
        f"export_integer_model: the {kind} step size of '{_name(layer_path)}' is "
        f"{step.tolist()}, not a finite number > 0 everywhere: its levels would be "
        "meaningless. Was the model trained with a NaN or Inf loss? Restore a "
        "checkpoint from before it, or recalibrate with talr_optax.nnx.calibrate.")
  return step


def _layer_entry(path: tuple[tp.Any, ...], layer: layers_lib.QuantLayer) -> dict[str, tp.Any]:
  """The quantizer part of one quantized layer's entry."""
  entry: dict[str, tp.Any] = {"multiply_scale": int(layer.multiply_scale)}
  if layer.weight_bits is not None:
    bits = layer.weight_bits
    entry.update(
        kernel_levels=np.asarray(jax.device_get(layer.levels())),
        weight_step=_step(path, "weight", layer.weight_scale[...]),
        weight_bits=bits,
        weight_gamma=quantizers.weight_range(bits).gamma)
  if layer.act_bits is not None:
    entry.update(
        act_step=_step(path, "activation", layer.act_scale[...]),
        act_bits=layer.act_bits,
        act_gamma=quantizers.activation_range(layer.act_bits).gamma)
  return entry


def _subtree(tree: dict[tp.Any, tp.Any], path: tuple[tp.Any, ...]) -> dict[tp.Any, tp.Any]:
  for key in path:
    tree = tree.setdefault(key, {})
  return tree


def export_integer_model(model: nnx.Module) -> dict[tp.Any, tp.Any]:
  """The integer weights, step sizes and float params of a trained QAT model.

  For every quantized layer (:class:`~talr_optax.nnx.QuantConv`,
  :class:`~talr_optax.nnx.QuantLinear`, also stacked under ``nnx.vmap``) the
  int8 levels are exactly those ``levels_fn_for(model)`` gives (and TALR
  counted), with the frozen step sizes, bit widths and the layer's
  ``multiply_scale`` convention; see the module docstring for the layout and
  the arithmetic a serving program does. Everything else keeps its float
  value. Nothing is left on the device.

  The result is a plain pytree: ``orbax.checkpoint.StandardCheckpointer().save(
  path, exported)`` saves it as it is.

  Example::

    >>> import jax
    >>> from flax import nnx
    >>> from talr_optax import nnx as tnnx
    >>> model = tnnx.SmallCNN(weight_bits=2, act_bits=2, rngs=nnx.Rngs(0))
    >>> _ = model(jax.random.uniform(jax.random.key(0), (8, 8, 8, 1)))  # calibrates
    >>> exported = tnnx.export_integer_model(model)
    >>> sorted(exported)
    ['export_version', 'params']
    >>> conv2 = exported["params"]["conv2"]
    >>> conv2["kernel_levels"].dtype, conv2["kernel_levels"].shape
    (dtype('int8'), (3, 3, 16, 32))
    >>> sorted(conv2)  # doctest: +NORMALIZE_WHITESPACE
    ['act_bits', 'act_gamma', 'act_step', 'kernel_levels', 'multiply_scale',
     'weight_bits', 'weight_gamma', 'weight_step']
    >>> conv2["weight_bits"], conv2["act_gamma"], conv2["multiply_scale"]
    (2, 4, 0)
    >>> sorted(exported["params"]["linear"])  # a float layer keeps its params
    ['bias', 'kernel']

  Args:
    model: a trained (so calibrated) NNX model with quantized layers.

  Returns:
    ``{"export_version": 1, "params": tree}`` with ``tree`` nested like
    ``nnx.state(model)`` (``nnx.Param`` and ``nnx.BatchStat`` values, list
    indices as int keys); NumPy leaves and Python ints.

  Raises:
    TypeError: ``model`` is not an ``nnx.Module``.
    ValueError: a Qwix model (use Qwix's serving path); no quantized layer; a
      layer not calibrated yet (its step sizes are placeholders: train or call
      :func:`~talr_optax.nnx.calibrate` first); a kernel that is not finite
      (the run diverged); a step size that is not finite and > 0.
  """
  _check_model(model)
  quantized = layers_lib.quantized_layers(model)
  if not quantized:
    raise ValueError(
        "export_integer_model: model has no quantized layer (no QuantConv/QuantLinear "
        "with weight_bits or act_bits set); a full-precision model needs no integer "
        "export: save nnx.state(model) with Orbax.")
  uncalibrated = [_name(path) for path, layer in quantized
                  if not bool(np.all(np.asarray(layer.calibrated[...])))]
  if uncalibrated:
    raise ValueError(
        f"export_integer_model: {len(uncalibrated)} quantized layer(s) are not "
        f"calibrated ({', '.join(repr(n) for n in uncalibrated[:5])}): their step sizes "
        "are placeholders, not the ones training used. Train the model, or call "
        "talr_optax.nnx.calibrate(model, batch), first.")
  # A diverged run leaves NaN/Inf kernels under finite frozen step sizes;
  # their levels would be zeros that look like a model.
  diverged = [_name(path) for path, layer in quantized
              if not bool(np.all(np.isfinite(np.asarray(jax.device_get(layer.kernel[...])))))]
  if diverged:
    raise ValueError(
        f"export_integer_model: the kernel of {len(diverged)} quantized layer(s) "
        f"({', '.join(repr(n) for n in diverged[:5])}) is not finite (NaN or Inf): the "
        "run diverged. Export a checkpoint from before it diverged, or train again (e.g. "
        "with a lower learning rate).")
  state = nnx.state(model, nnx.All(nnx.Any(nnx.Param, nnx.BatchStat),
                                    nnx.Not(nnx.Any(*_QUANTIZER_STATE))))
  tree = jax.device_get(nnx.to_pure_dict(state))
  tree = jax.tree.map(np.asarray, tree)
  for path, layer in quantized:
    entry = _subtree(tree, path)
    if layer.weight_bits is not None:
      del entry["kernel"]
    entry.update(_layer_entry(path, layer))
  return {"export_version": EXPORT_VERSION, "params": tree}
