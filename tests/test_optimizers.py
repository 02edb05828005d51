"""Tests of sgdt / adamt / adamwt against plain Optax optimizers and by hand.

Full-precision leaves (levels ``None``) must move exactly as with the matching
Optax optimizer; quantized leaves must move by ``-U * direction`` where the
direction is what the wrapped optimizer produced and ``U`` is the TALR stored
in the state.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import talr_optax
from talr_optax import optimizers, quantizers

N_STEPS = 6
LR = 0.1
TARGET = 0.05


def _params():
  return {
      "w": jnp.asarray([[0.30, -0.20, 0.05, 0.11], [0.60, -0.70, 0.12, -0.01]]),
      "b": jnp.asarray([0.1, -0.2, 0.3]),
  }


LEVELS_FN = quantizers.levels_fn_from_scales({"w": 0.5, "b": None}, 2)
_TARGETS = {
    "w": jnp.asarray([[-0.9, 0.8, 0.7, -0.6], [0.5, 0.4, -0.3, 0.2]]),
    "b": jnp.asarray([1.0, -1.0, 0.5]),
}


def _grads(params):
  """Gradient of a separable quadratic: each leaf's gradient only sees that leaf."""
  return jax.grad(
      lambda p: sum(jnp.sum((p[k] - _TARGETS[k]) ** 2) for k in p))(params)


def _run(tx, n=N_STEPS, params=None):
  """Runs ``tx`` eagerly; returns per step (params seen, grads, updates, state)."""
  params = _params() if params is None else params
  state = tx.init(params)
  history = []
  for _ in range(n):
    grads = _grads(params)
    updates, state = tx.update(grads, state, params)
    history.append((params, grads, updates, state))
    params = optax.apply_updates(params, updates)
  return params, state, history


def _talr(state, leaf="w"):
  return optax.tree.get(state, "talr")[leaf]


# ---------------------------------------------------------------------------
# Types.


@pytest.mark.parametrize("factory", [talr_optax.sgdt, talr_optax.adamt, talr_optax.adamwt])
def test_returns_gradient_transformation_extra_args(factory):
  tx = factory(LR, TARGET, LEVELS_FN)
  assert isinstance(tx, optax.GradientTransformationExtraArgs)
  state = tx.init(_params())
  talr = _talr(state)
  assert talr.dtype == jnp.float32 and float(talr) == pytest.approx(LR)
  assert optax.tree.get(state, "talr")["b"] is None


# ---------------------------------------------------------------------------
# SGDT.


@pytest.mark.parametrize("momentum, nesterov", [(0.9, False), (0.9, True), (0.0, False), (0.5, False)])
def test_sgdt_fp_leaves_equal_optax_sgd(momentum, nesterov):
  tx = talr_optax.sgdt(LR, TARGET, LEVELS_FN, momentum=momentum, nesterov=nesterov)
  ref = optax.sgd(LR, momentum=momentum, nesterov=nesterov)
  _, _, hist = _run(tx)
  _, _, ref_hist = _run(ref)
  for (p, _, u, _), (rp, _, ru, _) in zip(hist, ref_hist):
    np.testing.assert_array_equal(np.asarray(p["b"]), np.asarray(rp["b"]))
    np.testing.assert_array_equal(np.asarray(u["b"]), np.asarray(ru["b"]))


def test_sgdt_quantized_leaves_are_minus_talr_times_trace():
  """Fixed gradients: trace_t = g_t + m trace_{t-1} by hand; update = -U_t trace_t."""
  m = 0.9
  tx = talr_optax.sgdt(LR, TARGET, LEVELS_FN, momentum=m)
  params = _params()
  state = tx.init(params)
  rng = np.random.default_rng(0)
  trace = np.zeros((2, 4), np.float32)
  talrs = []
  for _ in range(N_STEPS):
    g = rng.normal(size=(2, 4)).astype(np.float32)
    grads = {"w": jnp.asarray(g), "b": jnp.zeros(3)}
    updates, state = tx.update(grads, state, params)
    trace = g + np.float32(m) * trace
    u_t = float(_talr(state))
    talrs.append(u_t)
    np.testing.assert_allclose(np.asarray(updates["w"]), -np.float32(u_t) * trace, rtol=1e-6, atol=1e-8)
    # The trace the optimizer carries is the same one.
    np.testing.assert_allclose(np.asarray(optax.tree.get(state, "trace")["w"]), trace, rtol=1e-6)
    params = optax.apply_updates(params, updates)
  # U really adapts (otherwise the test above could not tell U from LR).
  assert len(set(talrs)) > 1 and any(abs(u - LR) > 1e-6 for u in talrs)
  # Multiplicative rule: U = base * c.
  assert float(_talr(state)) == pytest.approx(
      LR * float(optax.tree.get(state, "talr_scale")["w"]), rel=1e-6)


# Reference directions (the chain without its learning-rate stage).
def _sgd_dir(wd, mask=None, momentum=0.9):
  return optax.chain(optax.add_decayed_weights(wd, mask), optax.trace(momentum))


def _adam_dir(wd, mask=None):
  return optax.chain(optax.add_decayed_weights(wd, mask), optax.scale_by_adam())


def _adamw_dir(wd, mask=None):
  return optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(wd, mask))


def _check_directions(tx, direction, lr_fn=lambda count: LR, granularity="per_tensor"):
  """Every step: update_w == -U_t * d_w and update_b == -lr(t) * d_b exactly."""
  _, _, hist = _run(tx)
  d_state = direction.init(_params())
  talrs = []
  for t, (p, g, u, state) in enumerate(hist):
    d, d_state = direction.update(g, d_state, p)
    talr = optax.tree.get(state, "talr")
    u_t = talr if granularity == "global" else talr["w"]
    talrs.append(float(u_t))
    np.testing.assert_array_equal(np.asarray(u["w"]), np.asarray(-u_t * d["w"]))
    lr_t = jnp.asarray(lr_fn(jnp.asarray(t, jnp.int32)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(u["b"]), np.asarray(-lr_t * d["b"]))
  assert any(abs(x - talrs[0]) > 1e-7 for x in talrs), "U never moved"


@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_sgdt_directions(wd):
  _check_directions(talr_optax.sgdt(LR, TARGET, LEVELS_FN, weight_decay=wd), _sgd_dir(wd))


def test_sgdt_global_granularity_directions():
  tx = talr_optax.sgdt(LR, TARGET, LEVELS_FN, granularity="global")
  _check_directions(tx, _sgd_dir(0.0), granularity="global")
  assert optax.tree.get(tx.init(_params()), "talr").shape == ()


@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_adamt_directions(wd):
  _check_directions(talr_optax.adamt(1e-2, TARGET, LEVELS_FN, weight_decay=wd),
                    _adam_dir(wd), lr_fn=lambda c: 1e-2)


@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_adamwt_directions(wd):
  _check_directions(talr_optax.adamwt(1e-2, TARGET, LEVELS_FN, weight_decay=wd),
                    _adamw_dir(wd), lr_fn=lambda c: 1e-2)


def test_sgdt_weight_decay_is_coupled():
  """FP leaves equal chain(add_decayed_weights, trace, scale(-lr)) written by hand."""
  wd, m = 0.05, 0.9
  tx = talr_optax.sgdt(LR, TARGET, LEVELS_FN, momentum=m, weight_decay=wd)
  ref = optax.chain(optax.add_decayed_weights(wd), optax.trace(decay=m), optax.scale(-LR))
  p_talr, _, _ = _run(tx)
  p_ref, _, _ = _run(ref)
  np.testing.assert_array_equal(np.asarray(p_talr["b"]), np.asarray(p_ref["b"]))
  # Decoupled decay (after momentum) gives a different trajectory: the test can tell.
  dec = optax.chain(optax.trace(decay=m), optax.add_decayed_weights(wd), optax.scale(-LR))
  p_dec, _, _ = _run(dec)
  assert not np.allclose(np.asarray(p_talr["b"]), np.asarray(p_dec["b"]), rtol=1e-5, atol=0)
  # And no decay at all differs too.
  p_sgd, _, _ = _run(optax.sgd(LR, momentum=m))
  assert not np.allclose(np.asarray(p_talr["b"]), np.asarray(p_sgd["b"]), rtol=1e-5, atol=0)


def test_sgdt_weight_decay_hand_first_step():
  """Step 1 by hand: trace = g + wd p, update_b = -lr (g + wd p)."""
  wd = 0.05
  tx = talr_optax.sgdt(LR, TARGET, LEVELS_FN, weight_decay=wd)
  params = _params()
  g = _grads(params)
  updates, _ = tx.update(g, tx.init(params), params)
  expected = -np.float32(LR) * (np.asarray(g["b"]) + np.float32(wd) * np.asarray(params["b"]))
  np.testing.assert_allclose(np.asarray(updates["b"]), expected, rtol=1e-6)


# ---------------------------------------------------------------------------
# AdamT / AdamWT FP leaves.


def test_adamt_fp_leaves_equal_coupled_l2_adam():
  wd = 0.05
  tx = talr_optax.adamt(1e-2, TARGET, LEVELS_FN, weight_decay=wd)
  ref = optax.chain(optax.add_decayed_weights(wd), optax.adam(1e-2))
  _, _, hist = _run(tx)
  _, _, ref_hist = _run(ref)
  for (p, _, u, _), (rp, _, ru, _) in zip(hist, ref_hist):
    np.testing.assert_array_equal(np.asarray(p["b"]), np.asarray(rp["b"]))
    np.testing.assert_array_equal(np.asarray(u["b"]), np.asarray(ru["b"]))
  # Without decay it is plain Adam.
  p0, _, _ = _run(talr_optax.adamt(1e-2, TARGET, LEVELS_FN))
  r0, _, _ = _run(optax.adam(1e-2))
  np.testing.assert_array_equal(np.asarray(p0["b"]), np.asarray(r0["b"]))


@pytest.mark.parametrize("wd", [1e-4, 0.05])
def test_adamwt_fp_leaves_equal_optax_adamw(wd):
  tx = talr_optax.adamwt(3e-2, TARGET, LEVELS_FN, weight_decay=wd)
  ref = optax.adamw(3e-2, weight_decay=wd)
  _, _, hist = _run(tx)
  _, _, ref_hist = _run(ref)
  for (p, _, u, _), (rp, _, ru, _) in zip(hist, ref_hist):
    np.testing.assert_array_equal(np.asarray(p["b"]), np.asarray(rp["b"]))
    np.testing.assert_array_equal(np.asarray(u["b"]), np.asarray(ru["b"]))


def test_adamwt_default_weight_decay_matches_adamw_default():
  p, _, _ = _run(talr_optax.adamwt(3e-2, TARGET, LEVELS_FN), n=3)
  r, _, _ = _run(optax.adamw(3e-2), n=3)
  np.testing.assert_array_equal(np.asarray(p["b"]), np.asarray(r["b"]))


# ---------------------------------------------------------------------------
# Learning-rate schedules.


def test_learning_rate_schedule():
  sched = optax.linear_schedule(0.2, 0.02, transition_steps=4)
  tx = talr_optax.sgdt(sched, TARGET, LEVELS_FN)
  state0 = tx.init(_params())
  # TALR starts at schedule(0), c at 1.
  assert float(_talr(state0)) == pytest.approx(0.2, rel=1e-6)
  assert float(optax.tree.get(state0, "talr_scale")["w"]) == 1.0
  # FP leaves follow the schedule exactly like optax.sgd(schedule).
  _, state, hist = _run(tx)
  _, _, ref_hist = _run(optax.sgd(sched, momentum=0.9))
  for (p, _, u, _), (rp, _, ru, _) in zip(hist, ref_hist):
    np.testing.assert_array_equal(np.asarray(u["b"]), np.asarray(ru["b"]))
    np.testing.assert_array_equal(np.asarray(p["b"]), np.asarray(rp["b"]))
  # Quantized leaves: U = schedule(0) * c, not schedule(t) * c.
  for _, _, _, st in hist:
    c = float(optax.tree.get(st, "talr_scale")["w"])
    assert float(_talr(st)) == pytest.approx(0.2 * c, rel=1e-6)
  # And the directions check with the schedule as lr(t).
  _check_directions(tx, _sgd_dir(0.0), lr_fn=sched)


def test_adam_learning_rate_schedule():
  sched = optax.cosine_decay_schedule(3e-2, 5)
  for tx, ref in [
      (talr_optax.adamt(sched, TARGET, LEVELS_FN), optax.adam(sched)),
      (talr_optax.adamwt(sched, TARGET, LEVELS_FN, weight_decay=1e-2),
       optax.adamw(sched, weight_decay=1e-2)),
  ]:
    assert float(_talr(tx.init(_params()))) == pytest.approx(3e-2, rel=1e-6)
    p, _, _ = _run(tx)
    r, _, _ = _run(ref)
    np.testing.assert_array_equal(np.asarray(p["b"]), np.asarray(r["b"]))


def test_target_schedule_is_used():
  target = talr_optax.cosine_target(0.05, 4)
  _, _, hist = _run(talr_optax.sgdt(LR, target, LEVELS_FN), n=5)
  for t, (_, _, _, st) in enumerate(hist):
    r = optax.tree.get(st, "target_transition_rate")["w"]
    assert float(r) == pytest.approx(float(target(t)), rel=1e-6, abs=1e-9)


# ---------------------------------------------------------------------------
# Weight-decay mask.


@pytest.mark.parametrize("as_callable", [False, True])
def test_weight_decay_mask(as_callable):
  wd = 0.05
  mask_w_only = {"w": True, "b": False}
  mask_b_only = {"w": False, "b": True}
  wrap = (lambda m: (lambda params: m)) if as_callable else (lambda m: m)

  # b not decayed: b moves like plain SGD with momentum.
  p, _, _ = _run(talr_optax.sgdt(LR, TARGET, LEVELS_FN, weight_decay=wd,
                                 weight_decay_mask=wrap(mask_w_only)))
  r, _, _ = _run(optax.sgd(LR, momentum=0.9))
  np.testing.assert_array_equal(np.asarray(p["b"]), np.asarray(r["b"]))

  # b decayed: like coupled decay, and not like plain SGD.
  tx = talr_optax.sgdt(LR, TARGET, LEVELS_FN, weight_decay=wd,
                       weight_decay_mask=wrap(mask_b_only))
  p, _, _ = _run(tx)
  r, _, _ = _run(optax.chain(optax.add_decayed_weights(wd), optax.trace(0.9), optax.scale(-LR)))
  np.testing.assert_array_equal(np.asarray(p["b"]), np.asarray(r["b"]))
  # w not decayed: its direction is the trace of the raw gradients.
  _check_directions(tx, _sgd_dir(wd, mask_b_only))


def test_weight_decay_mask_adamw():
  wd = 0.05
  mask = {"w": True, "b": False}
  tx = talr_optax.adamwt(1e-2, TARGET, LEVELS_FN, weight_decay=wd, weight_decay_mask=mask)
  p, _, _ = _run(tx)
  r, _, _ = _run(optax.adamw(1e-2, weight_decay=wd, mask=mask))
  np.testing.assert_array_equal(np.asarray(p["b"]), np.asarray(r["b"]))
  _check_directions(tx, _adamw_dir(wd, mask), lr_fn=lambda c: 1e-2)


# ---------------------------------------------------------------------------
# jit


def test_sgdt_under_jit_matches_eager():
  tx = talr_optax.sgdt(LR, TARGET, LEVELS_FN, weight_decay=1e-3)
  params = _params()
  state = tx.init(params)
  step = jax.jit(tx.update)
  p_eager, _, _ = _run(tx)
  for _ in range(N_STEPS):
    updates, state = step(_grads(params), state, params)
    params = optax.apply_updates(params, updates)
  for k in ("w", "b"):
    np.testing.assert_allclose(np.asarray(params[k]), np.asarray(p_eager[k]), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------
# Bad arguments.


@pytest.mark.parametrize(
    "factory, kwargs, name",
    [
        (talr_optax.sgdt, dict(learning_rate=0.0), "learning_rate"),
        (talr_optax.sgdt, dict(learning_rate=-0.1), "learning_rate"),
        (talr_optax.adamt, dict(learning_rate=0.0), "learning_rate"),
        (talr_optax.adamwt, dict(learning_rate=-1e-3), "learning_rate"),
        (talr_optax.sgdt, dict(momentum=1.0), "momentum"),
        (talr_optax.sgdt, dict(momentum=-0.1), "momentum"),
        (talr_optax.sgdt, dict(weight_decay=-1.0), "weight_decay"),
        (talr_optax.adamt, dict(weight_decay=-1.0), "weight_decay"),
        (talr_optax.adamwt, dict(weight_decay=-1.0), "weight_decay"),
        (talr_optax.adamt, dict(b1=1.0), "b1"),
        (talr_optax.adamwt, dict(b1=1.0), "b1"),
        (talr_optax.adamt, dict(b2=1.0), "b2"),
        (talr_optax.adamwt, dict(eps=-1.0), "eps"),
        (talr_optax.sgdt, dict(rule="exponential"), "rule"),
        (talr_optax.adamt, dict(rule="exponential"), "rule"),
        (talr_optax.sgdt, dict(granularity="per_channel"), "granularity"),
        (talr_optax.adamwt, dict(granularity="per_channel"), "granularity"),
        (talr_optax.sgdt, dict(rate=0.1), "rate"),
        (talr_optax.sgdt, dict(rule="additive", rate=-0.1), "rate"),
        (talr_optax.sgdt, dict(target_transition_rate=1.5), "target_transition_rate"),
        (talr_optax.sgdt, dict(target_transition_rate=-0.1), "target_transition_rate"),
    ],
)
def test_bad_args(factory, kwargs, name):
  args = dict(learning_rate=LR, target_transition_rate=TARGET, levels_fn=LEVELS_FN)
  args.update(kwargs)
  # The name as a whole word: 'rate' must not be satisfied by 'learning_rate',
  # nor 'momentum' by 'ema_momentum'.
  with pytest.raises(ValueError, match=rf"(?<!\w){re.escape(name)}(?!\w)"):
    factory(**args)


@pytest.mark.parametrize("factory", [talr_optax.sgdt, talr_optax.adamt, talr_optax.adamwt])
@pytest.mark.parametrize("value", [1.0, -0.1])
def test_bad_ema_momentum_names_ema_momentum(factory, value):
  # Not 'momentum' alone: sgdt has its own SGD momentum argument.
  with pytest.raises(ValueError, match=r"(?<!\w)ema_momentum(?!\w)"):
    factory(LR, TARGET, LEVELS_FN, ema_momentum=value)


# ---------------------------------------------------------------------------
# inject_hyperparams


@pytest.mark.parametrize("factory, lr", [(talr_optax.sgdt, LR), (talr_optax.adamt, 1e-2),
                                         (talr_optax.adamwt, 1e-2)])
def test_inject_hyperparams_under_jit(factory, lr):
  """static_args=('levels_fn',) is enough: every numeric default is injected
  as an array (traced in the jitted update) and must not be branched on."""
  params = _params()
  tx = optax.inject_hyperparams(factory, static_args=("levels_fn",))(
      learning_rate=lr, target_transition_rate=TARGET, levels_fn=LEVELS_FN)
  state = tx.init(params)
  assert {"learning_rate", "target_transition_rate", "weight_decay",
          "ema_momentum"} <= set(state.hyperparams)
  step = jax.jit(tx.update)
  for _ in range(3):
    updates, state = step(_grads(params), state, params)
    params = optax.apply_updates(params, updates)
  p_ref, s_ref, _ = _run(factory(lr, TARGET, LEVELS_FN), n=3)
  for k in ("w", "b"):
    np.testing.assert_allclose(np.asarray(params[k]), np.asarray(p_ref[k]), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(float(_talr(state)), float(_talr(s_ref)), rtol=1e-5)


def test_inject_hyperparams_changed_learning_rate_is_used():
  params = _params()
  tx = optax.inject_hyperparams(talr_optax.sgdt, static_args=("levels_fn",))(
      learning_rate=LR, target_transition_rate=TARGET, levels_fn=LEVELS_FN)
  state = tx.init(params)
  state.hyperparams["learning_rate"] = jnp.asarray(0.05)
  g = _grads(params)
  updates, state = jax.jit(tx.update)(g, state, params)
  # First step, FP leaf: -lr * (g + 0.9 * 0).
  np.testing.assert_allclose(np.asarray(updates["b"]), -0.05 * np.asarray(g["b"]), rtol=1e-6)


def test_inject_hyperparams_needs_static_levels_fn():
  # Without static_args, inject_hyperparams calls levels_fn as a schedule.
  tx = optax.inject_hyperparams(talr_optax.sgdt)(
      learning_rate=LR, target_transition_rate=TARGET, levels_fn=LEVELS_FN)
  with pytest.raises(ValueError, match="static_args"):
    tx.init(_params())


def test_schedule_starting_at_zero_is_rejected():
  # TALR's base rate is schedule(0); a warmup from 0 would freeze U at 0.
  with pytest.raises(ValueError, match="learning_rate"):
    talr_optax.sgdt(optax.linear_schedule(0.0, 0.1, 10), TARGET, LEVELS_FN)
