"""scale_by_talr and track_transitions against an independent reference, step for step."""

from __future__ import annotations

import dataclasses
import math

import jax
from jax.extend import core as jex_core
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax._src import test_utils

import talr_optax as talr
from reference import ReferenceTALR, levels as ref_levels

SHAPES = ((64,), (8, 16), (3, 3, 4, 8))


def _problem(seed=0, shapes=SHAPES):
  rng = np.random.default_rng(seed)
  params = [rng.normal(size=s).astype(np.float32) for s in shapes]
  scales = [float(3 * np.std(p)) for p in params]
  return params, scales


def _tree(xs):
  return {f"t{i}": jnp.asarray(x) for i, x in enumerate(xs)}


def _levels_fn(scales, bits=2):
  return talr.levels_fn_from_scales({f"t{i}": s for i, s in enumerate(scales)}, bits=bits)


def _names(shapes, axes):
  out = []
  for i, (s, a) in enumerate(zip(shapes, axes)):
    out += [f"t{i}"] if a is None else [f"t{i}[{j}]" for j in range(s[a])]
  return out


def _run_against_reference(rule, granularity, layer_axes=None, steps=200, bits=2,
                           shapes=SHAPES, momentum=0.9):
  params, scales = _problem(shapes=shapes)
  target = lambda t: 0.5 * 0.03 * (1 + math.cos(math.pi * t / steps))
  lr = 0.05
  axes_tree = None if layer_axes is None else {f"t{i}": a for i, a in enumerate(layer_axes)}
  tx = talr.scale_by_talr(
      optax.cosine_decay_schedule(0.03, steps), _levels_fn(scales, bits),
      learning_rate=lr, rule=rule, ema_momentum=momentum, granularity=granularity,
      layer_axes=axes_tree)
  ref = ReferenceTALR(scales, bits, target, lr, rule=rule, momentum=momentum,
                      global_rate=granularity == "global", layer_axes=layer_axes)
  p = _tree(params)
  state = tx.init(p)
  update = jax.jit(tx.update)
  rng = np.random.default_rng(1)
  transitions = 0.0
  for n in range(steps):
    grads = [rng.normal(size=x.shape).astype(np.float32) for x in params]
    before = [np.asarray(p[f"t{i}"]) for i in range(len(params))]
    expected = ref.updates(before, grads)
    upd, state = update(_tree(grads), state, p)
    for i, e in enumerate(expected):
      np.testing.assert_allclose(upd[f"t{i}"], e, rtol=1e-4, atol=lr * 4e-6,
                                 err_msg=f"update {n}, tensor {i}")
    p = optax.apply_updates(p, upd)
    ref.observe(before, [np.asarray(p[f"t{i}"]) for i in range(len(params))])
    if granularity == "global":  # a float32 weighted mean of per-tensor rates
      np.testing.assert_allclose(state.transition_rate, ref.k, rtol=1e-6)
    else:  # count / size, rounded once to float32
      np.testing.assert_array_equal(state.transition_rate, ref.k.astype(np.float32),
                                    err_msg=f"k after update {n}")
    np.testing.assert_allclose(state.ema_transition_rate, ref.K, rtol=1e-4, atol=1e-9)
    # The additive rule subtracts: its U carries float32 error of order lr * 1e-6.
    np.testing.assert_allclose(state.talr, ref.U, rtol=1e-4, atol=lr * 4e-6)
    np.testing.assert_allclose(state.target_transition_rate, target(n + 1), rtol=1e-5,
                               atol=1e-9)
    transitions += float(np.sum(ref.k))
  assert int(state.talr_count) == steps
  assert transitions > 1.0, "the run must exercise real transitions"
  return state


@pytest.mark.parametrize("rule", ["multiplicative", "additive"])
@pytest.mark.parametrize("granularity", ["per_tensor", "global"])
def test_matches_reference_step_for_step(rule, granularity):
  state = _run_against_reference(rule, granularity)
  want = [""] if granularity == "global" else ["t0", "t1", "t2"]
  assert list(state.rate_names.names) == want


@pytest.mark.parametrize("rule", ["multiplicative", "additive"])
def test_matches_reference_with_layer_axes(rule):
  axes = (None, 0, 3)
  state = _run_against_reference(rule, "per_tensor", layer_axes=axes, steps=100)
  assert list(state.rate_names.names) == _names(SHAPES, axes)
  assert state.talr.shape == (1 + 8 + 8,)


def test_binary_weights_match_reference():
  _run_against_reference("multiplicative", "per_tensor", bits=1, steps=60)


def test_first_two_updates_by_hand():
  # s = 1, 2-bit levels round(clip(2w, -2, 1)): [0, 0, 1, 1] for w below.
  params = {"w": jnp.array([0.1, 0.2, 0.3, 0.4])}
  lr, m, r0 = 0.5, 0.9, 0.1
  tx = talr.scale_by_talr(r0, talr.levels_fn_from_scales({"w": 1.0}, 2),
                          learning_rate=lr, ema_momentum=m)
  state = tx.init(params)
  np.testing.assert_array_equal(state.prev_levels["w"], [0, 0, 1, 1])
  np.testing.assert_allclose(state.ema_transition_rate, [r0])
  np.testing.assert_allclose(state.talr, [lr])
  # Update 0 uses U_0 = lr; it moves w[1] from 0.2 to 0.25 + ... across 0.25.
  g = {"w": jnp.array([0.0, -0.2, 0.0, 0.0])}
  upd, state = tx.update(g, state, params)
  np.testing.assert_allclose(upd["w"], [0.0, 0.1, 0.0, 0.0], rtol=1e-6)
  np.testing.assert_array_equal(state.prev_levels["w"], [0, 1, 1, 1])
  k0 = 0.25
  K1 = m * r0 + (1 - m) * k0
  c1 = m + (1 - m) * r0 / (K1 + 1e-8)
  np.testing.assert_allclose(state.transition_rate, [k0])
  np.testing.assert_allclose(state.ema_transition_rate, [K1], rtol=1e-6)
  np.testing.assert_allclose(state.talr, [lr * c1], rtol=1e-6)
  # Update 1 uses U_1; it causes no transition.
  params = optax.apply_updates(params, upd)
  upd, state = tx.update({"w": jnp.array([0.0, 0.0, 0.0, 0.01])}, state, params)
  np.testing.assert_allclose(upd["w"], [0.0, 0.0, 0.0, -0.01 * lr * c1], rtol=1e-6)
  K2 = m * K1
  c2 = m * c1 + (1 - m) * c1 * r0 / (K2 + 1e-8)
  np.testing.assert_allclose(state.transition_rate, [0.0])
  np.testing.assert_allclose(state.ema_transition_rate, [K2], rtol=1e-6)
  np.testing.assert_allclose(state.talr, [lr * c2], rtol=1e-6)


def test_additive_rule_by_hand_and_floor_at_zero():
  params = {"w": jnp.array([0.1, 0.2, 0.3, 0.4])}
  tx = talr.scale_by_talr(0.0, talr.levels_fn_from_scales({"w": 1.0}, 2),
                          learning_rate=0.5, rule="additive", additive_step=10.0, ema_momentum=0.5)
  state = tx.init(params)
  _, state = tx.update({"w": jnp.array([0.0, -0.2, 0.0, 0.0])}, state, params)
  # K_1 = 0.5 * 0 + 0.5 * 0.25; U_1 = max(0, 0.5 + 10 (0 - 0.125)) = 0.
  np.testing.assert_allclose(state.ema_transition_rate, [0.125])
  np.testing.assert_allclose(state.talr, [0.0])
  np.testing.assert_allclose(state.talr_scale, [1.0])


def _dependencies(jaxpr, wanted_outputs):
  """Indices of the jaxpr inputs that the given outputs depend on."""
  deps = {v: {i} for i, v in enumerate(jaxpr.invars)}
  for eqn in jaxpr.eqns:
    src = set()
    for v in eqn.invars:
      if not isinstance(v, jex_core.Literal):
        src |= deps.get(v, set())
    for v in eqn.outvars:
      deps[v] = src
  out = set()
  for i in wanted_outputs:
    v = jaxpr.outvars[i]
    if not isinstance(v, jex_core.Literal):
      out |= deps.get(v, set())
  return out


def test_updates_never_depend_on_levels_or_this_steps_count():
  params, scales = _problem()
  tx = talr.scale_by_talr(0.01, _levels_fn(scales), learning_rate=0.1)
  p = _tree(params)
  state = tx.init(p)
  grads = jax.tree.map(jnp.ones_like, p)
  closed = jax.make_jaxpr(tx.update)(grads, state, p)
  args = (grads, state, p)
  in_leaves = jax.tree_util.tree_flatten_with_path(args)[0]
  names = [jax.tree_util.keystr(path) for path, _ in in_leaves]
  out_tree = jax.eval_shape(tx.update, grads, state, p)
  n_updates = len(jax.tree.leaves(out_tree[0]))
  deps = {names[i] for i in _dependencies(closed.jaxpr, range(n_updates))}
  assert deps, "the updates must depend on something"
  allowed = {n for n in names if n.startswith("[0]") or ".talr" in n and "scale" not in n}
  assert deps <= allowed, f"updates depend on {sorted(deps - allowed)}"
  assert any(".talr" in d for d in deps)
  # ...while the new rates do depend on the params and the stored levels.
  k_index = n_updates + 2  # outputs: updates, talr_count, prev_levels..., then k
  flat_state = jax.tree.leaves(out_tree[1])
  k_pos = n_updates + [i for i, x in enumerate(flat_state) if x.shape == (3,)][0]
  deps_k = {names[i] for i in _dependencies(closed.jaxpr, [k_pos])}
  assert any("prev_levels" in d for d in deps_k) and any(d.startswith("[2]") for d in deps_k)
  del k_index


def test_monitor_matches_talr_measurement_when_rates_agree():
  """track_transitions with TALR's K_0 measures k and K exactly as TALR does."""
  params, scales = _problem()
  levels_fn = _levels_fn(scales)
  target = 0.02
  talr_tx = talr.scale_by_talr(target, levels_fn, learning_rate=0.05, ema_momentum=0.9)
  monitor = optax.chain(talr_tx, talr.track_transitions(levels_fn, target, ema_momentum=0.9))
  p = _tree(params)
  state = monitor.init(p)
  rng = np.random.default_rng(3)
  for _ in range(20):
    grads = _tree([rng.normal(size=x.shape).astype(np.float32) for x in params])
    upd, state = monitor.update(grads, state, p)
    p = optax.apply_updates(p, upd)
    np.testing.assert_array_equal(state[1].transition_rate, state[0].transition_rate)
    np.testing.assert_array_equal(state[1].ema_transition_rate,
                                  state[0].ema_transition_rate)
    assert state[1].rate_names == state[0].rate_names


def test_monitor_leaves_updates_unchanged_and_counts_them():
  params, scales = _problem()
  tx = optax.chain(optax.sgd(0.5), talr.track_transitions(_levels_fn(scales), 0.0))
  p = _tree(params)
  state = tx.init(p)
  grads = _tree([np.ones(s, np.float32) for s in SHAPES])
  upd, state = tx.update(grads, state, p)
  chex_equal = jax.tree.map(lambda u: np.testing.assert_allclose(u, -0.5), upd)
  del chex_equal
  new = optax.apply_updates(p, upd)
  for i, s in enumerate(scales):
    want = np.mean(ref_levels(new[f"t{i}"], s, 2) != ref_levels(p[f"t{i}"], s, 2))
    np.testing.assert_allclose(state[1].transition_rate[i], want, rtol=1e-6)


def test_no_recompile_after_first_step():
  params, scales = _problem()
  tx = talr.sgdt(0.1, talr.cosine_target(0.01, 50), _levels_fn(scales))

  @jax.jit
  def step(p, s):
    g = jax.grad(lambda q: sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(q)))(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  p = _tree(params)
  s = tx.init(p)
  p, s = step(p, s)
  with test_utils.log_compilations() as logs:
    for _ in range(5):
      p, s = step(p, s)
  assert not logs


def test_init_under_eval_shape_and_tree_get():
  params, scales = _problem()
  tx = talr.adamwt(1e-3, 0.01, _levels_fn(scales))
  p = _tree(params)
  shapes = jax.eval_shape(tx.init, p)
  state = tx.init(p)
  assert jax.tree.structure(shapes) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(shapes), jax.tree.leaves(state)):
    assert (a.shape, a.dtype) == (b.shape, b.dtype)
  for field in ("talr", "talr_count", "transition_rate", "ema_transition_rate",
                "target_transition_rate", "talr_scale", "prev_levels"):
    assert optax.tree.get(state, field) is not None
  assert optax.tree.get(state, "talr").shape == (3,)
  assert optax.tree.get(state, "prev_levels")["t1"].dtype == jnp.int8


def test_misuse_is_a_clear_error():
  params, scales = _problem()
  p = _tree(params)
  tx = talr.scale_by_talr(0.01, _levels_fn(scales), learning_rate=0.1)
  state = tx.init(p)
  with pytest.raises(ValueError, match="needs the params"):
    tx.update(p, state)
  with pytest.raises(ValueError, match="ScaleByTALRState"):
    tx.update(p, optax.sgd(0.1).init(p), p)
  monitor = talr.track_transitions(_levels_fn(scales), 0.01)
  with pytest.raises(ValueError, match="needs the params"):
    monitor.update(p, monitor.init(p))


def test_state_of_another_optimizer_is_a_clear_error():
  params, scales = _problem()
  p = _tree(params)
  sgdt = talr.sgdt(0.1, 0.01, _levels_fn(scales))
  adamt = talr.adamt(0.1, 0.01, _levels_fn(scales))
  with pytest.raises(ValueError, match="another optimizer"):
    sgdt.update(p, adamt.init(p), p)


def test_levels_fn_must_match_params():
  params, scales = _problem()
  p = _tree(params)
  bad_shape = lambda q: {k: (jnp.zeros(3, jnp.int8) if k == "t0" else None) for k in q}
  with pytest.raises(ValueError, match="one level per weight"):
    talr.scale_by_talr(0.01, bad_shape, learning_rate=0.1, fallback_learning_rate=0.1).init(p)
  floats = lambda q: {k: v for k, v in q.items()}
  with pytest.raises(ValueError, match="integer levels"):
    talr.scale_by_talr(0.01, floats, learning_rate=0.1).init(p)
  nothing = lambda q: {k: None for k in q}
  with pytest.raises(ValueError, match="no quantized leaf"):
    talr.scale_by_talr(0.01, nothing, learning_rate=0.1).init(p)
  partly = talr.levels_fn_from_scales({"t0": 1.0, "t1": None, "t2": None}, 2)
  with pytest.raises(ValueError, match="fallback_learning_rate"):
    talr.scale_by_talr(0.01, partly, learning_rate=0.1).init(p)
  with pytest.raises(ValueError, match="structure"):
    talr.scale_by_talr(0.01, lambda q: [jnp.zeros(64, jnp.int8)],
                       learning_rate=0.1).init(p)


def test_layer_axes_errors():
  params, scales = _problem()
  p = _tree(params)
  fn = _levels_fn(scales)
  with pytest.raises(ValueError, match="axis 5"):
    talr.scale_by_talr(0.01, fn, learning_rate=0.1,
                       layer_axes={"t0": None, "t1": 5, "t2": None}).init(p)
  with pytest.raises(ValueError, match="int axis or None"):
    talr.scale_by_talr(0.01, fn, learning_rate=0.1,
                       layer_axes={"t0": "x", "t1": None, "t2": None}).init(p)
  with pytest.raises(ValueError, match="granularity"):
    talr.scale_by_talr(0.01, fn, learning_rate=0.1, granularity="global", layer_axes={})
  with pytest.raises(ValueError, match="layer_axes must be a pytree"):
    talr.scale_by_talr(0.01, fn, learning_rate=0.1, layer_axes=[0, 1]).init(p)


def test_layer_axes_prefix_and_callable():
  params, scales = _problem()
  p = _tree(params)
  fn = _levels_fn(scales)
  as_prefix = talr.scale_by_talr(0.01, fn, learning_rate=0.1, layer_axes=0).init(p)
  assert len(as_prefix.rate_names.names) == 64 + 8 + 3
  by_fn = talr.scale_by_talr(0.01, fn, learning_rate=0.1,
                             layer_axes=lambda q: {k: None for k in q}).init(p)
  assert by_fn.rate_names.names == ("t0", "t1", "t2")


# ---------------------------------------------------------------------------
# A state reused with another configuration names the setting that changed.


def _stack(layers=4):
  rng = np.random.default_rng(0)
  return {"w": jnp.asarray(rng.normal(size=(layers, 16, 24)).astype(np.float32))}


_STACK_LF = talr.levels_fn_from_scales({"w": 1.0}, 2)
_MAKERS = {
    "scale_by_talr": lambda **kw: talr.scale_by_talr(0.01, _STACK_LF, learning_rate=0.1, **kw),
    "track_transitions": lambda **kw: talr.track_transitions(_STACK_LF, 0.01, **kw),
    "track_oscillations": lambda **kw: talr.track_oscillations(_STACK_LF, **kw),
    "sgdt": lambda **kw: talr.sgdt(0.1, 0.01, _STACK_LF, **kw),
}


@pytest.mark.parametrize("name", tuple(_MAKERS))
@pytest.mark.parametrize("made, used, layers, match", [
    ({"layer_axes": {"w": 0}}, {}, 4,
     r"layer_axes differs at 'w': the state has 4 per-layer rates, this optimizer one rate"),
    ({}, {"layer_axes": {"w": 0}}, 4,
     r"layer_axes differs at 'w': the state has one rate, this optimizer 4 per-layer rates"),
    ({"layer_axes": {"w": 0}}, {"layer_axes": {"w": 0}}, 6,
     r"the number of layers of 'w' differs: 4 in the state, 6 here"),
    ({}, {"sample_size": 64}, 4,
     r"the state counts all \(4, 16, 24\) levels of 'w', this optimizer samples"
     r" \(4, 2, 8\) of them: sample_size differs \(here sample_size=64\)"),
    ({"sample_size": 64}, {"sample_size": 100}, 4,
     r"the state holds levels of 'w' \(4, 16, 24\) sampled on a \(4, 2, 8\) grid, this"
     r" optimizer counts \(4, 2, 12\): sample_size"
     r" differs \(here sample_size=100\)"),
], ids=["layer_axes dropped", "layer_axes added", "layers", "sampled", "resampled"])
def test_state_of_another_configuration_names_the_setting(name, made, used, layers, match):
  state = _MAKERS[name](**made).init(_stack(4))
  params = _stack(layers)
  tx = _MAKERS[name](**used)
  owner = "scale_by_talr" if name == "sgdt" else name
  with pytest.raises(ValueError, match=rf"{owner} got a state made with another"
                                       rf" configuration: {match}"):
    tx.update(params, state, params)
  tx.update(params, tx.init(params), params)  # its own state works


def test_global_state_in_a_per_tensor_optimizer_names_granularity():
  p = _stack(4)
  state = _MAKERS["scale_by_talr"](granularity="global").init(p)
  with pytest.raises(ValueError, match="granularity differs"):
    _MAKERS["scale_by_talr"]().update(p, state, p)


def test_layer_axes_accepts_numpy_integers():
  p = _stack(4)
  for axis in (np.int64(0), np.int32(-3), np.uint8(0)):
    state = _MAKERS["scale_by_talr"](layer_axes={"w": axis}).init(p)
    assert state.rate_names.names == tuple(f"w[{i}]" for i in range(4))
  with pytest.raises(ValueError, match=r"int axis or None per leaf, got .*0\.0"):
    _MAKERS["scale_by_talr"](layer_axes={"w": np.float32(0)}).init(p)


# ---------------------------------------------------------------------------
# optax.inject_hyperparams with sample_size and layer_axes.


def _injected(static_args, **kw):
  return optax.inject_hyperparams(talr.sgdt, static_args=static_args)(
      learning_rate=0.1, target_transition_rate=0.01, levels_fn=_STACK_LF, **kw)


@pytest.mark.parametrize("kw, arg", [({"sample_size": 64}, "sample_size"),
                                     ({"layer_axes": 0}, "layer_axes")])
def test_inject_hyperparams_names_the_static_args_to_pass(kw, arg):
  p = _stack(4)
  with pytest.raises(ValueError, match=rf"pass static_args=\('{arg}',\)"):
    _injected(("levels_fn",), **kw).init(p)
  tx = _injected(("levels_fn", arg), **kw)
  direct = talr.sgdt(0.1, 0.01, _STACK_LF, **kw)
  s_inj, s_dir = tx.init(p), direct.init(p)
  update = jax.jit(tx.update)
  for _ in range(3):
    g = jax.tree.map(lambda x: 0.3 * jnp.sign(x), p)
    u_inj, s_inj = update(g, s_inj, p)
    u_dir, s_dir = direct.update(g, s_dir, p)
    np.testing.assert_allclose(u_inj["w"], u_dir["w"], rtol=1e-6)
    p = optax.apply_updates(p, u_dir)
  np.testing.assert_array_equal(s_inj.inner_state[-1].transition_rate,
                                s_dir[-1].transition_rate)


def test_inject_hyperparams_with_a_layer_axes_pytree_needs_nothing_static():
  p = _stack(4)
  tx = _injected(("levels_fn",), layer_axes={"w": 0})
  state = tx.init(p)
  assert state.inner_state[-1].rate_names.names == tuple(f"w[{i}]" for i in range(4))
  tx.update(p, state, p)


@pytest.mark.parametrize("pooled,fraction", [(False, 1.0), (True, 0.5)])
def test_measured_target_takes_r0_from_the_first_updates(pooled, fraction):
  """U stays at lr while R_0 is measured; then R_0 = mean k, and R is its cosine."""
  rng = np.random.default_rng(3)
  params = {"a": jnp.asarray(rng.normal(size=(8, 16)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(4, 4)), jnp.float32)}
  levels_fn = talr.levels_fn_from_scales({"a": 1.0, "b": 1.0}, 2)
  steps, W, lr, m = 30, 6, 0.05, 0.9
  target = dataclasses.replace(talr.measured_target(steps, measure_steps=W),
                               measure_pooled=pooled, measure_fraction=fraction)
  tx = talr.scale_by_talr(target, levels_fn, learning_rate=lr, ema_momentum=m)
  state = tx.init(params)
  assert float(state.initial_target_rate[0]) == 0.0
  update = jax.jit(tx.update)
  ks, Us = [], []
  for n in range(steps):
    g = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    upd, state = update(g, state, params)
    params = optax.apply_updates(params, upd)
    ks.append(np.asarray(state.transition_rate, np.float64))
    Us.append(np.asarray(state.talr))
    n1 = n + 1
    mean = np.mean(ks, axis=0) if n1 <= W else None
    if n1 < W:  # measuring: K is the running mean, R follows it, U does not move
      np.testing.assert_allclose(state.ema_transition_rate, mean, rtol=1e-5, atol=1e-7)
      np.testing.assert_allclose(state.target_transition_rate, state.ema_transition_rate)
      np.testing.assert_array_equal(state.talr, np.float32([lr, lr]))
    if n1 == W:
      sizes = np.array([128.0, 16.0])
      r0 = np.full(2, mean @ sizes / sizes.sum()) if pooled else mean
      r0 = np.maximum(fraction * r0, 1.0 / (np.array([128.0, 16.0]) * W))
      np.testing.assert_allclose(state.initial_target_rate, r0, rtol=1e-5)
      measured = np.asarray(state.initial_target_rate)
    if n1 >= W:
      shape = 0.5 * (1 + np.cos(np.pi * n1 / steps))
      np.testing.assert_allclose(state.target_transition_rate, measured * shape, rtol=1e-5,
                                 atol=1e-9)
      np.testing.assert_allclose(state.initial_target_rate, measured)
  assert np.all(measured > 0)
  assert not np.allclose(Us[-1], lr), "TALR adapts U after the measurement"
  # The EMA after W: K_(n+1) = m K_n + (1 - m) k_n.
  assert update._cache_size() == 1


def test_measured_target_with_no_transitions_keeps_a_floor():
  """A base rate that moves no weight in W updates gives R_0 = one transition per group."""
  params = {"w": jnp.full((10,), 0.1)}
  levels_fn = talr.levels_fn_from_scales({"w": 1.0}, 2)
  tx = talr.scale_by_talr(talr.measured_target(20, measure_steps=4, fraction=1.0), levels_fn,
                          learning_rate=1e-6)
  state = tx.init(params)
  for _ in range(4):
    upd, state = tx.update({"w": jnp.ones(10)}, state, params)
    params = optax.apply_updates(params, upd)
  np.testing.assert_allclose(state.initial_target_rate, [1 / (10 * 4)], rtol=1e-6)


def test_a_baseline_monitor_measures_k_like_talr():
  """track_transitions with a measured target: K is the running mean, then the EMA."""
  rng = np.random.default_rng(4)
  params = {"w": jnp.asarray(rng.normal(size=(32,)), jnp.float32)}
  levels_fn = talr.levels_fn_from_scales({"w": 1.0}, 2)
  W, m = 5, 0.8
  tx = optax.chain(optax.sgd(0.1), talr.track_transitions(
      levels_fn, talr.measured_target(40, measure_steps=W), ema_momentum=m))
  state = tx.init(params)
  assert float(state[1].ema_transition_rate[0]) == 0.0
  ks, K = [], 0.0
  for n in range(12):
    upd, state = tx.update({"w": jnp.asarray(rng.normal(size=32), jnp.float32)}, state, params)
    params = optax.apply_updates(params, upd)
    ks.append(float(state[1].transition_rate[0]))
    K = np.mean(ks) if n + 1 <= W else m * K + (1 - m) * ks[-1]
    np.testing.assert_allclose(state[1].ema_transition_rate, [K], rtol=1e-5, atol=1e-8)
  assert int(state[1].tracking_count) == 12


def test_measured_target_arguments():
  with pytest.raises(ValueError, match="measure_steps must be an integer in"):
    talr.measured_target(10, measure_steps=11)
  with pytest.raises(ValueError, match="total_steps"):
    talr.measured_target(0)
  assert talr.measured_target(2000).measure_steps == 40  # the EMA horizon T / 50
  assert talr.measured_target(2000).measure_fraction == 0.5
  assert not talr.measured_target(2000).measure_pooled
  assert talr.measured_target(5).measure_steps == 5
  with pytest.raises(ValueError, match="measure_fraction"):
    dataclasses.replace(talr.measured_target(100), measure_fraction=0.0)
  target = talr.measured_target(100)
  assert float(target(0)) == pytest.approx(1.0) and float(target(100)) == pytest.approx(0.0)


@pytest.mark.parametrize("rule", ["multiplicative", "additive"])
def test_max_talr_bounds_u_and_c(rule):
  """A vanishing gradient makes U grow; max_talr stops it, and c stays U / lr."""
  params = {"w": jnp.linspace(-0.9, 0.9, 40)}
  levels_fn = talr.levels_fn_from_scales({"w": 1.0}, 2)
  lr, cap = 0.01, 0.05
  step = {"additive_step": 0.2} if rule == "additive" else {}
  capped = talr.scale_by_talr(0.05, levels_fn, learning_rate=lr, ema_momentum=0.5, rule=rule,
                              max_talr=cap, **step)
  free = talr.scale_by_talr(0.05, levels_fn, learning_rate=lr, ema_momentum=0.5, rule=rule,
                            **step)
  tiny = {"w": jnp.full((40,), 1e-6)}
  s_capped, s_free = capped.init(params), free.init(params)
  for _ in range(30):
    u, s_capped = capped.update(tiny, s_capped, params)
    _, s_free = free.update(tiny, s_free, params)
    assert float(s_capped.talr[0]) <= cap + 1e-9
  assert float(s_free.talr[0]) > 2 * cap, "without the cap U grows past it"
  assert float(s_capped.talr[0]) == pytest.approx(cap)
  if rule == "multiplicative":
    np.testing.assert_allclose(s_capped.talr, lr * s_capped.talr_scale, rtol=1e-6)
  with pytest.raises(ValueError, match=r"max_talr must be in \[0.01, inf\)"):
    talr.scale_by_talr(0.05, levels_fn, learning_rate=lr, max_talr=0.001)
  tx = talr.sgdt(lr, 0.05, levels_fn, max_talr=cap, ema_momentum=0.5)
  state = tx.init(params)
  for _ in range(30):
    _, state = tx.update(tiny, state, params)
  assert float(talr.metrics(state)["talr/w"]) == pytest.approx(cap)
