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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["count_transitions"]

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
