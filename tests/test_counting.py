"""count_transitions is exact against NumPy; the sampling grid is what it says."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import talr_optax as talr
from talr_optax import count_transitions
from talr_optax.counting import sample_strides, take_sample


def _pair(shape, seed=0, dtype=np.int8):
  rng = np.random.default_rng(seed + sum(shape) + len(shape))
  a = rng.integers(-128, 128, size=shape).astype(dtype)
  b = np.where(rng.random(size=shape) < 0.3, rng.integers(-128, 128, size=shape), a)
  return a, b.astype(dtype)


@pytest.mark.parametrize("shape", [(), (1,), (7,), (3, 5), (3, 3, 4, 6), (2, 1, 13)])
def test_matches_numpy(shape):
  a, b = _pair(shape)
  got = count_transitions(jnp.asarray(a), jnp.asarray(b))
  assert got.dtype == jnp.int32 and got.shape == ()
  assert int(got) == int(np.count_nonzero(a != b))


@pytest.mark.parametrize("shape,axis", [((4, 7), 0), ((4, 7), 1), ((3, 5, 6), 0),
                                        ((3, 5, 6), 1), ((3, 5, 6), -1), ((5,), 0)])
def test_per_slice_counts_match_numpy(shape, axis):
  a, b = _pair(shape, seed=1)
  got = count_transitions(jnp.asarray(a), jnp.asarray(b), axis=axis)
  want = np.count_nonzero(np.moveaxis(a != b, axis, 0).reshape(shape[axis], -1), axis=1)
  assert got.dtype == jnp.int32 and got.shape == (shape[axis],)
  np.testing.assert_array_equal(got, want)


def test_extreme_levels_are_counted_once():
  a = jnp.array([-128, 127, 0, 5], jnp.int8)
  b = jnp.array([127, -128, 0, 5], jnp.int8)
  assert int(count_transitions(a, b)) == 2


def test_wide_int_levels_use_the_integer_path():
  a = jnp.array([300, 2, 3], jnp.int32)
  b = jnp.array([301, 2, 4], jnp.int32)
  assert int(count_transitions(a, b)) == 2


def test_exact_beyond_the_float32_integer_range():
  rows = 4097  # 2^24 + 4096 changes: a float32 total would round
  a = jnp.zeros((rows, 4096), jnp.int8)
  assert int(jax.jit(count_transitions)(a, a + 1)) == rows * 4096


def test_bad_input_is_a_clear_error():
  with pytest.raises(ValueError, match="same shape"):
    count_transitions(jnp.zeros(3, jnp.int8), jnp.zeros(4, jnp.int8))
  with pytest.raises(ValueError, match="integer quantization levels.*float32"):
    count_transitions(jnp.zeros(3), jnp.zeros(3))


@pytest.mark.parametrize("shape,n,axis", [
    ((3, 3, 256, 448), 65536, None), ((4096, 1024), 65536, None), ((10, 10), 7, None),
    ((12, 64, 256), 1000, 0), ((12, 64, 256), 300, 2), ((100000,), 65536, None)])
def test_sample_grid_is_spread_and_within_budget(shape, n, axis):
  strides = sample_strides(shape, n, axis)
  per_slice = [d for i, d in enumerate(shape) if axis is None or i != axis % len(shape)]
  points = [-(-shape[i] // s) for i, s in enumerate(strides)
            if axis is None or i != axis % len(shape)]
  assert math.prod(points) <= n
  assert math.prod(points) >= n / 4, "the grid should use most of the budget"
  if axis is not None:
    assert strides[axis % len(shape)] == 1
  # Every axis with more points than the budget's even share is thinned: no
  # single contiguous block.
  assert sum(s > 1 for s in strides) >= 1
  x = jnp.arange(math.prod(shape), dtype=jnp.int32).reshape(shape)
  sample = take_sample(x, strides)
  assert sample.size == math.prod(points) * (1 if axis is None else shape[axis])
  del per_slice


def test_small_tensors_are_counted_exactly():
  assert sample_strides((3, 4), 12) is None
  assert sample_strides((5, 3, 4), 12, layer_axis=0) is None
  x = jnp.ones((3, 4))
  assert take_sample(x, None) is x


def _sampled_run(sample_size, steps=40):
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(64, 96)).astype(np.float32)),
            "s": jnp.asarray(rng.normal(size=(3, 40, 50)).astype(np.float32))}
  levels_fn = talr.levels_fn_from_scales({"w": 3.0, "s": 3.0}, 2)
  tx = talr.scale_by_talr(0.02, levels_fn, learning_rate=0.05, ema_momentum=0.9,
                          layer_axes={"w": None, "s": 0}, sample_size=sample_size)
  state = tx.init(params)
  update = jax.jit(tx.update)
  history = []
  for _ in range(steps):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    before = params
    upd, state = update(grads, state, params)
    params = optax.apply_updates(params, upd)
    history.append((before, params, state))
  return levels_fn, history


def test_sampled_rates_are_the_rates_of_the_grid():
  n = 500
  levels_fn, history = _sampled_run(n)
  sw = sample_strides((64, 96), n)
  ss = sample_strides((3, 40, 50), n, 0)
  for before, after, state in history:
    old, new = levels_fn(before), levels_fn(after)
    want_w = np.mean(np.asarray(take_sample(old["w"], sw) != take_sample(new["w"], sw)))
    diff_s = np.asarray(take_sample(old["s"], ss) != take_sample(new["s"], ss))
    want_s = diff_s.reshape(3, -1).mean(axis=1)
    names = state.rate_names.names
    assert names == ("s[0]", "s[1]", "s[2]", "w")
    np.testing.assert_allclose(state.transition_rate, [*want_s, want_w], rtol=1e-6)
  # The state keeps only the sampled levels: at most n bytes per rate group.
  prev = history[-1][2].prev_levels
  assert prev["w"].size <= n and prev["s"].size <= 3 * n
  assert prev["w"].dtype == jnp.int8


def test_sample_size_above_every_tensor_is_exact_counting():
  _, sampled = _sampled_run(10**6, steps=10)
  _, exact = _sampled_run(None, steps=10)
  for (_, _, a), (_, _, b) in zip(sampled, exact):
    np.testing.assert_array_equal(a.transition_rate, b.transition_rate)
    np.testing.assert_array_equal(a.talr, b.talr)


# ---------------------------------------------------------------------------
# The edges: prime axes, the exact grid, pooling by true size, wide levels.


def _moving_run(tx, params, steps, seed=0, scale=0.8):
  """(levels before, levels after, state) per step of random steps under jit."""
  rng = np.random.default_rng(seed)
  state = tx.init(params)
  update = jax.jit(tx.update)
  out = []
  for _ in range(steps):
    g = jax.tree.map(lambda p: jnp.asarray(scale * rng.normal(size=p.shape), p.dtype), params)
    u, state = update(g, state, params)
    new = optax.apply_updates(params, u)
    out.append((params, new, state))
    params = new
  return out


def test_sample_grid_of_prime_axes_by_hand():
  # 13 x 17 with a budget of 20: rows thinned to <= 4 (sqrt(20) = 4), by the
  # plain strides 2, 3, 4 (13 has no divisor); then the last axis by 2, 3, 4
  # until 4 x 5 = 20 points. The grid starts at 0 and reaches the last index
  # of both axes (12 and 16): a split into (size // stride) blocks would not.
  assert sample_strides((13, 17), 20) == (4, 4)
  x = np.arange(13 * 17).reshape(13, 17)
  want = x[np.ix_([0, 4, 8, 12], [0, 4, 8, 12, 16])]
  np.testing.assert_array_equal(take_sample(jnp.asarray(x), (4, 4)), want)
  # A stride that divides its axis takes the same indices by a reshape.
  y = np.arange(12 * 7 * 10).reshape(12, 7, 10)
  np.testing.assert_array_equal(take_sample(jnp.asarray(y), (1, 3, 5)),
                                y[:, [0, 3, 6]][:, :, [0, 5]])
  np.testing.assert_array_equal(take_sample(jnp.asarray(y), (4, 7, 2)),
                                y[[0, 4, 8]][:, [0]][:, :, [0, 2, 4, 6, 8]])


@pytest.mark.parametrize("shape, n, axis", [((13, 17), 20, None), ((7, 11, 13), 30, None),
                                            ((5, 29, 31), 50, 0), ((23, 19, 3), 40, 2)])
def test_sample_grid_is_every_stride_th_index_from_zero(shape, n, axis):
  strides = sample_strides(shape, n, axis)
  x = np.arange(math.prod(shape)).reshape(shape)
  want = x[np.ix_(*[np.arange(0, d, s) for d, s in zip(shape, strides)])]
  np.testing.assert_array_equal(take_sample(jnp.asarray(x), strides), want)


@pytest.mark.parametrize("axis", [None, 0, 2])
def test_sampled_rates_on_prime_axes_are_the_rates_of_the_grid(axis):
  shape = (5, 13, 17) if axis is not None else (13, 17)
  axis = None if axis is None else axis % len(shape)
  rng = np.random.default_rng(3)
  params = {"w": jnp.asarray(rng.normal(size=shape).astype(np.float32))}
  levels_fn = talr.levels_fn_from_scales({"w": 1.5}, 2)
  tx = talr.track_transitions(levels_fn, 0.1, sample_size=20,
                              layer_axes=None if axis is None else {"w": axis})
  strides = sample_strides(shape, 20, axis)
  grid = np.ix_(*[np.arange(0, d, s) for d, s in zip(shape, strides)])
  for before, after, state in _moving_run(tx, params, steps=6, seed=1):
    changed = levels_fn(before)["w"] != levels_fn(after)["w"]
    changed = np.asarray(changed)[grid]
    want = (np.reshape(changed.mean(), (1,)) if axis is None
            else np.moveaxis(changed, axis, 0).reshape(shape[axis], -1).mean(axis=1))
    np.testing.assert_allclose(state.transition_rate, want, rtol=1e-6)
    np.testing.assert_array_equal(state.prev_levels["w"], np.asarray(levels_fn(after)["w"])[grid])
  assert state.prev_levels["w"].shape == changed.shape


def test_global_sampled_rate_weighs_groups_by_their_true_size():
  # A big sampled tensor that barely moves and a small exact one that moves a
  # lot: pooled equally, or by the counted sizes, the rate would be far off.
  rng = np.random.default_rng(4)
  params = {"big": jnp.asarray(rng.normal(size=(64, 96)).astype(np.float32)),
            "small": jnp.asarray(rng.normal(size=(7,)).astype(np.float32))}
  levels_fn = talr.levels_fn_from_scales({"big": 3.0, "small": 0.2}, 2)
  tx = talr.scale_by_talr(0.02, levels_fn, learning_rate=0.05, granularity="global",
                          sample_size=100)
  strides = sample_strides((64, 96), 100)
  grid = np.ix_(*[np.arange(0, d, s) for d, s in zip((64, 96), strides)])
  checked = 0
  for before, after, state in _moving_run(tx, params, steps=8, seed=5, scale=2.0):
    old, new = levels_fn(before), levels_fn(after)
    k_big = np.mean(np.asarray(old["big"] != new["big"])[grid])
    k_small = np.mean(np.asarray(old["small"] != new["small"]))
    want = (64 * 96 * k_big + 7 * k_small) / (64 * 96 + 7)
    np.testing.assert_allclose(state.transition_rate, [want], rtol=1e-5, atol=1e-7)
    checked += k_small != k_big
  assert checked, "the two tensors must move at different rates"


@pytest.mark.parametrize("dtype", ["int32", "int64", "int16", "uint8"])
def test_wide_integer_levels_are_stored_as_int8_and_counted(dtype):
  with jax.enable_x64(dtype == "int64"):
    rng = np.random.default_rng(6)
    params = {"w": jnp.asarray(rng.normal(size=(6, 9)).astype(np.float32))}
    base = talr.levels_fn_from_scales({"w": 0.5}, 3)
    offset = 100 if dtype == "uint8" else 0  # unsigned levels in [96, 103]
    levels_fn = lambda p: {"w": (base(p)["w"].astype(jnp.int32) + offset).astype(dtype)}
    assert levels_fn(params)["w"].dtype == np.dtype(dtype)
    tx = talr.track_transitions(levels_fn, 0.1)
    runs = _moving_run(tx, params, steps=5, seed=7)
  for before, after, state in runs:
    old, new = np.asarray(base(before)["w"]), np.asarray(base(after)["w"])
    assert state.prev_levels["w"].dtype == jnp.int8
    np.testing.assert_array_equal(state.prev_levels["w"], new + offset)
    np.testing.assert_allclose(state.transition_rate, [np.mean(old != new)], rtol=1e-6)
  assert any(float(s.transition_rate[0]) > 0 for *_, s in runs)


@pytest.mark.parametrize("lo, hi", [(-129, 1), (0, 128), (0, 255)])
def test_levels_that_do_not_fit_int8_are_refused_at_init(lo, hi):
  params = {"w": jnp.zeros(4)}
  levels_fn = lambda p: {"w": jnp.asarray([lo, 0, 1, hi], jnp.int32)}  # min lo, max hi
  for tx in (talr.scale_by_talr(0.01, levels_fn, learning_rate=0.1),
             talr.track_transitions(levels_fn, 0.01), talr.track_oscillations(levels_fn)):
    with pytest.raises(ValueError, match=rf"levels in \[{lo}, {hi}\], which do not fit the int8"):
      tx.init(params)
  # In range: accepted, and the extremes survive the cast.
  ok = lambda p: {"w": jnp.asarray([-128, 0, 1, 127], jnp.int32)}
  state = talr.track_transitions(ok, 0.01).init(params)
  np.testing.assert_array_equal(state.prev_levels["w"], [-128, 0, 1, 127])


@pytest.mark.parametrize("axis", [2, -3, 5])
def test_count_transitions_refuses_an_axis_out_of_range(axis):
  a = jnp.zeros((3, 4), jnp.int8)
  with pytest.raises(ValueError, match=rf"axis must be None or in \[-2, 2\).*got axis = {axis}"):
    count_transitions(a, a, axis=axis)
  np.testing.assert_array_equal(count_transitions(a, a + 1, axis=-2), [4, 4, 4])
