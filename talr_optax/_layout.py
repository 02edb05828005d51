"""Where each transition rate lives: the static layout shared by the transformations.

A *rate group* is the set of weights one transition rate is measured on: a
quantized tensor, one slice of a stacked tensor along its layer axis, or all
quantized weights pooled (``granularity="global"``). The layout is derived
from shapes only (at trace time), so the optimizer state holds nothing but
arrays: one int8 previous level per counted weight, and one float32 entry per
rate group in each rate vector.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from talr_optax import _tree
from talr_optax.counting import count_transitions, sample_strides, take_sample
from talr_optax.quantizers import LEVEL_DTYPE

LevelsFn = Callable[[Any], Any]
# Rates are float32 whatever the params' dtype: a rate of 1e-4 per step is
# below the resolution of bfloat16 around 1.
RATE_DTYPE = jnp.float32


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
  layer_axis: Optional[int]
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
    if self.strides is None:
      return self.weights_per_rate
    axis = None if self.layer_axis is None else self.layer_axis % len(self.shape)
    return math.prod(n for i, n in enumerate(self.counted_shape) if i != axis)


class Layout(NamedTuple):
  treedef: Any  # of the levels pytree, None and MaskedNode as leaves
  leaves: tuple[Optional[QuantizedLeaf], ...]  # per levels leaf
  names: tuple[str, ...]  # per rate group (before pooling)
  global_rate: bool

  @property
  def num_rates(self) -> int:
    return 1 if self.global_rate else len(self.names)


def has_no_weights(x: Any) -> bool:
  """A subtree whose arrays are all empty (a zero-size quantized leaf has no rate)."""
  leaves = jax.tree.leaves(x)
  return bool(leaves) and all(getattr(leaf, "size", 1) == 0 for leaf in leaves)


def check_shapes(layout: "Layout", params: Any) -> None:
  """Every quantized leaf's levels have the shape of its param (one level per weight)."""
  for q, p in zip(layout.leaves, match(layout.treedef, params, "params")):
    if q is None:
      continue
    param = _tree.unbox(p)
    shape = getattr(param, "shape", None)
    name = layout.names[q.offset]
    if shape is None:
      raise ValueError(
          f"levels_fn returned one level array at '{name}' where params hold a"
          f" subtree with {len(jax.tree.leaves(p))} leaves: it must return a pytree"
          " with the structure of params.")
    if tuple(shape) != q.shape:
      raise ValueError(
          f"levels at '{name}' have shape {q.shape}, but the param has shape"
          f" {tuple(shape)}: levels_fn must return one level per weight.")


def call_levels_fn(levels_fn: LevelsFn, params: Any) -> tuple[list[Any], Any]:
  """Levels leaves (int8 arrays, or None) and the treedef of ``levels_fn(params)``."""
  levels = levels_fn(params)
  leaves, treedef = jax.tree.flatten(levels, is_leaf=_tree.is_none_or_masked)
  out = []
  for i, level in enumerate(leaves):
    if level is None or _tree.is_masked(level):
      out.append(None)
      continue
    dtype = getattr(level, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
      raise ValueError(
          f"levels_fn must return integer levels (or None) for every leaf, got"
          f" {type(level).__name__} of dtype {dtype} at leaf {i}: round and cast"
          " the quantizer output, e.g. with talr_optax.weight_levels.")
    out.append(level.astype(LEVEL_DTYPE))
  return out, treedef


def match(treedef: Any, tree: Any, what: str) -> list[Any]:
  """Subtrees of ``tree`` at the leaves of the levels' structure."""
  try:
    return treedef.flatten_up_to(tree)
  except (ValueError, TypeError) as e:
    raise ValueError(
        f"levels_fn returned a pytree whose structure does not match the {what}:"
        " it must return a pytree with the structure of params, an integer array"
        f" per quantized leaf and None elsewhere. ({e})") from None


def _layer_axes(layer_axes: Any, params: Any, treedef: Any) -> list[Optional[int]]:
  """The layer axis of every levels leaf, from a prefix pytree (or a callable)."""
  if layer_axes is None:
    return [None] * treedef.num_leaves
  spec = layer_axes(params) if callable(layer_axes) else layer_axes
  marker = treedef.unflatten(range(treedef.num_leaves))
  out: list[Optional[int]] = [None] * treedef.num_leaves

  def assign(axis: Any, subtree: Any) -> None:
    axis = _tree.unbox(axis)
    if axis is not None and (isinstance(axis, bool) or not isinstance(axis, int)):
      raise ValueError(
          f"layer_axes must hold an int axis or None per leaf, got {axis!r}.")
    for position in jax.tree.leaves(subtree):
      out[position] = axis

  try:
    jax.tree.map(assign, spec, marker,
                 is_leaf=lambda x: x is None or _tree.is_boxed(x) or _tree.is_masked(x))
  except (ValueError, TypeError) as e:
    raise ValueError(
        "layer_axes must be a pytree with the structure of params (or a prefix of"
        f" it) holding an int axis or None, or a callable params -> such a pytree. ({e})"
    ) from None
  return out


def build(levels: list[Any], treedef: Any, params: Any, *, layer_axes: Any,
          sample_size: Optional[int], global_rate: bool) -> Layout:
  """The layout of the rate groups for the levels of ``params``."""
  axes = _layer_axes(layer_axes, params, treedef)
  paths = [p for p, _ in _tree.leaves_with_paths(
      treedef.unflatten([0] * treedef.num_leaves), is_leaf_fn=None)]
  leaves: list[Optional[QuantizedLeaf]] = []
  names: list[str] = []
  for position, (level, axis, path) in enumerate(zip(levels, axes, paths)):
    if level is None:
      leaves.append(None)
      continue
    if axis is not None and not -level.ndim <= axis < level.ndim:
      raise ValueError(
          f"layer_axes gives axis {axis} for '{path}', whose levels have shape"
          f" {tuple(level.shape)}.")
    num = 1 if axis is None else level.shape[axis]
    per_rate = level.size // num if num else 0
    if per_rate == 0:  # no weights to count: no rate, update passed through
      leaves.append(None)
      continue
    strides = None
    if sample_size is not None:
      strides = sample_strides(level.shape, sample_size, axis)
    leaves.append(QuantizedLeaf(position, len(names), num, axis, per_rate, strides,
                                tuple(level.shape)))
    names.extend([path] if axis is None else [f"{path}[{i}]" for i in range(num)])
  return Layout(treedef, tuple(leaves), tuple(names), global_rate)


def of_shapes(levels_fn: LevelsFn, params: Any, *, layer_axes: Any,
              sample_size: Optional[int], global_rate: bool) -> Layout:
  """The layout from the shapes of ``levels_fn(params)``, computing no levels."""
  shapes = jax.eval_shape(levels_fn, params)
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=_tree.is_none_or_masked)
  leaves = [None if _tree.is_none_or_masked(x) else x for x in leaves]
  return build(leaves, treedef, params, layer_axes=layer_axes, sample_size=sample_size,
               global_rate=global_rate)


def at_init(levels_fn: LevelsFn, params: Any, *, name: str, layer_axes: Any,
            sample_size: Optional[int], global_rate: bool) -> tuple[Layout, list[Any]]:
  """The layout and the int8 levels of the params, checked, for an ``init``.

  Levels are computed, not only traced: ``talr_optax.nnx.levels_fn_for`` of an
  uncalibrated model refuses to be traced.
  """
  if any(type(x).__name__ == "_ParamsPlaceholder"
         for x in jax.tree.leaves(params, is_leaf=lambda x: not isinstance(x, (dict, list, tuple)))):
    raise ValueError(
        f"optax.tree.map_params cannot map a {name} state: its init computes the"
        " levels of the real params, which a placeholder does not have. To shard the"
        " state, call tx.init (or jax.jit(tx.init)) on sharded params: levels take the"
        " sharding of their params, rates are replicated.")
  levels, treedef = call_levels_fn(levels_fn, params)
  if all(level is None for level in levels):
    raise ValueError(
        f"levels_fn returned no quantized leaf (only None): {name} has nothing to"
        " measure. Return integer levels for the quantized weights.")
  layout = build(levels, treedef, params, layer_axes=layer_axes,
                 sample_size=sample_size, global_rate=global_rate)
  check_shapes(layout, params)
  return layout, levels


def group_means(layout: Layout, values: list[Any]) -> jax.Array:
  """Mean of per-weight ``values`` (counted shape, one per quantized leaf) per rate group."""
  out = []
  for q, x in zip([q for q in layout.leaves if q is not None], values):
    x = x.astype(RATE_DTYPE)
    if q.layer_axis is None:
      out.append(jnp.mean(x).reshape(1))
    else:
      x = jnp.moveaxis(x, q.layer_axis, 0)
      out.append(jnp.mean(x.reshape(x.shape[0], -1), axis=1))
  return jnp.concatenate(out) if out else jnp.zeros((0,), RATE_DTYPE)


def counted_levels(layout: Layout, levels: list[Any]) -> Any:
  """The levels pytree as stored: sampled where sampling applies, None elsewhere."""
  return layout.treedef.unflatten([
      None if q is None else _sample(levels[q.position], q.strides)
      for q in layout.leaves])


def _sample(levels: jax.Array, strides: Optional[tuple[int, ...]]) -> jax.Array:
  """The counted levels, computed once.

  XLA:CPU would otherwise fuse the cheap levels computation into both of its
  consumers (the count and the stored copy) and read the sampled rows twice.
  """
  if strides is None:
    return levels
  return jax.lax.optimization_barrier(take_sample(levels, strides))


def transition_rates(layout: Layout, levels: list[Any], prev_levels: Any) -> jax.Array:
  """``k``: fraction of counted levels that changed, one entry per rate (float32)."""
  prev = match(layout.treedef, prev_levels, "stored previous levels")
  rates, weights = [], []
  for q in layout.leaves:
    if q is None:
      continue
    new = _sample(levels[q.position], q.strides)
    old = _tree.unbox(prev[q.position])
    if old is None or tuple(old.shape) != tuple(new.shape):
      raise ValueError(
          "levels_fn changed which leaves are quantized, or their shapes, since"
          f" init (at '{layout.names[q.offset]}').")
    counts = count_transitions(new, old, q.layer_axis).reshape(-1)
    rates.append(counts.astype(RATE_DTYPE) / q.counted_per_rate)
    weights.append(jnp.full((q.num_rates,), q.weights_per_rate, RATE_DTYPE))
  k = jnp.concatenate(rates) if rates else jnp.zeros((0,), RATE_DTYPE)
  if layout.global_rate:
    # Each group weighted by its true size (a sampled group counts fewer).
    w = jnp.concatenate(weights) if weights else jnp.zeros((0,), RATE_DTYPE)
    return (jnp.sum(k * w) / jnp.maximum(jnp.sum(w), 1.0)).reshape(1)
  return k


def leaf_rate(layout: Layout, vector: jax.Array, q: QuantizedLeaf, ndim: int) -> jax.Array:
  """The entries of a rate vector for one quantized leaf, shaped to broadcast.

  A tensor's entry is a scalar; a stacked tensor's entries lie along its
  layer axis, with size 1 on the other axes.
  """
  if layout.global_rate:
    return vector[0]
  if q.layer_axis is None:
    return vector[q.offset]
  shape = [1] * ndim
  shape[q.layer_axis % ndim] = q.num_rates
  return vector[q.offset:q.offset + q.num_rates].reshape(shape)
