"""Robustness of the TALR optimizers: dtypes, non-finite steps, Optax wrappers, bad input.

Modelled on ``optax/contrib/_common_test.py``: every optimizer in
``_OPTIMIZERS`` goes through the same checks. Sharding over several devices is
in ``test_sharding.py`` and checkpoint/resume in ``test_checkpoint.py``.
"""

from __future__ import annotations

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import talr_optax as talr

# ---------------------------------------------------------------------------
# A small problem: two quantized tensors and one full-precision leaf.

SCALES = {"a": 3.0, "b": 3.0, "fp": None}
LEVELS_FN = talr.levels_fn_from_scales(SCALES, bits=2)
QUANTIZED = ("a", "b")


def _params(dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  shapes = {"a": (8, 16), "b": (32,), "fp": (5,)}
  return {k: jnp.asarray(rng.normal(size=s), dtype) for k, s in shapes.items()}


def _grads(params, step):
  """A gradient that depends on the params (NaN params give NaN gradients)."""
  rng = np.random.default_rng(1000 + step)
  return {k: (0.1 * v + jnp.asarray(rng.normal(size=v.shape), v.dtype)).astype(v.dtype)
          for k, v in params.items()}


# name -> levels_fn -> GradientTransformation. The catalogue every test uses.
_OPTIMIZERS = {
    "sgdt": lambda lf: talr.sgdt(0.05, 0.02, lf, momentum=0.9, weight_decay=1e-4),
    "adamt": lambda lf: talr.adamt(1e-2, 0.02, lf, weight_decay=1e-4),
    "adamwt": lambda lf: talr.adamwt(
        optax.cosine_decay_schedule(1e-2, 100), talr.cosine_target(0.02, 100), lf),
    "talr_additive": lambda lf: talr.scale_by_talr(
        0.02, lf, learning_rate=0.05, rule="additive", fallback_learning_rate=0.05),
    "talr_global": lambda lf: talr.scale_by_talr(
        0.02, lf, learning_rate=0.05, granularity="global", fallback_learning_rate=0.05),
    "track_sgd": lambda lf: optax.chain(talr.track_transitions(lf), optax.sgd(0.05)),
}
OPT_NAMES = tuple(_OPTIMIZERS)
# The same optimizers inside Optax's wrappers.
_WRAPPED = {
    **{name: make for name, make in _OPTIMIZERS.items()},
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


def _is_talr_state(x):
  return isinstance(x, (talr.ScaleByTALRState, talr.TrackTransitionsState))


def _talr_states(opt_state):
  return [s for s in jax.tree.leaves(opt_state, is_leaf=_is_talr_state) if _is_talr_state(s)]


def _rate_leaves(s):
  fields = ["transition_rate", "ema_transition_rate"]
  if isinstance(s, talr.ScaleByTALRState):
    fields += ["target_transition_rate", "talr", "talr_scale"]
  return [x for f in fields for x in jax.tree.leaves(getattr(s, f))]


def _train(tx, params, steps, start=0, state=None, step_fn=None):
  state = tx.init(params) if state is None else state
  step_fn = step_fn or _jit_step(tx)
  for t in range(start, start + steps):
    params, state = step_fn(params, state, _grads(params, t))
  return params, state


def _step(tx):
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return step


# ---------------------------------------------------------------------------
# 1. Dtypes.

_DTYPES = [  # (param dtype, jax_enable_x64); float32 alone is what every other test runs
    pytest.param(jnp.bfloat16, False, id="bfloat16"),
    pytest.param(jnp.float16, False, id="float16"),
    pytest.param(jnp.float64, True, id="float64-x64"),
]


@pytest.mark.parametrize("opt_name, dtype, x64", [
    pytest.param(name, *d.values, id=f"{name}-{d.id}")
    for name in OPT_NAMES if name != "adamt" for d in _DTYPES  # adamwt covers Adam
] + [pytest.param("sgdt", jnp.float32, True, id="sgdt-float32-x64")])
def test_dtypes_updates_keep_param_dtype_rates_float32_levels_int8(opt_name, dtype, x64):
  with jax.enable_x64(x64):
    params = _params(dtype)
    assert params["a"].dtype == dtype
    tx = _tx(opt_name)
    state = jax.jit(tx.init)(params)

    @jax.jit
    def step(params, state, grads):
      # As in optax's shard/dtype stability test: lax.cond needs both branches
      # to return the same shapes and dtypes, so the updates must keep the
      # gradient dtype and the state must be stable.
      cond = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
      return jax.lax.cond(
          cond, lambda: tx.update(grads, state, params),
          lambda: (jax.tree.map(jnp.zeros_like, grads), state))

    updates, new_state = step(params, state, _grads(params, 0))
    for k in params:
      assert updates[k].dtype == dtype, (k, updates[k].dtype)
    chex.assert_trees_all_equal_shapes_and_dtypes(state, new_state)
    states = _talr_states(new_state)
    assert states
    for s in states:
      for x in _rate_leaves(s):
        assert x.dtype == jnp.float32 and x.shape == ()
      for k in QUANTIZED:
        assert s.prev_levels[k].dtype == jnp.int8
        assert s.prev_levels[k].shape == params[k].shape
      if isinstance(s, talr.ScaleByTALRState):
        assert s.talr_count.dtype == jnp.int32


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_dtypes_low_precision_run_follows_float32_run(dtype):
  tx = _tx("sgdt")
  p32, s32 = _train(tx, _params(jnp.float32), 20)
  plo, slo = _train(tx, _params(dtype), 20)
  assert plo["a"].dtype == dtype
  for k in QUANTIZED:
    # Same rates up to the few weights that round across a transition
    # differently in low precision.
    assert abs(float(slo[-1].talr[k]) - float(s32[-1].talr[k])) < 0.05 * float(s32[-1].talr[k])
    assert float(jnp.mean(slo[-1].prev_levels[k] != s32[-1].prev_levels[k])) < 0.05


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
def test_frozen_tensor_rate_saturates_and_zero_gradient_stays_zero(dtype):
  # A quantized tensor that stops moving (zero gradient: all weights beyond
  # the clip range, a frozen layer) has k = 0, so K -> 0 and the multiplicative
  # rule grows c geometrically. Before saturation c overflowed to inf within
  # ~100 steps here, and inf * 0 made the params NaN; the target decays to 0
  # by the end, which turned inf * R into NaN in c as well.
  steps = 400
  params = {"a": _params(dtype)["a"], "b": jnp.linspace(-1, 1, 32).astype(dtype)}
  lf = talr.levels_fn_from_scales({"a": 3.0, "b": 1.0}, 2)
  tx = talr.scale_by_talr(talr.cosine_target(0.05, steps - 50), lf, learning_rate=0.1,
                          momentum=0.9)
  state = tx.init(params)

  def body(carry, t):
    p, s = carry
    g = {"a": jax.random.normal(jax.random.fold_in(jax.random.key(0), t), p["a"].shape,
                                p["a"].dtype),
         "b": jnp.zeros_like(p["b"])}
    u, s = tx.update(g, s, p)
    return (optax.apply_updates(p, u), s), u["b"]

  (p, s), ub = jax.jit(lambda c: jax.lax.scan(body, c, jnp.arange(steps)))((params, state))
  assert np.all(np.asarray(ub) == 0)
  np.testing.assert_array_equal(p["b"], params["b"])
  assert float(s.talr["b"]) > 1e30  # grew as the method prescribes...
  for x in _rate_leaves(s):
    assert np.isfinite(float(x))  # ...but stayed finite
  assert np.all(np.isfinite(np.asarray(p["a"], np.float32)))


# ---------------------------------------------------------------------------
# 2. Non-finite steps.


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
  # Per-tensor state: tensor a and the full-precision leaf are bit-identical.
  for f in ("prev_levels", "transition_rate", "ema_transition_rate"):
    for s_nan, s_clean in zip(_talr_states(nan_state), _talr_states(clean_state)):
      np.testing.assert_array_equal(getattr(s_nan, f)["a"], getattr(s_clean, f)["a"])
  np.testing.assert_array_equal(nan_params["a"], clean_params["a"])
  np.testing.assert_array_equal(nan_params["fp"], clean_params["fp"])
  # Tensor b: its rates stay finite, its NaN weights sit at level 0.
  for s in _talr_states(nan_state):
    assert all(np.isfinite(float(x)) for x in _rate_leaves(s))
    lv = np.asarray(s.prev_levels["b"])
    assert np.all(lv[np.isnan(np.asarray(nan_params["b"]))] == 0)


def test_nan_params_under_global_granularity_keep_shared_rate_finite():
  tx = _tx("talr_global")
  step = _jit_step(tx)
  params, state = _train(tx, _params(), 3, step_fn=step)
  bad = dict(params, b=params["b"].at[:5].set(jnp.nan))
  nan_params, nan_state = _train(tx, bad, 4, start=3, state=state, step_fn=step)
  assert all(np.isfinite(float(x)) for x in _rate_leaves(nan_state))
  assert np.all(np.isfinite(np.asarray(nan_params["a"])))


def test_nan_weight_counts_one_burst_of_transitions_then_none():
  lf = talr.levels_fn_from_scales({"w": 1.0}, 2)
  tx = talr.scale_by_talr(0.1, lf, learning_rate=0.1, momentum=0.0)
  w = jnp.array([0.3, 0.3, -0.3, -0.9])  # levels [1, 1, -1, -2]
  state = tx.init({"w": w})
  nan_w = {"w": w.at[0].set(jnp.nan).at[2].set(jnp.nan)}
  g = {"w": jnp.zeros(4)}
  update = jax.jit(tx.update)
  _, state = update(g, state, nan_w)
  np.testing.assert_allclose(state.transition_rate["w"], 0.5)  # both moved to 0
  np.testing.assert_array_equal(state.prev_levels["w"], [0, 1, 0, -2])
  _, state = update(g, state, nan_w)
  np.testing.assert_allclose(state.transition_rate["w"], 0.0)


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
  assert isinstance(s.prev_levels["fp"], optax.MaskedNode) or s.prev_levels["fp"] is None
  ref_updates, _ = _tx("sgdt").update(grads, _tx("sgdt").init(params), params)
  for k in QUANTIZED:
    np.testing.assert_allclose(updates[k], ref_updates[k], rtol=1e-6)


def test_partition_routes_quantized_group_to_talr():
  labels = {"a": "q", "b": "q", "fp": "fp"}
  sgdt = talr.sgdt(0.05, 0.02, LEVELS_FN, momentum=0.9)
  tx = optax.partition({"q": sgdt, "fp": optax.adam(1e-3)}, labels)
  params = _params()
  p, state = _train(tx, params, 5)
  p_ref, s_ref = _train(sgdt, params, 5)  # fallback lr on fp, same TALR
  for k in QUANTIZED:
    np.testing.assert_allclose(p[k], p_ref[k], rtol=1e-6)
  (s,) = _talr_states(state)
  for k in QUANTIZED:
    np.testing.assert_allclose(s.talr[k], s_ref[-1].talr[k], rtol=1e-6)
  assert set(talr.metrics(state)) == set(talr.metrics(s_ref))


def test_partition_with_levels_fn_that_ignores_masked_nodes_is_a_clear_error():
  # A hand-written levels_fn that quantizes "b", but "b" is routed elsewhere:
  # under partition it receives an optax.MaskedNode there.
  lf = lambda p: {"a": talr.weight_levels(p["a"], 3.0, 2),
                  "b": talr.weight_levels(p["b"], 3.0, 2), "fp": None}
  tx = optax.partition(
      {"q": talr.scale_by_talr(0.02, lf, learning_rate=0.1), "fp": optax.sgd(0.1)},
      {"a": "q", "b": "fp", "fp": "fp"})
  with pytest.raises(ValueError, match="MaskedNode.*must return None"):
    tx.init(_params())


@pytest.mark.parametrize("factory, kwargs", [
    (talr.sgdt, dict(learning_rate=0.05, target_transition_rate=0.02, weight_decay=1e-4)),
    (talr.sgdt, dict(learning_rate=0.05, target_transition_rate=0.02, momentum=0.0)),
    (talr.adamt, dict(learning_rate=1e-2, target_transition_rate=0.02, weight_decay=1e-4)),
    (talr.adamwt, dict(learning_rate=1e-2, target_transition_rate=0.02)),
    (talr.scale_by_talr, dict(target_transition_rate=0.02, learning_rate=0.05,
                              fallback_learning_rate=0.05, rule="additive")),
], ids=["sgdt", "sgdt-no-momentum", "adamt", "adamwt", "scale_by_talr"])
def test_inject_hyperparams_matches_plain_optimizer(factory, kwargs):
  # As optax's test_optimizers_can_be_wrapped_in_inject_hyperparams, with
  # init and update jitted: every numeric hyperparameter arrives traced.
  plain = factory(levels_fn=LEVELS_FN, **kwargs)
  injected = optax.inject_hyperparams(factory, static_args=("levels_fn",))(
      levels_fn=LEVELS_FN, **kwargs)
  params = _params()
  p1, s1 = _train(plain, params, 5, state=jax.jit(plain.init)(params))
  p2, s2 = _train(injected, params, 5, state=jax.jit(injected.init)(params))
  chex.assert_trees_all_close(p2, p1, rtol=1e-5, atol=1e-7)
  (t1,), (t2,) = _talr_states(s1), _talr_states(s2)
  chex.assert_trees_all_close(t2, t1, rtol=1e-5, atol=1e-7)


def test_inject_hyperparams_with_bfloat16_params():
  # inject_hyperparams casts float hyperparameters to the params' dtype by
  # default: validation must accept bfloat16 values, and the target is then
  # bfloat16-rounded; hyperparam_dtype=jnp.float32 keeps it exact.
  params = _params(jnp.bfloat16)
  kwargs = dict(learning_rate=0.05, target_transition_rate=0.02, levels_fn=LEVELS_FN)
  inject = lambda **kw: optax.inject_hyperparams(talr.sgdt, static_args=("levels_fn",), **kw)
  _, s_bf16 = _train(inject()(**kwargs), params, 2)
  _, s_f32 = _train(inject(hyperparam_dtype=jnp.float32)(**kwargs), params, 2)
  _, s_plain = _train(talr.sgdt(**kwargs), params, 2)
  r = lambda s: float(_talr_states(s)[0].target_transition_rate["a"])
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
  grads = _grads(params, 2)
  updates, new_state = jax.jit(tx.update)(grads, state, params)
  params, state = _train(tx, params, 2, start=2, state=state, step_fn=step)
  assert len(traces) == 1
  (s,) = _talr_states(state)
  for k in QUANTIZED:
    np.testing.assert_allclose(s.target_transition_rate[k], 0.05)
    # Multiplicative rule: U = lr * c with the new lr.
    np.testing.assert_allclose(s.talr[k], 0.01 * s.talr_scale[k], rtol=1e-6)
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




@pytest.mark.parametrize("name", tuple(_WRAPPED))
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
  p, s = _train(tx, p, 3, state=s, step_fn=donating)
  assert first.is_deleted()  # the buffers were really donated
  chex.assert_trees_all_equal(p, ref_params)
  chex.assert_trees_all_equal(s, ref_state)


@pytest.mark.parametrize("opt_name", ["sgdt", "talr_global", "track_sgd"])
def test_update_accepts_unknown_extra_args_and_does_not_recompile(opt_name):
  # As optax's test_optimizers_accept_extra_args.
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


def test_tree_map_params_is_a_clear_error():
  tx = _tx("sgdt")
  state = tx.init(_params())
  with pytest.raises(ValueError, match="map_params"):
    optax.tree.map_params(tx, lambda v: v, state)


# ---------------------------------------------------------------------------
# 6. Bad input: a clear ValueError naming the argument and its range.

_P = {"w": jnp.zeros(4)}
_LF = talr.levels_fn_from_scales({"w": 1.0}, 2)


def _init(levels_fn, params=None, **kw):
  kw = dict(dict(learning_rate=0.1), **kw)
  return lambda: talr.scale_by_talr(0.01, levels_fn, **kw).init(params or _P)


def _update_with(levels, jit=False):
  def run():
    tx = talr.scale_by_talr(0.01, _LF, learning_rate=0.1)
    state = tx.init(_P)
    update = jax.jit(tx.update) if jit else tx.update
    update({"w": jnp.ones(4)}, state, _P, levels=levels)
  return run


_BAD = {
    # scale_by_talr
    "talr lr 0": (lambda: talr.scale_by_talr(0.01, _LF, learning_rate=0.0),
                  r"learning_rate must be in \(0, inf\), got learning_rate = 0.0"),
    "talr lr negative": (lambda: talr.scale_by_talr(0.01, _LF, learning_rate=-1),
                         r"learning_rate must be in \(0, inf\)"),
    "talr lr nan": (lambda: talr.scale_by_talr(0.01, _LF, learning_rate=float("nan")),
                    r"learning_rate must be in \(0, inf\)"),
    "talr lr string": (lambda: talr.scale_by_talr(0.01, _LF, learning_rate="0.1"),
                       "learning_rate must be a number"),
    "talr lr vector": (lambda: talr.scale_by_talr(0.01, _LF, learning_rate=jnp.ones(2)),
                       "learning_rate must be a scalar"),
    "talr lr schedule": (lambda: talr.scale_by_talr(0.01, _LF, learning_rate=lambda t: 0.1),
                         "learning_rate must be a number"),
    "talr momentum 1": (lambda: talr.scale_by_talr(0.01, _LF, learning_rate=0.1, momentum=1.0),
                        r"momentum must be in \[0, 1\)"),
    "talr momentum -0.1": (lambda: talr.scale_by_talr(0.01, _LF, learning_rate=0.1,
                                                      momentum=-0.1),
                           r"momentum must be in \[0, 1\)"),
    "talr rule": (lambda: talr.scale_by_talr(0.01, _LF, learning_rate=0.1, rule="exp"),
                  r"rule must be one of \('multiplicative', 'additive'\)"),
    "talr granularity": (lambda: talr.scale_by_talr(0.01, _LF, learning_rate=0.1,
                                                    granularity="layer"),
                         r"granularity must be one of \('per_tensor', 'global'\)"),
    "talr rate without additive": (lambda: talr.scale_by_talr(0.01, _LF, learning_rate=0.1,
                                                              rate=0.1),
                                   "rate is the step of the additive rule"),
    "talr rate 0": (lambda: talr.scale_by_talr(0.01, _LF, learning_rate=0.1, rule="additive",
                                               rate=0.0),
                    r"rate must be in \(0, inf\)"),
    "talr fallback negative": (lambda: talr.scale_by_talr(0.01, _LF, learning_rate=0.1,
                                                          fallback_learning_rate=-0.1),
                               r"fallback_learning_rate must be in \(0, inf\)"),
    "talr target negative": (lambda: talr.scale_by_talr(-0.1, _LF, learning_rate=0.1),
                             r"target_transition_rate must be in \[0, 1\]"),
    "talr target above 1": (lambda: talr.scale_by_talr(1.5, _LF, learning_rate=0.1),
                            r"target_transition_rate must be in \[0, 1\]"),
    "talr target schedule above 1": (
        lambda: talr.scale_by_talr(optax.constant_schedule(5.0), _LF, learning_rate=0.1),
        r"target_transition_rate must be in \[0, 1\].*schedule whose value at step 0 is 5.0"),
    "talr levels_fn not callable": (lambda: talr.scale_by_talr(0.01, {"w": 1}, learning_rate=0.1),
                                    "levels_fn must be callable"),
    "levels float": (_init(lambda p: {"w": p["w"]}), "integer levels.*float32"),
    "levels bool": (_init(lambda p: {"w": p["w"] > 0}), "integer levels.*bool"),
    "levels not array": (_init(lambda p: {"w": "levels"}), "integer arrays.*got str"),
    "levels list": (_init(lambda p: {"w": [0, 0, 0, 0]}),
                    "structure does not match.*integer array per quantized leaf"),
    "levels structure": (_init(lambda p: {"v": jnp.zeros(4, jnp.int8)}),
                         "structure does not match"),
    "levels one array for a subtree": (
        _init(lambda p: talr.weight_levels(p["w"], 1.0, 2), params={"w": jnp.zeros(4),
                                                                     "b": jnp.zeros(2)},
              fallback_learning_rate=0.1),
        "one level array at leaf 0 where params hold a subtree with 2 leaves"),
    "levels shape": (_init(lambda p: {"w": jnp.zeros(3, jnp.int8)}), r"shape \(3,\).*\(4,\)"),
    "levels beyond int8": (_init(lambda p: {"w": jnp.full(4, 300, jnp.int32)}),
                           r"does not fit int8 \[-128, 127\]"),
    "levels all None": (_init(lambda p: {"w": None}, fallback_learning_rate=0.1),
                        "no quantized leaf"),
    "unquantized without fallback": (
        _init(talr.levels_fn_from_scales({"w": 1.0, "b": None}, 2),
              params={"w": jnp.zeros(4), "b": jnp.zeros(2)}),
        "fallback_learning_rate"),
    "update levels= float": (_update_with({"w": jnp.zeros(4)}), "integer levels"),
    "update levels= float, jitted": (_update_with({"w": jnp.zeros(4)}, jit=True),
                                     "integer levels"),
    "update levels= shape": (_update_with({"w": jnp.zeros(5, jnp.int8)}), "shape"),
    "update without params": (
        lambda: talr.scale_by_talr(0.01, _LF, learning_rate=0.1).update(
            {"w": jnp.ones(4)}, talr.scale_by_talr(0.01, _LF, learning_rate=0.1).init(_P)),
        "needs params"),
    "update with another state": (
        lambda: talr.scale_by_talr(0.01, _LF, learning_rate=0.1).update(
            {"w": jnp.ones(4)}, optax.sgd(0.1).init(_P), _P),
        "state must be a ScaleByTALRState"),
    # track_transitions
    "track momentum": (lambda: talr.track_transitions(_LF, momentum=1.5),
                       r"momentum must be in \[0, 1\)"),
    "track initial_rate": (lambda: talr.track_transitions(_LF, initial_rate=-1),
                           r"initial_rate must be in \[0, 1\]"),
    "track levels_fn": (lambda: talr.track_transitions("levels"), "levels_fn must be callable"),
    # optimizers
    "sgdt lr 0": (lambda: talr.sgdt(0.0, 0.01, _LF), r"learning_rate must be in \(0, inf\)"),
    "sgdt lr schedule from 0": (
        lambda: talr.sgdt(optax.linear_schedule(0.0, 0.1, 10), 0.01, _LF),
        r"learning_rate is a schedule whose value at step 0 is 0.0.*\(0, inf\)"),
    "sgdt momentum 1": (lambda: talr.sgdt(0.1, 0.01, _LF, momentum=1.0),
                        r"momentum must be in \[0, 1\)"),
    "sgdt ema_momentum": (lambda: talr.sgdt(0.1, 0.01, _LF, ema_momentum=1.0),
                          r"ema_momentum must be in \[0, 1\)"),
    "sgdt nesterov": (lambda: talr.sgdt(0.1, 0.01, _LF, nesterov="yes"), "nesterov must be a bool"),
    "sgdt weight_decay": (lambda: talr.sgdt(0.1, 0.01, _LF, weight_decay=-1e-4),
                          r"weight_decay must be in \[0, inf\)"),
    "sgdt rule": (lambda: talr.sgdt(0.1, 0.01, _LF, rule="mult"), "rule must be one of"),
    "sgdt granularity": (lambda: talr.sgdt(0.1, 0.01, _LF, granularity="x"),
                         "granularity must be one of"),
    "sgdt target": (lambda: talr.sgdt(0.1, 2.0, _LF), r"target_transition_rate must be in \[0, 1\]"),
    "adamt b1": (lambda: talr.adamt(1e-3, 0.01, _LF, b1=1.0), r"b1 must be in \[0, 1\)"),
    "adamt b2": (lambda: talr.adamt(1e-3, 0.01, _LF, b2=-0.5), r"b2 must be in \[0, 1\)"),
    "adamt eps": (lambda: talr.adamt(1e-3, 0.01, _LF, eps=-1.0), r"eps must be in \[0, inf\)"),
    "adamt ema_momentum": (lambda: talr.adamt(1e-3, 0.01, _LF, ema_momentum=2.0),
                           r"ema_momentum must be in \[0, 1\)"),
    "adamwt lr negative": (lambda: talr.adamwt(-1e-3, 0.01, _LF),
                           r"learning_rate must be in \(0, inf\)"),
    "adamwt weight_decay": (lambda: talr.adamwt(1e-3, 0.01, _LF, weight_decay=float("nan")),
                            r"weight_decay must be in \[0, inf\)"),
    # quantizers
    "bits 0": (lambda: talr.weight_levels(jnp.zeros(3), 1.0, 0), r"bits must be an integer in \[1, 8\]"),
    "bits 9": (lambda: talr.weight_levels(jnp.zeros(3), 1.0, 9), r"bits must be an integer in \[1, 8\]"),
    "bits float": (lambda: talr.fake_quant_weight(jnp.zeros(3), 1.0, 2.0),
                   r"bits must be an integer in \[1, 8\]"),
    "bits bool": (lambda: talr.activation_levels(jnp.zeros(3), 1.0, True),
                  r"bits must be an integer in \[1, 8\]"),
    "bits string": (lambda: talr.fake_quant_activation(jnp.zeros(3), 1.0, "2"),
                    r"bits must be an integer in \[1, 8\]"),
    "scale 0": (lambda: talr.weight_levels(jnp.zeros(3), 0.0, 2), r"scale must be > 0"),
    "scale negative": (lambda: talr.fake_quant_weight(jnp.zeros(3), -1.0, 2), r"scale must be > 0"),
    "scale nan": (lambda: talr.distance_to_transition(jnp.zeros(3), float("nan"), 2),
                  r"scale must be > 0"),
    "scale string": (lambda: talr.weight_levels(jnp.zeros(3), "1", 2), "scale must be a positive"),
    "scale shape": (lambda: talr.weight_levels(jnp.zeros((3, 4)), jnp.ones(3), 2),
                    r"scale has shape \(3,\), which does not broadcast to the input's shape \(3, 4\)"),
    "w None": (lambda: talr.weight_levels(None, 1.0, 2), "w must be a numeric array"),
    "w list": (lambda: talr.fake_quant_weight([0.1, 0.2], 1.0, 2), "w must be a numeric array"),
    "w MaskedNode": (lambda: talr.weight_levels(optax.MaskedNode(), 1.0, 2), "MaskedNode"),
    "x string": (lambda: talr.activation_levels("x", 1.0, 2), "x must be a numeric array"),
    "from_scales all None": (lambda: talr.levels_fn_from_scales({"w": None}, 2),
                             "at least one leaf"),
    "from_scales bits 9": (lambda: talr.levels_fn_from_scales({"w": 1.0}, 9),
                           r"bits must be an integer in \[1, 8\]"),
    "from_scales bits tree": (lambda: talr.levels_fn_from_scales({"w": 1.0}, {"v": 2}),
                              "bits must be an int in"),
    "from_scales negative scale": (lambda: talr.levels_fn_from_scales({"w": -1.0}, 2),
                                   r"scales\[0\] must be > 0"),
    "from_scales params structure": (lambda: _LF({"v": jnp.zeros(4)}),
                                     "params do not have the structure of the scales"),
    # schedules
    "initial_target bits": (lambda: talr.initial_target(0), r"bits must be an integer in \[1, 8\]"),
    "initial_target lam 0": (lambda: talr.initial_target(2, lam=0.0), r"lam must be a number in \(0, 1\]"),
    "initial_target lam nan": (lambda: talr.initial_target(2, lam=float("nan")),
                               r"lam must be a number in \(0, 1\]"),
    "initial_target too large": (lambda: talr.initial_target(8, lam=0.9),
                                 r"is not a rate in \[0, 1\]"),
    "cosine init_rate 0": (lambda: talr.cosine_target(0.0, 10), r"init_rate must be a number in \(0, 1\]"),
    "cosine init_rate 2": (lambda: talr.cosine_target(2.0, 10), r"init_rate must be a number in \(0, 1\]"),
    "cosine total_steps 0": (lambda: talr.cosine_target(0.01, 0), "total_steps must be an integer > 0"),
    "cosine total_steps float": (lambda: talr.cosine_target(0.01, 10.5),
                                 "total_steps must be an integer > 0"),
    "cosine final_rate": (lambda: talr.cosine_target(0.01, 10, final_rate=0.02),
                          r"final_rate must be a number in \[0, init_rate"),
}


@pytest.mark.parametrize("case", tuple(_BAD))
def test_bad_input_raises_value_error_naming_the_argument(case):
  thunk, match = _BAD[case]
  with pytest.raises(ValueError, match=match):
    thunk()


def test_numpy_numbers_are_accepted_where_python_numbers_are():
  assert talr.initial_target(np.int64(2), lam=np.float32(5e-3)) == pytest.approx(
      5e-3 * math.sqrt(2), rel=1e-6)
  sched = talr.cosine_target(np.float64(0.01), np.int32(10))
  np.testing.assert_allclose(sched(0), 0.01, rtol=1e-6)
  lf = talr.levels_fn_from_scales({"w": 1.0}, np.int64(2))
  assert lf(_P)["w"].dtype == jnp.int8
  talr.sgdt(np.float32(0.1), np.float32(0.01), _LF, momentum=np.float64(0.9)).init(_P)
