"""Counting changed quantization levels: exactly, per layer, on a sample, pooled.

Everything the transformations count goes through this module, once per
update, on the static :class:`~talr_optax._layout.Layout` of the rate groups:

* :func:`init_levels`: every ``init``'s entry: the levels of the params
  (refused if they do not fit int8) and the :class:`~talr_optax._layout.Layout`;
* :func:`levels_of` / :func:`levels_after`: the int8 levels of the params
  before or after the update (rounded as the params will be stored);
* :func:`counted`: the levels on the sampling grid, computed once per update;
  :func:`stored` reads a state's per-weight arrays in the same order;
* :func:`transition_rates`: ``k`` per rate group (each group's count over the
  weights counted in it), or pooled over all groups weighted by their true
  sizes;
* :func:`group_means`: the per-group mean of per-weight values (the
  oscillation monitor's statistics).

:func:`count_transitions` is the hot loop. On XLA:CPU a float32 reduction
absorbs subtract / abs / sign into one vectorised pass, while
``sum(a != b)`` writes a boolean temporary and reduces it as integers, several
times slower. Level differences are small integers, so ``sign(|a - b|)`` is
exactly 0 or 1, and a float32 sum is exact while it stays below 2^24: rows
along the last axis are summed in float32, then the row sums as int32. Only
existing axes are reduced, so nothing is reshaped across a sharded axis.

:func:`take_sample` takes the fixed subset that ``sample_size`` counts on,
the grid of :func:`sample_strides`: strided over every axis of a tensor
(never one contiguous block, whose weights would share a channel), so the
estimate covers all input and output channels.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from talr_optax import _checks
from talr_optax import _layout
from talr_optax import _tree
from talr_optax._layout import RATE_DTYPE, Layout, LevelsFn, sample_strides
from talr_optax.quantizers import LEVEL_DTYPE

__all__ = ["count_transitions", "sample_strides", "take_sample"]

# float32 represents every integer up to 2^24 exactly.
_EXACT_F32_SUM = 2**24


def _check_levels(levels: jax.Array, prev_levels: jax.Array, axis: Optional[int]) -> None:
  for name, x in (("levels", levels), ("prev_levels", prev_levels)):
    if not _checks.is_integer_array(x):
      raise ValueError(
          f"count_transitions counts integer quantization levels, got {name} of"
          f" dtype {getattr(x, 'dtype', None)}: pass the integer levels (e.g. talr_optax.weight_levels),"
          " not the float weights.")
  if levels.shape != prev_levels.shape:
    raise ValueError(
        f"levels and prev_levels must have the same shape, got {levels.shape} and"
        f" {prev_levels.shape}.")
  if axis is not None and not -max(levels.ndim, 1) <= axis < levels.ndim:
    raise ValueError(
        f"axis must be None or in [{-levels.ndim}, {levels.ndim}) for levels of shape"
        f" {levels.shape}, got axis = {axis!r}.")


def count_transitions(levels: jax.Array, prev_levels: jax.Array,
                      axis: Optional[int] = None) -> jax.Array:
  """Number of entries where ``levels != prev_levels``, exact, as int32.

  Args:
    levels: integer levels of one tensor after an update.
    prev_levels: integer levels of the same tensor before it, same shape.
    axis: ``None`` counts over the whole tensor; an int in ``[-ndim, ndim)``
      counts each slice along that axis separately (a stacked tensor's layer
      axis).

  Returns:
    An int32 scalar, or with ``axis`` an int32 vector with one count per slice.
  """
  _check_levels(levels, prev_levels, axis)
  if axis is not None:
    axis = axis % levels.ndim
    levels, prev_levels = jnp.moveaxis(levels, axis, 0), jnp.moveaxis(prev_levels, axis, 0)
  if levels.ndim == 0 or (levels.ndim == 1 and axis is not None):
    # Nothing to sum within a slice: one entry per count.
    return (levels != prev_levels).astype(jnp.int32).reshape(
        (-1,) if axis is not None else ())
  keep = 1 if axis is not None else 0
  per_count = math.prod(levels.shape[keep:])
  if per_count < _EXACT_F32_SUM and jnp.iinfo(levels.dtype).bits <= 8:
    # One float32 sum per count: exact, and on a sharded tensor each device
    # adds its part and only the count crosses devices.
    diff = jnp.abs(levels.astype(jnp.float32) - prev_levels.astype(jnp.float32))
    total = jnp.sum(jnp.sign(diff), axis=tuple(range(keep, levels.ndim)))
    return total.astype(jnp.int32)
  if levels.shape[-1] >= _EXACT_F32_SUM or jnp.iinfo(levels.dtype).bits > 8:
    per_row = jnp.sum(levels != prev_levels, axis=-1, dtype=jnp.int32)
  else:
    # sign(|a - b|) is exactly 0 or 1; a row of fewer than 2^24 sums exactly.
    diff = jnp.abs(levels.astype(jnp.float32) - prev_levels.astype(jnp.float32))
    per_row = jnp.sum(jnp.sign(diff), axis=-1).astype(jnp.int32)
  return jnp.sum(per_row, axis=tuple(range(keep, per_row.ndim)), dtype=jnp.int32)


def take_sample(x: jax.Array, strides: Optional[Sequence[int]]) -> jax.Array:
  """The entries of ``x`` on the grid of :func:`sample_strides` (``x`` if ``None``).

  Along axis ``i`` the grid holds indices ``0, s_i, 2 s_i, ...`` (all below
  the axis size). An axis whose stride divides it is split into (points,
  stride) and index 0 kept (a reshape and a slice that a sharded axis does
  locally); any other axis is sliced with its stride.
  """
  if strides is None:
    return x
  splits = [s > 1 and d % s == 0 for d, s in zip(x.shape, strides)]
  x = x[tuple(slice(None) if split else slice(None, None, s)
              for split, s in zip(splits, strides))]
  shape, index = [], []
  for d, s, split in zip(x.shape, strides, splits):
    shape += [d // s, s] if split else [d]
    index += [slice(None), 0] if split else [slice(None)]
  out_sharding = _split_sharding(x, [s if split else 1 for s, split in zip(strides, splits)])
  return jnp.reshape(x, shape, out_sharding=out_sharding)[tuple(index)]


def _explicit_spec(x: jax.Array) -> Optional[tuple[Any, ...]]:
  """The spec of ``x`` if some axis is sharded over an Explicit mesh axis, else ``None``."""
  spec = getattr(jax.typeof(x).sharding, "spec", None)
  if spec is None or all(entry is None for entry in spec):
    return None
  return tuple(spec) + (None,) * (x.ndim - len(spec))


def _split_sharding(x: jax.Array, strides: Sequence[int]) -> Optional[NamedSharding]:
  """On a mesh with Explicit axes, where the sharding of ``x`` goes when split axes split.

  Explicit sharding is part of an array's type, so a reshape must be told
  where it goes: an axis sharded over mesh axes stays sharded on its grid
  points when they divide evenly (each device keeps its own block), else it
  is gathered. ``None`` (the compiler propagates) when no axis is Explicit.
  A ``NamedSharding`` on the array's own mesh, not a bare ``PartitionSpec``,
  so no ``jax.set_mesh`` context is needed.
  """
  spec = _explicit_spec(x)
  if spec is None:
    return None
  mesh = jax.typeof(x).sharding.mesh
  devices = lambda entry: math.prod(
      mesh.shape[a] for a in ((entry,) if isinstance(entry, str) else entry))
  out = []
  for entry, d, s in zip(spec, x.shape, strides):
    if s > 1:
      out += [entry if entry is None or (d // s) % devices(entry) == 0 else None, None]
    else:
      out += [entry]
  return NamedSharding(mesh, PartitionSpec(*out))


def _replicated(x: jax.Array) -> jax.Array:
  """``x`` (a few rates) replicated, where Explicit sharding would keep it split."""
  if _explicit_spec(x) is None:
    return x
  return jax.sharding.reshard(x, NamedSharding(jax.typeof(x).sharding.mesh, PartitionSpec()))


def zeros_like(x: jax.Array, dtype: Any) -> jax.Array:
  """Zeros shaped and sharded like ``x``, in ``dtype``.

  Computed from ``x``: ``jnp.zeros_like`` of an array sharded over an
  Explicit mesh axis, traced in a ``jax.jit`` outside ``jax.set_mesh``,
  fails to place its result.
  """
  return (x.astype(jnp.int32) * 0).astype(dtype)


def levels_of(levels_fn: LevelsFn, params: Any, *, check_range: bool = False) -> Any:
  """``levels_fn(params)`` with every integer leaf as int8 (``None`` elsewhere).

  With ``check_range`` (at ``init``), concrete levels that do not fit int8 are
  refused: stored as int8 they would wrap around and count transitions that
  never happened. ``update`` casts without looking (no host round-trip).
  """

  def to_int8(level):
    if not _checks.is_integer_array(level):
      return level  # checked, with its path, by _layout.build
    if check_range and not isinstance(level, jax.core.Tracer) and level.size:
      lo, hi = int(jnp.min(level)), int(jnp.max(level))
      info = jnp.iinfo(LEVEL_DTYPE)
      if lo < info.min or hi > info.max:
        raise ValueError(
            f"levels_fn returned levels in [{lo}, {hi}], which do not fit the int8 the"
            f" state stores them in ([{info.min}, {info.max}]): quantize to at most 8"
            " bits (signed levels), or offset unsigned 8-bit levels by -128.")
    return level.astype(LEVEL_DTYPE)

  return jax.tree.map(to_int8, levels_fn(params), is_leaf=_tree.is_none_or_masked)


def init_levels(levels_fn: LevelsFn, params: Any, *, name: str, layer_axes: Any,
                sample_size: Optional[int], global_rate: bool) -> tuple[Layout, Any]:
  """The layout and the int8 levels of the params, checked, for an ``init``.

  The one entry of every transformation's ``init``. Levels are computed, not
  only traced: ``talr_optax.nnx.levels_fn_for`` of an uncalibrated model
  refuses to be traced, and concrete levels are checked to fit int8.

  Args:
    levels_fn: ``params -> levels``.
    params: the params ``init`` received.
    name: the transformation, for messages.
    layer_axes, sample_size, global_rate: as in :func:`talr_optax._layout.build`.

  Returns:
    ``(layout, levels)``: levels as a pytree, int8 where quantized.
  """
  if not jax.tree.leaves(params):  # e.g. optax.tree.map_params's placeholder
    raise ValueError(
        f"{name}.init got params without arrays: optax.tree.map_params cannot map a"
        f" {name} state, since its init computes the levels of the real params, which"
        " a placeholder does not have. To shard the state, call tx.init (or"
        " jax.jit(tx.init)) on sharded params: levels take the sharding of their"
        " params, rates are replicated.")
  levels = levels_of(levels_fn, params, check_range=True)
  layout = _layout.build(levels, params, layer_axes=layer_axes, sample_size=sample_size,
                         global_rate=global_rate)
  if not any(not _tree.is_none_or_masked(x) for x in layout.match(levels, "levels")):
    raise ValueError(
        f"levels_fn returned no quantized leaf (only None): {name} has nothing to"
        " measure. Return integer levels for the quantized weights.")
  return layout, levels


def levels_after(levels_fn: LevelsFn, params: Any, updates: Any) -> Any:
  """The int8 levels of ``optax.apply_updates(params, updates)``, rounded as stored.

  Under jit XLA may keep ``p + u`` of bfloat16 / float16 params in float32
  (excess precision) when the levels read it, so the levels would be those of
  the unrounded sum, not of the params the next step receives.
  ``reduce_precision`` pins the rounding (to nearest even, like the cast).
  """
  return levels_of(levels_fn, jax.tree.map(_pin_rounding,
                                           optax.apply_updates(params, updates)))


def _pin_rounding(x: Any) -> Any:
  if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.floating):
    return x
  info = jnp.finfo(x.dtype)
  if info.nmant >= jnp.finfo(jnp.float32).nmant:
    return x
  wide = jax.lax.reduce_precision(x.astype(jnp.float32), exponent_bits=info.nexp,
                                  mantissa_bits=info.nmant)
  return wide.astype(x.dtype)


def counted(layout: Layout, levels: Any) -> list[jax.Array]:
  """The counted levels of every quantized leaf (on its grid), computed once.

  ``levels`` is a levels pytree (what :func:`levels_of` returns). The
  optimization barrier keeps XLA:CPU from fusing the cheap levels computation
  into each consumer (the count and the stored copy) and reading the sampled
  rows twice.
  """
  leaves = layout.match(levels, "levels")
  out = []
  for q in layout.quantized:
    x = take_sample(_tree.unbox(leaves[q.position]), q.strides)
    out.append(x if q.strides is None else jax.lax.optimization_barrier(x))
  return out


def stored(layout: Layout, tree: Any, what: str) -> list[jax.Array]:
  """The per-weight arrays a state stores for each quantized leaf, in order."""
  leaves = layout.match(tree, what)
  return [_tree.unbox(leaves[q.position]) for q in layout.quantized]


def transition_rates(layout: Layout, new: Sequence[jax.Array], old: Sequence[jax.Array]
                     ) -> jax.Array:
  """``k``: the fraction of counted levels that changed, per rate group (float32).

  ``new`` and ``old`` are counted levels, one array per quantized leaf. Each
  group's count is divided by the number of its weights counted; pooled
  (``granularity="global"``) each group weighs by its true size, so a sampled
  group stands for all its weights.
  """
  rates, sizes = [], []
  for q, a, b in zip(layout.quantized, new, old):
    counts = _replicated(count_transitions(a, b, q.layer_axis).reshape(-1))
    rates.append(counts.astype(RATE_DTYPE) / q.counted_per_rate)
    sizes.append(np.full((q.num_rates,), q.weights_per_rate, np.float64))
  if not rates:  # only empty quantized leaves: nothing changes
    return jnp.zeros((layout.num_rates,), RATE_DTYPE)
  k = jnp.concatenate(rates)
  if not layout.global_rate:
    return k
  w = np.concatenate(sizes)
  return jnp.sum(k * jnp.asarray(w / w.sum(), RATE_DTYPE)).reshape(1)


def rates_since(layout: Layout, levels: Any, prev_levels: Any) -> tuple[jax.Array, Any]:
  """``k`` from the stored ``prev_levels`` to ``levels``, and the levels to store next.

  The one count both ``scale_by_talr`` and ``track_transitions`` make:
  ``levels`` is a full levels tree, ``prev_levels`` the state's field.
  """
  new = counted(layout, levels)
  k = transition_rates(layout, new, stored(layout, prev_levels, "stored levels"))
  return k, layout.per_leaf(new)


def group_means(layout: Layout, values: Sequence[jax.Array]) -> jax.Array:
  """Mean of per-weight ``values`` (counted shape, one per quantized leaf) per rate group."""
  out = []
  for q, x in zip(layout.quantized, values):
    axes = tuple(i for i in range(x.ndim) if i != q.layer_axis)
    out.append(_replicated(jnp.mean(x.astype(RATE_DTYPE), axis=axes).reshape(-1)))
  return jnp.concatenate(out) if out else jnp.zeros((0,), RATE_DTYPE)
