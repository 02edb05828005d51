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
