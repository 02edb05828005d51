"""Where each transition rate lives: the static description of the rate groups.

A *rate group* is the set of weights one transition rate is measured on: a
quantized tensor, one slice of a stacked tensor along its layer axis, or all
quantized weights pooled (``granularity="global"``). A :class:`Layout` says,
for every leaf of the levels pytree, whether it is quantized, its layer axis,
its entries in the rate vectors and the grid its levels are counted on. It is
derived from shapes only, at trace time, by :func:`build` (the one way to make
one), so the optimizer state holds nothing but arrays.

Nothing here touches an array's values: the counting itself, on the layout,
is :mod:`talr_optax.counting`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from talr_optax import _checks
from talr_optax import _tree

LevelsFn = Callable[[Any], Any]
# Rates are float32 whatever the params' dtype: a rate of 1e-4 per step is
# below the resolution of bfloat16 around 1.
RATE_DTYPE = jnp.float32
_STATIC_ARGS_HINT = ("under optax.inject_hyperparams pass static_args=({!r},): it turns"
                     " numbers into traced arrays and calls callables with the step count")


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class RateNames:
  """Names of the entries of a state's rate vectors (static: no array leaves).

  ``"conv1/kernel"`` for a tensor, ``"blocks/mlp/kernel[3]"`` for layer 3 of a
  stacked tensor, ``""`` for the one pooled rate of ``granularity="global"``.
  """

  names: tuple[str, ...]


class QuantizedLeaf(NamedTuple):
  """Static description of one quantized leaf of the levels pytree."""

  position: int  # index among the leaves of the levels pytree
  offset: int  # first entry in the rate vectors
  num_rates: int  # 1, or the number of layers along `layer_axis`
  layer_axis: Optional[int]  # in [0, ndim), or None
  weights_per_rate: int  # true size of one rate group
  strides: Optional[tuple[int, ...]]  # sampling grid, None when exact
  shape: tuple[int, ...]  # of the levels (and the param)

  @property
  def counted_shape(self) -> tuple[int, ...]:
    """Shape of the counted (stored) levels: the sampling grid, or ``shape``."""
    if self.strides is None:
      return self.shape
    return tuple(-(-d // s) for d, s in zip(self.shape, self.strides))

  @property
  def counted_per_rate(self) -> int:
    """Entries counted per rate group (fewer than ``weights_per_rate`` when sampled)."""
    return math.prod(n for i, n in enumerate(self.counted_shape) if i != self.layer_axis)


class Layout(NamedTuple):
  """The rate groups of a levels pytree (static: built at trace time)."""

  treedef: Any  # of the levels pytree, None and MaskedNode as leaves
  leaves: tuple[Optional[QuantizedLeaf], ...]  # per levels leaf
  names: tuple[str, ...]  # per rate group (before pooling)
  global_rate: bool

  @property
  def num_rates(self) -> int:
    """Length of the state's rate vectors (1 when pooled)."""
    return 1 if self.global_rate else len(self.names)

  @property
  def rate_names(self) -> RateNames:
    """The names of the entries of the state's rate vectors."""
    return RateNames(("",) if self.global_rate else self.names)

  @property
  def quantized(self) -> tuple[QuantizedLeaf, ...]:
    """The quantized leaves, in order (those with a rate)."""
    return tuple(q for q in self.leaves if q is not None)

  def match(self, tree: Any, what: str) -> list[Any]:
    """Subtrees of ``tree`` at the leaves of the levels' structure."""
    return _match(self.treedef, tree, what)

  def per_leaf(self, values: Sequence[Any]) -> Any:
    """A pytree shaped like the levels from one value per quantized leaf (None elsewhere)."""
    it = iter(values)
    return self.treedef.unflatten([None if q is None else next(it) for q in self.leaves])

  def rate_of(self, vector: jax.Array, q: QuantizedLeaf, ndim: int) -> jax.Array:
    """The entries of a rate vector for one quantized leaf, shaped to broadcast.

    A tensor's entry is a scalar; a stacked tensor's entries lie along its
    layer axis, with size 1 on the other axes.
    """
    if self.global_rate:
      return vector[0]
    if q.layer_axis is None:
      return vector[q.offset]
    shape = [1] * ndim
    shape[q.layer_axis] = q.num_rates
    return vector[q.offset:q.offset + q.num_rates].reshape(shape)


def build(levels: Any, params: Any, *, layer_axes: Any, sample_size: Optional[int],
          global_rate: bool) -> Layout:
  """The layout of the rate groups of ``levels``, checked against ``params``.

  Args:
    levels: what ``levels_fn(params)`` returns, or its ``jax.eval_shape``:
      integer arrays (or shapes) for quantized leaves, ``None`` or
      ``optax.MaskedNode`` elsewhere.
    params: the params the levels are of (their structure and shapes).
    layer_axes: as in :func:`talr_optax.scale_by_talr`.
    sample_size: as in :func:`talr_optax.scale_by_talr`.
    global_rate: pool all rate groups into one rate.

  Returns:
    The :class:`Layout`. Raises a ``ValueError`` naming the cause when the
    levels are not integers, or do not match the params or ``layer_axes``.
  """
  leaves, treedef = jax.tree.flatten(levels, is_leaf=_tree.is_none_or_masked)
  paths = [p for p, _ in _tree.leaves_with_paths(
      treedef.unflatten([0] * treedef.num_leaves), is_leaf_fn=None)]
  for level, path in zip(leaves, paths):
    _check_integer(level, path)
  param_leaves = _match(treedef, params, "params")
  axes = layer_axes_of(layer_axes, params, treedef)
  out: list[Optional[QuantizedLeaf]] = []
  names: list[str] = []
  for position, (level, param, axis, path) in enumerate(zip(leaves, param_leaves, axes, paths)):
    if _tree.is_none_or_masked(level) or level.size == 0:
      out.append(None)  # no weights to count: no rate, update passed through
      continue
    shape = _check_level(level, param, path)
    if axis is not None:
      if not -len(shape) <= axis < len(shape):
        raise ValueError(
            f"layer_axes gives axis {axis} for '{path}', whose levels have shape {shape}.")
      axis %= len(shape)
    num = 1 if axis is None else shape[axis]
    per_rate = math.prod(shape) // num
    strides = None if sample_size is None else sample_strides(shape, sample_size, axis)
    out.append(QuantizedLeaf(position, len(names), num, axis, per_rate, strides, shape))
    names.extend([path] if axis is None else [f"{path}[{i}]" for i in range(num)])
  return Layout(treedef, tuple(out), tuple(names), global_rate)


def _check_integer(level: Any, path: str) -> None:
  """A levels leaf is ``None``, a ``MaskedNode`` or integer levels."""
  if _tree.is_none_or_masked(level):
    return
  if not _checks.is_integer_array(level):
    raise ValueError(
        f"levels_fn must return integer levels (or None) for every leaf, got"
        f" {type(level).__name__} of dtype {getattr(level, 'dtype', None)} at '{path}':"
        " round and cast"
        " the quantizer output, e.g. with talr_optax.weight_levels.")


def _check_level(level: Any, param: Any, path: str) -> tuple[int, ...]:
  """The shape of one leaf's levels: one level per weight of its param."""
  param_shape = getattr(_tree.unbox(param), "shape", None)
  if param_shape is None:
    raise ValueError(
        f"levels_fn returned one level array at '{path}' where params hold a"
        f" subtree with {len(jax.tree.leaves(param))} leaves: it must return a pytree"
        " with the structure of params.")
  shape = tuple(int(d) for d in level.shape)
  if shape != tuple(param_shape):
    raise ValueError(
        f"levels at '{path}' have shape {shape}, but the param has shape"
        f" {tuple(param_shape)}: levels_fn must return one level per weight.")
  return shape


def _match(treedef: Any, tree: Any, what: str) -> list[Any]:
  try:
    return treedef.flatten_up_to(tree)
  except (ValueError, TypeError) as e:
    raise ValueError(
        f"levels_fn returned a pytree whose structure does not match the {what}:"
        " it must return a pytree with the structure of params, an integer array"
        f" per quantized leaf and None elsewhere. ({e})") from None


def layer_axes_of(layer_axes: Any, params: Any, treedef: Any) -> list[Optional[int]]:
  """The layer axis of every levels leaf, from a prefix pytree (or a callable)."""
  if layer_axes is None:
    return [None] * treedef.num_leaves
  spec = layer_axes(params) if callable(layer_axes) else layer_axes
  marker = treedef.unflatten(range(treedef.num_leaves))
  out: list[Optional[int]] = [None] * treedef.num_leaves

  def assign(axis: Any, subtree: Any) -> None:
    axis = _tree.unbox(axis)
    if isinstance(axis, jax.Array):
      raise ValueError(
          f"layer_axes holds an array ({axis!r}), not an int axis: "
          + _STATIC_ARGS_HINT.format("layer_axes") + ".")
    if axis is not None and (isinstance(axis, bool) or not isinstance(axis, numbers.Integral)):
      raise ValueError(
          f"layer_axes must hold an int axis or None per leaf, got {axis!r}.")
    for position in jax.tree.leaves(subtree):
      out[position] = None if axis is None else int(axis)

  try:
    jax.tree.map(assign, spec, marker,
                 is_leaf=lambda x: x is None or _tree.is_boxed(x) or _tree.is_masked(x))
  except (ValueError, TypeError) as e:
    if "static_args" in str(e) or "int axis or None per leaf" in str(e):
      raise
    raise ValueError(
        "layer_axes must be a pytree with the structure of params (or a prefix of"
        f" it) holding an int axis or None, or a callable params -> such a pytree. ({e})"
    ) from None
  return out


def sample_strides(shape: Sequence[int], sample_size: int,
                   layer_axis: Optional[int] = None) -> Optional[tuple[int, ...]]:
  """Strides of the fixed subset counted for a tensor of ``shape``.

  Each slice (the whole tensor, or each slice along ``layer_axis``) with more
  than ``sample_size`` entries is sampled on a grid: every ``s_i``-th index
  along each axis ``i``, starting at 0, at most ``sample_size`` points per
  slice. Rows (all axes but the last) are thinned first, down to about
  ``sqrt(sample_size) / 4`` of them (at least 16), then the last axis: the
  grid spans every axis, while the entries of a row stay close in memory, so
  the sample reads a small share of the tensor's cache lines. Along each axis
  the axis with most grid points is thinned first.

  Args:
    shape: the tensor's shape.
    sample_size: the largest number of entries counted per slice (>= 1).
    layer_axis: an axis that is never thinned (each layer is sampled alike).

  Returns:
    The strides (1 on ``layer_axis``), or ``None`` if a slice has at most
    ``sample_size`` entries and is counted exactly.
  """
  shape = tuple(int(d) for d in shape)
  if layer_axis is not None:
    layer_axis %= len(shape)
  axes = [i for i in range(len(shape)) if i != layer_axis]
  if math.prod(shape[i] for i in axes) <= sample_size:
    return None
  strides = [1] * len(shape)
  points = {i: shape[i] for i in axes}

  def thin(candidates, budget):
    while candidates and math.prod(points[a] for a in candidates) > budget:
      i = max(candidates, key=lambda a: (points[a], a))  # ties: the later axis
      if points[i] == 1:
        return
      strides[i] = _next_stride(shape[i], strides[i])
      points[i] = -(-shape[i] // strides[i])

  rows, last = axes[:-1], axes[-1]
  root = math.isqrt(sample_size)
  thin(rows, max(root // 4, min(16, root), -(-sample_size // shape[last])))
  thin(axes, sample_size)
  return tuple(strides)


def _next_stride(size: int, stride: int) -> int:
  """The next stride that thins an axis of ``size``, a divisor of it if possible.

  A divisor lets :func:`talr_optax.counting.take_sample` split the axis into
  (points, stride) and keep index 0: on a sharded axis each device then
  samples its own block (when its block is a multiple of the stride), so no
  level crosses devices. A divisor is taken unless it would thin the axis
  more than twice as much as the next plain stride.
  """
  points = -(-size // stride)
  plain = stride
  while -(-size // plain) >= points:
    plain += 1
  divisor = next(d for d in range(stride + 1, size + 1) if size % d == 0)
  if size // divisor * 2 >= -(-size // plain):
    return divisor
  return plain


def check_state(layout: Layout, stored_names: RateNames, stored: Any, vectors: Sequence[Any],
                *, name: str, sample_size: Optional[int]) -> None:
  """The state was made for this layout; else a ``ValueError`` naming the setting.

  Args:
    layout: this optimizer's layout of the params it updates.
    stored_names: the state's ``rate_names``.
    stored: the state's per-weight pytree (levels or directions).
    vectors: the state's rate vectors (their lengths are checked).
    name: the transformation, for the message.
    sample_size: this optimizer's ``sample_size``, for the message.
  """
  problem = _names_differ(stored_names.names, layout.rate_names.names)
  if problem is None:
    for q, old in zip(layout.leaves, layout.match(stored, "stored per-weight state")):
      old = _tree.unbox(old)
      if q is None:
        continue
      path = layout.names[q.offset].removesuffix("[0]")
      shape = tuple(getattr(old, "shape", ()) or ()) if old is not None else None
      if shape == q.counted_shape:
        continue
      if old is None:
        problem = (f"'{path}' is quantized here but was not when the state was made"
                   " (levels_fn changed)")
      elif shape == q.shape:
        problem = (f"the state counts all {q.shape} levels of '{path}', this optimizer"
                   f" samples {q.counted_shape} of them: sample_size differs (here"
                   f" sample_size={sample_size})")
      elif _is_grid_of(shape, q.shape):
        problem = (f"the state holds levels of '{path}' {q.shape} sampled on a {shape}"
                   f" grid, this optimizer counts {q.counted_shape}: sample_size differs"
                   f" (here sample_size={sample_size})")
      else:
        problem = (f"the state holds {shape} levels at '{path}', whose param has shape"
                   f" {q.shape}: levels_fn changed which leaves are quantized, or their"
                   " shapes, since init")
      break
  if problem is None:
    lengths = {tuple(getattr(_tree.unbox(v), "shape", ())) for v in vectors}
    if lengths - {(layout.num_rates,)}:
      problem = (f"its rate vectors have shape {sorted(lengths)[0]}, this optimizer has"
                 f" {layout.num_rates} rates: layer_axes, the number of layers or"
                 " granularity differs (was the state restored into another"
                 " optimizer's structure?)")
  if problem is not None:
    raise ValueError(
        f"{name} got a state made with another configuration: {problem}. Build the"
        " optimizer as the state's was, or start from tx.init(params).")


def _is_grid_of(counted: tuple[int, ...], shape: tuple[int, ...]) -> bool:
  """``counted`` is the shape of some strided grid over ``shape``."""
  return len(counted) == len(shape) and all(
      any(-(-d // s) == n for s in range(1, d + 1)) for n, d in zip(counted, shape))


def _names_differ(old: tuple[str, ...], new: tuple[str, ...]) -> Optional[str]:
  """What changed between two tuples of rate names, or ``None`` if nothing."""
  if old == new:
    return None
  if ("",) in (old, new):
    return ("granularity differs: one rate is pooled over all tensors"
            " (granularity='global') in one of them")
  was, now = _layers_per_path(old), _layers_per_path(new)
  for path in list(was) + [p for p in now if p not in was]:
    a, b = was.get(path, "missing"), now.get(path, "missing")
    if a == b:
      continue
    if "missing" in (a, b):
      return (f"'{path}' is quantized in {'the state' if b == 'missing' else 'this optimizer'}"
              " only (levels_fn or the params changed)")
    if a is None or b is None:
      return (f"layer_axes differs at '{path}': the state has"
              f" {'one rate' if a is None else f'{a} per-layer rates'}, this optimizer"
              f" {'one rate' if b is None else f'{b} per-layer rates'}")
    return (f"the number of layers of '{path}' differs: {a} in the state, {b} here"
            " (or its axis in layer_axes)")
  return f"the rate groups differ: {old} in the state, {new} here"


def _layers_per_path(names: tuple[str, ...]) -> dict[str, Optional[int]]:
  """``{path: number of layers}`` (``None`` for a tensor with one rate)."""
  out: dict[str, Optional[int]] = {}
  for name in names:
    match = re.fullmatch(r"(.*)\[\d+\]", name)
    if match is None:
      out[name] = None
    else:
      out[match.group(1)] = (out.get(match.group(1)) or 0) + 1
  return out


def has_no_weights(x: Any) -> bool:
  """A subtree whose arrays are all empty (a zero-size quantized leaf has no rate)."""
  leaves = jax.tree.leaves(x)
  return bool(leaves) and all(getattr(leaf, "size", 1) == 0 for leaf in leaves)
