"""Bridges from an NNX model to Optax: ``levels_fn_for``, ``centers_fn_for``,
``param_labels``, ``layer_axes_for``.

What ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` (Flax 0.12) hands ``tx``:

* ``tx.init`` gets ``nnx.state(model, nnx.Param)``: an ``nnx.State`` (nested,
  keyed by attribute names and list indices) whose leaves are the
  ``nnx.Param`` *Variables* themselves (``ActivationScale`` included);
* ``tx.update`` gets ``nnx.as_pure`` of the same state: an ``nnx.State`` with
  the same keys whose leaves are plain ``jax.Array`` s;
* inside ``optax.partition`` / ``optax.masked`` the leaves of other groups are
  ``optax.MaskedNode()``.

The functions below key on the path of each leaf, so they accept all of these
forms (and plain nested dicts such as ``nnx.to_pure_dict(state)``), and they return
trees whose leaves are plain values. Such a tree is a tree *prefix* of both the
Variable-boxed and the pure form, so it can be mapped against either.

Stacked layers (created under ``nnx.vmap``, applied with ``nnx.scan``) hold
``L`` layers' kernels in one param of shape ``(L, ...)``; they are recognised
by a kernel rank one above the layer's own (``2`` for a linear layer,
``len(kernel_size) + 2`` for a conv). :func:`layer_axes_for` tells the
optimizer to schedule each layer slice on its own.
"""

from __future__ import annotations

import sys
import typing as tp

import jax
import numpy as np
from flax import nnx

from talr_optax import _checks
from talr_optax import _tree
from talr_optax import quantizers
from talr_optax.nnx import layers as layers_lib

__all__ = [
    "QUANTIZED",
    "FULL_PRECISION",
    "ACTIVATION_SCALE",
    "BATCH_NORM",
    "LABELS",
    "levels_fn_for",
    "centers_fn_for",
    "param_labels",
    "layer_axes_for",
]

QUANTIZED = "quantized"
FULL_PRECISION = "full_precision"
ACTIVATION_SCALE = "activation_scale"
BATCH_NORM = "batch_norm"
LABELS = (QUANTIZED, FULL_PRECISION, ACTIVATION_SCALE, BATCH_NORM)


def _map_with_path(fn: tp.Callable[[str, tp.Any], tp.Any], tree: tp.Any) -> tp.Any:
  """``fn("conv1/kernel", leaf)`` on every leaf; Variables and MaskedNodes are leaves."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: fn(_tree.path_str(path), x), tree, is_leaf=_tree.is_leaf)


# What to call instead when a model was quantized by Qwix, not by our layers.
_QWIX_INSTEAD = {
    "levels_fn_for": (
        "use levels_fn = talr_optax.qwix.levels_fn_from_qwix(qt_model, x) "
        "(x: example inputs)"),
    "layer_axes_for": (
        "use the layer_axes method of the Qwix levels function: levels_fn = "
        "talr_optax.qwix.levels_fn_from_qwix(qt_model, x), then "
        "sgdt(..., levels_fn, layer_axes=levels_fn.layer_axes)"),
    "param_labels": (
        "give sgdt/adamt/adamwt all params with levels_fn = "
        "talr_optax.qwix.levels_fn_from_qwix(qt_model, x): it returns None for "
        "the weights Qwix does not quantize, which then follow learning_rate"),
}


def _is_qwix_model(model: tp.Any) -> bool:
  """Whether ``qwix.quantize_model`` returned ``model``; never imports Qwix itself."""
  if sys.modules.get("qwix") is None:  # no Qwix model can exist without Qwix
    return False
  from talr_optax.qwix import _internals  # pylint: disable=g-import-not-at-top
  return _internals.is_qwix_model(model)


def _check_module(model: tp.Any, owner: str) -> None:
  if not isinstance(model, nnx.Module):
    raise TypeError(
        f"{owner}: model must be an nnx.Module (e.g. a SmallCNN, or any module with "
        f"QuantConv/QuantLinear layers), got model of type {type(model).__name__}."
    )
  if _is_qwix_model(model):
    # Qwix quantizes plain Flax layers; read here, they would all look full
    # precision and unstacked.
    raise TypeError(
        f"{owner}: model was quantized by qwix.quantize_model; {owner} reads "
        "talr_optax.nnx's QuantConv/QuantLinear layers and does not see which "
        f"weights Qwix quantizes. For a Qwix model, {_QWIX_INSTEAD[owner]}."
    )


def _quantized_kernels(model: nnx.Module, owner: str) -> dict[str, layers_lib.QuantLayer]:
  """``{"path/kernel": layer}`` for every layer with a quantized kernel."""
  kernels = {}
  for path, layer in layers_lib.quantized_layers(model):
    if layer.weight_bits is None:
      continue
    name = "/".join(str(p) for p in (*path, "kernel"))
    if len(layer.stack_shape) > 1:
      raise ValueError(
          f"{owner}: the kernel at '{name}' has shape {tuple(layer.kernel.shape)}, "
          f"{len(layer.stack_shape)} axes more than one layer's kernel: layers stacked "
          "over more than one axis (nested nnx.vmap) are not supported; stack them on "
          "one axis."
      )
    kernels[name] = layer
  return kernels


def _weight_scale(layer: layers_lib.QuantLayer, kernel: tp.Any, name: str) -> jax.Array:
  """The layer's weight scale(s) for ``kernel``, read now from the model object."""
  calibrated = layer.calibrated[...]
  if (isinstance(kernel, jax.core.Tracer) and not isinstance(calibrated, jax.core.Tracer)
      # NumPy: a jnp op on a concrete value would be staged into the trace.
      and not np.all(np.asarray(calibrated))):
    raise RuntimeError(
        f"levels_fn: the weight scale of '{name}' is not calibrated yet and "
        "levels_fn is being traced (e.g. inside nnx.jit). Under jit the model "
        "object levels_fn reads holds the values from before the call, so a "
        "scale set by the first forward pass inside the same jitted step is "
        "not visible. Call talr_optax.nnx.calibrate(model, batch) (or run one "
        "training forward pass) outside jit before the first jitted step."
    )
  # Calibrated: the frozen scale. Not yet, eagerly (nnx.Optimizer calling
  # tx.init before the first forward): the scale that forward will freeze.
  return layer.weight_scale_for(kernel)


def levels_fn_for(model: nnx.Module) -> tp.Callable[[tp.Any], tp.Any]:
  """Builds ``levels_fn(params)`` for :func:`talr_optax.scale_by_talr` from a model.

  Quantized kernels are the ``kernel`` params of :class:`QuantConv` /
  :class:`QuantLinear` layers with ``weight_bits`` set; their levels are
  ``quantizers.weight_levels(kernel, s, weight_bits)`` with the layer's frozen
  step size ``s`` (one per layer slice for a stacked kernel, whose levels
  have the stacked shape ``(L, ...)``).

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
  receives; that levels_fn reads the traced, current scales.

  Args:
    model: an NNX module containing quantized layers.

  Returns:
    ``levels_fn(params)``. ``params`` is any form of ``nnx.state(model,
    nnx.Param)``: Variable leaves (``tx.init``), array leaves (``tx.update``),
    a nested dict, with ``optax.MaskedNode`` or ``None`` leaves allowed. The
    result has the same keys with plain leaves: int8 levels for quantized
    kernels, ``None`` for everything else.

  Raises:
    TypeError: if ``model`` is not an ``nnx.Module``, or was quantized by
      ``qwix.quantize_model`` (use :func:`talr_optax.qwix.levels_fn_from_qwix`).
    ValueError: if ``model`` has no quantized kernel or one stacked over more
      than one axis; from ``levels_fn``, if ``params`` hold none of the
      model's quantized kernels, or one with another shape.
  """
  _check_module(model, "levels_fn_for")
  kernels = _quantized_kernels(model, "levels_fn_for")
  if not kernels:
    raise ValueError(
        "levels_fn_for: model has no quantized kernel (no QuantConv/QuantLinear "
        "with weight_bits set); got a model built with weight_bits = None?"
    )

  def levels_fn(params: tp.Any) -> tp.Any:
    return _map_kernels(params, kernels, lambda layer, kernel, scale, name:
                        quantizers.weight_levels(kernel, scale, layer.weight_bits))

  return levels_fn


def _map_kernels(params: tp.Any, kernels: dict[str, layers_lib.QuantLayer],
                 fn: tp.Callable[..., tp.Any], role: str = "levels_fn") -> tp.Any:
  """``fn(layer, kernel, scale, name)`` at every quantized kernel, ``None`` elsewhere.

  ``role`` (``"levels_fn"`` or ``"centers_fn"``) names the function in messages.
  """
  seen = []

  def leaf(name: str, leaf: tp.Any) -> jax.Array | None:
    layer = kernels.get(name)
    if layer is None:
      return None
    seen.append(name)
    if _tree.is_none_or_masked(leaf):
      return None
    kernel = _tree.unbox(leaf)
    want = tuple(layer.kernel.shape)
    if tuple(kernel.shape) != want:
      raise ValueError(
          f"{role}: params at '{name}' have shape {tuple(kernel.shape)}, but that "
          f"kernel of the model given to {role}_for has shape {want}: params must "
          "be nnx.state(model, nnx.Param) of that model."
      )
    return fn(layer, kernel, _weight_scale(layer, kernel, name), name)

  out = _map_with_path(leaf, params)
  if not seen:
    _raise_foreign_params(params, kernels, role)
  return out


def centers_fn_for(model: nnx.Module) -> tp.Callable[..., tp.Any]:
  """Builds the ``centers_fn`` of the oscillation remedies from a model.

  The companion of :func:`levels_fn_for` (same model, same params forms, the
  scales read the same way), for :func:`talr_optax.dampen_oscillations` and
  :func:`talr_optax.freeze_oscillations`. A level's centre is its value on
  the latent weight's axis, ``s * w_d / 2^(b-1)`` (``s * (2 w_d - 1)``
  binary), whatever the layer's ``multiply_scale``, which only scales the
  layer's output (see :func:`talr_optax.level_values`).

  Args:
    model: an NNX module containing quantized layers.

  Returns:
    ``centers_fn(params, levels=None)``: with the keys of ``params``, for each
    quantized kernel the latent value of each weight's current level (a
    weight beyond the outer levels is its own centre, see
    :func:`talr_optax.weight_centers`), or with ``levels`` (a pytree like
    ``levels_fn_for(model)(params)``) the latent values of those levels;
    ``None`` elsewhere. In the dtype of the kernels.

  Raises:
    TypeError: if ``model`` is not an ``nnx.Module``.
    ValueError: as :func:`levels_fn_for`.
  """
  _check_module(model, "centers_fn_for")
  kernels = _quantized_kernels(model, "centers_fn_for")
  if not kernels:
    raise ValueError(
        "centers_fn_for: model has no quantized kernel (no QuantConv/QuantLinear "
        "with weight_bits set); got a model built with weight_bits = None?"
    )

  def centers_fn(params: tp.Any, levels: tp.Any = None) -> tp.Any:
    if levels is None:
      return _map_kernels(params, kernels, lambda layer, kernel, scale, name:
                          quantizers.weight_centers(kernel, scale, layer.weight_bits),
                          "centers_fn")
    given = dict(_tree.leaves_with_paths(levels))

    def of_levels(layer, kernel, scale, name):
      level = given.get(name)
      if level is None or tuple(level.shape) != tuple(kernel.shape):
        raise ValueError(
            f"centers_fn: levels at '{name}' are {level!r}, but the kernel there has"
            f" shape {tuple(kernel.shape)}: pass levels_fn_for(model)(params).")
      return quantizers.level_values(level, scale, layer.weight_bits, kernel.dtype)

    return _map_kernels(params, kernels, of_levels, "centers_fn")

  return centers_fn


def _raise_foreign_params(params: tp.Any, kernels: dict[str, tp.Any], role: str
                          ) -> tp.NoReturn:
  """``params`` hold none of the model's quantized kernel paths: say what was expected."""
  _checks.raise_if_step_count(params, role)
  expected = ", ".join(f"'{name}'" for name in list(kernels)[:3])
  got = [name or "<the root>" for name, _ in _tree.leaves_with_paths(params)]
  got_text = ", ".join(f"'{g}'" for g in got[:3]) or "no leaves"
  raise ValueError(
      f"{role}: params hold none of the quantized kernels of the model given to "
      f"{role}_for (expected paths such as {expected}; got {got_text}). Pass "
      "nnx.state(model, nnx.Param) of that model, or a dict / pure state with its keys."
  )


def _labelled_state(model: tp.Any, wrt: tp.Any, owner: str
                    ) -> tuple[nnx.State, dict[str, layers_lib.QuantLayer]]:
  """Checks the arguments; returns ``nnx.state(model, wrt)`` and the quantized kernels."""
  _check_module(model, owner)
  try:
    nnx.filterlib.to_predicate(wrt)
  except Exception as e:  # pylint: disable=broad-except
    raise TypeError(
        f"{owner}: wrt must be an nnx filter, the one given to nnx.Optimizer "
        f"(e.g. nnx.Param), got wrt = {wrt!r}."
    ) from e
  return nnx.state(model, wrt), _quantized_kernels(model, owner)


def param_labels(model: nnx.Module, wrt: tp.Any = nnx.Param) -> nnx.State:
  """Optimizer-group label of every parameter, for ``optax.partition``.

  Labels: ``'quantized'`` (kernels of quantized layers, the ones TALR drives,
  stacked or not), ``'activation_scale'`` (:class:`ActivationScale`),
  ``'batch_norm'`` (scale and bias of ``nnx.BatchNorm``), ``'full_precision'``
  (everything else: the first conv, the last linear, biases).

  Example:

    >>> import jax.numpy as jnp, optax, talr_optax
    >>> from talr_optax import nnx as tnnx
    >>> model = tnnx.SmallCNN(weight_bits=2, act_bits=2, rngs=nnx.Rngs(0))
    >>> tnnx.calibrate(model, jnp.ones((4, 8, 8, 1)))
    >>> labels = param_labels(model)
    >>> labels["conv2"]["kernel"], labels["conv1"]["kernel"]
    ('quantized', 'full_precision')
    >>> tx = optax.partition(
    ...     {"quantized": talr_optax.sgdt(0.1, 5e-3, levels_fn_for(model)),
    ...      "full_precision": optax.sgd(0.1, 0.9), "activation_scale": optax.sgd(0.01),
    ...      "batch_norm": optax.sgd(0.1)}, labels)
    >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  Args:
    model: an NNX module.
    wrt: the filter given to ``nnx.Optimizer`` (default ``nnx.Param``).

  Returns:
    An ``nnx.State`` with the keys of ``nnx.state(model, wrt)`` and string
    leaves; a tree prefix of both the Variable-boxed and the pure state.

  Raises:
    TypeError: if ``model`` is not an ``nnx.Module``, was quantized by
      ``qwix.quantize_model``, or ``wrt`` is not an nnx filter.
    ValueError: a quantized kernel stacked over more than one axis.
  """
  state, kernels = _labelled_state(model, wrt, "param_labels")
  batch_norms = {
      "/".join(str(p) for p in path)
      for path, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)
  }

  def label(name: str, leaf: tp.Any) -> str:
    if name in kernels:
      return QUANTIZED
    if isinstance(leaf, layers_lib.ActivationScale):
      return ACTIVATION_SCALE
    if name.rpartition("/")[0] in batch_norms:
      return BATCH_NORM
    return FULL_PRECISION

  return _map_with_path(label, state)


def layer_axes_for(model: nnx.Module, wrt: tp.Any = nnx.Param) -> nnx.State:
  """The ``layer_axes`` spec of ``model`` for ``talr_optax.scale_by_talr`` / ``sgdt``.

  Stacked quantized kernels (``L`` layers created under ``nnx.vmap``, one
  param of shape ``(L, ...)``) get ``0``: the optimizer keeps one transition
  rate and one learning rate per layer slice. Every other param gets ``None``.
  A model quantized by Qwix is refused: its levels function,
  :func:`talr_optax.qwix.levels_fn_from_qwix`, has the ``layer_axes`` method
  that knows which weights Qwix quantizes and which are stacked.

  Args:
    model: an NNX module.
    wrt: the filter given to ``nnx.Optimizer`` (default ``nnx.Param``).

  Returns:
    An ``nnx.State`` with the keys of ``nnx.state(model, wrt)``, like
    :func:`param_labels`: ``0`` or ``None`` leaves.

  Raises:
    TypeError: if ``model`` is not an ``nnx.Module``, was quantized by
      ``qwix.quantize_model``, or ``wrt`` is not an nnx filter.
    ValueError: a quantized kernel stacked over more than one axis.
  """
  state, kernels = _labelled_state(model, wrt, "layer_axes_for")

  def axis(name: str, leaf: tp.Any) -> int | None:
    del leaf
    layer = kernels.get(name)
    return 0 if layer is not None and layer.stack_shape else None

  return _map_with_path(axis, state)
