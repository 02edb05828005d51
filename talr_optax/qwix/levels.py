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
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, Callable, NamedTuple

from flax import linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import qwix

from talr_optax.qwix import _internals

__all__ = ["QwixWeight", "quantized_weights", "levels_fn_from_qwix"]

Path = tuple[Hashable, ...]

# Levels of weights with at most 8 bits fit int8 (as in talr_optax.quantizers).
LEVEL_DTYPE = jnp.int8


class QwixWeight(NamedTuple):
  """How Qwix quantizes one parameter in the forward pass.

  Attributes:
    path: keys of the parameter in the params pytree, e.g. ``("fc1", "kernel")``.
    shape: shape of the parameter.
    dtype: dtype of the array Qwix quantizes: the parameter's dtype, or the
      layer's computation dtype if the layer casts the weight first.
    qtype: Qwix's quantized type, e.g. ``"int2"``, ``jnp.int4``, ``jnp.int8``.
    channelwise_axes: axes with one scale per index (e.g. the output channel
      of a ``Linear`` kernel).
    tiled_axes: ``(axis, tile_size)`` pairs of subchannel axes.
    calibration_method: e.g. ``"absmax"`` or ``"fixed,-0.3,0.3"``.
  """

  path: Path
  shape: tuple[int, ...]
  dtype: Any
  qtype: Any
  channelwise_axes: tuple[int, ...]
  tiled_axes: tuple[tuple[int, int | float], ...]
  calibration_method: str

  def levels(self, w: jax.Array) -> jax.Array:
    """Integer levels (int8) that Qwix's forward pass uses for the weight ``w``."""
    q = qwix.quantize(
        jnp.asarray(w).astype(self.dtype),
        self.qtype,
        channelwise_axes=self.channelwise_axes,
        tiled_axes=dict(self.tiled_axes),
        calibration_method=self.calibration_method,
    )
    # int2/int4 come as native int4 arrays, nf4 as uint4 bucket indices; one
    # dtype for all keeps the optimizer state uniform.
    return q.qvalue.astype(LEVEL_DTYPE)


def _key_name(key: Any) -> Hashable:
  """The plain key inside a ``jax.tree_util`` path entry."""
  for attr in ("key", "idx", "name"):
    if hasattr(key, attr):
      return getattr(key, attr)
  return key


def _is_node_leaf(x: Any) -> bool:
  """Leaves of a params tree: boxed values, None and masked-out entries."""
  return (
      x is None
      or isinstance(x, (nnx.Variable, nn.meta.AxisMetadata, optax.MaskedNode))
  )


def _unbox(x: Any) -> Any:
  """The array inside an ``nnx.Variable`` or Linen ``AxisMetadata`` box."""
  if isinstance(x, nnx.Variable):
    return x.get_value()
  if isinstance(x, nn.meta.AxisMetadata):
    return x.unbox()
  return x


def _flatten(tree: Any) -> tuple[list[tuple[Path, Any]], Any]:
  """``(path, leaf)`` pairs with plain-key paths, stopping at boxed values."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_node_leaf)
  return [(tuple(_key_name(k) for k in p), leaf) for p, leaf in leaves], treedef


def _path_str(path: Path) -> str:
  return "/".join(map(str, path))


def _identify(operand: Any, params: list[tuple[Path, jax.Array]]) -> Path | None:
  """The parameter that ``operand`` is, or None for an activation.

  A weight reaches Qwix either as the parameter array itself or cast to the
  layer's computation dtype, so identity is tried first, then equal values.
  """
  for path, array in params:
    if array is operand:
      return path
  if isinstance(operand, jax.core.Tracer):
    # Under a transformation inside the model (vmap over the batch, scan over
    # layers) values are unknown. Parameters are concrete in the eager pass,
    # so a traced operand is an activation, unless it looks like one slice of
    # a stacked weight (nnx.scan over layers), which we cannot replay.
    for path, array in params:
      if operand.ndim >= 2 and array.shape[1:] == operand.shape:
        raise NotImplementedError(
            "Qwix quantized a traced array shaped like one slice of parameter "
            f"'{_path_str(path)}' (a scan over stacked layers?); "
            "levels_fn_from_qwix only supports weights that reach the "
            "quantized op in the eager forward pass."
        )
    return None
  if operand.size and bool(jnp.min(operand) == jnp.max(operand)):
    # A constant array (e.g. zero example inputs) would equal any constant
    # parameter of its shape; only identity is evidence here.
    return None
  same = [
      path
      for path, array in params
      if array.shape == operand.shape
      and bool(jnp.array_equal(array.astype(operand.dtype), operand))
  ]
  if len(same) > 1:
    raise ValueError(
        "Qwix quantized an array equal to several parameters "
        f"({', '.join(_path_str(p) for p in same)}); cannot tell which one. "
        "Give them different values (e.g. random initialisation) first."
    )
  if same:
    return same[0]
  flat = jnp.sort(operand.ravel())
  for path, array in params:
    if array.size == operand.size and array.size > 1 and bool(
        jnp.array_equal(jnp.sort(array.astype(operand.dtype).ravel()), flat)
    ):
      raise NotImplementedError(
          f"Qwix quantizes a reshaped or transposed view of parameter "
          f"'{_path_str(path)}'; levels_fn_from_qwix only supports weights "
          "that reach the quantized op unchanged or cast to another dtype."
      )
  return None


def _qwix_run(
    qt_model: Any,
    example_inputs: tuple[Any, ...],
    example_kwargs: dict[str, Any],
    variables: Any,
    method: str | None,
) -> tuple[list[tuple[Path, jax.Array]], Callable[[], Any]]:
  """The float parameters of ``qt_model`` and a function running it once."""
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
    if variables is None or "params" not in variables:
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
  params = [(p, _unbox(leaf)) for p, leaf in _flatten(params_tree)[0] if leaf is not None]
  if any(
      hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.integer) for _, a in params
  ):
    raise ValueError(
        "qt_model holds integer parameters: it looks like a post-training "
        "quantized model (qwix.PtqProvider). TALR needs quantization-aware "
        "training: quantize the float model with qwix.QtProvider(rules)."
    )
  params = [(p, a) for p, a in params if isinstance(a, jax.Array)]
  return params, forward


def quantized_weights(
    qt_model: Any,
    *example_inputs: Any,
    variables: Any = None,
    method: str | None = None,
    **example_kwargs: Any,
) -> dict[Path, QwixWeight]:
  """Which parameters Qwix quantizes in the forward pass, and how.

  Runs ``qt_model`` once, eagerly, on the example inputs (the forward pass is
  run on a copy of an NNX model, so its state is left unchanged).

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
    A dict from parameter path (keys of the params pytree) to
    :class:`QwixWeight`, in the order Qwix quantized them.

  Raises:
    TypeError, ValueError: if ``qt_model`` is not a Qwix QAT model, or Qwix
      quantized no weight.
    NotImplementedError: if Qwix quantizes something that levels cannot be
      replayed for (a reshaped weight, stochastic rounding, a float qtype).
    RuntimeError: if the replay does not reproduce Qwix's integers (a Qwix
      release changed its quantization).
  """
  params, forward = _qwix_run(qt_model, example_inputs, example_kwargs, variables, method)
  calls = _internals.record_quantize_calls(forward)
  by_path = dict(params)
  weights: dict[Path, QwixWeight] = {}
  qvalues: dict[Path, Any] = {}
  for call in calls:
    path = _identify(call.operand, params)
    if path is None:
      continue  # an activation
    name = _path_str(path)
    if call.stochastic:
      raise NotImplementedError(f"Qwix quantizes '{name}' with stochastic rounding.")
    weight = QwixWeight(
        path=path,
        shape=tuple(by_path[path].shape),
        dtype=np.dtype(call.operand.dtype),
        qtype=call.qtype,
        channelwise_axes=call.channelwise_axes,
        tiled_axes=call.tiled_axes,
        calibration_method=call.calibration_method,
    )
    if path in weights and weights[path] != weight:
      raise ValueError(
          f"Qwix quantizes '{name}' in two ops in different ways "
          f"({weights[path]} and {weight}); its levels are not unique."
      )
    weights[path] = weight
    qvalues.setdefault(path, call.qvalue)
  if not weights:
    raise ValueError(
        "Qwix quantized no weight in the forward pass on the example inputs: "
        "check that a rule's module_path matches the layers and sets "
        "weight_qtype, and that qt_model comes from qwix.QtProvider."
    )
  for path, weight in weights.items():
    _check_replay(weight, by_path[path], qvalues[path])
  return weights


def _check_replay(weight: QwixWeight, param: jax.Array, qvalue: Any) -> None:
  """Fails unless ``weight.levels`` reproduces the integers Qwix used."""
  name = _path_str(weight.path)
  qdtype = jax.eval_shape(
      lambda w: qwix.quantize(
          w,
          weight.qtype,
          channelwise_axes=weight.channelwise_axes,
          tiled_axes=dict(weight.tiled_axes),
          calibration_method=weight.calibration_method,
      ).qvalue,
      jax.ShapeDtypeStruct(param.shape, weight.dtype),
  ).dtype
  # Signed codes of up to 8 bits and unsigned ones (nf4 bucket indices) of up
  # to 7 bits are exactly representable in int8.
  fits = jnp.issubdtype(qdtype, jnp.integer) and jnp.iinfo(qdtype).bits <= (
      8 if jnp.issubdtype(qdtype, jnp.signedinteger) else 7
  )
  if not fits:
    raise NotImplementedError(
        f"Qwix quantizes '{name}' to {weight.qtype!r} (stored as {qdtype}); "
        "TALR levels need integer codes that fit int8 (int2 ... int8, nf4)."
    )
  if qvalue is None or not bool(
      jnp.array_equal(weight.levels(param), jnp.asarray(qvalue).astype(LEVEL_DTYPE))
  ):
    raise RuntimeError(
        f"Replaying Qwix's quantization of '{name}' ({weight}) does not give "
        f"the integers Qwix used in its forward pass (qwix {qwix.__version__}). "
        "talr_optax.qwix needs updating for this Qwix release."
    )


def levels_fn_from_qwix(
    qt_model: Any,
    *example_inputs: Any,
    variables: Any = None,
    method: str | None = None,
    **example_kwargs: Any,
) -> Callable[[Any], Any]:
  """Builds a ``levels_fn`` for :func:`talr_optax.scale_by_talr` from a Qwix QAT model.

  The levels are exactly the integers Qwix's forward pass uses for every
  weight it quantizes (any rule: per channel, per tensor, tiled, any integer
  qtype and calibration), so TALR counts the transitions the quantized
  network actually makes.

  Args:
    qt_model: a model returned by ``qwix.quantize_model(model,
      qwix.QtProvider(rules), *example_inputs)``: an ``nnx.Module``, or a
      ``linen.Module`` together with ``variables``.
    *example_inputs: positional inputs for one eager forward pass (the ones
      given to ``qwix.quantize_model`` will do).
    variables: Linen only: the model's variables; the levels function is then
      over ``variables["params"]``.
    method: name of the method to run (default ``__call__``).
    **example_kwargs: keyword inputs for the forward pass.

  Returns:
    ``levels_fn(params)``: for NNX, ``params`` is the ``nnx.Param`` state
    ``nnx.Optimizer(qt_model, tx, wrt=nnx.Param)`` gives the optimizer, with
    ``nnx.Variable`` leaves (at ``init``) or plain arrays (at ``update``); for
    Linen, the params collection. Returns a pytree with the same containers:
    int8 levels for every quantized weight and None for every other leaf
    (also for ``optax.MaskedNode`` leaves). Jit-safe.

  Raises:
    See :func:`quantized_weights`.

  Example:
    >>> qt_model = qwix.quantize_model(model, qwix.QtProvider(rules), x)
    >>> levels_fn = levels_fn_from_qwix(qt_model, x)
    >>> tx = talr_optax.sgdt(0.1, 5e-3, levels_fn)
    >>> optimizer = nnx.Optimizer(qt_model, tx, wrt=nnx.Param)
  """
  weights = quantized_weights(
      qt_model, *example_inputs, variables=variables, method=method, **example_kwargs
  )

  def levels_fn(params: Any) -> Any:
    leaves, treedef = _flatten(params)
    out = []
    for path, leaf in leaves:
      weight = weights.get(path)
      if weight is None or leaf is None or isinstance(leaf, optax.MaskedNode):
        out.append(None)
        continue
      w = _unbox(leaf)
      if tuple(w.shape) != weight.shape:
        raise ValueError(
            f"params['{_path_str(path)}'] has shape {tuple(w.shape)}, but Qwix "
            f"quantizes a weight of shape {weight.shape} there: these params do "
            "not belong to the model given to levels_fn_from_qwix."
        )
      out.append(weight.levels(w))
    return treedef.unflatten(out)

  return levels_fn
