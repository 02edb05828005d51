"""Bridges from an NNX model to Optax: ``levels_fn_for`` and ``param_labels``.

What ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` (Flax 0.12) hands ``tx``:

* ``tx.init`` gets ``nnx.state(model, nnx.Param)``: an ``nnx.State`` (nested,
  keyed by attribute names and list indices) whose leaves are the
  ``nnx.Param`` *Variables* themselves (``ActivationScale`` included);
* ``tx.update`` gets ``nnx.as_pure`` of the same state: an ``nnx.State`` with
  the same keys whose leaves are plain ``jax.Array`` s;
* inside ``optax.partition`` / ``optax.masked`` the leaves of other groups are
  ``optax.MaskedNode()``.

Both functions below key on the path of each leaf, so they accept all of these
forms (and plain nested dicts such as ``nnx.to_pure_dict(state)``), and they return
trees whose leaves are plain values. Such a tree is a tree *prefix* of both the
Variable-boxed and the pure form, so it can be mapped against either.
"""

from __future__ import annotations

import typing as tp

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from talr_optax import quantizers
from talr_optax.nnx import layers as layers_lib

__all__ = [
    "QUANTIZED",
    "FULL_PRECISION",
    "ACTIVATION_SCALE",
    "BATCH_NORM",
    "LABELS",
    "levels_fn_for",
    "param_labels",
]

QUANTIZED = "quantized"
FULL_PRECISION = "full_precision"
ACTIVATION_SCALE = "activation_scale"
BATCH_NORM = "batch_norm"
LABELS = (QUANTIZED, FULL_PRECISION, ACTIVATION_SCALE, BATCH_NORM)

Path = tuple[tp.Any, ...]


def _key(entry: tp.Any) -> tp.Any:
  """A jax key-path entry as the plain key ``nnx`` uses in module paths."""
  for attr in ("key", "idx", "name"):
    if hasattr(entry, attr):
      return getattr(entry, attr)
  return entry


def _is_leaf(x: tp.Any) -> bool:
  # Variables and MaskedNodes are pytree nodes; stop at them so every form of
  # the state yields the same key paths.
  return x is None or isinstance(x, (nnx.Variable, optax.MaskedNode))


def _map_with_path(fn: tp.Callable[[Path, tp.Any], tp.Any], tree: tp.Any) -> tp.Any:
  return jax.tree_util.tree_map_with_path(
      lambda path, x: fn(tuple(_key(e) for e in path), x), tree, is_leaf=_is_leaf
  )


def _kernel_paths(model: nnx.Module) -> dict[Path, layers_lib.QuantLayer]:
  return {
      (*path, "kernel"): layer
      for path, layer in layers_lib.quantized_layers(model)
      if layer.weight_bits is not None
  }


def _frozen_scale(layer: layers_lib.QuantLayer, kernel: jax.Array, path: Path) -> jax.Array:
  """The layer's frozen weight scale, read now from the model object."""
  calibrated = layer.calibrated[...]
  if isinstance(calibrated, jax.core.Tracer):
    # ``model`` itself lives inside the trace (levels_fn_for was called on the
    # model a jitted function received), so its values are current.
    return jnp.where(calibrated, layer.weight_scale[...], layers_lib.fresh_weight_scale(kernel))
  if bool(calibrated):
    return layer.weight_scale[...]
  if isinstance(kernel, jax.core.Tracer):
    name = "/".join(str(p) for p in path)
    raise RuntimeError(
        f"levels_fn: the weight scale of '{name}' is not calibrated yet and "
        "levels_fn is being traced (e.g. inside nnx.jit). Under jit the model "
        "object levels_fn reads holds the values from before the call, so a "
        "scale set by the first forward pass inside the same jitted step is "
        "not visible. Call talr_optax.nnx.calibrate(model, batch) (or run one "
        "training forward pass) outside jit before the first jitted step."
    )
  # Eager call before the first forward pass (nnx.Optimizer.__init__ calls
  # tx.init): use the scale that pass will freeze, 3 * std(current kernel).
  return layers_lib.fresh_weight_scale(kernel)


def levels_fn_for(model: nnx.Module) -> tp.Callable[[tp.Any], tp.Any]:
  """Builds ``levels_fn(params)`` for :func:`talr_optax.scale_by_talr` from a model.

  Quantized kernels are the ``kernel`` params of :class:`QuantConv` /
  :class:`QuantLinear` layers with ``weight_bits`` set; their levels are
  ``quantizers.weight_levels(kernel, s, weight_bits)`` with the layer's frozen
  step size ``s``.

  The scales are read from ``model`` *when levels_fn is called*, not when it
  is built, because they are set by the first training forward pass, usually
  after the optimizer exists:

  * frozen scale set: it is used (it never changes afterwards, so reading it
    inside a compiled function, where it becomes a constant, is correct);
  * not set yet, eager call (``nnx.Optimizer`` calling ``tx.init``): the
    value the first forward pass will freeze, ``3 * std(kernel)``;
  * not set yet, traced call (``tx.update`` inside ``nnx.jit``): a
    ``RuntimeError``. Under ``nnx.jit`` the model captured here is the outer
    object, which only receives the new scale after the jitted call returns;
    call :func:`talr_optax.nnx.calibrate` (or one eager training forward)
    before the first jitted step. Re-calibrating later needs a fresh
    ``nnx.jit`` wrapper for the same reason.

  ``levels_fn_for`` may also be called on the model a jitted function
  receives; that levels_fn reads the traced, current scales (e.g. to pass
  ``levels=`` to ``scale_by_talr``'s update).

  Args:
    model: an NNX module containing quantized layers.

  Returns:
    ``levels_fn(params)``. ``params`` is any form of ``nnx.state(model,
    nnx.Param)``: Variable leaves (``tx.init``), array leaves (``tx.update``),
    a nested dict, with ``optax.MaskedNode`` or ``None`` leaves allowed. The
    result has the same keys with plain leaves: int8 levels for quantized
    kernels, ``None`` for everything else.

  Raises:
    TypeError: if ``model`` is not an ``nnx.Module``.
    ValueError: if ``model`` has no quantized kernel; from ``levels_fn``, if
      ``params`` hold none of the model's quantized kernels, or one with
      another shape.
  """
  _check_module(model, "levels_fn_for")
  kernels = _kernel_paths(model)
  if not kernels:
    raise ValueError(
        "levels_fn_for: model has no quantized kernel (no QuantConv/QuantLinear "
        "with weight_bits set); got a model built with weight_bits = None?"
    )

  def levels_fn(params: tp.Any) -> tp.Any:
    seen = []

    def leaf_levels(path: Path, leaf: tp.Any) -> jax.Array | None:
      layer = kernels.get(path)
      if layer is None:
        return None
      seen.append(path)
      if leaf is None or isinstance(leaf, optax.MaskedNode):
        return None
      kernel = leaf[...] if isinstance(leaf, nnx.Variable) else leaf
      want = tuple(layer.kernel.shape)
      if tuple(jnp.shape(kernel)) != want:
        raise ValueError(
            f"levels_fn: params at '{_name(path)}' have shape {tuple(jnp.shape(kernel))}, "
            f"but that kernel of the model given to levels_fn_for has shape {want}: "
            "params must be nnx.state(model, nnx.Param) of that model."
        )
      scale = _frozen_scale(layer, kernel, path)
      return quantizers.weight_levels(kernel, scale, layer.weight_bits)

    out = _map_with_path(leaf_levels, params)
    if not seen:
      _raise_foreign_params(params, kernels)
    return out

  return levels_fn


def _name(path: Path) -> str:
  return "/".join(str(p) for p in path)


def _check_module(model: tp.Any, owner: str) -> None:
  if not isinstance(model, nnx.Module):
    raise TypeError(
        f"{owner}: model must be an nnx.Module (e.g. a SmallCNN, or any module with "
        f"QuantConv/QuantLinear layers), got model of type {type(model).__name__}."
    )


def _raise_foreign_params(params: tp.Any, kernels: dict[Path, tp.Any]) -> tp.NoReturn:
  """``params`` hold none of the model's quantized kernel paths: say what was expected."""
  quantizers.raise_if_step_count(params)
  expected = ", ".join(f"'{_name(p)}'" for p in list(kernels)[:3])
  got: list[str] = []
  _map_with_path(lambda path, x: got.append(_name(path) or "<the root>"), params)
  got_text = ", ".join(f"'{g}'" for g in got[:3]) or "no leaves"
  raise ValueError(
      "levels_fn: params hold none of the quantized kernels of the model given to "
      f"levels_fn_for (expected paths such as {expected}; got {got_text}). Pass "
      "nnx.state(model, nnx.Param) of that model, or a dict / pure state with its keys."
  )


def param_labels(model: nnx.Module, wrt: tp.Any = nnx.Param) -> nnx.State:
  """Optimizer-group label of every parameter, for ``optax.partition``.

  Labels: ``'quantized'`` (kernels of quantized layers, the ones TALR drives),
  ``'activation_scale'`` (:class:`ActivationScale`), ``'batch_norm'`` (scale
  and bias of ``nnx.BatchNorm``), ``'full_precision'`` (everything else: the
  first conv, the last linear, biases).

  Example::

    >>> tx = optax.partition(
    ...     {'quantized': sgdt(...), 'full_precision': optax.sgd(0.1, 0.9),
    ...      'activation_scale': optax.sgd(0.01), 'batch_norm': optax.sgd(0.1)},
    ...     param_labels(model))
    >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  Args:
    model: an NNX module.
    wrt: the filter given to ``nnx.Optimizer`` (default ``nnx.Param``).

  Returns:
    An ``nnx.State`` with the keys of ``nnx.state(model, wrt)`` and string
    leaves; a tree prefix of both the Variable-boxed and the pure state.

  Raises:
    TypeError: if ``model`` is not an ``nnx.Module`` or ``wrt`` is not an
      nnx filter.
  """
  _check_module(model, "param_labels")
  try:
    nnx.filterlib.to_predicate(wrt)
  except Exception as e:  # pylint: disable=broad-except
    raise TypeError(
        "param_labels: wrt must be an nnx filter, the one given to nnx.Optimizer "
        f"(e.g. nnx.Param), got wrt = {wrt!r}."
    ) from e
  kernels = _kernel_paths(model)
  batch_norms = {
      tuple(path) for path, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)
  }

  def label(path: Path, leaf: tp.Any) -> str:
    if path in kernels:
      return QUANTIZED
    if isinstance(leaf, layers_lib.ActivationScale):
      return ACTIVATION_SCALE
    if path[:-1] in batch_norms:
      return BATCH_NORM
    return FULL_PRECISION

  return _map_with_path(label, nnx.state(model, wrt))
