"""sgdt / adamt / adamwt: their stages, and their updates against plain Optax.

Full-precision leaves (levels ``None``) move exactly as with the matching Optax
optimizer. Quantized leaves move by ``-U_n * d_n``, where ``d_n`` is the
direction the stages before TALR produce and ``U_n`` the TALR of the state the
update receives (``U_0`` is the learning rate). Optax's optimizer contract
(extra arguments, inject_hyperparams, MultiSteps, lax.cond, ...) is in
``test_contract.py``.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import talr_optax

N_STEPS = 20
LR = 0.1
TARGET = 0.05


def _params():
  return {
      "w": jnp.asarray([[0.30, -0.20, 0.05, 0.11], [0.60, -0.70, 0.12, -0.01]]),
      "b": jnp.asarray([0.1, -0.2, 0.3]),
  }


LEVELS_FN = talr_optax.levels_fn_from_scales({"w": 0.5, "b": None}, 2)
_TARGETS = {
    "w": jnp.asarray([[-0.9, 0.8, 0.7, -0.6], [0.5, 0.4, -0.3, 0.2]]),
    "b": jnp.asarray([1.0, -1.0, 0.5]),
}


def _grads(params):
  """Gradient of a separable quadratic: each leaf's gradient only sees that leaf."""
  return jax.grad(
      lambda p: sum(jnp.sum((p[k] - _TARGETS[k]) ** 2) for k in p))(params)


def _run(tx, n=N_STEPS, params=None):
  """Runs ``tx`` eagerly; per step: (params, grads, updates, state before, state after)."""
  params = _params() if params is None else params
  state = tx.init(params)
  history = []
  for _ in range(n):
    grads = _grads(params)
    updates, new_state = tx.update(grads, state, params)
    history.append((params, grads, updates, state, new_state))
    params, state = optax.apply_updates(params, updates), new_state
  return params, state, history


def _talr_state(state):
  (s,) = [x for x in state if isinstance(x, talr_optax.ScaleByTALRState)]
  return s


def _stages(tx):
  return tuple(type(s).__name__ for s in tx.init(_params()))


# ---------------------------------------------------------------------------
# Structure: which stages exist depends on which arguments are given.


@pytest.mark.parametrize("factory, kwargs, stages", [
    (talr_optax.sgdt, {}, ("TraceState", "ScaleByTALRState")),
    (talr_optax.sgdt, {"momentum": 0.0}, ("TraceState", "ScaleByTALRState")),
    (talr_optax.sgdt, {"momentum": None}, ("ScaleByTALRState",)),
    (talr_optax.sgdt, {"weight_decay": 0.0}, ("EmptyState", "TraceState", "ScaleByTALRState")),
    (talr_optax.sgdt, {"weight_decay": 1e-4, "momentum": None},
     ("EmptyState", "ScaleByTALRState")),
    (talr_optax.adamt, {}, ("ScaleByAdamState", "ScaleByTALRState")),
    (talr_optax.adamt, {"weight_decay": 0.0},
     ("EmptyState", "ScaleByAdamState", "ScaleByTALRState")),
    (talr_optax.adamwt, {}, ("ScaleByAdamState", "EmptyState", "ScaleByTALRState")),
    (talr_optax.adamwt, {"weight_decay": 0.0},
     ("ScaleByAdamState", "EmptyState", "ScaleByTALRState")),
    (talr_optax.adamwt, {"weight_decay": None}, ("ScaleByAdamState", "ScaleByTALRState")),
], ids=["sgdt", "sgdt-momentum0", "sgdt-no-momentum", "sgdt-wd0", "sgdt-wd-no-momentum",
        "adamt", "adamt-wd0", "adamwt", "adamwt-wd0", "adamwt-no-wd"])
def test_stages(factory, kwargs, stages):
  tx = factory(LR, TARGET, LEVELS_FN, **kwargs)
  assert isinstance(tx, optax.GradientTransformationExtraArgs)
  assert _stages(tx) == stages
  talr = tx.init(_params())[-1]
  assert talr.rate_names.names == ("w",)
  np.testing.assert_array_equal(talr.talr, np.array([LR], np.float32))  # U_0 = lr


def test_sgdt_without_momentum_is_plain_sgd_on_full_precision_leaves():
  p, _, hist = _run(talr_optax.sgdt(LR, TARGET, LEVELS_FN, momentum=None), n=5)
  r, _, _ = _run(optax.sgd(LR), n=5)
  np.testing.assert_array_equal(p["b"], r["b"])
  for _, g, u, before, _ in hist:  # and quantized leaves move along the raw gradient
    np.testing.assert_array_equal(u["w"], -_talr_state(before).talr[0] * g["w"])


# ---------------------------------------------------------------------------
# Full-precision leaves equal Optax's optimizers, step for step.


@pytest.mark.parametrize("momentum, nesterov", [(0.9, False), (0.9, True), (0.0, False)])
def test_sgdt_full_precision_leaves_equal_optax_sgd(momentum, nesterov):
  tx = talr_optax.sgdt(LR, TARGET, LEVELS_FN, momentum=momentum, nesterov=nesterov)
  ref = optax.sgd(LR, momentum=momentum, nesterov=nesterov)
  _, _, hist = _run(tx)
  _, _, ref_hist = _run(ref)
  for (p, _, u, _, _), (rp, _, ru, _, _) in zip(hist, ref_hist):
    np.testing.assert_array_equal(p["b"], rp["b"])
    np.testing.assert_array_equal(u["b"], ru["b"])


@pytest.mark.parametrize("wd", [None, 0.05])
def test_adamt_full_precision_leaves_equal_coupled_l2_adam(wd):
  tx = talr_optax.adamt(1e-2, TARGET, LEVELS_FN, weight_decay=wd)
  ref = optax.adam(1e-2) if wd is None else optax.chain(optax.add_decayed_weights(wd),
                                                         optax.adam(1e-2))
  p, _, _ = _run(tx)
  r, _, _ = _run(ref)
  np.testing.assert_array_equal(p["b"], r["b"])


@pytest.mark.parametrize("wd", [None, 1e-4, 0.05])
def test_adamwt_full_precision_leaves_equal_optax_adamw(wd):
  kwargs = {} if wd is None else {"weight_decay": wd}  # None: both defaults (1e-4)
  p, _, _ = _run(talr_optax.adamwt(3e-2, TARGET, LEVELS_FN, **kwargs))
  r, _, _ = _run(optax.adamw(3e-2, **kwargs))
  np.testing.assert_array_equal(p["b"], r["b"])


# ---------------------------------------------------------------------------
# Quantized leaves: -U_n times the direction, U_0 = lr.


@pytest.mark.parametrize("factory, ref", [
    (lambda **kw: talr_optax.sgdt(LR, TARGET, LEVELS_FN, weight_decay=0.05, **kw),
     optax.chain(optax.add_decayed_weights(0.05), optax.sgd(LR, momentum=0.9))),
    (lambda **kw: talr_optax.adamt(1e-2, TARGET, LEVELS_FN, weight_decay=0.05, **kw),
     optax.chain(optax.add_decayed_weights(0.05), optax.adam(1e-2))),
    (lambda **kw: talr_optax.adamwt(1e-2, TARGET, LEVELS_FN, weight_decay=0.05, **kw),
     optax.adamw(1e-2, weight_decay=0.05)),
], ids=["sgdt-coupled", "adamt-coupled", "adamwt-decoupled"])
def test_first_update_of_a_quantized_leaf_is_optax_with_the_same_lr(factory, ref):
  # U_0 = lr, so the first update of every leaf is Optax's, bit for bit.
  params = _params()
  g = _grads(params)
  ref_updates, _ = ref.update(g, ref.init(params), params)
  for granularity in ("per_tensor", "global"):
    tx = factory(granularity=granularity)
    updates, _ = tx.update(g, tx.init(params), params)
    for k in ("w", "b"):
      np.testing.assert_array_equal(updates[k], ref_updates[k], err_msg=k)


def test_weight_decay_placement_is_visible_in_the_first_update():
  # Coupled decay goes through Adam's normalisation, decoupled decay does not:
  # the two first updates differ, and each equals its Optax counterpart.
  params = _params()
  g = _grads(params)
  first = lambda tx: tx.update(g, tx.init(params), params)[0]["w"]
  coupled = first(talr_optax.adamt(1e-2, TARGET, LEVELS_FN, weight_decay=0.5))
  decoupled = first(talr_optax.adamwt(1e-2, TARGET, LEVELS_FN, weight_decay=0.5))
  assert not np.allclose(coupled, decoupled, rtol=1e-3, atol=0)
  # By hand: Adam's first step is sign(.) up to eps; decoupled adds lr * wd * w.
  d_coupled = np.sign(np.asarray(g["w"]) + 0.5 * np.asarray(params["w"]))
  np.testing.assert_allclose(coupled, -1e-2 * d_coupled, rtol=1e-5)
  d_decoupled = np.sign(np.asarray(g["w"])) + 0.5 * np.asarray(params["w"])
  np.testing.assert_allclose(decoupled, -1e-2 * d_decoupled, rtol=1e-5)
  # SGDT: coupled L2 on the gradient, before momentum: g + wd w.
  sgdt = first(talr_optax.sgdt(LR, TARGET, LEVELS_FN, weight_decay=0.5))
  np.testing.assert_allclose(sgdt, -LR * (np.asarray(g["w"]) + 0.5 * np.asarray(params["w"])),
                             rtol=1e-6)


def _sgd_dir(wd, mask=None, momentum=0.9):
  return optax.chain(optax.add_decayed_weights(wd, mask), optax.trace(momentum))


def _adam_dir(wd, mask=None):
  return optax.chain(optax.add_decayed_weights(wd, mask), optax.scale_by_adam())


def _adamw_dir(wd, mask=None):
  return optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(wd, mask))


def _check_directions(tx, direction, lr_fn=lambda count: LR):
  """Every step n: update_w == -U_n * d_w and update_b == -lr(n) * d_b, bit for bit.

  ``U_n`` is read from the state the update received: it comes from earlier
  updates only.
  """
  _, _, hist = _run(tx)
  d_state = direction.init(_params())
  talrs = []
  for n, (p, g, u, before, after) in enumerate(hist):
    d, d_state = direction.update(g, d_state, p)
    u_n = _talr_state(before).talr[0]
    talrs.append(float(u_n))
    np.testing.assert_array_equal(u["w"], -u_n * d["w"], err_msg=f"update {n}")
    lr_n = jnp.asarray(lr_fn(jnp.asarray(n, jnp.int32)), jnp.float32)
    np.testing.assert_array_equal(u["b"], -lr_n * d["b"], err_msg=f"update {n}")
    assert int(_talr_state(after).talr_count) == n + 1
  assert talrs[0] == np.float32(hist[0][3][-1].talr[0])
  assert any(abs(x - talrs[0]) > 1e-7 for x in talrs), "U never moved"
  return talrs


@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_sgdt_directions(wd):
  talrs = _check_directions(talr_optax.sgdt(LR, TARGET, LEVELS_FN, weight_decay=wd),
                            _sgd_dir(wd))
  assert talrs[0] == np.float32(LR)


def test_sgdt_global_granularity_directions():
  tx = talr_optax.sgdt(LR, TARGET, LEVELS_FN, granularity="global")
  _check_directions(tx, _sgd_dir(0.0))
  assert _talr_state(tx.init(_params())).talr.shape == (1,)


@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_adamt_directions(wd):
  _check_directions(talr_optax.adamt(1e-2, TARGET, LEVELS_FN, weight_decay=wd),
                    _adam_dir(wd), lr_fn=lambda c: 1e-2)


@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_adamwt_directions(wd):
  _check_directions(talr_optax.adamwt(1e-2, TARGET, LEVELS_FN, weight_decay=wd),
                    _adamw_dir(wd), lr_fn=lambda c: 1e-2)


def test_sgdt_quantized_leaves_by_hand():
  """Trace by hand: t_n = g_n + m t_(n-1); update_n = -U_n t_n."""
  m = 0.9
  tx = talr_optax.sgdt(LR, TARGET, LEVELS_FN, momentum=m)
  params = _params()
  state = tx.init(params)
  rng = np.random.default_rng(0)
  trace = np.zeros((2, 4), np.float32)
  for _ in range(8):
    g = rng.normal(size=(2, 4)).astype(np.float32)
    u_n = np.float32(state[-1].talr[0])
    updates, state = tx.update({"w": jnp.asarray(g), "b": jnp.zeros(3)}, state, params)
    trace = g + np.float32(m) * trace
    np.testing.assert_allclose(updates["w"], -u_n * trace, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(state[0].trace["w"], trace, rtol=1e-6)
    params = optax.apply_updates(params, updates)
  # Multiplicative rule: U = lr * c.
  np.testing.assert_allclose(state[-1].talr, LR * state[-1].talr_scale, rtol=1e-6)
  assert abs(float(state[-1].talr[0]) - LR) > 1e-6


# ---------------------------------------------------------------------------
# Schedules.


def test_learning_rate_schedule():
  sched = optax.linear_schedule(0.2, 0.02, transition_steps=4)
  tx = talr_optax.sgdt(sched, TARGET, LEVELS_FN)
  state0 = _talr_state(tx.init(_params()))
  # TALR starts at schedule(0), c at 1.
  np.testing.assert_allclose(state0.talr, [0.2], rtol=1e-6)
  np.testing.assert_array_equal(state0.talr_scale, [1.0])
  # Full-precision leaves follow the schedule exactly like optax.sgd(schedule).
  _, _, hist = _run(tx)
  _, _, ref_hist = _run(optax.sgd(sched, momentum=0.9))
  for (p, _, u, _, _), (rp, _, ru, _, _) in zip(hist, ref_hist):
    np.testing.assert_array_equal(u["b"], ru["b"])
    np.testing.assert_array_equal(p["b"], rp["b"])
  # Quantized leaves: U = schedule(0) * c, not schedule(n) * c.
  for *_, after in hist:
    s = _talr_state(after)
    np.testing.assert_allclose(s.talr, np.float32(0.2) * s.talr_scale, rtol=1e-6)
  _check_directions(tx, _sgd_dir(0.0), lr_fn=sched)


def test_adam_learning_rate_schedule():
  sched = optax.cosine_decay_schedule(3e-2, 5)
  for tx, ref in [
      (talr_optax.adamt(sched, TARGET, LEVELS_FN), optax.adam(sched)),
      (talr_optax.adamwt(sched, TARGET, LEVELS_FN, weight_decay=1e-2),
       optax.adamw(sched, weight_decay=1e-2)),
  ]:
    np.testing.assert_allclose(_talr_state(tx.init(_params())).talr, [3e-2], rtol=1e-6)
    p, _, _ = _run(tx, n=8)
    r, _, _ = _run(ref, n=8)
    np.testing.assert_array_equal(p["b"], r["b"])


def test_target_schedule_is_stored_for_the_next_update():
  target = talr_optax.cosine_target(0.05, 4)
  tx = talr_optax.sgdt(LR, target, LEVELS_FN)
  np.testing.assert_allclose(_talr_state(tx.init(_params())).target_transition_rate,
                             [0.05], rtol=1e-6)
  _, _, hist = _run(tx, n=6)
  for n, (*_, after) in enumerate(hist):
    # After update n the state holds R(n + 1), the target U_(n+1) was set for.
    np.testing.assert_allclose(_talr_state(after).target_transition_rate,
                               [float(target(n + 1))], rtol=1e-6, atol=1e-9)


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
                                 weight_decay_mask=wrap(mask_w_only)), n=6)
  r, _, _ = _run(optax.sgd(LR, momentum=0.9), n=6)
  np.testing.assert_array_equal(p["b"], r["b"])
  # b decayed (coupled): like optax with add_decayed_weights before momentum.
  tx = talr_optax.sgdt(LR, TARGET, LEVELS_FN, weight_decay=wd,
                       weight_decay_mask=wrap(mask_b_only))
  p, _, _ = _run(tx, n=6)
  r, _, _ = _run(optax.chain(optax.add_decayed_weights(wd), optax.sgd(LR, momentum=0.9)),
                 n=6)
  np.testing.assert_array_equal(p["b"], r["b"])
  # w not decayed: its direction is the trace of the raw gradients.
  _check_directions(tx, _sgd_dir(wd, mask_b_only))


def test_weight_decay_mask_adamw():
  wd = 0.05
  mask = {"w": True, "b": False}
  tx = talr_optax.adamwt(1e-2, TARGET, LEVELS_FN, weight_decay=wd, weight_decay_mask=mask)
  p, _, _ = _run(tx, n=6)
  r, _, _ = _run(optax.adamw(1e-2, weight_decay=wd, mask=mask), n=6)
  np.testing.assert_array_equal(p["b"], r["b"])
  _check_directions(tx, _adamw_dir(wd, mask), lr_fn=lambda c: 1e-2)


# ---------------------------------------------------------------------------
# Bad arguments: a ValueError naming the argument.


@pytest.mark.parametrize(
    "factory, kwargs, name",
    [
        (talr_optax.sgdt, dict(learning_rate=0.0), "learning_rate"),
        (talr_optax.sgdt, dict(learning_rate=-0.1), "learning_rate"),
        (talr_optax.sgdt, dict(learning_rate="0.1"), "learning_rate"),
        (talr_optax.sgdt, dict(learning_rate=optax.linear_schedule(0.0, 0.1, 10)),
         "learning_rate"),
        (talr_optax.adamt, dict(learning_rate=0.0), "learning_rate"),
        (talr_optax.adamwt, dict(learning_rate=-1e-3), "learning_rate"),
        (talr_optax.sgdt, dict(momentum=1.0), "momentum"),
        (talr_optax.sgdt, dict(momentum=-0.1), "momentum"),
        (talr_optax.sgdt, dict(nesterov="yes"), "nesterov"),
        (talr_optax.sgdt, dict(weight_decay=-1.0), "weight_decay"),
        (talr_optax.adamt, dict(weight_decay=-1.0), "weight_decay"),
        (talr_optax.adamwt, dict(weight_decay=float("nan")), "weight_decay"),
        (talr_optax.adamt, dict(b1=1.0), "b1"),
        (talr_optax.adamwt, dict(b1=1.0), "b1"),
        (talr_optax.adamt, dict(b2=-0.5), "b2"),
        (talr_optax.adamwt, dict(eps=-1.0), "eps"),
        (talr_optax.sgdt, dict(ema_momentum=1.0), "ema_momentum"),
        (talr_optax.adamt, dict(ema_momentum=-0.1), "ema_momentum"),
        (talr_optax.adamwt, dict(ema_momentum=2.0), "ema_momentum"),
        (talr_optax.sgdt, dict(rule="exponential"), "rule"),
        (talr_optax.adamt, dict(rule="exponential"), "rule"),
        (talr_optax.sgdt, dict(granularity="per_channel"), "granularity"),
        (talr_optax.adamwt, dict(granularity="per_channel"), "granularity"),
        (talr_optax.sgdt, dict(additive_step=0.1), "additive_step"),
        (talr_optax.sgdt, dict(rule="additive", additive_step=-0.1), "additive_step"),
        (talr_optax.sgdt, dict(sample_size=0), "sample_size"),
        (talr_optax.adamwt, dict(sample_size=2.5), "sample_size"),
        (talr_optax.sgdt, dict(granularity="global", layer_axes={"w": 0, "b": None}),
         "layer_axes"),
        (talr_optax.sgdt, dict(target_transition_rate=1.5), "target_transition_rate"),
        (talr_optax.adamt, dict(target_transition_rate=-0.1), "target_transition_rate"),
        (talr_optax.sgdt, dict(levels_fn=None), "levels_fn"),
    ],
)
def test_bad_args(factory, kwargs, name):
  args = dict(learning_rate=LR, target_transition_rate=TARGET, levels_fn=LEVELS_FN)
  args.update(kwargs)
  # The name as a whole word: 'rate' must not be satisfied by 'learning_rate',
  # nor 'momentum' by 'ema_momentum'.
  with pytest.raises(ValueError, match=rf"(?<!\w){re.escape(name)}(?!\w)"):
    factory(**args)


def _k_after(tx, n=4):
  """The EMA K of the last stage that holds one, after ``n`` updates of a 2-bit problem."""
  params = {"w": jnp.linspace(-0.3, 0.3, 64).reshape(8, 8)}
  state = tx.init(params)
  for i in range(n):
    grads = {"w": jnp.sin(jnp.arange(64.0) + i).reshape(8, 8)}
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return np.asarray(optax.tree.get(state, "ema_transition_rate"))


@pytest.mark.parametrize("factory", [talr_optax.sgdt, talr_optax.adamt, talr_optax.adamwt])
def test_default_ema_momentum_follows_the_targets_length(factory):
  levels_fn = talr_optax.levels_fn_from_scales({"w": 0.1}, 2)
  for steps, m in ((1000, 0.95), (4000, 0.9875), (20_000, 0.99)):
    target = talr_optax.cosine_target(0.05, steps)
    got = _k_after(factory(0.05, target, levels_fn))
    np.testing.assert_array_equal(got, _k_after(factory(0.05, target, levels_fn,
                                                        ema_momentum=m)))
  # A float target does not know the run's length: 0.99.
  np.testing.assert_array_equal(_k_after(factory(0.05, 0.05, levels_fn)),
                                _k_after(factory(0.05, 0.05, levels_fn, ema_momentum=0.99)))
  # The default differs from 0.99 where it should (the test can fail).
  target = talr_optax.cosine_target(0.05, 1000)
  assert not np.array_equal(_k_after(factory(0.05, target, levels_fn)),
                            _k_after(factory(0.05, target, levels_fn, ema_momentum=0.99)))


def test_track_transitions_default_momentum_follows_the_targets_length():
  levels_fn = talr_optax.levels_fn_from_scales({"w": 0.1}, 2)
  target = talr_optax.cosine_target(0.05, 1000)
  chain = lambda **kw: optax.chain(optax.sgd(0.05), talr_optax.track_transitions(
      levels_fn, target, **kw))
  np.testing.assert_array_equal(_k_after(chain()), _k_after(chain(ema_momentum=0.95)))
  assert not np.array_equal(_k_after(chain()), _k_after(chain(ema_momentum=0.99)))
