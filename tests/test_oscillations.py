"""track_oscillations against a NumPy reference of Nagel et al.'s tracking."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import talr_optax as talr
from reference import levels as ref_levels


class ReferenceOscillations:
  """Per weight: last change direction, EMA of oscillations (float64)."""

  def __init__(self, shape, momentum):
    self.last = np.zeros(shape)
    self.f = np.zeros(shape)
    self.m = momentum
    self.flips = np.zeros(shape, bool)

  def observe(self, old, new):
    d = np.sign(new - old)
    self.flips = d * self.last == -1
    self.f = self.m * self.f + (1 - self.m) * self.flips
    self.last = np.where(d != 0, d, self.last)


def test_matches_reference_and_sees_oscillations():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(6, 20)).astype(np.float32)
  s, m, th = 2.0, 0.9, 0.05
  params = {"w": jnp.asarray(w), "b": jnp.zeros(3)}
  levels_fn = talr.levels_fn_from_scales({"w": s, "b": None}, 2)
  tx = optax.chain(optax.sgd(1.0), talr.track_oscillations(levels_fn, ema_momentum=m,
                                                           threshold=th))
  state = tx.init(params)
  ref = ReferenceOscillations(w.shape, m)
  for step in range(40):
    # Push every weight back and forth across its nearest transition point.
    sign = 1.0 if step % 2 == 0 else -1.0
    g = {"w": jnp.asarray(sign * 0.6 * rng.random(size=w.shape).astype(np.float32)),
         "b": jnp.zeros(3)}
    before = np.asarray(params["w"])
    upd, state = tx.update(g, state, params)
    params = optax.apply_updates(params, upd)
    ref.observe(ref_levels(before, s, 2), ref_levels(np.asarray(params["w"]), s, 2))
    t = state[1]
    np.testing.assert_array_equal(t.last_direction["w"], ref.last.astype(np.int8))
    np.testing.assert_allclose(t.oscillation_frequency["w"], ref.f, rtol=2e-3, atol=1e-4)
    np.testing.assert_allclose(t.mean_oscillation_frequency, [ref.f.mean()], rtol=2e-3,
                               atol=1e-5)
    np.testing.assert_allclose(t.oscillation_rate, [ref.flips.mean()], rtol=1e-6)
    np.testing.assert_allclose(t.oscillating_fraction, [(ref.f > th).mean()], atol=1 / w.size)
  assert ref.f.mean() > 0.1, "the run must oscillate"
  np.testing.assert_array_equal(upd["b"], jnp.zeros(3))
  keys = talr.metrics(state)
  assert set(keys) == {"mean_oscillation_frequency/w", "oscillating_fraction/w",
                       "oscillation_rate/w"}


def test_monotone_drift_is_not_an_oscillation():
  params = {"w": jnp.linspace(-1.0, 1.0, 50)}
  levels_fn = talr.levels_fn_from_scales({"w": 1.0}, 3)
  tx = optax.chain(optax.sgd(1.0), talr.track_oscillations(levels_fn))
  state = tx.init(params)
  for _ in range(30):
    upd, state = tx.update({"w": -0.05 * jnp.ones(50)}, state, params)
    params = optax.apply_updates(params, upd)
  assert float(state[1].mean_oscillation_frequency[0]) == 0.0
  assert int(jnp.sum(state[1].last_direction["w"] == 1)) > 10


def test_state_cost_and_sampling_and_layer_axes():
  params = {"w": jnp.ones((4, 64, 64))}
  levels_fn = talr.levels_fn_from_scales({"w": 1.0}, 2)
  full = talr.track_oscillations(levels_fn, layer_axes={"w": 0}).init(params)
  assert full.last_direction["w"].dtype == jnp.int8
  assert full.oscillation_frequency["w"].dtype == jnp.float32
  per_weight = (full.last_direction["w"].nbytes + full.oscillation_frequency["w"].nbytes
                ) / params["w"].size
  assert per_weight == 5.0
  assert full.rate_names.names == tuple(f"w[{i}]" for i in range(4))
  sampled = talr.track_oscillations(levels_fn, layer_axes={"w": 0}, sample_size=256)
  state = sampled.init(params)
  assert state.last_direction["w"].size <= 4 * 256
  upd, state = sampled.update({"w": jnp.full((4, 64, 64), 0.3)}, state, params)
  assert state.oscillation_rate.shape == (4,)


def test_bad_arguments():
  fn = talr.levels_fn_from_scales({"w": 1.0}, 2)
  with pytest.raises(ValueError, match="threshold"):
    talr.track_oscillations(fn, threshold=1.5)
  with pytest.raises(ValueError, match="momentum"):
    talr.track_oscillations(fn, ema_momentum=1.0)
  with pytest.raises(ValueError, match="sample_size"):
    talr.track_oscillations(fn, sample_size=0)
  tx = talr.track_oscillations(fn)
  params = {"w": jnp.ones(3)}
  with pytest.raises(ValueError, match="needs the params"):
    tx.update(params, tx.init(params))


def test_jit_no_recompile():
  from optax._src import test_utils  # pylint: disable=import-outside-toplevel
  params = {"w": jnp.linspace(-1.0, 1.0, 64)}
  tx = optax.chain(optax.sgd(0.1), talr.track_oscillations(
      talr.levels_fn_from_scales({"w": 1.0}, 2)))
  step = jax.jit(lambda p, s, g: tx.update(g, s, p))
  state = tx.init(params)
  _, state = step(params, state, params)
  with test_utils.log_compilations() as logs:
    _, state = step(params, state, params)
  assert not logs


def test_init_on_an_uncalibrated_nnx_model():
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from talr_optax import nnx as tnnx  # pylint: disable=import-outside-toplevel
  model = tnnx.SmallCNN(weight_bits=2, act_bits=2, rngs=nnx.Rngs(0))
  levels_fn = tnnx.levels_fn_for(model)
  state = talr.track_oscillations(levels_fn).init(nnx.state(model, nnx.Param))
  assert state.rate_names.names == ("conv2/kernel", "conv3/kernel")


# ---------------------------------------------------------------------------
# The edges: the layer axis last, threshold 0, bfloat16 params under jit.


def _back_and_forth(tx, params, steps, seed=0, jit=True):
  """Steps that push weights across transition points and back; the states and params."""
  rng = np.random.default_rng(seed)
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  out = []
  for step in range(steps):
    sign = 1.0 if step % 2 == 0 else -1.0
    g = jax.tree.map(
        lambda p: jnp.asarray(sign * 0.6 * rng.random(size=p.shape), p.dtype), params)
    upd, state = update(g, state, params)
    new = optax.apply_updates(params, upd)
    out.append((params, new, state))
    params = new
  return out


@pytest.mark.parametrize("axis", [2, -1])
def test_layer_axis_last_matches_the_reference_per_layer(axis):
  rng = np.random.default_rng(1)
  w = rng.normal(size=(4, 6, 3)).astype(np.float32)
  s, m, th = 2.0, 0.8, 0.05
  levels_fn = talr.levels_fn_from_scales({"w": s}, 2)
  tx = optax.chain(optax.sgd(1.0), talr.track_oscillations(
      levels_fn, ema_momentum=m, threshold=th, layer_axes={"w": axis}))
  ref = ReferenceOscillations(w.shape, m)
  per_layer = lambda x: np.moveaxis(np.asarray(x, np.float64), 2, 0).reshape(3, -1).mean(axis=1)
  for before, after, state in _back_and_forth(tx, {"w": jnp.asarray(w)}, steps=12):
    ref.observe(ref_levels(np.asarray(before["w"]), s, 2), ref_levels(np.asarray(after["w"]), s, 2))
    t = state[1]
    assert t.rate_names.names == ("w[0]", "w[1]", "w[2]")
    np.testing.assert_allclose(t.oscillation_rate, per_layer(ref.flips), rtol=1e-6)
    np.testing.assert_allclose(t.mean_oscillation_frequency, per_layer(ref.f), rtol=2e-3,
                               atol=1e-5)
    np.testing.assert_allclose(t.oscillating_fraction, per_layer(ref.f > th), atol=1e-6)
  assert len(set(np.round(per_layer(ref.f), 6))) == 3, "layers must differ"


def test_threshold_zero_counts_every_weight_that_oscillated():
  rng = np.random.default_rng(2)
  w = rng.normal(size=(8, 10)).astype(np.float32)
  s = 2.0
  levels_fn = talr.levels_fn_from_scales({"w": s}, 2)
  tx = optax.chain(optax.sgd(1.0), talr.track_oscillations(levels_fn, ema_momentum=0.9,
                                                           threshold=0.0))
  ref = ReferenceOscillations(w.shape, 0.9)
  for before, after, state in _back_and_forth(tx, {"w": jnp.asarray(w)}, steps=10, seed=3):
    ref.observe(ref_levels(np.asarray(before["w"]), s, 2), ref_levels(np.asarray(after["w"]), s, 2))
    np.testing.assert_allclose(state[1].oscillating_fraction, [np.mean(ref.f > 0)], atol=1e-6)
  assert 0 < np.mean(ref.f > 0) < 1, "some weights oscillate, some never do"


def test_bfloat16_params_under_jit_count_the_stored_levels():
  # Under jit XLA may keep p + u of bfloat16 params in float32 where the
  # levels read it; the monitor must see the levels of the params the step
  # returns (rounded to bfloat16), as track_transitions does.
  rng = np.random.default_rng(4)
  s, m = 3.0, 0.9
  params = {"w": jnp.asarray(rng.normal(size=(8, 16)), jnp.bfloat16)}
  levels_fn = talr.levels_fn_from_scales({"w": s}, 2)
  tx = optax.chain(optax.sgd(0.05, momentum=0.9), talr.track_oscillations(
      levels_fn, ema_momentum=m))
  state = tx.init(params)
  update = jax.jit(tx.update)
  ref = ReferenceOscillations((8, 16), m)
  for step in range(20):
    g = {"w": (0.1 * params["w"] + jnp.asarray(rng.normal(size=(8, 16)), jnp.bfloat16))}
    upd, state = update(g, state, params)
    new = optax.apply_updates(params, upd)
    ref.observe(ref_levels(np.asarray(params["w"], np.float64), s, 2),
                ref_levels(np.asarray(new["w"], np.float64), s, 2))
    np.testing.assert_array_equal(state[1].last_direction["w"], ref.last.astype(np.int8),
                                  err_msg=f"step {step}")
    np.testing.assert_allclose(state[1].oscillation_rate, [ref.flips.mean()], rtol=1e-6)
    params = new
  assert ref.f.mean() > 0, "the run must oscillate"


def test_frequency_holds_at_the_authors_momentum_over_2000_steps():
  """At ema_momentum=0.999 the frequency is within 1 % of a float64 reference."""
  rng = np.random.default_rng(9)
  n, steps, m = 512, 2000, 0.999
  # Levels of each weight: a step of -1, 0 or +1 per update, flipping often for some.
  p_flip = np.linspace(0.0, 0.2, n)
  moves = (rng.random((steps, n)) < p_flip) * rng.choice([-1, 1], (steps, n))
  levels = np.clip(np.cumsum(moves, axis=0), -2, 1).astype(np.float32)
  latent = jnp.asarray((np.concatenate([np.zeros((1, n)), levels]) * 0.5), jnp.float32)
  levels_fn = talr.levels_fn_from_scales({"w": 1.0}, 2)
  tx = talr.track_oscillations(levels_fn, ema_momentum=m)

  def step(state, pair):
    before, after = pair
    _, state = tx.update({"w": after - before}, state, {"w": before})
    return state, None

  state, _ = jax.lax.scan(step, tx.init({"w": latent[0]}), (latent[:-1], latent[1:]))
  ref = ReferenceOscillations((n,), m)
  ref_levels_seq = np.asarray(latent) * 2
  for t in range(steps):
    ref.observe(ref_levels_seq[t], ref_levels_seq[t + 1])
  got = np.asarray(state.oscillation_frequency["w"], np.float64)
  assert state.oscillation_frequency["w"].dtype == jnp.float32
  busy = ref.f > 1e-3
  assert busy.sum() > n // 2
  np.testing.assert_allclose(got[busy], ref.f[busy], rtol=0.01)
  np.testing.assert_allclose(float(state.mean_oscillation_frequency[0]), ref.f.mean(), rtol=0.01)
