"""freeze_oscillations against a NumPy reference of Nagel et al.'s tracking and freezing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import talr_optax as talr
from reference import levels as ref_levels
from talr_optax import freezing


class ReferenceFreezing:
  """The reference code's wrapper around a quantizer's integer forward, in NumPy.

  A transcription of ``TrackOscillation`` in Nagel et al.'s
  ``utils/oscillation_tracking_utils.py``. Called once per forward pass with
  the integers the quantizer gives the latent weights; returns the integers
  the network uses (frozen ones replaced). ``a`` is its momentum (the weight
  of the new value); float32, in its order of operations. As its
  ``check_init``: tracking starts at the first call, and the freezing state
  (the frozen mask and the level EMA ``ema_x``) is created at the first call
  whose threshold is above 0, from that call's integers. ``threshold`` may
  be changed between calls (the reference code's schedule callback does).
  ``refreeze=True`` is the reference code as it is: a frozen weight whose
  frequency is still above the threshold gets the rounded level EMA again
  at every step; ``False`` freezes once, as the paper describes and as the
  library does.
  """

  def __init__(self, a, threshold, refreeze=False):
    self.a, self.threshold, self.refreeze = np.float32(a), threshold, refreeze
    self.prev = None
    self.frozen_state = None  # (frozen, frozen_x) once created
    self.ema_x = None

  @property
  def frozen(self):
    """The frozen mask (all False before the freezing state exists)."""
    return np.zeros(self.prev.shape, bool) if self.frozen_state is None else self.frozen_state[0]

  def __call__(self, x):
    x = np.asarray(x, np.float32)
    if self.frozen_state is not None:
      frozen, frozen_x = self.frozen_state
      x = np.where(frozen, frozen_x, x)
    if self.prev is None:  # check_init: tracking starts here
      self.prev, self.switch_dir = x.copy(), np.zeros_like(x)
      self.ema_osc = np.zeros_like(x)
    if self.frozen_state is None and self.threshold > 0:  # check_init: freezing starts here
      self.frozen_state = (np.zeros(x.shape, bool), np.zeros_like(x))
      self.ema_x = x.copy()
    delta = np.round(self.prev - x)
    direction = np.sign(delta)
    oscillated = (self.switch_dir * direction) == -1
    a = self.a
    self.ema_osc = (a * oscillated.astype(np.float32)
                    + np.float32(1 - a) * self.ema_osc).astype(np.float32)
    self.switch_dir = np.where(delta != 0, direction, self.switch_dir)
    self.prev = x
    if self.threshold > 0:
      frozen, frozen_x = self.frozen_state
      freeze = self.ema_osc > self.threshold
      if not self.refreeze:
        freeze &= ~frozen
      frozen[freeze] = True
      frozen_x[freeze] = np.round(self.ema_x[freeze])
      self.ema_x = (a * x + np.float32(1 - a) * self.ema_x).astype(np.float32)
    return x


def _oscillating_grads(rng, shape, step):
  """Pushes every weight back and forth across its nearest transition point."""
  sign = 1.0 if step % 2 == 0 else -1.0
  return sign * 0.6 * rng.random(size=shape).astype(np.float32) + 0.05 * rng.normal(
      size=shape).astype(np.float32)


def _setup(bits=2, scale=1.0, dtype=jnp.float32):
  scales = {"w": scale, "b": None}
  return (talr.levels_fn_from_scales(scales, bits), talr.centers_fn_from_scales(scales, bits))


def test_matches_the_reference_code():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(6, 20)).astype(np.float32)
  m, th, bits, s = 0.9, 0.15, 2, 1.0
  levels_fn, centers_fn = _setup(bits, s)
  params = {"w": jnp.asarray(w), "b": jnp.zeros(3)}
  tx = optax.chain(optax.sgd(0.5),
                   talr.freeze_oscillations(levels_fn, centers_fn, th, ema_momentum=m))
  state = tx.init(params)
  ref = ReferenceFreezing(1 - m, th)
  ref(ref_levels(w, s, bits))  # the forward pass init's params stand for
  frozen_before = np.zeros(w.shape, bool)
  snaps = stays = 0
  update = jax.jit(tx.update)
  for step in range(60):
    g = {"w": jnp.asarray(_oscillating_grads(rng, w.shape, step)), "b": jnp.ones(3)}
    before = np.asarray(params["w"])
    upd, state = update(g, state, params)
    params = optax.apply_updates(params, upd)
    f = state[1]
    # The step's tracking equals the reference's call on the same levels.
    np.testing.assert_array_equal(f.frozen["w"], ref.frozen)
    # EMAs to an ulp: XLA may fuse a multiply-add that NumPy rounds twice.
    np.testing.assert_allclose(f.freeze_frequency["w"], ref.ema_osc, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(f.freeze_level_ema["w"], ref.ema_x, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(f.frozen_fraction, [ref.frozen.mean()], rtol=1e-6)
    frozen_now = ref.frozen.copy()
    # The next forward pass uses exactly the integers the reference uses.
    used = ref(ref_levels(np.asarray(params["w"]), s, bits))
    np.testing.assert_array_equal(ref_levels(np.asarray(params["w"]), s, bits), used)
    # Weights frozen before this update did not move; new ones moved only to snap
    # to their level's centre.
    assert np.all(np.asarray(upd["w"])[frozen_before] == 0)
    moved = np.asarray(upd["w"]) != 0
    newly = frozen_now & ~frozen_before
    snapped = newly & moved
    snaps += int(snapped.sum())
    np.testing.assert_allclose(np.asarray(params["w"])[snapped],
                               (used * s / 2)[snapped], rtol=1e-6)
    # A weight frozen at the level it has keeps its latent value (off its centre).
    stay = newly & (used == ref_levels(before, s, bits))
    np.testing.assert_array_equal(np.asarray(params["w"])[stay], before[stay])
    stays += int(stay.sum())
    frozen_before = frozen_now
  assert 0.2 < ref.frozen.mean() < 1.0, "the run must freeze some weights"
  assert snaps > 0, "some weights must snap to another level"
  assert stays > 0, "some weights must freeze at the level they have"
  np.testing.assert_array_equal(upd["b"], -0.5 * np.ones(3))
  assert talr.metrics(state) == {"frozen_fraction/w": state[1].frozen_fraction[0]}


def test_the_reference_code_moves_frozen_weights_we_do_not():
  """Why we freeze once: re-freezing flips a frozen weight's level (a fast EMA)."""
  seq = (0, 1, 1, 0, 0, 0)
  ref = ReferenceFreezing(0.5, 0.2, refreeze=True)
  used = [int(ref(np.array([x], np.float32))[0]) for x in seq]
  # Frozen at the 4th pass at round(0.625) = 1, then again at round(0.3125) = 0.
  assert used == [0, 1, 1, 0, 1, 0]
  once = ReferenceFreezing(0.5, 0.2)
  assert [int(once(np.array([x], np.float32))[0]) for x in seq] == [0, 1, 1, 0, 1, 1]


@pytest.mark.parametrize("layer_axes", [None, {"w": 0, "b": None}])
def test_talr_counts_what_is_applied(layer_axes):
  """Around scale_by_talr, TALR's k is the fraction of applied level changes."""
  rng = np.random.default_rng(1)
  w = rng.normal(size=(4, 8, 4)).astype(np.float32)
  levels_fn, centers_fn = _setup(2, 1.0)
  talr_stage = talr.scale_by_talr(0.05, levels_fn, learning_rate=0.3,
                                  fallback_learning_rate=0.1, layer_axes=layer_axes)
  tx = optax.chain(
      optax.scale_by_adam(),
      talr.freeze_oscillations(levels_fn, centers_fn, 0.1, ema_momentum=0.9,
                               layer_axes=layer_axes, inner=talr_stage))
  params = {"w": jnp.asarray(w), "b": jnp.zeros(3)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  snapped_steps = 0
  for step in range(50):
    g = {"w": jnp.asarray(_oscillating_grads(rng, w.shape, step)), "b": jnp.ones(3)}
    frozen_before = np.asarray(state[1].frozen["w"])
    upd, state = update(g, state, params)
    new = optax.apply_updates(params, upd)
    old_levels = np.asarray(levels_fn(params)["w"])
    new_levels = np.asarray(levels_fn(new)["w"])
    k = np.asarray(state[1].inner_state.transition_rate)
    changed = (old_levels != new_levels).reshape(4, -1)
    np.testing.assert_allclose(
        k, [changed.mean()] if layer_axes is None else changed.mean(axis=1), atol=1e-7)
    newly = np.asarray(state[1].frozen["w"]) & ~frozen_before
    snapped_steps += bool(np.any(newly & (old_levels != new_levels)))
    params = new
  assert snapped_steps > 0, "some steps must snap a weight to another level"
  assert float(np.mean(state[1].frozen["w"])) > 0.1
  suffix = "" if layer_axes is None else "[3]"
  keys = set(talr.metrics(state))
  assert {f"frozen_fraction/w{suffix}", f"talr/w{suffix}", f"transition_rate/w{suffix}"} <= keys


def test_composes_with_sgdt_adamwt_and_plain():
  levels_fn, centers_fn = _setup(2, 1.0)
  params = {"w": jnp.asarray(np.random.default_rng(2).normal(size=(4, 5)), jnp.float32),
            "b": jnp.zeros(2)}
  g = {"w": jnp.ones((4, 5)), "b": jnp.ones(2)}
  for tx in (
      talr.sgdt(0.1, 0.01, levels_fn, freeze_threshold=0.1, centers_fn=centers_fn),
      talr.adamwt(0.1, 0.01, levels_fn, freeze_threshold=0.1, centers_fn=centers_fn),
      optax.chain(optax.adamw(0.1), talr.freeze_oscillations(levels_fn, centers_fn, 0.1))):
    state = tx.init(params)
    upd, state = tx.update(g, state, params)
    assert upd["w"].shape == (4, 5) and "frozen_fraction/w" in talr.metrics(state)
  with pytest.raises(ValueError, match="needs centers_fn"):
    talr.adamt(0.1, 0.01, levels_fn, freeze_threshold=0.1)
  with pytest.raises(ValueError, match="drop centers_fn"):
    talr.adamt(0.1, 0.01, levels_fn, centers_fn=centers_fn)
  with pytest.raises(ValueError, match="threshold"):
    talr.sgdt(0.1, 0.01, levels_fn, freeze_threshold=2.0, centers_fn=centers_fn)


def test_layer_axes_bf16_and_state_bytes():
  rng = np.random.default_rng(3)
  w = rng.normal(size=(3, 4, 5)).astype(np.float32)
  levels_fn, centers_fn = _setup(2, 1.0)
  tx = optax.chain(optax.sgd(0.5), talr.freeze_oscillations(
      levels_fn, centers_fn, 0.1, ema_momentum=0.9, layer_axes={"w": 0, "b": None}))
  params = {"w": jnp.asarray(w, jnp.bfloat16), "b": jnp.zeros(2, jnp.bfloat16)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  for step in range(40):
    g = {"w": jnp.asarray(_oscillating_grads(rng, w.shape, step), jnp.bfloat16),
         "b": jnp.ones(2, jnp.bfloat16)}
    frozen_before = np.asarray(state[1].frozen["w"])
    upd, state = update(g, state, params)
    assert upd["w"].dtype == jnp.bfloat16
    new = optax.apply_updates(params, upd)
    kept = frozen_before
    np.testing.assert_array_equal(np.asarray(new["w"], np.float32)[kept],
                                  np.asarray(params["w"], np.float32)[kept])
    params = new
  frozen = np.asarray(state[1].frozen["w"])
  np.testing.assert_allclose(state[1].frozen_fraction, frozen.reshape(3, -1).mean(1),
                             rtol=1e-6)
  assert frozen.any()
  assert set(talr.metrics(state)) == {f"frozen_fraction/w[{i}]" for i in range(3)}
  assert update._cache_size() == 1
  # Per-weight state: 11 bytes per quantized weight.
  shapes = jax.eval_shape(tx.init, params)[1]
  per_weight = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(
      (shapes.freeze_prev_levels, shapes.freeze_direction, shapes.freeze_frequency,
       shapes.freeze_level_ema, shapes.frozen)))
  assert per_weight == 11 * w.size == freezing.state_bytes_per_weight() * w.size


def test_non_finite_gradient_does_not_corrupt_state():
  levels_fn, centers_fn = _setup()
  tx = optax.chain(optax.sgd(0.5), talr.freeze_oscillations(levels_fn, centers_fn, 0.1))
  params = {"w": jnp.linspace(-1, 1, 6), "b": jnp.zeros(1)}
  state = tx.init(params)
  g = {"w": jnp.array([jnp.nan, jnp.inf, 0.0, 1.0, 0.0, 0.0]), "b": jnp.ones(1)}
  upd, state = tx.update(g, state, params)
  params = optax.apply_updates(params, upd)
  upd, state = tx.update(jax.tree.map(jnp.zeros_like, g), state, params)
  f = state[1]
  for x in (f.freeze_frequency["w"], f.freeze_level_ema["w"], f.frozen_fraction):
    assert np.all(np.isfinite(x))
  assert f.freeze_prev_levels["w"].dtype == jnp.int8


@pytest.mark.parametrize("bits", [2, 4])
def test_warm_start_matches_the_reference_code(bits):
  """The authors' schedule: no freezing for a quarter of the run, then a cosine.

  Their level EMA is created when freezing begins, from that step's levels
  (``check_init``), not from the levels before QAT: weights that drifted
  during the warm start freeze at the levels they have then.
  """
  rng = np.random.default_rng(4)
  w = rng.normal(size=(8, 50)).astype(np.float32)
  steps, m = 120, 0.9
  schedule = talr.delayed_cosine_schedule(0.3, 0.1, steps, value_before=0.0)
  levels_fn, centers_fn = _setup(bits, 1.0)
  tx = optax.chain(optax.sgd(0.5), talr.freeze_oscillations(levels_fn, centers_fn, schedule,
                                                            ema_momentum=m))
  params = {"w": jnp.asarray(w), "b": jnp.zeros(1)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  ref = ReferenceFreezing(1 - m, float(schedule(0)))
  ref(ref_levels(w, 1.0, bits))
  for step in range(steps):
    drift = 0.04 if step < steps // 4 else 0.0  # moves levels before freezing begins
    g = {"w": jnp.asarray(_oscillating_grads(rng, w.shape, step) + drift), "b": jnp.ones(1)}
    upd, state = update(g, state, params)
    params = optax.apply_updates(params, upd)
    f = state[1]
    np.testing.assert_array_equal(f.frozen["w"], ref.frozen)
    assert bool(f.freeze_level_ema_started) == (ref.ema_x is not None)
    if ref.ema_x is not None:
      np.testing.assert_allclose(f.freeze_level_ema["w"], ref.ema_x, rtol=1e-6, atol=1e-7)
    ref.threshold = float(schedule(step + 1))  # its call for update step + 1
    used = ref(ref_levels(np.asarray(params["w"]), 1.0, bits))
    # The network uses exactly the integers the reference code's network uses.
    np.testing.assert_array_equal(ref_levels(np.asarray(params["w"]), 1.0, bits), used)
    if step + 1 < steps // 4:
      assert not np.any(ref.frozen)
  frozen = ref.frozen
  assert 0.1 < frozen.mean() < 1.0, "the run must freeze some weights"
  moved = ref.frozen_state[1] != ref_levels(w, 1.0, bits)
  assert np.any(frozen & moved), "some weights must freeze away from their pre-QAT level"


def test_tracking_starts_at_the_first_update():
  """An optimizer built on other params (before the weights are loaded) freezes alike."""
  rng = np.random.default_rng(6)
  levels_fn, centers_fn = _setup(2, 1.0)
  loaded = {"w": jnp.asarray(rng.normal(size=(6, 20)), jnp.float32), "b": jnp.zeros(2)}
  fresh = {"w": jnp.asarray(rng.normal(size=(6, 20)), jnp.float32), "b": jnp.ones(2)}
  tx = optax.chain(optax.sgd(0.5), talr.freeze_oscillations(levels_fn, centers_fn, 0.2,
                                                            ema_momentum=0.8))
  update = jax.jit(tx.update)
  runs = []
  for init_params in (loaded, fresh):
    params, state, trace = loaded, tx.init(init_params), []
    grads = np.random.default_rng(7)
    for step in range(30):
      g = {"w": jnp.asarray(_oscillating_grads(grads, (6, 20), step)), "b": jnp.ones(2)}
      upd, state = update(g, state, params)
      params = optax.apply_updates(params, upd)
      trace.append(upd["w"])
    runs.append((trace, state[1]))
  (trace_a, a), (trace_b, b) = runs
  jax.tree.map(np.testing.assert_array_equal, trace_a, trace_b)
  for field in ("freeze_prev_levels", "freeze_direction", "freeze_frequency", "frozen"):
    np.testing.assert_array_equal(getattr(a, field)["w"], getattr(b, field)["w"])
  assert np.asarray(a.frozen["w"]).any()


def test_state_from_another_configuration_is_refused():
  """A state made with other layer_axes names the setting (and no per-layer mean is misreported)."""
  levels_fn, centers_fn = _setup(2, 1.0)
  params = {"w": jnp.ones((3, 4, 5)), "b": jnp.zeros(2)}
  stacked = talr.freeze_oscillations(levels_fn, centers_fn, 0.1,
                                     layer_axes={"w": 0, "b": None})
  flat = talr.freeze_oscillations(levels_fn, centers_fn, 0.1)
  with pytest.raises(ValueError, match="freeze_oscillations got a state made with another"
                                       " configuration: layer_axes differs at 'w'"):
    stacked.update(params, flat.init(params), params)
  with pytest.raises(ValueError, match="layer_axes differs at 'w'"):
    flat.update(params, stacked.init(params), params)


def test_bad_input():
  levels_fn, centers_fn = _setup()
  for bad in (0.0, -0.1, 1.5, float("nan"), "0.1"):
    with pytest.raises(ValueError, match="threshold"):
      talr.freeze_oscillations(levels_fn, centers_fn, bad)
  with pytest.raises(ValueError, match="threshold.*step 0 is 2"):
    talr.freeze_oscillations(levels_fn, centers_fn, lambda n: 2.0)
  for bad in (1.0, -0.5, float("nan")):
    with pytest.raises(ValueError, match="ema_momentum"):
      talr.freeze_oscillations(levels_fn, centers_fn, 0.1, ema_momentum=bad)
  with pytest.raises(ValueError, match="inner"):
    talr.freeze_oscillations(levels_fn, centers_fn, 0.1, inner=0.1)
  with pytest.raises(ValueError, match="centers_fn"):
    talr.freeze_oscillations(levels_fn, None, 0.1)
  params = {"w": jnp.ones((2, 3)), "b": jnp.zeros(2)}
  with pytest.raises(ValueError, match="no quantized leaf"):
    talr.freeze_oscillations(lambda p: {"w": None, "b": None}, centers_fn, 0.1).init(params)
  with pytest.raises(ValueError, match="centers_fn returned a pytree whose structure"):
    talr.freeze_oscillations(levels_fn, lambda p, levels=None: [p["w"]], 0.1).init(params)
  ignores_levels = lambda p, levels=None: {"w": p["w"][:1], "b": None} if levels is not None \
      else centers_fn(p)
  tx = talr.freeze_oscillations(levels_fn, ignores_levels, 0.1)
  with pytest.raises(ValueError, match=r"centers_fn\(params, levels\) returned Array"):
    tx.update(params, tx.init(params), params)
  tx = talr.freeze_oscillations(levels_fn, centers_fn, 0.1)
  with pytest.raises(ValueError, match="needs the params"):
    tx.update(params, tx.init(params))
  with pytest.raises(ValueError, match="FreezeOscillationsState"):
    tx.update(params, optax.EmptyState(), params)
  jax.eval_shape(tx.init, params)


def test_masked_and_inject_hyperparams():
  levels_fn, centers_fn = _setup()
  params = {"w": jnp.linspace(-1, 1, 6), "b": jnp.zeros(2)}
  ones = jax.tree.map(jnp.ones_like, params)
  masked = optax.masked(talr.freeze_oscillations(levels_fn, centers_fn, 0.1),
                        {"w": True, "b": False})
  upd, _ = masked.update(ones, masked.init(params), params)
  jax.tree.map(np.testing.assert_array_equal, upd, ones)
  damp = optax.masked(talr.dampen_oscillations(centers_fn, 0.1), {"w": True, "b": False})
  upd, _ = damp.update(ones, damp.init(params), params)
  # Centres -1, -0.5, 0, 0, and the two weights past the top level are their own.
  np.testing.assert_allclose(upd["w"], 1 + 0.2 * np.array([0, -0.1, -0.2, 0.2, 0, 0]),
                             rtol=1e-6)
  injected = optax.inject_hyperparams(
      talr.freeze_oscillations, static_args=("levels_fn", "centers_fn", "inner"))(
          levels_fn, centers_fn, 0.1, ema_momentum=0.9)
  state = injected.init(params)
  upd, state = injected.update(ones, state, params)
  assert float(state.hyperparams["threshold"]) == pytest.approx(0.1)
  jax.tree.map(np.testing.assert_array_equal, upd, ones)


@pytest.mark.parametrize("factory", ["sgdt", "adamt", "adamwt"])
def test_ready_optimizers_pass_the_freezing_settings_on(factory):
  """freeze_ema_momentum reaches the stage; bad values name the factory's arguments."""
  levels_fn, centers_fn = _setup(2, 1.0)
  make = getattr(talr, factory)
  tx = make(0.1, 0.01, levels_fn, freeze_threshold=0.9, centers_fn=centers_fn,
            freeze_ema_momentum=0.5)
  # The stage tracks the levels of the params it is given: level 0, 1, 0 is one oscillation.
  seq = [{"w": jnp.full((2, 2), x), "b": jnp.zeros(1)} for x in (0.1, 0.4, 0.1)]
  state = tx.init(seq[0])
  for params in seq:
    _, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
  frozen_state = [s for s in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, talr.FreezeOscillationsState))
                  if isinstance(s, talr.FreezeOscillationsState)][0]
  np.testing.assert_allclose(frozen_state.freeze_frequency["w"], 0.5)  # a = 1 - 0.5
  with pytest.raises(ValueError, match="freeze_ema_momentum must be in"):
    make(0.1, 0.01, levels_fn, freeze_threshold=0.1, centers_fn=centers_fn,
         freeze_ema_momentum=1.0)
  with pytest.raises(ValueError, match="freeze_threshold must be an oscillation frequency"):
    make(0.1, 0.01, levels_fn, freeze_threshold=lambda n: 2.0, centers_fn=centers_fn)
  with pytest.raises(ValueError, match="freeze_threshold must be in"):
    make(0.1, 0.01, levels_fn, freeze_threshold=0.0, centers_fn=centers_fn)


@pytest.mark.parametrize("factory", ["sgdt", "adamwt"])
def test_ready_optimizers_count_what_is_applied(factory):
  """The ready optimizers wrap their TALR stage: its k is the fraction of applied changes."""
  rng = np.random.default_rng(8)
  levels_fn, centers_fn = _setup(2, 1.0)
  tx = getattr(talr, factory)(0.3, 0.05, levels_fn, freeze_threshold=0.1,
                              centers_fn=centers_fn, freeze_ema_momentum=0.9)
  params = {"w": jnp.asarray(rng.normal(size=(8, 16)), jnp.float32), "b": jnp.zeros(3)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  snapped_steps = 0
  for step in range(40):
    g = {"w": jnp.asarray(_oscillating_grads(rng, (8, 16), step)), "b": jnp.ones(3)}
    upd, state = update(g, state, params)
    new = optax.apply_updates(params, upd)
    old_levels, new_levels = (np.asarray(levels_fn(p)["w"]) for p in (params, new))
    m = talr.metrics(state)
    np.testing.assert_allclose(m["transition_rate/w"], np.mean(old_levels != new_levels),
                               atol=1e-7)
    snapped_steps += bool(np.any((old_levels != new_levels) & (np.asarray(upd["w"]) != 0)
                                 & (m["frozen_fraction/w"] > 0)))
    params = new
  assert float(m["frozen_fraction/w"]) > 0.05, "the run must freeze weights"
  assert snapped_steps > 0


def test_inject_hyperparams_hint_names_the_callable_left_out():
  """The hint names centers_fn when it is the callable inject_hyperparams called."""
  levels_fn, centers_fn = _setup()
  params = {"w": jnp.linspace(-1, 1, 6), "b": jnp.zeros(2)}
  tx = optax.inject_hyperparams(talr.freeze_oscillations, static_args=("levels_fn",))(
      levels_fn, centers_fn, 0.1)
  with pytest.raises(ValueError, match=r"centers_fn was called with a step count.*"
                                       r"static_args=\('centers_fn',\)"):
    tx.init(params)
  with pytest.raises(ValueError, match="centers_fn must accept \\(params, levels\\).*not levels_fn"):
    talr.freeze_oscillations(levels_fn, levels_fn, 0.1)
