"""Tests of scale_by_talr and track_transitions against an independent reference."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import talr_optax as talr

# ---------------------------------------------------------------------------
# An independent float64 NumPy re-implementation of the recursion (METHOD.md
# §3-§4), written without looking at the library's code path.


def np_levels_2bit(w, s):
  return np.round(np.clip(2.0 * w / s, -2, 1)).astype(np.int64)


class NumpyTALR:
  """Reference TALR for a list of tensors; float64 throughout."""

  def __init__(self, params, scales, target, lr, rule, m, eta, granularity):
    self.scales, self.target, self.lr = scales, target, lr
    self.rule, self.m, self.eta, self.gran = rule, m, eta, granularity
    self.prev = [np_levels_2bit(p, s) for p, s in zip(params, scales)]
    n = 1 if granularity == "global" else len(params)
    r0 = target(0)
    self.K = np.full(n, r0)
    self.U = np.full(n, lr)
    self.c = np.ones(n)
    self.t = 0
    self.k = np.zeros(n)

  def step(self, params, grads):
    levels = [np_levels_2bit(p, s) for p, s in zip(params, self.scales)]
    changed = np.array([np.sum(a != b) for a, b in zip(levels, self.prev)], float)
    sizes = np.array([a.size for a in levels], float)
    k = changed / sizes if self.gran == "per_tensor" else np.array([changed.sum() / sizes.sum()])
    R = self.target(self.t)
    K = self.m * self.K + (1 - self.m) * k
    if self.rule == "additive":
      U = np.maximum(0.0, self.U + self.eta * (R - K))
      c = self.c
    else:
      c = self.m * self.c + (1 - self.m) * self.c * R / (K + 1e-8)
      U = self.lr * c
    self.k, self.K, self.U, self.c, self.prev = k, K, U, c, levels
    self.t += 1
    Us = U if self.gran == "per_tensor" else np.repeat(U, len(params))
    return [-u * g for u, g in zip(Us, grads)]


def _problem(seed=0, shapes=((64,), (8, 16), (3, 3, 4, 8))):
  rng = np.random.default_rng(seed)
  params = [rng.normal(size=s).astype(np.float32) for s in shapes]
  scales = [float(3 * np.std(p)) for p in params]
  return params, scales


def _tree(xs):
  return {f"t{i}": jnp.asarray(x) for i, x in enumerate(xs)}


def _levels_fn(scales):
  return talr.levels_fn_from_scales({f"t{i}": s for i, s in enumerate(scales)}, bits=2)


@pytest.mark.parametrize("rule", ["multiplicative", "additive"])
@pytest.mark.parametrize("granularity", ["per_tensor", "global"])
def test_matches_numpy_reference_over_many_steps(rule, granularity):
  params, scales = _problem()
  steps = 300
  target = lambda t: 0.5 * 0.02 * (1 + math.cos(math.pi * t / steps))
  lr, m = 0.05, 0.9
  tx = talr.scale_by_talr(
      optax.cosine_decay_schedule(0.02, steps), _levels_fn(scales),
      learning_rate=lr, rule=rule, momentum=m, granularity=granularity)
  ref = NumpyTALR(params, scales, target, lr, rule, m, lr, granularity)
  p = _tree(params)
  state = tx.init(p)
  update = jax.jit(tx.update)
  rng = np.random.default_rng(1)
  total_changes = 0
  for _ in range(steps):
    grads = [rng.normal(size=x.shape).astype(np.float32) for x in params]
    upd, state = update(_tree(grads), state, p)
    ref_upd = ref.step([np.asarray(p[f"t{i}"], np.float64) for i in range(len(params))],
                       [g.astype(np.float64) for g in grads])
    k = state.transition_rate
    if granularity == "global":
      np.testing.assert_allclose(k, ref.k[0], rtol=1e-6, atol=1e-9)
      np.testing.assert_allclose(state.ema_transition_rate, ref.K[0], rtol=1e-4, atol=1e-8)
      np.testing.assert_allclose(state.talr, ref.U[0], rtol=1e-4, atol=1e-9)
    else:
      for i in range(len(params)):
        np.testing.assert_allclose(k[f"t{i}"], ref.k[i], rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(state.ema_transition_rate[f"t{i}"], ref.K[i], rtol=1e-4, atol=1e-8)
        np.testing.assert_allclose(state.talr[f"t{i}"], ref.U[i], rtol=1e-4, atol=1e-9)
    for i in range(len(params)):
      np.testing.assert_allclose(upd[f"t{i}"], ref_upd[i], rtol=1e-4, atol=1e-9)
    total_changes += float(np.sum(ref.k))
    p = optax.apply_updates(p, upd)
  assert int(state.talr_count) == steps
  assert total_changes > 1.0, "the test must exercise real transitions"


def test_hand_computed_two_steps_multiplicative():
  # 4 weights, s = 1, levels round(clip(2w, -2, 1)): [0, 0, 1, 1] at init.
  params = {"w": jnp.array([0.1, 0.2, 0.3, 0.4])}
  tx = talr.scale_by_talr(0.1, talr.levels_fn_from_scales({"w": 1.0}, 2),
                          learning_rate=0.5, momentum=0.9)
  state = tx.init(params)
  np.testing.assert_array_equal(state.prev_levels["w"], [0, 0, 1, 1])
  g = {"w": jnp.array([1.0, 1.0, 1.0, 1.0])}
  # Step 1: nothing moved since init: k = 0, K = 0.9*0.1 = 0.09,
  # c = 0.9 + 0.1 * 0.1 / (0.09 + 1e-8) = 1.0111111, U = 0.5 * c.
  upd, state = tx.update(g, state, params)
  c1 = 0.9 + 0.1 * 0.1 / (0.09 + 1e-8)
  np.testing.assert_allclose(state.ema_transition_rate["w"], 0.09, rtol=1e-6)
  np.testing.assert_allclose(state.talr["w"], 0.5 * c1, rtol=1e-6)
  np.testing.assert_allclose(upd["w"], -0.5 * c1 * np.ones(4), rtol=1e-6)
  # Step 2: the first weight crossed (0.1 -> 0.3, level 0 -> 1): k = 0.25,
  # K = 0.9*0.09 + 0.1*0.25 = 0.106, c = 0.9c1 + 0.1 c1 * 0.1/0.106.
  params = {"w": jnp.array([0.3, 0.2, 0.3, 0.4])}
  upd, state = tx.update(g, state, params)
  K2 = 0.9 * 0.09 + 0.1 * 0.25
  c2 = 0.9 * c1 + 0.1 * c1 * 0.1 / (K2 + 1e-8)
  np.testing.assert_allclose(state.transition_rate["w"], 0.25)
  np.testing.assert_allclose(state.ema_transition_rate["w"], K2, rtol=1e-6)
  np.testing.assert_allclose(state.talr_scale["w"], c2, rtol=1e-6)
  np.testing.assert_allclose(state.talr["w"], 0.5 * c2, rtol=1e-6)
  np.testing.assert_array_equal(state.prev_levels["w"], [1, 0, 1, 1])


def test_hand_computed_two_steps_additive():
  params = {"w": jnp.array([0.1, 0.2, 0.3, 0.4])}
  tx = talr.scale_by_talr(0.1, talr.levels_fn_from_scales({"w": 1.0}, 2),
                          learning_rate=0.5, rule="additive", rate=0.2, momentum=0.9)
  state = tx.init(params)
  g = {"w": jnp.ones(4)}
  _, state = tx.update(g, state, params)
  U1 = 0.5 + 0.2 * (0.1 - 0.09)
  np.testing.assert_allclose(state.talr["w"], U1, rtol=1e-6)
  _, state = tx.update(g, state, {"w": jnp.array([0.3, 0.2, 0.3, 0.4])})
  K2 = 0.9 * 0.09 + 0.1 * 0.25
  np.testing.assert_allclose(state.talr["w"], U1 + 0.2 * (0.1 - K2), rtol=1e-6)
  np.testing.assert_allclose(state.talr_scale["w"], 1.0)


def test_additive_rule_floors_at_zero():
  params = {"w": jnp.array([0.1, 0.2, 0.3, 0.4])}
  tx = talr.scale_by_talr(0.0, talr.levels_fn_from_scales({"w": 1.0}, 2),
                          learning_rate=0.01, rule="additive", rate=1.0, momentum=0.0)
  state = tx.init(params)
  _, state = tx.update({"w": jnp.ones(4)}, state, {"w": jnp.array([0.3, 0.2, 0.3, 0.4])})
  # K = k = 0.25 > R = 0: U = max(0, 0.01 + (0 - 0.25)) = 0.
  assert float(state.talr["w"]) == 0.0


def test_levels_extra_arg_replaces_levels_fn():
  calls = []

  def levels_fn(p):
    calls.append(1)
    return {"w": jnp.zeros(4, jnp.int8)}

  tx = talr.scale_by_talr(0.1, levels_fn, learning_rate=0.5, momentum=0.0)
  params = {"w": jnp.zeros(4)}
  state = tx.init(params)
  n = len(calls)
  levels = {"w": jnp.array([1, 0, 0, 0], jnp.int32)}
  _, state = tx.update({"w": jnp.ones(4)}, state, None, levels=levels)
  assert len(calls) == n
  np.testing.assert_allclose(state.transition_rate["w"], 0.25)
  assert state.prev_levels["w"].dtype == jnp.int8


def test_update_without_params_is_a_clear_error():
  tx = talr.scale_by_talr(0.1, talr.levels_fn_from_scales({"w": 1.0}, 2), learning_rate=0.1)
  state = tx.init({"w": jnp.zeros(3)})
  with pytest.raises(ValueError, match="needs params"):
    tx.update({"w": jnp.ones(3)}, state)


def test_jit_does_not_recompile_across_steps():
  params, scales = _problem()
  tx = talr.sgdt(0.1, talr.cosine_target(0.01, 100), _levels_fn(scales))
  p = _tree(params)
  state = tx.init(p)

  traces = []

  @jax.jit
  def step(p, state, g):
    traces.append(1)  # runs only when jit traces (compiles) the step
    u, state = tx.update(g, state, p)
    return optax.apply_updates(p, u), state

  rng = np.random.default_rng(0)
  for _ in range(5):
    g = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), p)
    p, state = step(p, state, g)
  assert len(traces) == 1
  assert int(state[-1].talr_count) == 5


def test_eval_shape_init():
  params, scales = _problem()
  tx = talr.sgdt(0.1, 0.01, _levels_fn(scales))
  shapes = jax.eval_shape(tx.init, _tree(params))
  talr_state = shapes[-1]
  assert talr_state.prev_levels["t0"].dtype == jnp.int8
  assert talr_state.prev_levels["t2"].shape == (3, 3, 4, 8)
  assert talr_state.talr["t1"].shape == ()


def test_tree_get_finds_every_field_inside_chain():
  params, scales = _problem()
  tx = optax.chain(optax.trace(0.9),
                   talr.scale_by_talr(0.01, _levels_fn(scales), learning_rate=0.1))
  state = tx.init(_tree(params))
  for name in ("talr_count", "prev_levels", "transition_rate", "ema_transition_rate",
               "target_transition_rate", "talr", "talr_scale"):
    value = optax.tree.get(state, name)
    assert value is not None, name
  assert optax.tree.get(state, "talr_count").dtype == jnp.int32


def test_chain_with_adam_scales_bias_corrected_step():
  params = {"w": jnp.array([0.1, -0.4, 0.3])}
  lf = talr.levels_fn_from_scales({"w": 1.0}, 2)
  tx = optax.chain(optax.scale_by_adam(), talr.scale_by_talr(0.01, lf, learning_rate=1e-3))
  ref = optax.scale_by_adam()
  s, rs = tx.init(params), ref.init(params)
  g = {"w": jnp.array([0.5, -1.0, 2.0])}
  u, s = tx.update(g, s, params)
  ru, _ = ref.update(g, rs, params)
  U = optax.tree.get(s, "talr")["w"]
  np.testing.assert_allclose(u["w"], -U * ru["w"], rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_updates_keep_dtype_rates_stay_float32(dtype):
  params = {"w": jnp.array([0.1, -0.4, 0.3], dtype), "b": jnp.zeros(2, dtype)}
  lf = talr.levels_fn_from_scales({"w": 1.0, "b": None}, 2)
  tx = talr.scale_by_talr(0.01, lf, learning_rate=0.1, fallback_learning_rate=0.1)
  s = tx.init(params)
  u, s = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), s, params)
  assert u["w"].dtype == dtype and u["b"].dtype == dtype
  assert s.talr["w"].dtype == jnp.float32
  assert s.ema_transition_rate["w"].dtype == jnp.float32
  assert s.prev_levels["w"].dtype == jnp.int8


def test_fallback_learning_rate_schedule_on_unquantized_leaves():
  params = {"w": jnp.array([0.1, 0.2]), "b": jnp.array([1.0, 2.0])}
  lf = talr.levels_fn_from_scales({"w": 1.0, "b": None}, 2)
  sched = optax.linear_schedule(0.1, 0.0, 10)
  tx = talr.scale_by_talr(0.01, lf, learning_rate=0.5, fallback_learning_rate=sched)
  s = tx.init(params)
  g = jax.tree.map(jnp.ones_like, params)
  for n in range(3):
    u, s = tx.update(g, s, params)
    np.testing.assert_allclose(u["b"], -float(sched(n)) * np.ones(2), rtol=1e-6)
  assert s.talr["b"] is None and s.prev_levels["b"] is None


def test_missing_fallback_is_an_error_at_init():
  lf = talr.levels_fn_from_scales({"w": 1.0, "b": None}, 2)
  tx = talr.scale_by_talr(0.01, lf, learning_rate=0.5)
  with pytest.raises(ValueError, match="fallback_learning_rate.*optax.partition"):
    tx.init({"w": jnp.zeros(2), "b": jnp.zeros(2)})


def test_masked_nodes_pass_through_untouched():
  params = {"w": jnp.array([0.1, 0.2]), "b": jnp.array([1.0, 2.0])}
  lf = talr.levels_fn_from_scales({"w": 1.0, "b": None}, 2)
  tx = optax.masked(talr.scale_by_talr(0.01, lf, learning_rate=0.5), {"w": True, "b": False})
  s = tx.init(params)
  u, s = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), s, params)
  np.testing.assert_allclose(u["b"], [1.0, 1.0])  # masked: unchanged
  np.testing.assert_allclose(u["w"], [-0.5, -0.5], rtol=1e-2)


def test_partition_routes_quantized_and_full_precision():
  params = {"w": jnp.array([0.1, 0.2]), "b": jnp.array([1.0, 2.0])}
  lf = talr.levels_fn_from_scales({"w": 1.0, "b": None}, 2)
  tx = optax.partition(
      {"q": talr.scale_by_talr(0.01, lf, learning_rate=0.5), "fp": optax.sgd(0.1)},
      {"w": "q", "b": "fp"})
  s = tx.init(params)
  u, s = tx.update(jax.tree.map(jnp.ones_like, params), s, params)
  np.testing.assert_allclose(u["b"], [-0.1, -0.1], rtol=1e-6)
  assert "talr/w" in talr.metrics(s)


def test_works_with_nested_tuples():
  params = ((jnp.array([0.1, 0.2]),), [jnp.array([0.3])])
  lf = lambda p: jax.tree.map(lambda x: talr.weight_levels(x, 1.0, 2), p)
  tx = talr.scale_by_talr(0.01, lf, learning_rate=0.5)
  s = tx.init(params)
  u, s = tx.update(jax.tree.map(jnp.ones_like, params), s, params)
  chex.assert_trees_all_equal_structs(u, params)


def test_global_granularity_pools_counts():
  params = {"a": jnp.zeros(2), "b": jnp.zeros(6)}
  lf = talr.levels_fn_from_scales({"a": 1.0, "b": 1.0}, 2)
  tx = talr.scale_by_talr(0.1, lf, learning_rate=0.5, granularity="global", momentum=0.0)
  s = tx.init(params)
  moved = {"a": jnp.array([1.0, 0.0]), "b": jnp.array([1.0, 0, 0, 0, 0, 0])}
  u, s = tx.update(jax.tree.map(jnp.ones_like, params), s, moved)
  np.testing.assert_allclose(s.transition_rate, 2 / 8)
  assert s.talr.shape == ()
  np.testing.assert_allclose(u["a"], u["b"][:2])


def test_schedule_target_is_evaluated_at_step_count():
  lf = talr.levels_fn_from_scales({"w": 1.0}, 2)
  sched = optax.linear_schedule(0.1, 0.0, 4)
  tx = talr.scale_by_talr(sched, lf, learning_rate=0.5)
  params = {"w": jnp.zeros(3)}
  s = tx.init(params)
  np.testing.assert_allclose(s.ema_transition_rate["w"], 0.1)
  for n in range(4):
    _, s = tx.update({"w": jnp.ones(3)}, s, params)
    np.testing.assert_allclose(s.target_transition_rate["w"], float(sched(n)), rtol=1e-6)


def test_track_transitions_leaves_updates_and_records_rates():
  lf = talr.levels_fn_from_scales({"w": 1.0}, 2)
  tx = optax.chain(talr.track_transitions(lf, momentum=0.5), optax.sgd(0.1))
  params = {"w": jnp.array([0.1, 0.2, 0.3, 0.4])}
  s = tx.init(params)
  g = {"w": jnp.ones(4)}
  u, s = tx.update(g, s, {"w": jnp.array([0.3, 0.2, 0.3, 0.4])})
  np.testing.assert_allclose(u["w"], -0.1 * np.ones(4), rtol=1e-6)
  m = talr.metrics(s)
  np.testing.assert_allclose(m["transition_rate/w"], 0.25)
  np.testing.assert_allclose(m["ema_transition_rate/w"], 0.125)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(learning_rate=0.0), "learning_rate"),
        (dict(learning_rate=-1.0), "learning_rate"),
        (dict(learning_rate=0.1, rule="exp"), "rule"),
        (dict(learning_rate=0.1, momentum=1.0), "momentum"),
        (dict(learning_rate=0.1, momentum=-0.1), "momentum"),
        (dict(learning_rate=0.1, granularity="layer"), "granularity"),
        (dict(learning_rate=0.1, rate=0.1), "rate"),
        (dict(learning_rate=0.1, rule="additive", rate=0.0), "rate"),
        (dict(learning_rate=0.1, fallback_learning_rate=-0.1), "fallback_learning_rate"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, match):
  with pytest.raises(ValueError, match=match):
    talr.scale_by_talr(0.01, lambda p: p, **kwargs)


@pytest.mark.parametrize("target", [-0.1, 1.5, float("nan")])
def test_bad_target_is_rejected(target):
  with pytest.raises(ValueError, match="target_transition_rate"):
    talr.scale_by_talr(target, lambda p: p, learning_rate=0.1)


def test_bad_levels_are_rejected():
  params = {"w": jnp.zeros(4)}
  with pytest.raises(ValueError, match="integer levels"):
    talr.scale_by_talr(0.01, lambda p: p, learning_rate=0.1).init(params)
  with pytest.raises(ValueError, match="shape"):
    talr.scale_by_talr(0.01, lambda p: {"w": jnp.zeros(3, jnp.int8)},
                       learning_rate=0.1).init(params)
  with pytest.raises(ValueError, match="int8"):
    talr.scale_by_talr(0.01, lambda p: {"w": jnp.full(4, 300, jnp.int32)},
                       learning_rate=0.1).init(params)
  with pytest.raises(ValueError, match="structure"):
    talr.scale_by_talr(0.01, lambda p: {"v": jnp.zeros(4, jnp.int8)},
                       learning_rate=0.1).init(params)
  with pytest.raises(ValueError, match="no quantized leaf"):
    talr.scale_by_talr(0.01, lambda p: {"w": None}, learning_rate=0.1,
                       fallback_learning_rate=0.1).init(params)
  with pytest.raises(ValueError, match="levels_fn must be callable"):
    talr.scale_by_talr(0.01, None, learning_rate=0.1)


@pytest.mark.parametrize("granularity", ["per_tensor", "global"])
def test_levels_extra_arg_and_levels_fn_give_identical_rates(granularity):
  # (3, 3, 4, 8): last axis % 4 == 0 (packed count); (5, 7): not (fallback).
  params, scales = _problem(seed=3, shapes=((3, 3, 4, 8), (5, 7), (16,)))
  levels_fn = _levels_fn(scales)
  tx = talr.scale_by_talr(0.05, levels_fn, learning_rate=0.3, momentum=0.9,
                          granularity=granularity)
  p_a = p_b = _tree(params)
  s_a = s_b = tx.init(p_a)
  step_fn = jax.jit(lambda g, s, p: tx.update(g, s, p))
  step_lv = jax.jit(lambda g, s, p, lv: tx.update(g, s, p, levels=lv))
  rng = np.random.default_rng(7)
  seen = 0.0
  for _ in range(6):
    g = _tree([rng.normal(size=np.shape(x)).astype(np.float32) for x in params])
    u_a, s_a = step_fn(g, s_a, p_a)
    u_b, s_b = step_lv(g, s_b, p_b, levels_fn(p_b))
    chex.assert_trees_all_equal(u_a, u_b)
    for field in ("transition_rate", "ema_transition_rate", "talr", "talr_scale",
                  "prev_levels", "talr_count"):
      chex.assert_trees_all_equal(getattr(s_a, field), getattr(s_b, field))
    seen += float(np.min(np.asarray(jax.tree.leaves(s_a.transition_rate))))
    p_a = optax.apply_updates(p_a, u_a)
    p_b = optax.apply_updates(p_b, u_b)
  assert seen > 0  # every tensor saw transitions: the counts were exercised
