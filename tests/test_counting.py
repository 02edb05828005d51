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


# ---------------------------------------------------------------------------
# count_transitions_packed: 4 int8 levels per uint32 word.

from talr_optax.counting import count_transitions_packed  # noqa: E402


@pytest.mark.parametrize("shape", [(4,), (8,), (12,), (3, 8), (2, 3, 12), (3, 3, 4, 8),
                                   (5, 1024), (), (3,), (2, 5), (3, 3, 3, 6)])
@pytest.mark.parametrize("p_flip", [0.0, 0.3, 1.0])
def test_packed_matches_numpy_on_random_levels(shape, p_flip):
  rng = np.random.default_rng(sum(shape) + len(shape) + int(10 * p_flip))
  a = rng.integers(-128, 128, size=shape).astype(np.int8)
  flip = rng.random(size=shape) < p_flip
  # A changed level always differs (add 1..255 modulo 256).
  b = np.where(flip, (a.astype(np.int64) + rng.integers(1, 256, size=shape) + 128) % 256 - 128,
               a).astype(np.int8)
  for fn in (count_transitions_packed, jax.jit(count_transitions_packed)):
    got = fn(jnp.asarray(a), jnp.asarray(b))
    assert got.dtype == jnp.int32
    assert int(got) == int(np.count_nonzero(a != b))


def test_packed_extreme_values():
  a = jnp.array([[-128, 127, 0, 5, -128, -1, 1, 127]], jnp.int8)
  b = jnp.array([[127, -128, 0, 5, -128, 0, -1, 126]], jnp.int8)
  assert int(count_transitions_packed(a, b)) == 5
  assert int(count_transitions_packed(a, a)) == 0


@pytest.mark.parametrize("old,new", [(0, 1), (0, -128), (-128, 127), (127, -128), (-1, 0),
                                     (1, 2), (0, 64), (0, 16), (5, -5)])
def test_packed_every_byte_position_and_bit_is_counted(old, new):
  # One changed byte at each position of a word (and of the row): exactly one.
  for n in (4, 8, 12):
    for pos in range(n):
      a = np.full((2, n), old, np.int8)
      b = a.copy()
      b[1, pos] = new
      assert int(count_transitions_packed(jnp.asarray(a), jnp.asarray(b))) == 1, (n, pos)
  # Every subset of the 4 bytes of a word changed.
  for mask in range(16):
    a = np.full((4,), old, np.int8)
    b = a.copy()
    for pos in range(4):
      if mask >> pos & 1:
        b[pos] = new
    assert int(count_transitions_packed(jnp.asarray(a), jnp.asarray(b))) == bin(mask).count("1")


def test_packed_single_bit_differences():
  # Levels that differ in exactly one bit, every bit of every byte.
  a = np.zeros((8, 32), np.int8)
  b = a.copy()
  for bit in range(8):
    b[bit] = np.int8(np.uint8(1 << bit).view(np.int8))
  assert int(count_transitions_packed(jnp.asarray(a), jnp.asarray(b))) == 8 * 32


def test_packed_exact_beyond_float32_integer_range():
  rows = 4097
  a = jnp.zeros((rows, 4096), jnp.int8)
  b = jnp.full((rows, 4096), -1, jnp.int8)
  assert int(jax.jit(count_transitions_packed)(a, b)) == rows * 4096


def test_packed_falls_back_for_wide_ints_and_checks_shapes():
  a = jnp.array([300, 2, 3, 4], jnp.int32)
  b = jnp.array([301, 2, 4, 4], jnp.int32)
  assert int(count_transitions_packed(a, b)) == 2
  with pytest.raises(ValueError, match="same shape"):
    count_transitions_packed(jnp.zeros(4, jnp.int8), jnp.zeros(8, jnp.int8))
