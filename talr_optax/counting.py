"""Exact count of changed quantization levels, the hot loop of TALR.

Kept in one small function so the formulation can be chosen per backend from
measurements (see ``benchmarks/``) without touching the transformation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["count_transitions"]


def count_transitions(levels: jax.Array, prev_levels: jax.Array) -> jax.Array:
  """Number of entries where ``levels != prev_levels``, as an exact int32 scalar.

  Args:
    levels: integer levels of one tensor at this step.
    prev_levels: integer levels of the same tensor at the previous step, same
      shape.

  Returns:
    An int32 scalar: the number of quantized weights that changed level.
  """
  return jnp.sum(levels != prev_levels, dtype=jnp.int32)
