"""Counting changed quantization levels: exactly, per layer, or on a sample.

:func:`count_transitions` is the hot loop of TALR. On XLA:CPU a float32
reduction absorbs subtract / abs / sign into one vectorised pass, while
``sum(a != b)`` writes a boolean temporary and reduces it as integers, several
times slower. Level differences are small integers, so ``sign(|a - b|)`` is
exactly 0 or 1, and a float32 sum is exact while it stays below 2^24: rows
along the last axis are summed in float32, then the row sums as int32. Only
existing axes are reduced, so nothing is reshaped across a sharded axis.

:func:`sample_strides` and :func:`take_sample` pick the fixed subset that
``sample_size`` counts on: a strided grid over every axis of a tensor (never
one contiguous block, whose weights would share a channel), so the estimate
covers all input and output channels.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

__all__ = ["count_transitions", "sample_strides", "take_sample"]

# float32 represents every integer up to 2^24 exactly.
_EXACT_F32_SUM = 2**24


def _check_levels(levels: jax.Array, prev_levels: jax.Array) -> None:
  for name, x in (("levels", levels), ("prev_levels", prev_levels)):
    dtype = getattr(x, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
      raise ValueError(
          f"count_transitions counts integer quantization levels, got {name} of"
          f" dtype {dtype}: pass the integer levels (e.g. talr_optax.weight_levels),"
          " not the float weights.")
  if levels.shape != prev_levels.shape:
    raise ValueError(
        f"levels and prev_levels must have the same shape, got {levels.shape} and"
        f" {prev_levels.shape}.")


def count_transitions(levels: jax.Array, prev_levels: jax.Array,
                      axis: Optional[int] = None) -> jax.Array:
  """Number of entries where ``levels != prev_levels``, exact, as int32.

  Args:
    levels: integer levels of one tensor after an update.
    prev_levels: integer levels of the same tensor before it, same shape.
    axis: ``None`` counts over the whole tensor; an int counts each slice
      along that axis separately (a stacked tensor's layer axis).

  Returns:
    An int32 scalar, or with ``axis`` an int32 vector with one count per slice.
  """
  _check_levels(levels, prev_levels)
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


def sample_strides(shape: Sequence[int], sample_size: int,
                   layer_axis: Optional[int] = None) -> Optional[tuple[int, ...]]:
  """Strides of the fixed subset counted for a tensor of ``shape``.

  Each slice (the whole tensor, or each slice along ``layer_axis``) with more
  than ``sample_size`` entries is sampled on a grid: every ``s_i``-th index
  along each axis ``i``, at most ``sample_size`` points per slice. Rows (all
  axes but the last) are thinned first, down to about
  ``sqrt(sample_size)`` of them, then the last axis: the grid spans every
  axis, while the entries of a row stay close in memory, so the sample reads
  a small share of the tensor's cache lines. Along each axis the axis with
  most grid points is thinned first.

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
  thin(rows, max(math.isqrt(sample_size), -(-sample_size // shape[last])))
  thin(axes, sample_size)
  return tuple(strides)


def _next_stride(size: int, stride: int) -> int:
  """The next stride that thins an axis of ``size``, a divisor of it if possible.

  A divisor lets :func:`take_sample` split the axis into (points, stride) and
  keep index 0: on a sharded axis each device then samples its own block
  (when its block is a multiple of the stride), so no level crosses devices.
  A divisor is taken unless it would thin the axis more than twice as much
  as the next plain stride.
  """
  points = -(-size // stride)
  plain = stride
  while -(-size // plain) >= points:
    plain += 1
  divisor = next(d for d in range(stride + 1, size + 1) if size % d == 0)
  if size // divisor * 2 >= -(-size // plain):
    return divisor
  return plain


def take_sample(x: jax.Array, strides: Optional[Sequence[int]]) -> jax.Array:
  """The entries of ``x`` on the grid of :func:`sample_strides` (``x`` if ``None``).

  An axis whose stride divides it is split into (points, stride) and index 0
  kept (a reshape and a slice that a sharded axis does locally); any other
  axis is sliced with its stride.
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
  return x.reshape(shape)[tuple(index)]
