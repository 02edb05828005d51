"""Optax's contract for optimizers, applied to sgdt, adamt, adamwt and scale_by_talr.

The checks follow ``optax/contrib/_common_test.py``: extra arguments, no
recompile, ``inject_hyperparams`` equal to the plain optimizer (updates and
state), dtype of updates kept, ``MultiSteps``, ``lax.cond`` stability of the
state in float16 / bfloat16 / float32 / float64, schedules accepted where the
learning rate is annotated as one.
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import optax
import pytest
from optax._src import test_utils

import talr_optax as talr


def _levels_fn(params):
  """2-bit levels with step size 1 for every leaf."""
  return jax.tree.map(lambda p: talr.weight_levels(p, 1.0, 2), params)


def _make(name, **kwargs):
  """The optimizer under test; the target is a schedule, as users pass it."""
  target = talr.cosine_target(0.05, 100)
  if name == "scale_by_talr":
    return talr.scale_by_talr(target, _levels_fn, learning_rate=kwargs.pop(
        "learning_rate", 1e-2), **kwargs)
  factory = getattr(talr, name)
  return factory(kwargs.pop("learning_rate", 1e-2), target, _levels_fn, **kwargs)


OPTIMIZERS = [
    ("sgdt", {}),
    ("sgdt", {"weight_decay": 0.0}),
    ("sgdt", {"momentum": 0.0, "weight_decay": 1e-4}),
    ("adamt", {}),
    ("adamt", {"weight_decay": 0.0}),
    ("adamwt", {}),
    ("adamwt", {"weight_decay": 0.0}),
    ("scale_by_talr", {}),
    ("scale_by_talr", {"rule": "additive"}),
]
IDS = [f"{n}-{k}" for n, k in OPTIMIZERS]


def _rosenbrock(dtype=jnp.float32):
  params = jnp.array([0.3, -0.4], dtype=dtype)

  def objective(p):
    return (1.0 - p[0]) ** 2 + 100.0 * (p[1] - p[0] ** 2) ** 2

  return params, objective


@pytest.mark.parametrize("name,kwargs", OPTIMIZERS, ids=IDS)
def test_accepts_extra_args_and_does_not_recompile(name, kwargs):
  opt = _make(name, **kwargs)
  params, objective = _rosenbrock()

  @jax.jit
  def step(p, s):
    grads = jax.grad(objective)(p)
    updates, s = opt.update(grads, s, p, unexpected_extra_args_your_optimizer_doesnt_expect=1)
    return optax.apply_updates(p, updates), s

  state = opt.init(params)
  params, state = step(params, state)
  with test_utils.log_compilations() as logs:
    params, state = step(params, state)
  assert not logs, "the optimizer recompiles on its second update"


def _hparams(name, kwargs):
  hp = dict(kwargs, learning_rate=1e-2,
            target_transition_rate=talr.cosine_target(0.05, 100), levels_fn=_levels_fn)
  return hp


@pytest.mark.parametrize("name,kwargs", OPTIMIZERS, ids=IDS)
def test_inject_hyperparams_equals_the_plain_optimizer(name, kwargs):
  if name == "scale_by_talr":
    factory = lambda target_transition_rate, levels_fn, **kw: talr.scale_by_talr(
        target_transition_rate, levels_fn, **kw)
    factory = functools.wraps(talr.scale_by_talr)(factory)
  else:
    factory = getattr(talr, name)
  hp = _hparams(name, kwargs)
  plain = factory(**hp)
  injected = optax.inject_hyperparams(
      factory, static_args=("levels_fn", "target_transition_rate"))(**hp)
  params = [-jnp.ones((2, 3)), jnp.ones((2, 5, 2))]
  grads = [jnp.ones((2, 3)), -jnp.ones((2, 5, 2))]
  state = jax.jit(plain.init)(params)
  updates, new_state = jax.jit(plain.update)(grads, state, params)
  state_i = jax.jit(injected.init)(params)
  updates_i, new_state_i = jax.jit(injected.update)(grads, state_i, params)
  test_utils.assert_trees_all_close(updates_i, updates, rtol=1e-5)
  assert jax.tree.structure(new_state_i.inner_state) == jax.tree.structure(new_state)
  test_utils.assert_trees_all_close(new_state_i.inner_state, new_state, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,kwargs", OPTIMIZERS, ids=IDS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_updates_keep_the_params_dtype(name, kwargs, dtype):
  opt = _make(name, **kwargs)
  params = jnp.array([1.0, 2.0], dtype=dtype)
  grads = jax.grad(lambda x: jnp.sum(x**2))(params)
  state = jax.jit(opt.init)(params)
  updates, _ = jax.jit(opt.update)(grads, state, params)
  assert updates.dtype == params.dtype


@pytest.mark.parametrize("name,kwargs", OPTIMIZERS, ids=IDS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_multisteps_gives_zero_updates_between_real_ones(name, kwargs, dtype):
  opt = optax.MultiSteps(_make(name, **kwargs), every_k_schedule=4)
  params = jnp.array([1.0, 2.0], dtype=dtype)
  grads = jax.grad(lambda x: jnp.sum(x**2))(params)
  state = jax.jit(opt.init)(params)
  updates, _ = jax.jit(opt.update)(grads, state, params)
  test_utils.assert_trees_all_equal(updates, jnp.zeros_like(grads))


@pytest.mark.parametrize("name,kwargs", OPTIMIZERS, ids=IDS)
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64])
def test_state_is_stable_under_lax_cond(name, kwargs, dtype):
  with jax.enable_x64(dtype == jnp.float64):
    opt = _make(name, **kwargs)
    params = jnp.array([-1.0, 10.0, 1.0], dtype=dtype)
    target = jnp.array([1.0, -1.0, 1.0], dtype=dtype)
    objective = lambda p: jnp.sum((p - target) ** 2)

    @jax.jit
    def step(p, s):
      grads = jax.grad(objective)(p)
      cond = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
      updates, s = jax.lax.cond(cond, lambda: opt.update(grads, s, p), lambda: (p, s))
      return optax.apply_updates(p, updates), s

    state = opt.init(params)
    for _ in range(2):
      params, new_state = step(params, state)
      assert params.dtype == dtype
      cond = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
      state = jax.lax.cond(cond, lambda: state, lambda: new_state)  # noqa: B023


@pytest.mark.parametrize("name", ["sgdt", "adamt", "adamwt"])
def test_learning_rate_schedule_is_accepted_where_annotated(name):
  factory = getattr(talr, name)
  annotation = inspect.signature(factory).parameters["learning_rate"].annotation
  assert annotation in (optax.ScalarOrSchedule, "optax.ScalarOrSchedule")
  with_schedule = _make(name, learning_rate=optax.constant_schedule(1e-3))
  with_float = _make(name, learning_rate=1e-3)
  params, objective = _rosenbrock()
  p1, p2 = params, params
  s1, s2 = with_schedule.init(p1), with_float.init(p2)
  for _ in range(10):
    u1, s1 = with_schedule.update(jax.grad(objective)(p1), s1, p1)
    u2, s2 = with_float.update(jax.grad(objective)(p2), s2, p2)
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
  test_utils.assert_trees_all_close(p1, p2)


@pytest.mark.parametrize("name", ["sgdt", "adamt", "adamwt"])
def test_chain_structure_does_not_depend_on_hyperparameter_values(name):
  params = jnp.ones(3)
  zero = _make(name, weight_decay=0.0).init(params)
  some = _make(name, weight_decay=1e-3).init(params)
  assert jax.tree.structure(zero) == jax.tree.structure(some)
  dropped = _make(name, weight_decay=None).init(params)
  assert len(dropped) == len(zero) - 1
