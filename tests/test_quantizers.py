"""Tests of talr_optax.quantizers against hand-made cases and a NumPy reference.

The paper's conventions: weights of b >= 2 bits have levels
``round(clip(gamma * w / s, alpha, beta))`` with alpha = -2^(b-1),
beta = 2^(b-1) - 1, gamma = 2^(b-1); binary weights have code ``1[w > 0]`` in
{0, 1} (value 2 * code - 1); activations have alpha = 0, beta = 2^b - 1,
gamma = 2^b. ``round`` is half to even (as ``np.round``).

The quantizers run on every forward pass and check only ``bits`` (and
``multiply_scale``) per call; step sizes are checked once, by
``levels_fn_from_scales``.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from talr_optax import quantizers as q

ALL_BITS = list(range(1, 9))
MULTI_BITS = list(range(2, 9))
BAD_BITS = [0, 9, -1, 2.0, True, np.bool_(True), "2", None, np.float32(2.0)]


def _wrange(bits):
  """(alpha, beta, gamma) of the paper's weight quantizer, written out independently."""
  return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1, 2 ** (bits - 1)


def _np_weight_levels(w, s, bits):
  """NumPy reference, in float32 like the library (np.round is half to even)."""
  w = np.asarray(w, np.float32)
  s = np.asarray(s, np.float32)
  if bits == 1:
    return (w > 0).astype(np.int8)
  alpha, beta, gamma = _wrange(bits)
  u = np.float32(gamma) * w / s
  return np.round(np.clip(u, alpha, beta)).astype(np.int8)


# ---------------------------------------------------------------------------
# weight_levels: hand-made cases, every bit width.

# u = gamma * w / s; expected level written by hand (half to even, then clip).
# Columns: 0, .5, -.5, 1.5, -1.5, 2.5, .49, .51, beta-.5, alpha+.5,
#          alpha, beta, alpha-.5, beta+.5, alpha-10, beta+10
HAND_CASES = {
    2: ([0, .5, -.5, 1.5, -1.5, 2.5, .49, .51, .5, -1.5,
         -2, 1, -2.5, 1.5, -12, 11],
        [0, 0, 0, 1, -2, 1, 0, 1, 0, -2,
         -2, 1, -2, 1, -2, 1]),
    3: ([0, .5, -.5, 1.5, -1.5, 2.5, .49, .51, 2.5, -3.5,
         -4, 3, -4.5, 3.5, -14, 13],
        [0, 0, 0, 2, -2, 2, 0, 1, 2, -4,
         -4, 3, -4, 3, -4, 3]),
    4: ([0, .5, -.5, 1.5, -1.5, 2.5, .49, .51, 6.5, -7.5,
         -8, 7, -8.5, 7.5, -18, 17],
        [0, 0, 0, 2, -2, 2, 0, 1, 6, -8,
         -8, 7, -8, 7, -8, 7]),
    5: ([0, .5, -.5, 1.5, -1.5, 2.5, .49, .51, 14.5, -15.5,
         -16, 15, -16.5, 15.5, -26, 25],
        [0, 0, 0, 2, -2, 2, 0, 1, 14, -16,
         -16, 15, -16, 15, -16, 15]),
    6: ([0, .5, -.5, 1.5, -1.5, 2.5, .49, .51, 30.5, -31.5,
         -32, 31, -32.5, 31.5, -42, 41],
        [0, 0, 0, 2, -2, 2, 0, 1, 30, -32,
         -32, 31, -32, 31, -32, 31]),
    7: ([0, .5, -.5, 1.5, -1.5, 2.5, .49, .51, 62.5, -63.5,
         -64, 63, -64.5, 63.5, -74, 73],
        [0, 0, 0, 2, -2, 2, 0, 1, 62, -64,
         -64, 63, -64, 63, -64, 63]),
    8: ([0, .5, -.5, 1.5, -1.5, 2.5, .49, .51, 126.5, -127.5,
         -128, 127, -128.5, 127.5, -138, 137],
        [0, 0, 0, 2, -2, 2, 0, 1, 126, -128,
         -128, 127, -128, 127, -128, 127]),
}


@pytest.mark.parametrize("bits", MULTI_BITS)
@pytest.mark.parametrize("scale", [1.0, 0.25, 4.0])  # powers of 2: u is exact
def test_weight_levels_hand_cases(bits, scale):
  u, expected = HAND_CASES[bits]
  gamma = 2 ** (bits - 1)
  w = jnp.asarray(np.asarray(u, np.float32) * np.float32(scale) / gamma)
  levels = q.weight_levels(w, scale, bits)
  assert levels.dtype == jnp.int8
  assert levels.shape == w.shape
  np.testing.assert_array_equal(np.asarray(levels), np.asarray(expected, np.int8))


@pytest.mark.parametrize("scale", [1.0, 0.3, 7.0])
def test_weight_levels_binary_hand_cases(scale):
  w = np.asarray([0.0, -0.0, 1e-30, -1e-30, 1e-7, 0.3, -0.3, scale, -scale,
                  5 * scale, -5 * scale], np.float32)
  expected = [0, 0, 1, 0, 1, 1, 0, 1, 0, 1, 0]
  levels = q.weight_levels(jnp.asarray(w), scale, 1)
  assert levels.dtype == jnp.int8
  np.testing.assert_array_equal(np.asarray(levels), expected)


def test_weight_levels_binary_zero_is_minus_one_value():
  # w = 0 maps to code 0, i.e. to the value -1.
  assert int(q.weight_levels(jnp.zeros(()), 1.0, 1)) == 0
  assert float(q.fake_quant_weight(jnp.zeros(()), 1.0, 1, multiply_scale=False)) == -1.0
  assert float(q.fake_quant_weight(jnp.asarray(1e-30), 1.0, 1, multiply_scale=False)) == 1.0


def test_weight_levels_non_power_of_two_scale():
  # s = 0.3, 2 bits: u = 2 w / 0.3; values well away from half-integers.
  w = jnp.asarray([0.0, 0.05, 0.1, 0.2, -0.1, -0.2, -0.29, 0.4, -1.0])
  # u = 0, .333, .667, 1.333, -.667, -1.333, -1.933, 2.667, -6.667
  np.testing.assert_array_equal(
      np.asarray(q.weight_levels(w, 0.3, 2)), [0, 0, 1, 1, -1, -1, -2, 1, -2])


@pytest.mark.parametrize("bits", ALL_BITS)
def test_weight_levels_dtype_and_range(bits):
  w = jax.random.normal(jax.random.key(bits), (64,)) * 3.0
  levels = q.weight_levels(w, 0.5, bits)
  assert levels.dtype == jnp.int8
  alpha, beta, _ = _wrange(bits) if bits > 1 else (0, 1, 1)
  assert int(levels.min()) == alpha and int(levels.max()) == beta


def test_weight_levels_per_channel_scales():
  w = jnp.asarray([[0.3, 0.3, 0.3], [-0.6, -0.6, -0.6]])
  # 2 bits, gamma = 2. Column scales 0.5, 1, 2: u = 1.2, .6, .3 / -2.4, -1.2, -.6
  expected = [[1, 1, 0], [-2, -1, -1]]
  for scale in (jnp.asarray([[0.5, 1.0, 2.0]]), jnp.asarray([0.5, 1.0, 2.0]),
                np.asarray([0.5, 1.0, 2.0])):
    np.testing.assert_array_equal(np.asarray(q.weight_levels(w, scale, 2)), expected)
  # Row scales (2, 1): u = 2 w / s with s = 0.5 (row 0), 4 (row 1).
  rows = jnp.asarray([[0.5], [4.0]])
  np.testing.assert_array_equal(
      np.asarray(q.weight_levels(w, rows, 2)), [[1, 1, 1], [0, 0, 0]])


@pytest.mark.parametrize("bits", ALL_BITS)
def test_weight_levels_matches_numpy_reference(bits):
  rng = np.random.default_rng(100 + bits)
  w = rng.normal(size=(40, 8)).astype(np.float32)
  s = np.float32(3.0 * w.std())
  alpha, beta, gamma = _wrange(bits) if bits > 1 else (-1, 1, 1)
  # Exact half-integers and exact levels of u (s replaced by 1 for them).
  half = (rng.integers(alpha - 3, beta + 3, size=8) + 0.5) / gamma
  w_exact = np.concatenate([half, np.arange(alpha - 2, beta + 3) / gamma, [0.0]])
  w_exact = np.resize(w_exact, 300).astype(np.float32)  # one shape for all bits
  np.testing.assert_array_equal(
      np.asarray(q.weight_levels(jnp.asarray(w), s, bits)),
      _np_weight_levels(w, s, bits))
  np.testing.assert_array_equal(
      np.asarray(q.weight_levels(jnp.asarray(w_exact), 1.0, bits)),
      _np_weight_levels(w_exact, 1.0, bits))
  # Per-channel (last axis) scales.
  s_c = (3.0 * w.std(axis=0, keepdims=True)).astype(np.float32)
  np.testing.assert_array_equal(
      np.asarray(q.weight_levels(jnp.asarray(w), jnp.asarray(s_c), bits)),
      _np_weight_levels(w, s_c, bits))


# ---------------------------------------------------------------------------
# activation_levels


@pytest.mark.parametrize("bits", ALL_BITS)
def test_activation_levels_range_and_dtype(bits):
  x = jnp.linspace(-1.0, 3.0, 401)
  levels = q.activation_levels(x, 1.0, bits)
  assert levels.dtype == jnp.int32
  assert int(levels.min()) == 0
  assert int(levels.max()) == 2**bits - 1
  # Every level in between is reached (x covers [0, s] finely enough for b <= 6).
  if bits <= 6:
    assert set(np.unique(np.asarray(levels)).tolist()) == set(range(2**bits))


def test_activation_levels_hand_cases():
  # b = 1: gamma = 2, beta = 1: levels {0, 1}.
  x = jnp.asarray([-1.0, 0.0, 0.25, 0.26, 0.5, 3.0])
  np.testing.assert_array_equal(np.asarray(q.activation_levels(x, 1.0, 1)),
                                [0, 0, 0, 1, 1, 1])
  # b = 2, s = 1: gamma = 4, beta = 3; u = 4 x.
  x = jnp.asarray([-0.5, 0.0, 0.125, 0.375, 0.625, 0.75, 0.875, 2.0])
  np.testing.assert_array_equal(np.asarray(q.activation_levels(x, 1.0, 2)),
                                [0, 0, 0, 2, 2, 3, 3, 3])
  # b = 8: gamma = 256, beta = 255; s = 2, u = 128 x.
  x = jnp.asarray([2.0, 1.0, 254.5 / 128, 253.5 / 128, 255.5 / 128, 100.0])
  levels = q.activation_levels(x, 2.0, 8)
  assert levels.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(levels), [255, 128, 254, 254, 255, 255])


@pytest.mark.parametrize("bits", ALL_BITS)
def test_activation_levels_numpy_reference(bits):
  rng = np.random.default_rng(bits)
  x = np.abs(rng.normal(size=200)).astype(np.float32)
  s = np.float32(1.7)
  u = np.float32(2**bits) * x / s
  ref = np.round(np.clip(u, 0, 2**bits - 1)).astype(np.int32)
  np.testing.assert_array_equal(np.asarray(q.activation_levels(jnp.asarray(x), s, bits)), ref)


# ---------------------------------------------------------------------------
# fake_quant_weight / fake_quant_activation: values and STE gradients.


@pytest.mark.parametrize("bits", ALL_BITS)
def test_fake_quant_weight_values(bits):
  w = jax.random.normal(jax.random.key(7), (50,))
  s = 0.8
  levels = np.asarray(q.weight_levels(w, s, bits)).astype(np.float32)
  expected = 2 * levels - 1 if bits == 1 else levels / 2 ** (bits - 1)
  out = q.fake_quant_weight(w, s, bits, multiply_scale=False)
  assert out.dtype == w.dtype
  np.testing.assert_array_equal(np.asarray(out), expected)
  out_s = q.fake_quant_weight(w, s, bits, multiply_scale=True)
  np.testing.assert_allclose(np.asarray(out_s), expected * s, rtol=1e-7, atol=0)


def test_fake_quant_weight_hand_values():
  w = jnp.asarray([-1.0, -0.3, 0.0, 0.2, 0.3, 0.9])
  # 2 bits, s = 1: u = 2w -> levels -2, -1 (-0.6), 0, 0 (0.4), 1 (0.6), 1
  np.testing.assert_array_equal(np.asarray(q.fake_quant_weight(w, 1.0, 2, multiply_scale=False)),
                                [-1.0, -0.5, 0.0, 0.0, 0.5, 0.5])
  np.testing.assert_array_equal(np.asarray(q.fake_quant_weight(w, 1.0, 1, multiply_scale=False)),
                                [-1.0, -1.0, -1.0, 1.0, 1.0, 1.0])
  np.testing.assert_allclose(
      np.asarray(q.fake_quant_weight(w, 2.0, 1, multiply_scale=True)),
      [-2.0, -2.0, -2.0, 2.0, 2.0, 2.0])


@pytest.mark.parametrize("bits", MULTI_BITS)
@pytest.mark.parametrize("multiply_scale", [False, True])
def test_fake_quant_weight_ste_gradient(bits, multiply_scale):
  alpha, beta, gamma = _wrange(bits)
  s = 0.8
  lo, hi = alpha * s / gamma, beta * s / gamma  # clip edges in w
  inside = np.linspace(lo, hi, 23)[1:-1]
  outside = np.asarray([lo - 1e-3, lo - 5.0, hi + 1e-3, hi + 5.0])
  w = jnp.asarray(np.concatenate([inside, outside]), jnp.float32)
  c = jax.random.normal(jax.random.key(bits), w.shape)  # per-element cotangent
  grad = jax.grad(
      lambda w: jnp.sum(c * q.fake_quant_weight(w, s, bits, multiply_scale=multiply_scale)))(w)
  inner = 1.0 if multiply_scale else 1.0 / s
  expected = np.concatenate([np.full(inside.size, inner), np.zeros(outside.size)])
  np.testing.assert_allclose(np.asarray(grad), np.asarray(c) * expected, rtol=1e-6)


@pytest.mark.parametrize("multiply_scale", [False, True])
def test_fake_quant_weight_binary_ste_gradient(multiply_scale):
  s = 0.5
  w = jnp.asarray([-0.49, -0.2, 0.0, 1e-3, 0.3, 0.49, -0.51, 0.51, -3.0, 3.0])
  grad = jax.grad(
      lambda w: jnp.sum(q.fake_quant_weight(w, s, 1, multiply_scale=multiply_scale)))(w)
  inner = 1.0 if multiply_scale else 1.0 / s
  np.testing.assert_allclose(np.asarray(grad), [inner] * 6 + [0.0] * 4, rtol=1e-6)


def test_fake_quant_weight_per_channel_gradient():
  s = jnp.asarray([[0.5, 1.0, 2.0]])
  w = jnp.asarray([[0.1, 0.1, 0.1], [-0.2, -0.2, -0.2], [5.0, 5.0, 5.0]])
  grad = jax.grad(lambda w: jnp.sum(q.fake_quant_weight(w, s, 2, multiply_scale=False)))(w)
  np.testing.assert_allclose(
      np.asarray(grad), [[2.0, 1.0, 0.5], [2.0, 1.0, 0.5], [0.0, 0.0, 0.0]], rtol=1e-6)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_fake_quant_activation_values_and_gradients(bits):
  gamma, beta = 2**bits, 2**bits - 1
  s = 1.5
  hi = beta * s / gamma
  inside = np.linspace(0.0, hi, 13)[1:-1]
  outside = np.asarray([-1.0, -1e-3, hi + 1e-3, hi + 4.0])
  x = jnp.asarray(np.concatenate([inside, outside]), jnp.float32)
  out = q.fake_quant_activation(x, s, bits)
  levels = np.asarray(q.activation_levels(x, s, bits)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(out), levels / gamma)
  c = jax.random.normal(jax.random.key(bits), x.shape)
  loss = lambda x, s: jnp.sum(c * q.fake_quant_activation(x, s, bits))
  gx, gs = jax.grad(loss, argnums=(0, 1))(x, jnp.float32(s))
  mask = np.concatenate([np.ones(inside.size), np.zeros(outside.size)])
  np.testing.assert_allclose(np.asarray(gx), np.asarray(c) * mask / s, rtol=1e-6)
  # d/ds of the STE value (gamma x / s) / gamma = -x / s^2 inside, 0 where clipped.
  expected_gs = float(np.sum(np.asarray(c) * mask * -np.asarray(x) / s**2))
  assert float(gs) != 0.0
  np.testing.assert_allclose(float(gs), expected_gs, rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("bits", [1, 2, 8])
def test_fake_quant_preserves_dtype(dtype, bits):
  w = jnp.asarray([-0.7, -0.1, 0.0, 0.2, 0.9], dtype)
  for scale in (0.5, jnp.asarray(0.5, jnp.float32)):
    assert q.fake_quant_weight(w, scale, bits, multiply_scale=False).dtype == dtype
    assert q.fake_quant_weight(w, scale, bits, multiply_scale=True).dtype == dtype
    assert q.fake_quant_activation(jnp.abs(w), scale, bits).dtype == dtype
  # Values are exact in bf16 (levels / 2^k with few significant bits).
  ref = q.fake_quant_weight(w.astype(jnp.float32), 0.5, bits, multiply_scale=False)
  np.testing.assert_array_equal(
      np.asarray(q.fake_quant_weight(w, 0.5, bits, multiply_scale=False).astype(jnp.float32)),
      np.asarray(ref))


def _fq_times_scale(w, scale, bits):
  return q.fake_quant_weight(w, scale, bits, multiply_scale=True)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_low_precision_levels_equal_float32_levels_of_the_same_values(bits):
  """u = gamma * w / s is computed in float32: no double rounding through bfloat16."""
  w32 = np.random.default_rng(bits).normal(0.0, 0.3, 4096).astype(np.float32)
  w16 = jnp.asarray(w32, jnp.bfloat16)
  up = w16.astype(jnp.float32)  # the same values, exactly
  x16, xup = jnp.abs(w16), jnp.abs(up)
  for scale in (0.9, jnp.asarray(0.9, jnp.float32), jnp.asarray(0.9, jnp.bfloat16)):
    s32 = jnp.asarray(scale, jnp.float32)
    np.testing.assert_array_equal(np.asarray(q.weight_levels(w16, scale, bits)),
                                  np.asarray(q.weight_levels(up, s32, bits)))
    np.testing.assert_array_equal(np.asarray(q.activation_levels(x16, scale, bits)),
                                  np.asarray(q.activation_levels(xup, s32, bits)))
    # Float results: computed in float32, rounded to bfloat16 once.
    for fn, a, b in ((_fq_times_scale, w16, up), (q.fake_quant_activation, x16, xup),
                     (q.distance_to_transition, w16, up)):
      out = fn(a, scale, bits)
      assert out.dtype == jnp.bfloat16, fn.__name__
      np.testing.assert_array_equal(np.asarray(out.astype(jnp.float32)),
                                    np.asarray(fn(b, s32, bits).astype(jnp.bfloat16)
                                               .astype(jnp.float32)), err_msg=fn.__name__)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("multiply_scale", [False, True])
def test_low_precision_fake_quant_ste_gradients(dtype, multiply_scale):
  """Gradients still flow through the float32 computation, in the input's dtype."""
  w = jnp.asarray([-1.5, -0.3, 0.1, 0.45, 2.0], dtype)  # |w| > s = 1: clipped
  s = 1.0
  gw = jax.grad(lambda w: jnp.sum(
      q.fake_quant_weight(w, s, 2, multiply_scale=multiply_scale).astype(jnp.float32)))(w)
  assert gw.dtype == dtype
  inside = np.asarray([0.0, 1.0, 1.0, 1.0, 0.0])
  expected = inside * (1.0 if multiply_scale else 1.0 / s)
  np.testing.assert_array_equal(np.asarray(gw, np.float32), expected)
  x = jnp.abs(w)
  gx, gs = jax.grad(lambda x, s: jnp.sum(q.fake_quant_activation(x, s, 2).astype(jnp.float32)),
                    argnums=(0, 1))(x, jnp.asarray(1.0, dtype))
  assert gx.dtype == dtype and gs.dtype == dtype
  np.testing.assert_array_equal(np.asarray(gx, np.float32), [0.0, 1.0, 1.0, 1.0, 0.0])
  assert float(gs) != 0.0


# ---------------------------------------------------------------------------
# Initial scales.


def test_initial_weight_scale():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(3, 4, 5)).astype(np.float32) * 0.2
  s = q.initial_weight_scale(jnp.asarray(w))
  assert s.shape == ()
  np.testing.assert_allclose(float(s), 3.0 * np.std(w), rtol=1e-5)
  s0 = q.initial_weight_scale(jnp.asarray(w), axis=0)
  assert s0.shape == (1, 4, 5)
  np.testing.assert_allclose(np.asarray(s0), 3.0 * np.std(w, axis=0, keepdims=True), rtol=1e-5)
  s01 = q.initial_weight_scale(jnp.asarray(w), axis=(0, 1))
  assert s01.shape == (1, 1, 5)
  np.testing.assert_allclose(
      np.asarray(s01), 3.0 * np.std(w, axis=(0, 1), keepdims=True), rtol=1e-5)
  # The per-channel scale broadcasts against w.
  assert q.weight_levels(jnp.asarray(w), s01, 2).shape == w.shape
  # Hand case: std of [-1, 1] is 1.
  np.testing.assert_allclose(float(q.initial_weight_scale(jnp.asarray([-1.0, 1.0]))), 3.0)


def test_initial_activation_scale():
  rng = np.random.default_rng(1)
  x = np.maximum(rng.normal(size=(8, 16)), 0).astype(np.float32)
  s = q.initial_activation_scale(jnp.asarray(x))
  assert s.shape == ()
  np.testing.assert_allclose(float(s), 3.0 * np.std(x) / np.sqrt(1.0 - 2.0 / np.pi), rtol=1e-5)
  # Hand case: std of [0, 2] is 1.
  np.testing.assert_allclose(float(q.initial_activation_scale(jnp.asarray([0.0, 2.0]))),
                             3.0 / math.sqrt(1.0 - 2.0 / math.pi), rtol=1e-6)


# ---------------------------------------------------------------------------
# distance_to_transition


@pytest.mark.parametrize("bits", MULTI_BITS)
def test_distance_to_transition(bits):
  alpha, beta, gamma = _wrange(bits)
  s = 2.0
  # Half-integers inside the range: on a transition point (0).
  halves = np.arange(alpha, beta) + 0.5
  # Levels, and beyond the clip edges: 0.5.
  levels = np.concatenate([np.arange(alpha, beta + 1),
                           [alpha - 0.5, alpha - 3.25, beta + 0.5, beta + 7.75]])
  # Quarter points: 0.25.
  quarters = np.asarray([0.25, -0.25, 0.75, -0.75, alpha + 0.25, beta - 0.25])
  u = np.concatenate([halves, levels, quarters])
  expected = np.concatenate([np.zeros(halves.size), np.full(levels.size, 0.5),
                             np.full(quarters.size, 0.25)])
  # One shape for every bit width (cyclic padding) so eager ops compile once.
  u, expected = np.resize(u, 300), np.resize(expected, 300)
  w = jnp.asarray(u * s / gamma, jnp.float32)  # exact: gamma and s are powers of 2
  np.testing.assert_array_equal(np.asarray(q.distance_to_transition(w, s, bits)), expected)


def test_distance_to_transition_hand_2bit():
  # s = 1, gamma = 2: u = 2w.
  w = jnp.asarray([0.25, 0.5, 3.0, 0.125, -0.875, 0.45, -0.05])
  np.testing.assert_allclose(np.asarray(q.distance_to_transition(w, 1.0, 2)),
                             [0.0, 0.5, 0.5, 0.25, 0.25, 0.4, 0.4], atol=1e-6)


def test_distance_to_transition_binary():
  w = jnp.asarray([0.0, 0.5, -0.5, 2.0, -2.0, 1.0])
  np.testing.assert_allclose(np.asarray(q.distance_to_transition(w, 1.0, 1)),
                             [0.0, 0.5, 0.5, 1.0, 1.0, 1.0])
  np.testing.assert_allclose(np.asarray(q.distance_to_transition(w, 2.0, 1)),
                             [0.0, 0.25, 0.25, 1.0, 1.0, 0.5])


# ---------------------------------------------------------------------------
# levels_fn_from_scales


def _params():
  return {
      "w": jnp.asarray([[0.3, -0.2, 0.05], [0.6, -0.7, 0.12]]),
      "b": jnp.asarray([0.1, -0.2, 0.3]),
      "layer": {"k": jnp.asarray([[0.4, -0.4], [0.1, 0.9]])},
  }


def test_levels_fn_from_scales_basic():
  params = _params()
  scales = {"w": 0.5, "b": None, "layer": {"k": jnp.asarray([1.0, 0.25])}}
  levels = q.levels_fn_from_scales(scales, 2)(params)
  assert levels["b"] is None
  assert levels["w"].dtype == jnp.int8 and levels["layer"]["k"].dtype == jnp.int8
  # u = 4 w: 1.2, -.8, .2 / 2.4, -2.8, .48
  np.testing.assert_array_equal(np.asarray(levels["w"]), [[1, -1, 0], [1, -2, 0]])
  # column scales 1, .25: u = [[.8, -3.2], [.2, 7.2]]
  np.testing.assert_array_equal(np.asarray(levels["layer"]["k"]), [[1, -2], [0, 1]])


def test_levels_fn_from_scales_per_leaf_bits():
  params = _params()
  scales = {"w": 0.5, "b": None, "layer": {"k": 1.0}}
  bits = {"w": 1, "b": None, "layer": {"k": 4}}
  levels = q.levels_fn_from_scales(scales, bits)(params)
  assert levels["b"] is None
  np.testing.assert_array_equal(np.asarray(levels["w"]), [[1, 0, 1], [1, 0, 1]])
  np.testing.assert_array_equal(np.asarray(levels["layer"]["k"]),
                                np.asarray(q.weight_levels(params["layer"]["k"], 1.0, 4)))
  # u = 8 k: 3.2, -3.2, .8, 7.2
  np.testing.assert_array_equal(np.asarray(levels["layer"]["k"]), [[3, -3], [1, 7]])


def test_levels_fn_from_scales_masked_and_none_leaves():
  params = _params()
  scales = {"w": 0.5, "b": None, "layer": {"k": 1.0}}
  levels_fn = q.levels_fn_from_scales(scales, 2)
  masked = dict(params, w=optax.MaskedNode())
  levels = levels_fn(masked)
  assert levels["w"] is None and levels["b"] is None
  assert levels["layer"]["k"].dtype == jnp.int8
  # A None param leaf gives None too.
  levels = levels_fn(dict(params, w=None))
  assert levels["w"] is None


def test_levels_fn_from_scales_structure_errors():
  scales = {"w": 0.5, "b": None, "layer": {"k": 1.0}}
  levels_fn = q.levels_fn_from_scales(scales, 2)
  with pytest.raises(ValueError, match="structure"):
    levels_fn({"w": jnp.ones(3), "b": jnp.ones(3)})
  with pytest.raises(ValueError, match="bits"):
    q.levels_fn_from_scales(scales, {"w": 2, "b": None})
  with pytest.raises(ValueError, match=r"bits.*\[1, 8\]"):
    q.levels_fn_from_scales(scales, {"w": 2, "b": None, "layer": {"k": 9}})
  with pytest.raises(ValueError, match="bits"):
    q.levels_fn_from_scales(scales, "2")
  with pytest.raises(ValueError, match="scales"):
    q.levels_fn_from_scales({"w": None, "b": None}, 2)
  with pytest.raises(ValueError, match=r"params do not have the structure of the scales"):
    levels_fn({"w": jnp.ones(3), "b": jnp.ones(3), "layer": {"k": jnp.ones(2), "j": None}})


@pytest.mark.parametrize("scale, shown", [
    (np.asarray([1.0, 0.0, 2.0]), r"array\(\[1\., 0\., 2\.\]\)"),
    (jnp.asarray([[0.5, -1.0, 1.0]]), "Array"),
    (np.asarray([1.0, np.inf]), "inf"),
    (jnp.asarray([np.nan, 1.0], jnp.bfloat16), "nan"),
    (np.zeros((0,)), r"array\(\[\]"),
    (object(), "object"),
], ids=["array-zero", "array-negative", "array-inf", "bf16-nan", "empty", "object"])
def test_levels_fn_from_scales_rejects_bad_per_channel_scales(scale, shown):
  # The path of the leaf and the value given are in the message.
  with pytest.raises(ValueError, match=rf"scales\['layer/k'\] must be a finite step size > 0"
                                       rf".*got scales\['layer/k'\] = .*{shown}"):
    q.levels_fn_from_scales({"w": 0.5, "layer": {"k": scale}}, 2)


def test_levels_fn_from_scales_accepts_good_per_channel_and_boxed_scales():
  fn = q.levels_fn_from_scales({"w": np.asarray([[0.5, 1.0, 2.0]], np.float32), "b": None,
                                "layer": {"k": jnp.asarray(1.0, jnp.bfloat16)}}, 2)
  levels = fn(_params())
  # u = 2 w / s with column scales 0.5, 1, 2: [[1.2, -0.4, 0.05], [2.4, -1.4, 0.12]].
  np.testing.assert_array_equal(levels["w"], [[1, 0, 0], [1, -1, 0]])
  np.testing.assert_array_equal(levels["layer"]["k"], [[1, -1], [0, 1]])


@pytest.mark.parametrize("scale", ["0.5", True], ids=["string", "bool"])
def test_levels_fn_from_scales_rejects_non_numeric_scales(scale):
  with pytest.raises(ValueError, match=r"scales\['w'\] must be a finite step size"):
    q.levels_fn_from_scales({"w": scale}, 2)


def test_levels_fn_from_scales_called_with_a_step_count_says_what_to_do():
  # optax.inject_hyperparams without static_args calls levels_fn with the count.
  fn = q.levels_fn_from_scales({"w": 0.5, "b": None}, 2)
  with pytest.raises(ValueError, match=r"step count.*static_args=\('levels_fn',\)"):
    fn(jnp.asarray(0, jnp.int32))


@pytest.mark.parametrize("bits", [0, 9, 2.0, True, "2"])
def test_levels_fn_from_scales_bad_int_bits(bits):
  with pytest.raises(ValueError, match="bits"):
    q.levels_fn_from_scales({"w": 1.0}, bits)


# ---------------------------------------------------------------------------
# Bad input.

_FNS = [
    lambda x, s, b: q.weight_levels(x, s, b),
    lambda x, s, b: q.activation_levels(x, s, b),
    lambda x, s, b: q.fake_quant_weight(x, s, b, multiply_scale=True),
    lambda x, s, b: q.fake_quant_activation(x, s, b),
    lambda x, s, b: q.distance_to_transition(x, s, b),
]
_FN_IDS = ["weight_levels", "activation_levels", "fake_quant_weight",
           "fake_quant_activation", "distance_to_transition"]


@pytest.mark.parametrize("fn", _FNS, ids=_FN_IDS)
@pytest.mark.parametrize("bits", BAD_BITS, ids=repr)
def test_bad_bits(fn, bits):
  with pytest.raises(ValueError, match=r"bits.*\[1, 8\]"):
    fn(jnp.ones(3), 1.0, bits)


def test_multiply_scale_is_required_and_a_bool():
  w = jnp.asarray([0.3, -0.3])
  with pytest.raises(TypeError, match="multiply_scale"):
    q.fake_quant_weight(w, 1.0, 2)  # pylint: disable=missing-kwoa
  with pytest.raises(TypeError):
    q.fake_quant_weight(w, 1.0, 2, True)  # keyword-only  # pylint: disable=too-many-function-args
  for bad in ("yes", 1, None, jnp.asarray(True)):
    with pytest.raises(ValueError, match="multiply_scale must be True or False"):
      q.fake_quant_weight(w, 1.0, 2, multiply_scale=bad)
  assert q.fake_quant_weight(w, 1.0, 2, multiply_scale=np.bool_(True)).shape == (2,)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_step_sizes_are_not_checked_per_call_and_the_result_is_defined(jit):
  # A zero step size makes u = +-inf (outer levels) or NaN (level of w = 0);
  # no error, no host read-back, the same eager and jitted.
  w = jnp.asarray([-1.0, 0.0, 1.0])
  levels = jax.jit(q.weight_levels, static_argnums=2) if jit else q.weight_levels
  np.testing.assert_array_equal(levels(w, 0.0, 2), [-2, 0, 1])
  np.testing.assert_array_equal(levels(w, jnp.asarray([1.0, 0.0, -1.0]), 2), [-2, 0, -2])
  fq = lambda w, s: q.fake_quant_weight(w, s, 2, multiply_scale=False)
  fq = jax.jit(fq) if jit else fq
  np.testing.assert_array_equal(fq(w, jnp.float32(0.5)), [-1.0, 0.0, 0.5])


@pytest.mark.parametrize("bits", [np.int64(2), np.int8(3), np.int32(1)], ids=repr)
def test_numpy_integer_bits_accepted(bits):
  w = jnp.asarray([0.3, -0.3, 0.05])
  np.testing.assert_array_equal(np.asarray(q.weight_levels(w, 1.0, bits)),
                                np.asarray(q.weight_levels(w, 1.0, int(bits))))
  np.testing.assert_array_equal(
      np.asarray(q.fake_quant_weight(w, 1.0, bits, multiply_scale=False)),
      np.asarray(q.fake_quant_weight(w, 1.0, int(bits), multiply_scale=False)))


def test_levels_fn_from_scales_numpy_integer_bits():
  fn = q.levels_fn_from_scales({"w": 1.0, "b": None}, np.int64(2))
  levels = fn({"w": jnp.asarray([0.3, -0.3]), "b": jnp.zeros(2)})
  np.testing.assert_array_equal(np.asarray(levels["w"]), [1, -1])


# ---------------------------------------------------------------------------
# jit


@pytest.mark.parametrize("bits", [1, 2, 8])
def test_under_jit_with_python_float_scale(bits):
  w = jax.random.normal(jax.random.key(3), (50,))
  s = 0.8
  fns = {
      "levels": lambda w: q.weight_levels(w, s, bits),
      "act": lambda w: q.activation_levels(jnp.abs(w), s, bits),
      "fq": lambda w: q.fake_quant_weight(w, s, bits, multiply_scale=False),
      "fqs": lambda w: q.fake_quant_weight(w, s, bits, multiply_scale=True),
      "fqa": lambda w: q.fake_quant_activation(jnp.abs(w), s, bits),
      "dist": lambda w: q.distance_to_transition(w, s, bits),
  }
  for name, fn in fns.items():
    out = jax.jit(fn)(w)
    ref = fn(w)
    assert out.dtype == ref.dtype, name
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-6, err_msg=name)
  np.testing.assert_array_equal(np.asarray(jax.jit(fns["levels"])(w)),
                                _np_weight_levels(np.asarray(w), s, bits))


def test_under_jit_with_traced_scale():
  w = jax.random.normal(jax.random.key(4), (16,))
  f = jax.jit(lambda w, s: q.weight_levels(w, s, 3))
  np.testing.assert_array_equal(np.asarray(f(w, jnp.float32(0.9))),
                                _np_weight_levels(np.asarray(w), np.float32(0.9), 3))
  g = jax.jit(jax.grad(lambda s, x: jnp.sum(q.fake_quant_activation(x, s, 2))))
  assert np.isfinite(float(g(jnp.float32(1.0), jnp.abs(w))))
