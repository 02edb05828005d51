"""Robustness of the TALR optimizers: dtypes, non-finite values, Optax wrappers, misuse.

Every optimizer in ``_OPTIMIZERS`` goes through the same checks. The recursion
itself is checked against a reference in ``test_transform.py``, Optax's
optimizer contract in ``test_contract.py``, sharding in ``test_sharding.py``.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import talr_optax as talr
from reference import levels as ref_levels

# ---------------------------------------------------------------------------
# A small problem: two quantized tensors and one full-precision leaf.

SCALES = {"a": 3.0, "b": 3.0, "fp": None}
LEVELS_FN = talr.levels_fn_from_scales(SCALES, bits=2)
QUANTIZED = ("a", "b")  # the rate names, in the order of the rate vectors
RATE_FIELDS = ("transition_rate", "ema_transition_rate", "target_transition_rate", "talr",
               "talr_scale")


def _params(dtype=jnp.float32, seed=0, shapes=None):
  rng = np.random.default_rng(seed)
  shapes = shapes or {"a": (8, 16), "b": (32,), "fp": (5,)}
  return {k: jnp.asarray(rng.normal(size=s), dtype) for k, s in shapes.items()}


def _grads(params, step):
  """A gradient that depends on the params (NaN params give NaN gradients)."""
  rng = np.random.default_rng(1000 + step)
  return {k: (0.1 * v + jnp.asarray(rng.normal(size=v.shape), v.dtype)).astype(v.dtype)
          for k, v in params.items()}


# name -> levels_fn -> GradientTransformation. The catalogue the tests share.
_OPTIMIZERS = {
    "sgdt": lambda lf: talr.sgdt(0.05, 0.02, lf, momentum=0.9, weight_decay=1e-4),
    "adamt": lambda lf: talr.adamt(1e-2, 0.02, lf, weight_decay=1e-4),
    "adamwt": lambda lf: talr.adamwt(
        optax.cosine_decay_schedule(1e-2, 100), talr.cosine_target(0.02, 100), lf),
    "talr_additive": lambda lf: talr.scale_by_talr(
        0.02, lf, learning_rate=0.05, rule="additive", fallback_learning_rate=0.05),
    "talr_global": lambda lf: talr.scale_by_talr(
        0.02, lf, learning_rate=0.05, granularity="global", fallback_learning_rate=0.05),
    "track_sgd": lambda lf: optax.chain(optax.sgd(0.05), talr.track_transitions(lf, 0.02)),
}
OPT_NAMES = tuple(_OPTIMIZERS)
# The same optimizers inside Optax's wrappers.
_WRAPPED = {
    **_OPTIMIZERS,
    "masked": lambda lf: optax.masked(_OPTIMIZERS["sgdt"](lf), {"a": True, "b": True,
                                                                "fp": False}),
    "partition": lambda lf: optax.partition(
        {"q": talr.sgdt(0.05, 0.02, lf), "fp": optax.sgd(0.1)},
        {"a": "q", "b": "q", "fp": "fp"}),
    "multisteps": lambda lf: optax.MultiSteps(_OPTIMIZERS["adamt"](lf), every_k_schedule=2),
    "inject": lambda lf: optax.inject_hyperparams(talr.sgdt, static_args=("levels_fn",))(
        learning_rate=0.05, target_transition_rate=0.02, levels_fn=lf),
    "apply_if_finite": lambda lf: optax.apply_if_finite(_OPTIMIZERS["sgdt"](lf), 3),
}


@functools.cache
def _tx(name):
  """One transformation per name, shared by the tests..."""
  return _WRAPPED[name](LEVELS_FN)


@functools.cache
def _guarded(name):
  return optax.apply_if_finite(_tx(name), max_consecutive_errors=3)


_JITTED = {}


def _jit_step(tx):
  """...and one jitted step per transformation: each compiles once per input type."""
  if id(tx) not in _JITTED:
    _JITTED[id(tx)] = (tx, jax.jit(_step(tx)))  # keeps tx alive, so id(tx) stays unique
  return _JITTED[id(tx)][1]


def _step(tx):
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return step


def _train(tx, params, steps, start=0, state=None, step_fn=None):
  state = tx.init(params) if state is None else state
  step_fn = step_fn or _jit_step(tx)
  for t in range(start, start + steps):
    params, state = step_fn(params, state, _grads(params, t))
  return params, state


def _is_talr_state(x):
  return isinstance(x, (talr.ScaleByTALRState, talr.TrackTransitionsState))


def _talr_states(opt_state):
  return [s for s in jax.tree.leaves(opt_state, is_leaf=_is_talr_state) if _is_talr_state(s)]


def _rate_vectors(s):
  return [getattr(s, f) for f in RATE_FIELDS if hasattr(s, f)]


def _entry(s, field, name):
  """The entry of a rate vector for one rate group."""
  return getattr(s, field)[s.rate_names.names.index(name)]


def _host_k(before, after, granularity="per_tensor"):
  """k of one update from the host: the fraction of levels it changed (NumPy reference)."""
  changed, sizes = [], []
  for key in QUANTIZED:
    old = ref_levels(np.asarray(before[key], np.float64), SCALES[key], 2)
    new = ref_levels(np.asarray(after[key], np.float64), SCALES[key], 2)
    changed.append(np.sum(old != new))
    sizes.append(old.size)
  if granularity == "global":
    return np.array([sum(changed) / sum(sizes)])
  return np.array(changed) / np.array(sizes)


def _assert_k_is_the_host_count(state, before, after, granularity="per_tensor"):
  want = _host_k(before, after, granularity)
  if granularity == "global":  # a float32 weighted mean of per-tensor rates
    np.testing.assert_allclose(state.transition_rate, want, rtol=1e-6)
  else:  # count / size, rounded once to float32
    np.testing.assert_array_equal(state.transition_rate, want.astype(np.float32))


# ---------------------------------------------------------------------------
# 1. Dtypes.

_DTYPES = [  # (param dtype, jax_enable_x64)
    pytest.param(jnp.bfloat16, False, id="bfloat16"),
    pytest.param(jnp.float16, False, id="float16"),
    pytest.param(jnp.float64, True, id="float64-x64"),
]


@pytest.mark.parametrize("opt_name, dtype, x64", [
    pytest.param(name, *d.values, id=f"{name}-{d.id}")
    for name in OPT_NAMES if name != "adamt" for d in _DTYPES  # adamwt covers Adam
    if d.id != "float16" or name in ("sgdt", "talr_global", "track_sgd")
] + [pytest.param("sgdt", jnp.float32, True, id="sgdt-float32-x64")])
def test_dtypes_keep_updates_in_param_dtype_and_count_exactly(opt_name, dtype, x64):
  with jax.enable_x64(x64):
    params = _params(dtype)
    assert params["a"].dtype == dtype
    tx = _tx(opt_name)
    state = jax.jit(tx.init)(params)
    init_state = state
    update = jax.jit(tx.update)
    granularity = "global" if opt_name == "talr_global" else "per_tensor"
    for t in range(3):
      updates, state = update(_grads(params, t), state, params)
      for k in params:
        assert updates[k].dtype == dtype, (k, updates[k].dtype)
      new_params = optax.apply_updates(params, updates)
      (s,) = _talr_states(state)
      # k of the update: the levels of the params in their own dtype, counted
      # on the host, before and after it.
      _assert_k_is_the_host_count(s, params, new_params, granularity)
      params = new_params
    chex.assert_trees_all_equal_shapes_and_dtypes(init_state, state)
    names = ("",) if granularity == "global" else QUANTIZED
    assert s.rate_names.names == names
    for x in _rate_vectors(s):
      assert x.dtype == jnp.float32 and x.shape == (len(names),)
      assert np.all(np.isfinite(x))
    for k in QUANTIZED:
      assert s.prev_levels[k].dtype == jnp.int8
      assert s.prev_levels[k].shape == params[k].shape
      np.testing.assert_array_equal(
          s.prev_levels[k], ref_levels(np.asarray(params[k], np.float64), SCALES[k], 2))
    assert s.prev_levels["fp"] is None
    if isinstance(s, talr.ScaleByTALRState):
      assert s.talr_count.dtype == jnp.int32 and int(s.talr_count) == 3


def test_levels_are_those_of_the_rounded_bfloat16_params():
  # Under jit XLA may keep params + updates of bfloat16 params in float32
  # (excess precision) where levels_fn reads them; the stored levels must be
  # those of the rounded params the step returns, or the next k is off.
  tx = _tx("sgdt")
  params = _params(jnp.bfloat16)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for t in range(20):
    updates, state = update(_grads(params, t), state, params)
    new_params = optax.apply_updates(params, updates)
    _assert_k_is_the_host_count(state[-1], params, new_params)
    for k in QUANTIZED:
      np.testing.assert_array_equal(
          state[-1].prev_levels[k],
          ref_levels(np.asarray(new_params[k], np.float64), SCALES[k], 2))
    params = new_params


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_run_follows_the_float32_run(dtype):
  tx = _tx("sgdt")
  _, s32 = _train(tx, _params(jnp.float32), 20)
  plo, slo = _train(tx, _params(dtype), 20)
  assert plo["a"].dtype == dtype
  t32, tlo = s32[-1], slo[-1]
  assert float(jnp.sum(t32.transition_rate)) > 0  # the runs do cross levels
  # Same rates up to the few weights that round across a transition
  # differently in low precision.
  np.testing.assert_allclose(tlo.talr, t32.talr, rtol=0.05)
  for k in QUANTIZED:
    assert float(jnp.mean(tlo.prev_levels[k] != t32.prev_levels[k])) < 0.05


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
def test_frozen_tensor_saturates_without_nan_and_zero_gradient_stays_zero(dtype):
  # A quantized tensor that stops moving (zero gradient: a frozen layer, or
  # all weights beyond the clip range) has k = 0, so K -> 0 and the
  # multiplicative rule grows c geometrically; then the target decays to 0.
  # c and U must saturate at the largest float32, never inf (inf * 0 = NaN).
  steps = 400
  params = {"a": _params(dtype)["a"], "b": jnp.linspace(-1, 1, 32).astype(dtype)}
  lf = talr.levels_fn_from_scales({"a": 3.0, "b": 1.0}, 2)
  tx = talr.scale_by_talr(talr.cosine_target(0.05, steps - 50), lf, learning_rate=0.1,
                          ema_momentum=0.9)
  state = tx.init(params)

  def body(carry, t):
    p, s = carry
    g = {"a": jax.random.normal(jax.random.fold_in(jax.random.key(0), t), p["a"].shape,
                                p["a"].dtype),
         "b": jnp.zeros_like(p["b"])}
    u, s = tx.update(g, s, p)
    return (optax.apply_updates(p, u), s), (u["b"], s.talr[1], s.talr_scale[1])

  (p, s), (ub, u_b, c_b) = jax.jit(lambda c: jax.lax.scan(body, c, jnp.arange(steps)))(
      (params, state))
  assert np.all(np.asarray(ub) == 0)
  np.testing.assert_array_equal(p["b"], params["b"])
  f32_max = np.finfo(np.float32).max
  assert float(jnp.max(c_b)) == f32_max  # grew as the method prescribes, then saturated
  assert float(jnp.max(u_b)) == np.float32(0.1) * f32_max  # U = lr * c
  assert np.all(np.isfinite(u_b)) and np.all(np.isfinite(c_b))
  assert float(u_b[-1]) < f32_max  # R = 0 at the end: c decays by m per step
  for x in _rate_vectors(s):
    assert np.all(np.isfinite(x))
  assert np.all(np.isfinite(np.asarray(p["a"], np.float32)))
  assert np.all(np.isfinite(np.asarray(s.talr)))


# ---------------------------------------------------------------------------
# 2. Non-finite values.


@pytest.mark.parametrize("opt_name, bad", [
    ("sgdt", np.nan), ("sgdt", np.inf), ("talr_global", -np.inf), ("track_sgd", np.nan)])
def test_apply_if_finite_leaves_talr_state_exactly_unchanged(opt_name, bad):
  tx = _guarded(opt_name)
  step = _jit_step(tx)
  params, state = _train(tx, _params(), 4, step_fn=step)
  grads = _grads(params, 99)
  grads["a"] = grads["a"].at[2, 3].set(bad)
  updates, new_state = jax.jit(tx.update)(grads, state, params)
  chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, updates))
  chex.assert_trees_all_equal(new_state.inner_state, state.inner_state)  # bitwise
  assert int(new_state.notfinite_count) == 1
  # The skipped step leaves no trace: the run continues as if it never came.
  params_skip, state_skip = _train(
      tx, optax.apply_updates(params, updates), 3, start=4, state=new_state, step_fn=step)
  params_ref, state_ref = _train(tx, params, 3, start=4, state=state, step_fn=step)
  chex.assert_trees_all_equal(params_skip, params_ref)
  chex.assert_trees_all_equal(state_skip.inner_state, state_ref.inner_state)


@pytest.mark.parametrize("opt_name", ["sgdt", "talr_additive", "track_sgd"])
def test_nan_params_in_one_tensor_leave_other_tensors_untouched(opt_name):
  tx = _tx(opt_name)
  step = _jit_step(tx)
  params, state = _train(tx, _params(), 3, step_fn=step)
  clean_params, clean_state = _train(tx, params, 4, start=3, state=state, step_fn=step)
  bad = dict(params, b=params["b"].at[:5].set(jnp.nan))  # tensor b diverged
  nan_params, nan_state = _train(tx, bad, 4, start=3, state=state, step_fn=step)
  assert np.isnan(np.asarray(nan_params["b"])).any()
  # Tensor a and the full-precision leaf are bit-identical to the clean run.
  for s_nan, s_clean in zip(_talr_states(nan_state), _talr_states(clean_state)):
    np.testing.assert_array_equal(s_nan.prev_levels["a"], s_clean.prev_levels["a"])
    for f in RATE_FIELDS:
      if hasattr(s_nan, f):
        np.testing.assert_array_equal(_entry(s_nan, f, "a"), _entry(s_clean, f, "a"),
                                      err_msg=f)
  np.testing.assert_array_equal(nan_params["a"], clean_params["a"])
  np.testing.assert_array_equal(nan_params["fp"], clean_params["fp"])
  # Tensor b: its rates stay finite, its NaN weights sit at level 0.
  for s in _talr_states(nan_state):
    for x in _rate_vectors(s):
      assert np.all(np.isfinite(x))
    lv = np.asarray(s.prev_levels["b"])
    assert np.all(lv[np.isnan(np.asarray(nan_params["b"]))] == 0)


def test_nan_params_under_global_granularity_keep_the_shared_rate_finite():
  tx = _tx("talr_global")
  step = _jit_step(tx)
  params, state = _train(tx, _params(), 3, step_fn=step)
  bad = dict(params, b=params["b"].at[:5].set(jnp.nan))
  nan_params, nan_state = _train(tx, bad, 4, start=3, state=state, step_fn=step)
  for x in _rate_vectors(nan_state):
    assert np.all(np.isfinite(x))
  assert np.all(np.isfinite(np.asarray(nan_params["a"])))


def test_nan_weights_count_one_burst_of_transitions_then_none():
  lf = talr.levels_fn_from_scales({"w": 1.0}, 2)
  tx = talr.scale_by_talr(0.1, lf, learning_rate=0.1, ema_momentum=0.0)
  w = jnp.array([0.3, 0.3, -0.3, -0.9])  # levels [1, 1, -1, -2]
  state = tx.init({"w": w})
  nan_w = {"w": w.at[0].set(jnp.nan).at[2].set(jnp.nan)}
  g = {"w": jnp.zeros(4)}
  update = jax.jit(tx.update)
  _, state = update(g, state, nan_w)
  np.testing.assert_array_equal(state.transition_rate, [0.5])  # both moved to level 0
  np.testing.assert_array_equal(state.prev_levels["w"], [0, 1, 0, -2])
  _, state = update(g, state, nan_w)
  np.testing.assert_array_equal(state.transition_rate, [0.0])
  assert np.isfinite(float(state.talr[0]))


@pytest.mark.parametrize("bits", range(1, 9))
def test_levels_of_non_finite_weights_are_defined(bits):
  q = talr.quantizers.weight_range(bits)
  w = jnp.array([jnp.nan, jnp.inf, -jnp.inf, 0.0])
  level_of_zero = int(talr.weight_levels(jnp.zeros(1), 1.0, bits)[0])
  expected = [level_of_zero, q.beta, q.alpha, level_of_zero]
  np.testing.assert_array_equal(talr.weight_levels(w, 1.0, bits), expected)
  np.testing.assert_array_equal(jax.jit(talr.weight_levels, static_argnums=2)(w, 1.0, bits),
                                expected)
  a = talr.activation_levels(jnp.array([jnp.nan, jnp.inf, 0.0]), 1.0, bits)
  np.testing.assert_array_equal(a, [0, 2**bits - 1, 0])


# ---------------------------------------------------------------------------
# 3. Optax wrappers.


@pytest.mark.parametrize("opt_name", ["adamt", "talr_global", "track_sgd"])
def test_multisteps_counts_transitions_once_per_real_update(opt_name):
  k, updates_n = 3, 4
  inner = _tx(opt_name)
  ms = optax.MultiSteps(inner, every_k_schedule=k)
  ms_step, ref_step = jax.jit(_step(ms)), _jit_step(inner)
  params = ref_params = _params()
  state, ref_state = ms.init(params), inner.init(params)
  for n in range(updates_n):
    # The same gradient k times: its running mean is exact, so the
    # accumulated run must equal the plain one (up to XLA fusing the two
    # programs differently: 1 ulp).
    g = _grads(params, n)
    for i in range(k):
      before = state.inner_opt_state
      params, state = ms_step(params, state, g)
      if i < k - 1:  # mini-step: the inner TALR state does not move
        chex.assert_trees_all_equal(state.inner_opt_state, before)
    ref_params, ref_state = ref_step(ref_params, ref_state, g)
  chex.assert_trees_all_close(state.inner_opt_state, ref_state, rtol=1e-5, atol=1e-7)
  chex.assert_trees_all_close(params, ref_params, rtol=1e-5, atol=1e-7)
  for s, ref in zip(_talr_states(state), _talr_states(ref_state)):
    chex.assert_trees_all_equal(s.prev_levels, ref.prev_levels)
    np.testing.assert_array_equal(s.transition_rate, ref.transition_rate)
    if isinstance(s, talr.ScaleByTALRState):
      assert int(s.talr_count) == int(ref.talr_count) == updates_n


def test_masked_talr_sees_masked_nodes_and_leaves_them_alone():
  tx = _tx("masked")
  params = _params()
  state = tx.init(params)
  grads = _grads(params, 0)
  updates, state = jax.jit(tx.update)(grads, state, params)
  np.testing.assert_array_equal(updates["fp"], grads["fp"])  # untouched
  (s,) = _talr_states(state)
  assert s.prev_levels["fp"] is None
  assert s.rate_names.names == QUANTIZED
  plain = _tx("sgdt")
  ref_updates, ref_state = plain.update(grads, plain.init(params), params)
  for k in QUANTIZED:
    np.testing.assert_allclose(updates[k], ref_updates[k], rtol=1e-6)
  np.testing.assert_array_equal(s.transition_rate, ref_state[-1].transition_rate)


def test_partition_routes_the_quantized_group_to_talr():
  labels = {"a": "q", "b": "q", "fp": "fp"}
  sgdt = talr.sgdt(0.05, 0.02, LEVELS_FN, momentum=0.9)
  tx = optax.partition({"q": sgdt, "fp": optax.adam(1e-3)}, labels)
  params = _params()
  p, state = _train(tx, params, 5)
  p_ref, s_ref = _train(sgdt, params, 5)  # fallback lr on fp, same TALR
  for k in QUANTIZED:
    np.testing.assert_allclose(p[k], p_ref[k], rtol=1e-6)
  (s,) = _talr_states(state)
  np.testing.assert_allclose(s.talr, s_ref[-1].talr, rtol=1e-6)
  assert set(talr.metrics(state)) == set(talr.metrics(s_ref))


def test_partition_with_a_levels_fn_unaware_of_masked_nodes():
  # A hand-written levels_fn that quantizes "b" too, but "b" is routed to
  # another optimizer: under partition it receives an optax.MaskedNode there,
  # whose "levels" are empty, so it gets no rate and TALR leaves it alone.
  lf = lambda p: {"a": talr.weight_levels(p["a"], 3.0, 2),
                  "b": talr.weight_levels(p["b"], 3.0, 2), "fp": None}
  talr_tx = talr.scale_by_talr(0.02, lf, learning_rate=0.1)
  tx = optax.partition({"q": talr_tx, "fp": optax.sgd(0.1)}, {"a": "q", "b": "fp", "fp": "fp"})
  params = _params()
  state = tx.init(params)
  grads = _grads(params, 0)
  updates, state = tx.update(grads, state, params)
  (s,) = _talr_states(state)
  assert s.rate_names.names == ("a",)
  np.testing.assert_allclose(updates["a"], -0.1 * grads["a"], rtol=1e-6)
  np.testing.assert_allclose(updates["b"], -0.1 * grads["b"], rtol=1e-6)  # plain sgd


@pytest.mark.parametrize("factory, kwargs", [
    (talr.sgdt, dict(learning_rate=0.05, target_transition_rate=0.02, weight_decay=1e-4)),
    (talr.sgdt, dict(learning_rate=0.05, target_transition_rate=0.02, momentum=None)),
    (talr.adamwt, dict(learning_rate=1e-2, target_transition_rate=0.02)),
    (talr.scale_by_talr, dict(target_transition_rate=0.02, learning_rate=0.05,
                              fallback_learning_rate=0.05, rule="additive")),
], ids=["sgdt", "sgdt-no-momentum", "adamwt", "scale_by_talr-additive"])
def test_inject_hyperparams_with_a_traced_target_matches_the_plain_optimizer(factory, kwargs):
  # Every numeric hyperparameter, the target included, arrives traced.
  plain = factory(levels_fn=LEVELS_FN, **kwargs)
  injected = optax.inject_hyperparams(factory, static_args=("levels_fn",))(
      levels_fn=LEVELS_FN, **kwargs)
  params = _params()
  state = jax.jit(injected.init)(params)
  assert "target_transition_rate" in state.hyperparams
  p1, s1 = _train(plain, params, 5, state=jax.jit(plain.init)(params))
  p2, s2 = _train(injected, params, 5, state=state)
  chex.assert_trees_all_close(p2, p1, rtol=1e-5, atol=1e-7)
  (t1,), (t2,) = _talr_states(s1), _talr_states(s2)
  chex.assert_trees_all_close(t2, t1, rtol=1e-5, atol=1e-7)


def test_inject_hyperparams_with_bfloat16_params():
  # inject_hyperparams casts float hyperparameters to the params' dtype by
  # default: the target is then bfloat16-rounded; hyperparam_dtype=jnp.float32
  # keeps it exact.
  params = _params(jnp.bfloat16)
  kwargs = dict(learning_rate=0.05, target_transition_rate=0.02, levels_fn=LEVELS_FN)
  inject = lambda **kw: optax.inject_hyperparams(talr.sgdt, static_args=("levels_fn",), **kw)
  _, s_bf16 = _train(inject()(**kwargs), params, 2)
  _, s_f32 = _train(inject(hyperparam_dtype=jnp.float32)(**kwargs), params, 2)
  _, s_plain = _train(talr.sgdt(**kwargs), params, 2)
  r = lambda s: float(_entry(_talr_states(s)[0], "target_transition_rate", "a"))
  assert r(s_bf16) == float(jnp.asarray(0.02, jnp.bfloat16)) != r(s_plain)
  assert r(s_f32) == r(s_plain) == float(np.float32(0.02))


def test_inject_hyperparams_changes_lr_and_target_at_run_time_without_recompiling():
  tx = optax.inject_hyperparams(talr.sgdt, static_args=("levels_fn",))(
      learning_rate=0.05, target_transition_rate=0.02, levels_fn=LEVELS_FN, momentum=0.9)
  params = _params()
  state = tx.init(params)
  traces = []

  @jax.jit
  def step(params, state, grads):
    traces.append(1)  # runs only when jit traces
    return _step(tx)(params, state, grads)

  params, state = _train(tx, params, 2, state=state, step_fn=step)
  state.hyperparams["learning_rate"] = jnp.asarray(0.01, jnp.float32)
  state.hyperparams["target_transition_rate"] = jnp.asarray(0.05, jnp.float32)
  updates, new_state = jax.jit(tx.update)(_grads(params, 2), state, params)
  params, state = _train(tx, params, 2, start=2, state=state, step_fn=step)
  assert len(traces) == 1
  (s,) = _talr_states(state)
  np.testing.assert_allclose(s.target_transition_rate, [0.05, 0.05])
  # Multiplicative rule: U = lr * c with the new lr.
  np.testing.assert_allclose(s.talr, 0.01 * s.talr_scale, rtol=1e-6)
  # The full-precision leaf follows the new learning rate too.
  (trace_state,) = [x for x in new_state.inner_state if isinstance(x, optax.TraceState)]
  np.testing.assert_allclose(updates["fp"], -0.01 * trace_state.trace["fp"], rtol=1e-6)


def test_inject_hyperparams_without_static_levels_fn_is_a_clear_error():
  with pytest.raises(ValueError, match=r"static_args=\('levels_fn',\)"):
    optax.inject_hyperparams(talr.sgdt)(
        learning_rate=0.05, target_transition_rate=0.02, levels_fn=LEVELS_FN
    ).init(_params())
  # A levels_fn that survives being called with a step count reaches the
  # factory as a non-callable value.
  lenient = lambda p: None if getattr(p, "ndim", 1) == 0 else LEVELS_FN(p)
  with pytest.raises(ValueError, match=r"static_args=\('levels_fn',\)"):
    optax.inject_hyperparams(talr.sgdt)(
        learning_rate=0.05, target_transition_rate=0.02, levels_fn=lenient
    ).init(_params())


@pytest.mark.parametrize("name", [n for n in _WRAPPED if n not in ("adamt", "adamwt")])
def test_eval_shape_init_matches_init(name):
  tx = _tx(name)
  params = _params()
  chex.assert_trees_all_equal_shapes_and_dtypes(jax.eval_shape(tx.init, params),
                                                tx.init(params))


@pytest.mark.parametrize("name", ["sgdt", "talr_global", "track_sgd", "inject",
                                  "multisteps"])
@pytest.mark.filterwarnings("error:Some donated buffers were not usable")
def test_donated_params_and_state_from_fresh_init(name):
  tx = _tx(name)
  params = _params()
  ref_params, ref_state = _train(tx, params, 3)
  donating = jax.jit(_step(tx), donate_argnums=(0, 1))
  p, s = jax.tree.map(jnp.copy, params), tx.init(params)  # fresh state, donated
  first = p["a"]
  first_rate = _talr_states(s)[0].ema_transition_rate
  p, s = _train(tx, p, 3, state=s, step_fn=donating)
  assert first.is_deleted() and first_rate.is_deleted()  # really donated
  chex.assert_trees_all_equal(p, ref_params)
  chex.assert_trees_all_equal(s, ref_state)


@pytest.mark.parametrize("opt_name", ["talr_global", "track_sgd"])
def test_update_accepts_unknown_extra_args_and_does_not_recompile(opt_name):
  tx = _tx(opt_name)
  traces = []

  @jax.jit
  def step(params, state, grads):
    traces.append(1)
    updates, state = tx.update(grads, state, params, some_unexpected_arg=1)
    return optax.apply_updates(params, updates), state

  params = _params()
  state = tx.init(params)
  for t in range(3):
    params, state = step(params, state, _grads(params, t))
  assert len(traces) == 1
  assert int(jnp.sum(_talr_states(state)[0].transition_rate > 0)) >= 1


# ---------------------------------------------------------------------------
# 4. Careless use: the behaviour is defined and says what happened.


def _schedule(values):
  """A target schedule with the given values at steps 0, 1, ... (then the last)."""
  table = jnp.asarray(values, jnp.float32)
  return lambda count: table[jnp.minimum(count, len(values) - 1)]


@pytest.mark.parametrize("rule", ["multiplicative", "additive"])
def test_target_leaving_the_unit_interval_is_clipped_and_nan_acts_as_zero(rule):
  bad = [0.02, 5.0, -3.0, np.nan, np.inf, -np.inf, 0.3, np.nan, 0.02]
  clean = [0.02, 1.0, 0.0, 0.0, 1.0, 0.0, 0.3, 0.0, 0.02]
  make = lambda values: talr.scale_by_talr(
      _schedule(values), LEVELS_FN, learning_rate=0.05, rule=rule, ema_momentum=0.5,
      fallback_learning_rate=0.05)
  runs = []
  for values in (bad, clean):
    tx = make(values)
    params, state = _params(), tx.init(_params())
    update = jax.jit(tx.update)
    states = []
    for t in range(len(bad) + 2):
      updates, state = update(_grads(params, t), state, params)
      params = optax.apply_updates(params, updates)
      states.append(state)
    runs.append((params, states))
  (p_bad, s_bad), (p_clean, s_clean) = runs
  for n, (a, b) in enumerate(zip(s_bad, s_clean)):
    # The stored target of update n is R(n + 1), clipped; NaN as 0.
    want = clean[min(n + 1, len(clean) - 1)]
    np.testing.assert_array_equal(a.target_transition_rate, np.full(2, want, np.float32))
    for x in _rate_vectors(a):
      assert np.all(np.isfinite(x)), n
    # U bounded: the run is the run of the clipped schedule, bit for bit.
    chex.assert_trees_all_equal(a, b)
  chex.assert_trees_all_equal(p_bad, p_clean)
  u = np.stack([s.talr for s in s_bad])
  assert np.all(u >= 0) and np.all(u < 10.0)


def _with_empty(params, shape):
  return dict(params, z=jnp.zeros(shape, params["a"].dtype))


@pytest.mark.parametrize("shape, layer_axes", [((0, 16), None), ((3, 0), {"z": 0}),
                                               ((0, 4), {"z": 0})])
def test_zero_size_quantized_tensor_has_no_rate_and_changes_nothing_else(shape, layer_axes):
  lf = talr.levels_fn_from_scales(dict(SCALES, z=1.0), 2)
  axes = None if layer_axes is None else dict({"a": None, "b": None, "fp": None}, **layer_axes)
  with_z = talr.sgdt(0.05, 0.02, lf, momentum=0.9, weight_decay=1e-4, layer_axes=axes)
  without = _tx("sgdt")
  params = _params()
  p_z, s_z = _train(with_z, _with_empty(params, shape), 4)
  p_0, s_0 = _train(without, params, 4)
  assert p_z["z"].shape == shape
  t_z, t_0 = s_z[-1], s_0[-1]
  assert t_z.rate_names.names == QUANTIZED
  for x in _rate_vectors(t_z):
    assert np.all(np.isfinite(x))
  for f in RATE_FIELDS:
    np.testing.assert_array_equal(getattr(t_z, f), getattr(t_0, f), err_msg=f)
  for k in params:
    np.testing.assert_array_equal(p_z[k], p_0[k])
  assert float(jnp.sum(t_0.transition_rate)) > 0


def test_zero_size_quantized_tensor_under_global_rate_and_monitor():
  lf = talr.levels_fn_from_scales(dict(SCALES, z=1.0), 2)
  params = _params()
  for make in (lambda f: talr.scale_by_talr(0.02, f, learning_rate=0.05,
                                            granularity="global",
                                            fallback_learning_rate=0.05),
               lambda f: optax.chain(optax.sgd(0.05), talr.track_transitions(f, 0.02))):
    _, s_z = _train(make(lf), _with_empty(params, (0, 16)), 3, step_fn=jax.jit(
        _step(make(lf))))
    _, s_0 = _train(make(LEVELS_FN), params, 3, step_fn=jax.jit(_step(make(LEVELS_FN))))
    (t_z,), (t_0,) = _talr_states(s_z), _talr_states(s_0)
    assert t_z.rate_names == t_0.rate_names
    for x, y in zip(_rate_vectors(t_z), _rate_vectors(t_0)):
      assert np.all(np.isfinite(x))
      np.testing.assert_array_equal(x, y)


def test_zero_size_quantized_tensor_needs_no_fallback_learning_rate():
  lf = talr.levels_fn_from_scales({"a": 3.0, "z": 1.0}, 2)
  params = {"a": _params()["a"], "z": jnp.zeros((0, 16))}
  tx = talr.scale_by_talr(0.02, lf, learning_rate=0.05)
  state = tx.init(params)
  updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  assert updates["z"].shape == (0, 16)
  assert state.rate_names.names == ("a",)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, 0.0, -0.5, np.nan])
def test_levels_fn_from_scales_rejects_a_bad_step_size_by_name(bad):
  with pytest.raises(ValueError, match=r"scales\['conv/kernel'\] must be a finite step size"
                                       r" > 0.*got scales\['conv/kernel'\] = "):
    talr.levels_fn_from_scales({"conv": {"kernel": bad}, "bias": None}, 2)
  per_channel = np.array([1.0, bad, 2.0], np.float32)
  with pytest.raises(ValueError, match=r"scales\['w'\] must be a finite step size > 0"):
    talr.levels_fn_from_scales({"w": jnp.asarray(per_channel), "a": 1.0}, 2)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_count_transitions_on_weights_instead_of_levels_is_a_clear_error(jit):
  w = _params()["a"]
  levels = talr.weight_levels(w, 3.0, 2)
  count = jax.jit(talr.count_transitions) if jit else talr.count_transitions
  with pytest.raises(ValueError, match="got levels of dtype float32.*not the float weights"):
    count(w, levels)
  with pytest.raises(ValueError, match="got prev_levels of dtype bfloat16"):
    count(levels, w.astype(jnp.bfloat16))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_state_of_another_optimizer_names_both(jit):
  params = _params()
  sgdt = talr.sgdt(0.05, 0.02, LEVELS_FN)
  cases = [
      (sgdt, talr.adamt(0.05, 0.02, LEVELS_FN).init(params), "sgdt",
       r"\('TraceState', 'ScaleByTALRState'\), got \('ScaleByAdamState', 'ScaleByTALRState'\)"),
      # The same optimizer built without its momentum stage.
      (sgdt, talr.sgdt(0.05, 0.02, LEVELS_FN, momentum=None).init(params), "sgdt",
       r"got \('ScaleByTALRState',\)"),
      (talr.adamwt(1e-3, 0.02, LEVELS_FN), sgdt.init(params), "adamwt",
       r"\('ScaleByAdamState', 'EmptyState', 'ScaleByTALRState'\), got \('TraceState',"),
  ]
  for tx, state, name, match in cases:
    update = jax.jit(tx.update) if jit else tx.update
    with pytest.raises(ValueError, match=f"{name} got a state made by another optimizer"
                                         f".*{match}"):
      update(_grads(params, 0), state, params)


@pytest.mark.parametrize("make", [
    lambda lf: talr.scale_by_talr(0.02, lf, learning_rate=0.0625, ema_momentum=0.5,
                                  fallback_learning_rate=0.05),
    lambda lf: talr.scale_by_talr(optax.piecewise_constant_schedule(0.02, {4: 0.5}), lf,
                                  learning_rate=0.0625,
                                  ema_momentum=0.5, rule="additive", fallback_learning_rate=0.05),
    lambda lf: talr.scale_by_talr(0.02, lf, learning_rate=0.0625, ema_momentum=0.5,
                                  granularity="global", fallback_learning_rate=0.05),
    lambda lf: optax.chain(optax.scale(-0.125), talr.track_transitions(lf, 0.02, ema_momentum=0.5)),
], ids=["multiplicative", "additive", "global", "monitor"])
def test_eager_and_jitted_update_are_bitwise_identical(make):
  # XLA:CPU contracts a * b + c into one fused multiply-add under jit (the
  # moments of optax.adam differ in their last bit between eager and jit too).
  # XLA also folds constants together (k / size * (1 - m)). With m = 1/2, a power-of-2
  # learning rate and rate groups whose sizes are powers of 2, every product
  # in the recursion is exact, so any difference would come from the library:
  # a branch on concrete values, a host read-back, another code path.
  tx = make(LEVELS_FN)
  params = _params(shapes={"a": (8, 16), "b": (128,), "fp": (5,)})
  state = tx.init(params)
  update = jax.jit(tx.update)
  moved = 0.0
  for t in range(6):
    grads = jax.tree.map(lambda g: 4.0 * g, _grads(params, t))
    eager = tx.update(grads, state, params)
    jitted = update(grads, state, params)
    chex.assert_trees_all_equal(eager, jitted)
    updates, state = eager
    params = optax.apply_updates(params, updates)
    moved += float(jnp.sum(_talr_states(state)[0].transition_rate))
  assert moved > 0.1


@pytest.mark.parametrize("name, owner", [("sgdt", "scale_by_talr"),
                                         ("track_sgd", "track_transitions")])
def test_tree_map_params_is_a_clear_error(name, owner):
  # map_params calls init on a placeholder, which has no levels.
  tx = _tx(name)
  state = tx.init(_params())
  with pytest.raises(ValueError, match=f"optax.tree.map_params cannot map a {owner} state"
                                       r".*call tx.init \(or jax.jit\(tx.init\)\)"):
    optax.tree.map_params(tx, lambda v: v, state)


# ---------------------------------------------------------------------------
# 5. Bad input to scale_by_talr and track_transitions: a clear ValueError
# naming the argument. (The optimizers' arguments are in test_optimizers.py,
# the quantizers' in test_quantizers.py, the schedules' in test_schedules.py.)

_P = {"w": jnp.zeros(4)}
_LF = talr.levels_fn_from_scales({"w": 1.0}, 2)


def _init(levels_fn, params=None, **kw):
  kw = dict(dict(learning_rate=0.1), **kw)
  return lambda: talr.scale_by_talr(0.01, levels_fn, **kw).init(params or _P)


def _talr_kw(target=0.01, **kw):
  return lambda: talr.scale_by_talr(target, _LF, **kw)


_BAD = {
    "lr 0": (_talr_kw(learning_rate=0.0),
             r"learning_rate must be in \(0, inf\), got learning_rate = 0.0"),
    "lr negative": (_talr_kw(learning_rate=-1), r"learning_rate must be in \(0, inf\)"),
    "lr nan": (_talr_kw(learning_rate=float("nan")), r"learning_rate must be in \(0, inf\)"),
    "lr inf": (_talr_kw(learning_rate=float("inf")), r"learning_rate must be in \(0, inf\)"),
    "lr string": (_talr_kw(learning_rate="0.1"), "learning_rate must be a real number"),
    "lr vector": (_talr_kw(learning_rate=jnp.ones(2)), "learning_rate must be a real number"),
    "lr schedule": (_talr_kw(learning_rate=lambda t: 0.1), "learning_rate must be a real number"),
    "ema_momentum 1": (_talr_kw(learning_rate=0.1, ema_momentum=1.0), r"ema_momentum must be in \[0, 1\)"),
    "ema_momentum nan": (_talr_kw(learning_rate=0.1, ema_momentum=float("nan")),
                     r"ema_momentum must be in \[0, 1\)"),
    "rule": (_talr_kw(learning_rate=0.1, rule="exp"),
             r"rule must be one of \('multiplicative', 'additive'\)"),
    "granularity": (_talr_kw(learning_rate=0.1, granularity="layer"),
                    r"granularity must be one of \('per_tensor', 'global'\)"),
    "additive_step without additive": (_talr_kw(learning_rate=0.1, additive_step=0.1),
                                       "additive_step is the step of the additive rule"),
    "additive_step 0": (_talr_kw(learning_rate=0.1, rule="additive", additive_step=0.0),
                        r"additive_step must be in \(0, inf\)"),
    "fallback negative": (_talr_kw(learning_rate=0.1, fallback_learning_rate=-0.1),
                          r"fallback_learning_rate must be in \(0, inf\)"),
    "sample_size 0": (_talr_kw(learning_rate=0.1, sample_size=0),
                      "sample_size must be an integer >= 1, got sample_size = 0"),
    "sample_size float": (_talr_kw(learning_rate=0.1, sample_size=100.0),
                          "sample_size must be an integer >= 1"),
    "target negative": (_talr_kw(target=-0.1, learning_rate=0.1),
                        r"target_transition_rate must be in \[0, 1\]"),
    "target nan": (_talr_kw(target=float("nan"), learning_rate=0.1),
                   r"target_transition_rate must be in \[0, 1\]"),
    "target schedule above 1": (
        _talr_kw(target=optax.constant_schedule(5.0), learning_rate=0.1),
        r"target_transition_rate must be a rate in \[0, 1\].*value at step 0 is 5.0"),
    "levels_fn not callable": (lambda: talr.scale_by_talr(0.01, {"w": 1}, learning_rate=0.1),
                               "levels_fn must be a function params -> levels"),
    "levels bool": (_init(lambda p: {"w": p["w"] > 0}), "integer levels.*dtype bool"),
    "levels string": (_init(lambda p: {"w": "levels"}), "integer levels.*got str"),
    "levels list": (_init(lambda p: {"w": [0, 0, 0, 0]}), "integer levels.*got int"),
    "levels one array for a subtree": (
        _init(lambda p: {"w": talr.weight_levels(p["w"]["x"], 1.0, 2)},
              params={"w": {"x": jnp.zeros(4), "y": jnp.zeros(2)}},
              fallback_learning_rate=0.1),
        "one level array at 'w' where params hold a subtree with 2 leaves"),
    "params of another model in update": (
        lambda: (lambda tx: tx.update({"w": jnp.zeros(5)}, tx.init(_P), {"w": jnp.zeros(5)}))(
            talr.scale_by_talr(0.01, _LF, learning_rate=0.1)),
        r"the state holds \(4,\) levels at 'w', whose param has shape \(5,\): levels_fn"
        r" changed which leaves are quantized, or their shapes, since init"),
    "track ema_momentum": (lambda: talr.track_transitions(_LF, 0.01, ema_momentum=1.5),
                       r"ema_momentum must be in \[0, 1\)"),
    "track initial_rate": (lambda: talr.track_transitions(_LF, -1),
                           r"initial_rate must be in \[0, 1\]"),
    "track initial_rate schedule": (lambda: talr.track_transitions(_LF, lambda t: 2.0),
                                    r"initial_rate must be a rate in \[0, 1\]"),
    "track levels_fn": (lambda: talr.track_transitions("levels", 0.01),
                        "levels_fn must be a function"),
    "track sample_size": (lambda: talr.track_transitions(_LF, 0.01, sample_size=-1),
                          "sample_size must be an integer >= 1"),
}


@pytest.mark.parametrize("case", tuple(_BAD))
def test_bad_input_raises_value_error_naming_the_argument(case):
  thunk, match = _BAD[case]
  with pytest.raises(ValueError, match=match):
    thunk()


def test_numpy_numbers_are_accepted_where_python_numbers_are():
  tx = talr.sgdt(np.float32(0.1), np.float32(0.01), _LF, momentum=np.float64(0.9),
                 ema_momentum=np.float32(0.5), sample_size=np.int64(2))
  state = tx.init(_P)
  np.testing.assert_allclose(state[-1].talr, [0.1])
  monitor = talr.track_transitions(_LF, np.float64(0.01), ema_momentum=np.float32(0.9))
  np.testing.assert_allclose(monitor.init(_P).ema_transition_rate, [0.01])
