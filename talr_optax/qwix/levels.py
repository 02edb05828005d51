"""Integer levels of the weights a Qwix QAT model quantizes, for ``scale_by_talr``.

TALR counts transitions on the integer levels the network uses in its forward
pass. Qwix's quantized training (``qwix.QtProvider``) computes them inside each
quantized op: the qtype, calibration and tile size come from the matching rule,
but the channelwise and tiled axes come from the op's dimension numbers, and a
layer may cast its weight first (``dtype=jnp.bfloat16``). So we do not guess
them from the rules: we run the quantized model once on example inputs, record
every weight quantization Qwix performs, and replay it with the public
``qwix.quantize`` inside the levels function. At construction the replay is
checked against the integers Qwix produced in that pass.

Stacked layers (a scan over layers: ``nnx.vmap`` creates one parameter of shape
``(L, ...)`` per weight kind, ``nnx.scan`` applies one slice per layer) are
quantized by Qwix one slice at a time; the replay is then the per-slice
quantization mapped over the layer axis, and TALR can give every layer its own
rate with the ``layer_axes`` of :class:`QwixLevelsFn`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple

from flax import linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import qwix

from talr_optax import _checks
from talr_optax import _tree
from talr_optax.quantizers import LEVEL_DTYPE
from talr_optax.qwix import _internals

__all__ = ["QwixLevelsFn", "QwixWeight", "quantized_weights", "levels_fn_from_qwix"]


class QwixWeight(NamedTuple):
  """How Qwix quantizes one parameter in the forward pass.

  Attributes:
    path: the parameter's path in the params pytree, e.g. ``"fc1/kernel"``
      (the same string Qwix's ``module_path`` rules match, plus the name).
    shape: shape of the parameter (with the layer axis, if stacked).
    dtype: dtype of the array Qwix quantizes: the parameter's dtype, or the
      layer's computation dtype if the layer casts the weight first.
    qtype: Qwix's quantized type, e.g. ``"int2"``, ``jnp.int4``, ``jnp.int8``.
    channelwise_axes: axes with one scale per index (e.g. the output channel
      of a ``Linear`` kernel); axes of one layer slice if stacked.
    tiled_axes: ``(axis, tile_size)`` pairs of subchannel axes (of one layer
      slice if stacked).
    calibration_method: e.g. ``"absmax"`` or ``"fixed,-0.3,0.3"``.
    layer_axis: for a stacked parameter that a scan over layers slices, the
      axis of the layers (Qwix quantizes each slice on its own); ``None``
      for a parameter Qwix quantizes whole.
  """

  path: str
  shape: tuple[int, ...]
  dtype: Any
  qtype: Any
  channelwise_axes: tuple[int, ...]
  tiled_axes: tuple[tuple[int, int | float], ...]
  calibration_method: str
  layer_axis: int | None = None

  def quantize(self, w: jax.Array) -> Any:
    """Qwix's ``QArray`` of one array as the op quantizes it (a layer slice if stacked)."""
    return qwix.quantize(
        jnp.asarray(w).astype(self.dtype),
        self.qtype,
        channelwise_axes=self.channelwise_axes,
        tiled_axes=dict(self.tiled_axes),
        calibration_method=self.calibration_method,
    )

  def levels(self, w: jax.Array) -> jax.Array:
    """Integer levels (int8) that Qwix's forward pass uses for the weight ``w``.

    Args:
      w: the parameter, of shape ``shape``.

    Returns:
      An int8 array of shape ``shape``; for a stacked parameter, each layer
      slice quantized on its own, as Qwix does inside the scan.
    """
    # int2/int4 come as native int4 arrays, nf4 as uint4 bucket indices; one
    # dtype for all keeps the optimizer state uniform.
    levels = lambda x: self.quantize(x).qvalue.astype(LEVEL_DTYPE)
    if self.layer_axis is None:
      return levels(w)
    return jax.vmap(levels, in_axes=self.layer_axis, out_axes=self.layer_axis)(w)


  def centers(self, w: jax.Array, levels: jax.Array | None = None) -> jax.Array:
    """Latent values of levels, as Qwix dequantizes them (a layer slice at a time).

    Args:
      w: the parameter, of shape ``shape``.
      levels: integer levels shaped like ``w`` (e.g. frozen ones); ``None``:
        the current levels of ``w``, with a weight more than half a step from
        its level's value (beyond the outer levels) as its own centre.

    Returns:
      An array shaped like ``w`` in its dtype.
    """

    def one(x, level):
      q = self.quantize(x)
      if level is not None:
        return qwix.dequantize(dataclasses.replace(q, qvalue=level.astype(q.qvalue.dtype)))
      center = qwix.dequantize(q)
      step = jnp.abs(qwix.dequantize(dataclasses.replace(q, qvalue=jnp.ones_like(q.qvalue)))
                     - qwix.dequantize(dataclasses.replace(q, qvalue=jnp.zeros_like(q.qvalue))))
      x = x.astype(center.dtype)
      return jnp.where(jnp.abs(x - center) > step / 2, x, center)

    dtype = jnp.asarray(w).dtype
    if self.layer_axis is None:
      return one(w, levels).astype(dtype)
    if levels is None:
      f = jax.vmap(lambda x: one(x, None), in_axes=self.layer_axis, out_axes=self.layer_axis)
      return f(w).astype(dtype)
    f = jax.vmap(one, in_axes=self.layer_axis, out_axes=self.layer_axis)
    return f(w, levels).astype(dtype)


class QwixLevelsFn:
  """The ``levels_fn`` of a Qwix QAT model (see :func:`levels_fn_from_qwix`).

  Call it on params to get the levels; pass :meth:`layer_axes` as the core's
  ``layer_axes`` to give each layer of a stacked weight its own rate, and
  :meth:`centers` as the ``centers_fn`` of the oscillation remedies.

  Attributes:
    weights: the quantized parameters, ``{path: QwixWeight}``.
  """

  def __init__(self, weights: Mapping[str, QwixWeight]):
    self.weights = dict(weights)
    # Compiled even when called eagerly (nnx.Optimizer's init): a weight on a
    # rounding tie (with absmax calibration, the negative extreme of each
    # channel) may round differently in op-by-op and compiled code, and init
    # and update must agree or the first update counts spurious transitions.
    self._levels = {path: jax.jit(w.levels) for path, w in self.weights.items()}

  def __repr__(self) -> str:
    return f"QwixLevelsFn({', '.join(self.weights)})"

  def __call__(self, params: Any) -> Any:
    """Int8 levels of every quantized weight in ``params``, ``None`` elsewhere.

    Args:
      params: the params pytree of the model (see :func:`levels_fn_from_qwix`),
        with plain or boxed (``nnx.Variable``, Linen ``AxisMetadata``) leaves;
        ``None`` and ``optax.MaskedNode`` leaves give ``None``.

    Returns:
      A pytree with the containers of ``params``.

    Raises:
      ValueError: if ``params`` holds none of the quantized weights, or one of
        another shape (they do not belong to the model).
    """
    return self._map(params, lambda weight, w: self._levels[weight.path](w))

  def centers(self, params: Any, levels: Any = None) -> Any:
    """The ``centers_fn`` of the oscillation remedies for this model.

    ``levels_fn.centers`` is what :func:`talr_optax.dampen_oscillations` and
    :func:`talr_optax.freeze_oscillations` take: the latent value of each
    quantized weight's level as Qwix dequantizes it, from the same recording
    as the levels.

    Args:
      params: as for ``__call__``.
      levels: ``None`` for the current levels of ``params`` (a weight more
        than half a step from its level's value, beyond the outer levels, is
        its own centre), or a pytree like ``self(params)`` of levels to take
        the values of.

    Returns:
      A pytree with the containers of ``params``: centres at quantized
      weights, in the params' dtype; ``None`` elsewhere.

    Raises:
      ValueError: as for ``__call__``; ``levels`` without a level array for a
        quantized weight.
    """
    _checks.raise_if_step_count(params, "centers_fn")
    if levels is None:
      return self._map(params, lambda weight, w: weight.centers(w))
    given = dict(_tree.leaves_with_paths(levels))

    def of_levels(weight: QwixWeight, w: jax.Array) -> jax.Array:
      level = given.get(weight.path)
      if getattr(level, "shape", None) != tuple(w.shape):
        raise ValueError(
            f"centers: levels at '{weight.path}' are {level!r}, but the weight there"
            f" has shape {tuple(w.shape)}: pass levels_fn(params).")
      return weight.centers(w, level)

    return self._map(params, of_levels)

  def layer_axes(self, params: Any) -> Any:
    """The core's ``layer_axes`` for ``params``: the layer axis of each stacked weight.

    Args:
      params: as for ``__call__``.

    Returns:
      A pytree with the containers of ``params``: for each quantized weight
      that a scan over layers slices, its layer axis (usually 0); ``None``
      elsewhere (weights Qwix quantizes whole, unquantized leaves).

    Raises:
      ValueError: as for ``__call__``.
    """
    _checks.raise_if_step_count(params, "layer_axes")
    return self._map(params, lambda weight, w: weight.layer_axis)

  def _map(self, params: Any, fn: Callable[[QwixWeight, jax.Array], Any]) -> Any:
    """``fn(weight, array)`` at each quantized leaf, ``None`` elsewhere.

    The checks only look at paths and shapes, which are static: eager and
    jitted calls behave the same.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_tree.is_leaf)
    out, found = [], False
    for keypath, leaf in leaves:
      path = _tree.path_str(keypath)
      weight = self.weights.get(path)
      found = found or weight is not None
      if weight is None or _tree.is_none_or_masked(leaf):
        out.append(None)
        continue
      w = _tree.unbox(leaf)
      if tuple(w.shape) != weight.shape:
        raise ValueError(
            f"params['{path}'] has shape {tuple(w.shape)}, but Qwix quantizes a "
            f"weight of shape {weight.shape} there: these params do not belong to "
            "the model given to levels_fn_from_qwix."
        )
      out.append(fn(weight, w))
    if not found:
      raise ValueError(
          "params hold none of the weights Qwix quantizes "
          f"({', '.join(self.weights)}); got paths like "
          f"{[_tree.path_str(p) for p, _ in leaves[:3]]}. Pass the params the "
          "optimizer sees: nnx.state(qt_model, nnx.Param) for NNX, "
          "variables['params'] (not the whole variables) for Linen."
      )
    return treedef.unflatten(out)


def _slice_axes(shape: tuple[int, ...], slice_shape: tuple[int, ...]) -> list[int]:
  """The axes of ``shape`` whose removal leaves ``slice_shape``."""
  return [
      a for a in range(len(shape))
      if len(shape) == len(slice_shape) + 1 and shape[:a] + shape[a + 1 :] == slice_shape
  ]


def _equal(a: jax.Array, b: jax.Array) -> bool:
  return a.shape == b.shape and bool(jnp.array_equal(a.astype(b.dtype), b))


def _traced_layer_of(operand: Any, params: list[tuple[str, jax.Array]]) -> list[str]:
  """Stacked parameters that a traced ``operand`` has the shape of one layer of."""
  if not isinstance(operand, jax.core.Tracer) or operand.ndim < 2:
    return []
  return [path for path, array in params if _slice_axes(array.shape, operand.shape)]


def _identify(
    call: _internals.QuantizeCall, params: list[tuple[str, jax.Array]]
) -> tuple[str, int | None, int | None] | None:
  """``(path, layer axis, layer)`` of the parameter ``call`` quantized, or None.

  A weight reaches Qwix as the parameter array itself, cast to the layer's
  computation dtype, or (in an unrolled scan over layers) as one slice of a
  stacked parameter, so identity is tried first, then equal values. None
  means an activation.
  """
  operand = call.operand
  for path, array in params:
    if array is operand:
      return path, None, None
  if isinstance(operand, jax.core.Tracer):
    # Values are unknown under a transformation inside the model (vmap over
    # the batch, jit, remat, Linen's shape-tracing pass before its scan).
    # Parameters are concrete in the eager pass, so this is an activation, or
    # a layer of a stacked weight that the caller looks for elsewhere.
    return None
  if operand.size and bool(jnp.min(operand) == jnp.max(operand)):
    # A constant array (e.g. zero example inputs) would equal any constant
    # parameter of its shape; only identity is evidence here.
    return None
  same = [(path, None, None) for path, array in params if _equal(array, operand)]
  for layer in sorted(set(call.scan_indices)):
    for path, array in params:
      for axis in _slice_axes(array.shape, operand.shape):
        if layer < array.shape[axis] and _equal(jnp.take(array, layer, axis), operand):
          same.append((path, axis, layer))
  if len(same) > 1:
    raise ValueError(
        "Qwix quantized an array equal to several parameters or layers "
        f"({', '.join(p if a is None else f'{p}[{i}]' for p, a, i in same)}); "
        "cannot tell which one. Give them different values (e.g. random "
        "initialisation) first."
    )
  if same:
    return same[0]
  flat = jnp.sort(operand.ravel())
  for path, array in params:
    if array.size == operand.size and array.size > 1 and bool(
        jnp.array_equal(jnp.sort(array.astype(operand.dtype).ravel()), flat)
    ):
      raise NotImplementedError(
          f"Qwix quantizes a reshaped or transposed view of parameter '{path}'; "
          "levels_fn_from_qwix only supports weights that reach the quantized "
          "op unchanged, cast to another dtype, or as one layer of a scan."
      )
  return None


def _qwix_run(
    qt_model: Any,
    example_inputs: tuple[Any, ...],
    example_kwargs: dict[str, Any],
    variables: Any,
    method: str | None,
) -> tuple[list[tuple[str, jax.Array]], Callable[[], Any]]:
  """The float parameters of ``qt_model`` and a function running it once."""
  if method is not None and not (isinstance(method, str) and hasattr(qt_model, method)):
    raise ValueError(
        f"method must be None (__call__) or the name of a method of "
        f"{type(qt_model).__name__}, got method = {method!r}."
    )
  if isinstance(qt_model, nnx.Module):
    if variables is not None:
      raise ValueError("variables is only for Linen models; an NNX model holds its own.")
    # A clone keeps the forward pass from updating the user's quant_stats,
    # batch statistics or RNG counts.
    model = nnx.clone(qt_model)
    params_tree = nnx.state(model, nnx.Param)

    def forward():
      return getattr(model, method or "__call__")(*example_inputs, **example_kwargs)

  elif isinstance(qt_model, nn.Module):
    if not isinstance(variables, Mapping) or "params" not in variables:
      raise ValueError(
          "A Linen model needs variables=... holding its 'params' collection, "
          "e.g. levels_fn_from_qwix(qt_model, x, variables=variables)."
      )
    params_tree = variables["params"]

    def forward():
      return qt_model.apply(
          variables, *example_inputs, method=method, mutable=True, **example_kwargs
      )

  else:
    raise TypeError(
        "qt_model must be a flax.nnx.Module or flax.linen.Module returned by "
        f"qwix.quantize_model, got {type(qt_model).__name__}."
    )
  if not _internals.is_qwix_model(qt_model):
    raise ValueError(
        f"{type(qt_model).__name__} is not a Qwix model: pass the model returned "
        "by qwix.quantize_model(model, qwix.QtProvider(rules), *example_inputs)."
    )
  params = [
      (path, _tree.unbox(leaf))
      for path, leaf in _tree.leaves_with_paths(params_tree)
      if leaf is not None
  ]
  if any(
      hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.integer) for _, a in params
  ):
    raise ValueError(
        "qt_model holds integer parameters: it looks like a post-training "
        "quantized model (qwix.PtqProvider). TALR needs quantization-aware "
        "training: quantize the float model with qwix.QtProvider(rules)."
    )
  params = [(p, a) for p, a in params if isinstance(a, jax.Array)]
  if example_inputs or example_kwargs:
    return params, forward

  def forward_without_inputs():
    # A model that takes inputs fails here with its own TypeError about a
    # missing argument; say what is missing in our terms.
    try:
      return forward()
    except TypeError as e:
      raise TypeError(
          f"Running {type(qt_model).__name__} without example inputs failed "
          f"({e}). The weights Qwix quantizes, and how, are found by running "
          "the model once: pass the inputs of one forward pass after the model, "
          "e.g. levels_fn_from_qwix(qt_model, x) (Linen: "
          "levels_fn_from_qwix(qt_model, x, variables=variables)); keyword "
          "inputs go as keyword arguments."
      ) from e

  return params, forward_without_inputs


def quantized_weights(
    qt_model: Any,
    *example_inputs: Any,
    variables: Any = None,
    method: str | None = None,
    **example_kwargs: Any,
) -> dict[str, QwixWeight]:
  """Which parameters Qwix quantizes in the forward pass, and how.

  Runs ``qt_model`` once, eagerly, on the example inputs (the forward pass is
  run on a copy of an NNX model, so its state is left unchanged; scans over
  layers are unrolled for this pass).

  Args:
    qt_model: a model returned by ``qwix.quantize_model`` with a
      ``qwix.QtProvider``: an ``nnx.Module``, or a ``linen.Module`` together
      with ``variables``.
    *example_inputs: positional inputs for one forward pass, e.g. the ones
      given to ``qwix.quantize_model``.
    variables: Linen only: the variables (with a ``"params"`` collection).
    method: name of the method to run (default ``__call__``).
    **example_kwargs: keyword inputs for the forward pass.

  Returns:
    A dict from parameter path (e.g. ``"fc1/kernel"``) to :class:`QwixWeight`,
    in the order Qwix first quantized them.

  Raises:
    TypeError: if ``qt_model`` is not a Flax module, or the forward pass
      without example inputs fails (they are needed).
    ValueError: if ``qt_model`` is not a Qwix QAT model, ``variables`` or
      ``method`` do not fit it, Qwix quantized no weight, or quantized one
      weight in two ways.
    NotImplementedError: if Qwix quantizes something that levels cannot be
      replayed for (a reshaped weight, stochastic rounding, a float qtype,
      stacked layers in a scan that cannot be unrolled).
    RuntimeError: if the replay does not reproduce Qwix's integers (a Qwix
      release changed its quantization).
  """
  params, forward = _qwix_run(qt_model, example_inputs, example_kwargs, variables, method)
  calls = _internals.record_quantize_calls(forward)
  by_path = dict(params)
  weights: dict[str, QwixWeight] = {}
  # path -> {layer (None if not stacked): the integers Qwix used}
  qvalues: dict[str, dict[int | None, Any]] = {}
  traced_layers: set[str] = set()
  for call in calls:
    traced_layers.update(_traced_layer_of(call.operand, params))
    found = _identify(call, params)
    if found is None:
      continue  # an activation
    path, layer_axis, layer = found
    if call.stochastic:
      raise NotImplementedError(f"Qwix quantizes '{path}' with stochastic rounding.")
    weight = QwixWeight(
        path=path,
        shape=tuple(by_path[path].shape),
        dtype=np.dtype(call.operand.dtype),
        qtype=call.qtype,
        channelwise_axes=call.channelwise_axes,
        tiled_axes=call.tiled_axes,
        calibration_method=call.calibration_method,
        layer_axis=layer_axis,
    )
    if path in weights and weights[path] != weight:
      raise ValueError(
          f"Qwix quantizes '{path}' in two ops in different ways "
          f"({weights[path]} and {weight}); its levels are not unique."
      )
    weights[path] = weight
    qvalues.setdefault(path, {}).setdefault(layer, call.qvalue)
  hidden = sorted(traced_layers - set(weights))
  if hidden:
    raise NotImplementedError(
        "Qwix quantized a traced array shaped like one layer of stacked "
        f"parameter(s) {hidden}: a scan over layers inside jax.jit, nnx.remat, "
        "or a loop other than jax.lax.scan? levels_fn_from_qwix unrolls "
        "jax.lax.scan (which nnx.scan and nn.scan use) for its recording pass; "
        "other transformations hide the weight's values from it."
    )
  if not weights:
    raise ValueError(
        "Qwix quantized no weight in the forward pass on the example inputs: "
        "check that a rule's module_path matches the layers and sets "
        "weight_qtype, and that qt_model comes from qwix.QtProvider."
    )
  for path, weight in weights.items():
    _check_all_layers(weight, qvalues[path])
    _check_replay(weight, by_path[path], qvalues[path])
  return weights


def _check_all_layers(weight: QwixWeight, qvalues: dict[int | None, Any]) -> None:
  """Fails unless Qwix quantized every layer of a stacked weight."""
  if weight.layer_axis is None:
    return
  layers = weight.shape[weight.layer_axis]
  missing = sorted(set(range(layers)) - set(qvalues))
  if missing:
    raise ValueError(
        f"Qwix quantized only some layers of the stacked parameter '{weight.path}' "
        f"(not layers {missing} of {layers}); levels_fn_from_qwix needs a forward "
        "pass that uses every layer."
    )


def _check_replay(weight: QwixWeight, param: jax.Array, qvalues: dict[int | None, Any]) -> None:
  """Fails unless replaying ``weight`` reproduces the integers Qwix used.

  Each recorded array (the weight, or one layer slice of a stacked weight) is
  replayed on its own, op by op as in Qwix's eager pass, so that only the
  recorded quantization (qtype, axes, calibration) is compared, not how
  compiled code rounds values on a tie.
  """
  slices = {None: param} if weight.layer_axis is None else {
      i: jnp.take(param, i, axis=weight.layer_axis) for i in qvalues}
  qdtype = jax.eval_shape(
      lambda w: weight.quantize(w).qvalue,
      jax.ShapeDtypeStruct(slices[next(iter(qvalues))].shape, weight.dtype),
  ).dtype
  # Signed codes of up to 8 bits and unsigned ones (nf4 bucket indices) of up
  # to 7 bits are exactly representable in int8.
  fits = jnp.issubdtype(qdtype, jnp.integer) and jnp.iinfo(qdtype).bits <= (
      8 if jnp.issubdtype(qdtype, jnp.signedinteger) else 7
  )
  if not fits:
    raise NotImplementedError(
        f"Qwix quantizes '{weight.path}' to {weight.qtype!r} (stored as {qdtype}); "
        "TALR levels need integer codes that fit int8 (int2 ... int8, nf4)."
    )
  for i, qvalue in qvalues.items():
    if qvalue is None or not bool(jnp.array_equal(
        weight.quantize(slices[i]).qvalue.astype(LEVEL_DTYPE),
        jnp.asarray(qvalue).astype(LEVEL_DTYPE))):
      where = "" if i is None else f" (layer {i})"
      raise RuntimeError(
          f"Replaying Qwix's quantization of '{weight.path}'{where} ({weight}) "
          "does not give the integers Qwix used in its forward pass (qwix "
          f"{qwix.__version__}). talr_optax.qwix needs updating for this Qwix release."
      )


def levels_fn_from_qwix(
    qt_model: Any,
    *example_inputs: Any,
    variables: Any = None,
    method: str | None = None,
    **example_kwargs: Any,
) -> QwixLevelsFn:
  """Builds a ``levels_fn`` for :func:`talr_optax.scale_by_talr` from a Qwix QAT model.

  The levels are exactly the integers Qwix's forward pass uses for every
  weight it quantizes (any rule: per channel, per tensor, tiled, any integer
  qtype and calibration), so TALR counts the transitions the quantized
  network actually makes. Weights of stacked layers (``nnx.vmap`` to create,
  ``nnx.scan`` to apply; Linen ``nn.scan``) get one level array of the
  stacked shape, each layer quantized on its own as Qwix does; pass
  ``layer_axes=levels_fn.layer_axes`` to the optimizer to give each layer
  its own rate.

  Args:
    qt_model: a model returned by ``qwix.quantize_model(model,
      qwix.QtProvider(rules), *example_inputs)``: an ``nnx.Module``, or a
      ``linen.Module`` together with ``variables``.
    *example_inputs: positional inputs for one eager forward pass (the ones
      given to ``qwix.quantize_model`` will do). Required unless the model
      takes none.
    variables: Linen only: the model's variables; the levels function is then
      over ``variables["params"]``.
    method: name of the method to run (default ``__call__``).
    **example_kwargs: keyword inputs for the forward pass.

  Returns:
    A :class:`QwixLevelsFn` ``levels_fn``; ``levels_fn(params)``: for NNX,
    ``params`` is the ``nnx.Param`` state ``nnx.Optimizer(qt_model, tx,
    wrt=nnx.Param)`` gives the optimizer, with ``nnx.Variable`` leaves (at
    ``init``) or plain arrays (at ``update``); for Linen, the params
    collection. It returns a pytree with the same containers: int8 levels for
    every quantized weight and None for every other leaf (also for
    ``optax.MaskedNode`` leaves). Jit-safe; no host read-backs. The levels
    are always computed by compiled code, so eager and jitted calls agree.
    (A weight exactly on a rounding tie, as Qwix's ``absmax`` calibration
    puts the negative extreme of each channel, may round one level apart in
    compiled and op-by-op code; ``qwix.quantize`` itself differs there
    between eager and jitted calls in the same way.)

  Raises:
    See :func:`quantized_weights`.

  Example:
    >>> import optax, talr_optax
    >>> class MLP(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.fc1, self.fc2 = nnx.Linear(16, 32, rngs=rngs), nnx.Linear(32, 10, rngs=rngs)
    ...   def __call__(self, x):
    ...     return self.fc2(jax.nn.relu(self.fc1(x)))
    >>> x = jnp.ones((4, 16))
    >>> rules = [qwix.QtRule(module_path="fc2", weight_qtype="int2")]
    >>> qt_model = qwix.quantize_model(MLP(nnx.Rngs(0)), qwix.QtProvider(rules), x)
    >>> levels_fn = levels_fn_from_qwix(qt_model, x)
    >>> levels = levels_fn(nnx.state(qt_model, nnx.Param))
    >>> levels["fc2"]["kernel"].dtype, levels["fc1"]["kernel"] is None
    (dtype('int8'), True)
    >>> tx = talr_optax.sgdt(0.1, 5e-3, levels_fn, layer_axes=levels_fn.layer_axes)
    >>> optimizer = nnx.Optimizer(qt_model, tx, wrt=nnx.Param)
  """
  return QwixLevelsFn(
      quantized_weights(
          qt_model, *example_inputs, variables=variables, method=method, **example_kwargs
      )
  )
