"""count_transitions is exact for every shape against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from talr_optax import count_transitions


@pytest.mark.parametrize("shape", [(), (1,), (7,), (3, 5), (3, 3, 4, 6), (2, 1, 13)])
def test_matches_numpy_on_random_levels(shape):
  rng = np.random.default_rng(sum(shape) + len(shape))
  a = rng.integers(-128, 128, size=shape).astype(np.int8)
  b = a.copy()
  flip = rng.random(size=shape) < 0.3
  b = np.where(flip, rng.integers(-128, 128, size=shape), b).astype(np.int8)
  got = count_transitions(jnp.asarray(a), jnp.asarray(b))
  assert got.dtype == jnp.int32
  assert int(got) == int(np.count_nonzero(a != b))


def test_extreme_levels_differ_by_255_and_are_counted_once():
  a = jnp.array([-128, 127, 0, 5], jnp.int8)
  b = jnp.array([127, -128, 0, 5], jnp.int8)
  assert int(count_transitions(a, b)) == 2


def test_wide_int_levels_use_exact_integer_path():
  a = jnp.array([300, 2, 3], jnp.int32)
  b = jnp.array([301, 2, 4], jnp.int32)
  assert int(count_transitions(a, b)) == 2


def test_exact_beyond_float32_integer_range_per_tensor():
  # 2^24 + 3 changed entries over many rows: a float32 total would round.
  rows = 4097
  a = jnp.zeros((rows, 4096), jnp.int8)
  b = jnp.ones((rows, 4096), jnp.int8)
  assert int(jax.jit(count_transitions)(a, b)) == rows * 4096


def test_shape_mismatch_is_an_error():
  with pytest.raises(ValueError, match="same shape"):
    count_transitions(jnp.zeros(3, jnp.int8), jnp.zeros(4, jnp.int8))
