"""Exact count of changed quantization levels, the hot loop of TALR.

Kept in one small function so the formulation can be chosen from measurements
(``benchmarks/count_formulations.py``) without touching the transformation.

Why this formulation: on XLA:CPU, float32 reductions run through a fast
vectorised path that can absorb subtract / abs / sign into the reduction, but
not a comparison; ``sum(a != b)`` first writes a full-size boolean temporary
and then reduces it as integers, 3-4x slower in a full optimizer step. Here
``sign(|a - b|)`` is exactly 0 or 1 in float32 (level differences are at most
255), each row along the last axis is summed in float32 (exact while a row has
fewer than 2^24 entries) and the row sums are added as int32. Only existing
axes are reduced, so nothing is reshaped across a sharded axis.

:func:`count_transitions_packed` reads four int8 levels as one uint32 word
(a reshape of the last axis only) and counts changed bytes per word. It is
faster when the levels are already in memory (passed as ``levels=`` to
``update``), but when the levels are computed in the same step XLA:CPU
recomputes them from the params inside it, so the transformation uses it only
for levels passed in.
"""

from __future__ import annotations

import jax
from jax import lax
import jax.numpy as jnp

__all__ = ["count_transitions", "count_transitions_packed"]

# Float32 represents every integer up to 2^24 exactly.
_EXACT_F32_ROW = 2**24


def count_transitions(levels: jax.Array, prev_levels: jax.Array) -> jax.Array:
  """Number of entries where ``levels != prev_levels``, as an exact int32 scalar.

  Args:
    levels: integer levels of one tensor at this step (int8 in practice).
    prev_levels: integer levels of the same tensor at the previous step, same
      shape.

  Returns:
    An int32 scalar: the number of quantized weights that changed level.
  """
  if levels.shape != prev_levels.shape:
    raise ValueError(
        f"levels and prev_levels must have the same shape, got {levels.shape}"
        f" and {prev_levels.shape}."
    )
  if levels.ndim == 0:
    levels, prev_levels = levels.reshape(1), prev_levels.reshape(1)
  if levels.shape[-1] >= _EXACT_F32_ROW or jnp.iinfo(levels.dtype).bits > 8:
    return jnp.sum(levels != prev_levels, dtype=jnp.int32)
  diff = jnp.abs(levels.astype(jnp.float32) - prev_levels.astype(jnp.float32))
  per_row = jnp.sum(jnp.sign(diff), axis=-1)
  return jnp.sum(per_row.astype(jnp.int32), dtype=jnp.int32)


def _words(x: jax.Array) -> jax.Array:
  """(..., C) int8 with C % 4 == 0 -> (..., C // 4) uint32 (last axis only)."""
  return lax.bitcast_convert_type(
      x.reshape(x.shape[:-1] + (x.shape[-1] // 4, 4)), jnp.uint32)


def count_transitions_packed(levels: jax.Array, prev_levels: jax.Array) -> jax.Array:
  """:func:`count_transitions` on 32-bit words holding four int8 levels each.

  XOR of the words is nonzero in exactly the bytes whose level changed; each
  byte's bits are folded onto its lowest bit and the (at most 4) set bits of a
  word are counted with ``lax.population_count``. Exact for any values; used
  only for int8 levels whose last axis is a multiple of 4 (``ndim >= 1``),
  otherwise it falls back to :func:`count_transitions`.

  Args:
    levels: integer levels of one tensor at this step.
    prev_levels: the levels at the previous step, same shape.

  Returns:
    An int32 scalar: the number of entries where ``levels != prev_levels``.
  """
  if levels.shape != prev_levels.shape:
    raise ValueError(
        f"levels and prev_levels must have the same shape, got {levels.shape}"
        f" and {prev_levels.shape}."
    )
  if (levels.dtype != jnp.int8 or prev_levels.dtype != jnp.int8
      or levels.ndim == 0 or levels.shape[-1] % 4 != 0):
    return count_transitions(levels, prev_levels)
  z = _words(levels) ^ _words(prev_levels)
  z = z | (z >> 4)
  z = z | (z >> 2)
  z = z | (z >> 1)
  per_word = lax.population_count(z & jnp.uint32(0x01010101))
  return jnp.sum(per_word.astype(jnp.int32), dtype=jnp.int32)
