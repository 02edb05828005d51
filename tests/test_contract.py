"""Optax's contract for optimizers, applied to every stage of the library.

The checks follow the common tests Optax runs on its contributed optimizers:
extra arguments, no recompile, ``inject_hyperparams`` equal to the plain
transformation (updates and state), dtype of updates kept and the state stable
under ``lax.cond`` in float16 / bfloat16 / float32 / float64, ``MultiSteps``,
and schedules accepted where an argument is annotated as one; and besides,
``init`` under ``jax.eval_shape``, and ``jax.jit(tx.init)`` plus jitted updates
on params sharded over a mesh with Explicit axes.

The cases (``CASES``) are the ready optimizers ``sgdt`` / ``adamt`` /
``adamwt`` (also with ``freeze_threshold`` and ``centers_fn``),
``scale_by_talr``, and the stages ``track_transitions``,
``track_oscillations``, ``dampen_oscillations`` and ``freeze_oscillations``
(after a plain optimizer, and wrapping ``scale_by_talr`` through ``inner``),
some with ``layer_axes`` and ``sample_size``. A stage that needs an optimizer
is tested in the chain a user writes (``optax.sgd`` before a tracker or the
freezing, after the dampening); ``inject_hyperparams`` wraps the stage alone.

The sharded checks need 8 host devices, which are fixed when JAX initialises:
one subprocess runs this file as a script (``XLA_FLAGS=
--xla_force_host_platform_device_count=8``, as ``tests/test_sharding.py``),
checks every stage (``SHARDED_CASES``) and prints a JSON report; this
process keeps one device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import os
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from optax._src import test_utils

import talr_optax as talr

ROOT = Path(__file__).resolve().parents[1]
TARGET = talr.cosine_target(0.05, 100)


def _levels_fn(params):
  """2-bit levels with step size 1 for every leaf."""
  return jax.tree.map(lambda p: talr.weight_levels(p, 1.0, 2), params)


def _centers_fn(params, levels=None):
  """The centres of ``_levels_fn``'s quantizer: of the current levels, or of ``levels``."""
  if levels is None:
    return jax.tree.map(lambda p: talr.weight_centers(p, 1.0, 2), params)
  return jax.tree.map(lambda q, p: talr.level_values(q, 1.0, 2, p.dtype), levels, params)


def _layer_axes(params):
  """Axis 0 of every leaf is a layer axis (each layer gets its own rate)."""
  return jax.tree.map(lambda p: 0, params)


@dataclasses.dataclass(frozen=True)
class Case:
  """A stage under test: ``factory(**args)``, between ``before`` and ``after``.

  ``before`` / ``after`` are plain Optax optimizers that a user chains with
  the stage; ``shown`` are the arguments the test id shows.
  """

  factory: Callable[..., Any]
  args: dict
  shown: dict
  before: Optional[Callable[[], Any]] = None
  after: Optional[Callable[[], Any]] = None

  @property
  def id(self) -> str:
    shown = {k: getattr(v, "__name__", v) for k, v in self.shown.items()}
    return f"{self.factory.__name__}-{shown}"

  def stage(self) -> optax.GradientTransformationExtraArgs:
    return self.factory(**self.args)

  def make(self) -> optax.GradientTransformationExtraArgs:
    """The transformation a user trains with: the stage, chained if it needs to be."""
    parts = [f() for f in (self.before,) if f] + [self.stage()]
    parts += [f() for f in (self.after,) if f]
    return parts[0] if len(parts) == 1 else optax.chain(*parts)


def _ready(factory, **shown):
  args = dict(learning_rate=1e-2, target_transition_rate=TARGET, levels_fn=_levels_fn)
  return Case(factory, dict(args, **shown), shown)


def _talr(**shown):
  args = dict(target_transition_rate=TARGET, levels_fn=_levels_fn, learning_rate=1e-2)
  return Case(talr.scale_by_talr, dict(args, **shown), shown)


_SGD = functools.partial(optax.sgd, 1e-2)
_SAMPLED = dict(layer_axes=_layer_axes, sample_size=2)
# Freezing after one oscillation (m = 0.5), so the snap happens in short runs.
_FREEZE = dict(freeze_threshold=0.1, centers_fn=_centers_fn, freeze_ema_momentum=0.5)
_FREEZE_ARGS = dict(levels_fn=_levels_fn, centers_fn=_centers_fn, threshold=0.1,
                    ema_momentum=0.5)

CASES = [
    _ready(talr.sgdt),
    _ready(talr.sgdt, weight_decay=0.0),
    _ready(talr.sgdt, momentum=0.0, weight_decay=1e-4),
    _ready(talr.adamt),
    _ready(talr.adamt, weight_decay=0.0),
    _ready(talr.adamwt),
    _ready(talr.adamwt, weight_decay=0.0),
    _talr(),
    _talr(rule="additive"),
    _talr(**_SAMPLED),
    _ready(talr.sgdt, **_FREEZE),
    _ready(talr.adamt, **_FREEZE),
    _ready(talr.adamwt, **_FREEZE, **_SAMPLED),
    Case(talr.track_transitions, dict(levels_fn=_levels_fn, initial_rate=0.05), {},
         before=_SGD),
    Case(talr.track_transitions, dict(levels_fn=_levels_fn, initial_rate=0.05, **_SAMPLED),
         _SAMPLED, before=_SGD),
    Case(talr.track_oscillations, dict(levels_fn=_levels_fn, ema_momentum=0.5), {},
         before=_SGD),
    Case(talr.track_oscillations, dict(levels_fn=_levels_fn, ema_momentum=0.5, **_SAMPLED),
         _SAMPLED, before=_SGD),
    Case(talr.dampen_oscillations, dict(centers_fn=_centers_fn, strength=1e-2), {},
         after=_SGD),
    Case(talr.freeze_oscillations, _FREEZE_ARGS, {}, before=_SGD),
    Case(talr.freeze_oscillations,
         dict(_FREEZE_ARGS, layer_axes=_layer_axes,
              inner=talr.scale_by_talr(TARGET, _levels_fn, learning_rate=1e-2,
                                       layer_axes=_layer_axes)),
         {"inner": "scale_by_talr", "layer_axes": _layer_axes},
         before=optax.scale_by_adam),
]
IDS = [c.id for c in CASES]
BY_ID = dict(zip(IDS, CASES))
assert len(BY_ID) == len(CASES), "case ids must be unique"
cases = pytest.mark.parametrize("case", CASES, ids=IDS)


def _stages() -> list[Callable[..., Any]]:
  """The library's public factories of Optax transformations (by their return type)."""
  out = []
  for name in talr.__all__:
    f = getattr(talr, name)
    if inspect.isfunction(f) and typing.get_type_hints(f).get("return") in (
        optax.GradientTransformation, optax.GradientTransformationExtraArgs):
      out.append(f)
  return out


STAGES = _stages()


def test_every_stage_of_the_library_is_a_case():
  """The cases cover every public factory of a transformation, and nothing else."""
  assert {c.factory for c in CASES} == set(STAGES)


def _rosenbrock(dtype=jnp.float32):
  params = jnp.array([0.3, -0.4], dtype=dtype)

  def objective(p):
    return (1.0 - p[0]) ** 2 + 100.0 * (p[1] - p[0] ** 2) ** 2

  return params, objective


@cases
def test_accepts_extra_args_and_does_not_recompile(case):
  """Updates take unknown keyword arguments; the second jitted step reuses the first's compile."""
  opt = case.make()
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


# Arguments inject_hyperparams must leave alone: functions it would take for
# schedules, the target (a schedule the stage reads its length from), and
# integers it would turn into traced arrays.
_STATIC = ("levels_fn", "centers_fn", "inner", "layer_axes", "sample_size",
           "target_transition_rate")


@cases
def test_inject_hyperparams_equals_the_plain_optimizer(case):
  """The stage under ``optax.inject_hyperparams`` (numbers injected) gives the plain stage's
  updates and state (init and update jitted together, one compile for both)."""
  static = tuple(k for k in _STATIC if k in case.args)
  injected_args = [k for k, v in case.args.items()
                   if k not in static and isinstance(v, (int, float)) and not isinstance(v, bool)]
  assert injected_args, "the case injects no hyperparameter"
  plain = case.stage()
  injected = optax.inject_hyperparams(case.factory, static_args=static)(**case.args)
  params = [-jnp.ones((2, 3)), jnp.ones((2, 5, 2))]
  grads = [jnp.ones((2, 3)), -jnp.ones((2, 5, 2))]

  @jax.jit
  def run(params, grads):
    return [tx.update(grads, tx.init(params), params) for tx in (plain, injected)]

  (updates, new_state), (updates_i, new_state_i) = run(params, grads)
  assert set(injected_args) <= set(new_state_i.hyperparams)
  test_utils.assert_trees_all_close(updates_i, updates, rtol=1e-5)
  assert jax.tree.structure(new_state_i.inner_state) == jax.tree.structure(new_state)
  test_utils.assert_trees_all_close(new_state_i.inner_state, new_state, rtol=1e-5, atol=1e-5)


# Each leaf in its own dtype, so one compile checks float16, bfloat16 and
# float32; float64 needs x64, which changes how Python scalars promote, so it
# gets a run of its own.
_PRECISIONS = {"float16+bfloat16+float32": (jnp.float16, jnp.bfloat16, jnp.float32),
               "float64": (jnp.float64,)}
precisions = pytest.mark.parametrize("precision", list(_PRECISIONS))


def _tree_of(values, dtypes):
  return {jnp.dtype(d).name: jnp.array(values, dtype=d) for d in dtypes}


@cases
@precisions
def test_updates_keep_the_params_dtype(case, precision):
  """Updates have the dtype of their param, leaf by leaf (init and update under jit)."""
  dtypes = _PRECISIONS[precision]
  with jax.enable_x64(jnp.float64 in dtypes):
    opt = case.make()
    params = _tree_of([1.0, 2.0], dtypes)
    grads = jax.grad(lambda p: sum(jnp.sum(x**2) for x in jax.tree.leaves(p)))(params)
    updates = jax.jit(lambda p, g: opt.update(g, opt.init(p), p)[0])(params, grads)
    assert {k: u.dtype for k, u in updates.items()} == {k: p.dtype for k, p in params.items()}


@cases
def test_init_under_eval_shape(case):
  """``jax.eval_shape(tx.init)`` traces and gives the shapes, dtypes and tree of ``tx.init``."""
  opt = case.make()
  params = {"w": jnp.linspace(-2.0, 2.0, 12).reshape(3, 4), "b": jnp.array([0.4, -1.3])}
  abstract = jax.eval_shape(opt.init, params)
  concrete = opt.init(params)
  assert jax.tree.structure(abstract) == jax.tree.structure(concrete)
  describe = lambda x: (tuple(x.shape), jnp.dtype(x.dtype), getattr(x, "weak_type", False))
  assert [describe(x) for x in jax.tree.leaves(abstract)] == [
      describe(jax.typeof(x)) for x in jax.tree.leaves(concrete)]


@cases
def test_multisteps_gives_zero_updates_between_real_ones(case):
  """Under ``optax.MultiSteps`` the first of 4 accumulated steps gives zero updates
  (bfloat16 and float32 leaves)."""
  opt = optax.MultiSteps(case.make(), every_k_schedule=4)
  params = _tree_of([1.0, 2.0], (jnp.bfloat16, jnp.float32))
  grads = jax.grad(lambda p: sum(jnp.sum(x**2) for x in jax.tree.leaves(p)))(params)
  updates = jax.jit(lambda p, g: opt.update(g, opt.init(p), p)[0])(params, grads)
  test_utils.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, grads))


@cases
@precisions
def test_state_is_stable_under_lax_cond(case, precision):
  """Two steps, each inside ``lax.cond`` (updates or the params) and followed by
  ``lax.cond`` choosing the old or the new state, as Optax's test: the branches'
  types must match, so update keeps the types of params and state.

  ``lax.cond`` checks types when it is traced, so the steps are traced with
  ``jax.eval_shape`` and not compiled (``test_updates_keep_the_params_dtype``
  runs the same stages in the same dtypes).
  """
  dtypes = _PRECISIONS[precision]
  with jax.enable_x64(jnp.float64 in dtypes):
    opt = case.make()
    params = _tree_of([-1.0, 10.0, 1.0], dtypes)
    target = _tree_of([1.0, -1.0, 1.0], dtypes)
    objective = lambda p: sum(jnp.sum((p[k] - target[k]) ** 2) for k in p)

    def run(p):
      s = s0 = opt.init(p)
      for _ in range(2):
        grads = jax.grad(objective)(p)
        # A traced condition, as in Optax's test: both branches are traced.
        cond = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
        step = lambda: opt.update(grads, s, p)  # noqa: B023
        updates, new_s = jax.lax.cond(cond, step, lambda: (p, s))  # noqa: B023
        p = optax.apply_updates(p, updates)
        s = jax.lax.cond(cond, lambda: s, lambda: new_s)  # noqa: B023
      return p, s, s0

    params, state, initial = jax.eval_shape(run, params)
    assert {k: p.dtype for k, p in params.items()} == {jnp.dtype(d).name: jnp.dtype(d)
                                                       for d in dtypes}
    describe = lambda x: (x.shape, x.dtype, x.weak_type)
    assert jax.tree.map(describe, state) == jax.tree.map(describe, initial)


# ---------------------------------------------------------------------------
# Schedules where a float is: every argument annotated as a scalar or schedule.

_SCALES = {"w": 0.5, "b": None}  # "b" is not quantized
_LEVELS = talr.levels_fn_from_scales(_SCALES, 2)
_CENTERS = talr.centers_fn_from_scales(_SCALES, 2)

# (factory, argument) -> (transformation of the argument's value, the float).
_SCHEDULED = {
    (talr.sgdt, "learning_rate"): (lambda v: talr.sgdt(v, 0.05, _LEVELS), 0.05),
    (talr.sgdt, "target_transition_rate"): (lambda v: talr.sgdt(0.05, v, _LEVELS), 0.05),
    (talr.sgdt, "freeze_threshold"): (lambda v: talr.sgdt(
        0.05, 0.05, _LEVELS, freeze_threshold=v, centers_fn=_CENTERS,
        freeze_ema_momentum=0.5), 0.1),
    (talr.adamt, "learning_rate"): (lambda v: talr.adamt(v, 0.05, _LEVELS), 0.05),
    (talr.adamt, "target_transition_rate"): (lambda v: talr.adamt(0.05, v, _LEVELS), 0.05),
    (talr.adamt, "freeze_threshold"): (lambda v: talr.adamt(
        0.05, 0.05, _LEVELS, freeze_threshold=v, centers_fn=_CENTERS,
        freeze_ema_momentum=0.5), 0.1),
    (talr.adamwt, "learning_rate"): (lambda v: talr.adamwt(v, 0.05, _LEVELS), 0.05),
    (talr.adamwt, "target_transition_rate"): (lambda v: talr.adamwt(0.05, v, _LEVELS), 0.05),
    (talr.adamwt, "freeze_threshold"): (lambda v: talr.adamwt(
        0.05, 0.05, _LEVELS, freeze_threshold=v, centers_fn=_CENTERS,
        freeze_ema_momentum=0.5), 0.1),
    (talr.scale_by_talr, "target_transition_rate"): (lambda v: talr.scale_by_talr(
        v, _LEVELS, learning_rate=0.05, fallback_learning_rate=0.05), 0.05),
    (talr.scale_by_talr, "fallback_learning_rate"): (lambda v: talr.scale_by_talr(
        0.05, _LEVELS, learning_rate=0.05, fallback_learning_rate=v), 0.05),
    (talr.track_transitions, "initial_rate"): (lambda v: optax.chain(
        optax.sgd(0.05), talr.track_transitions(_LEVELS, v)), 0.05),
    (talr.dampen_oscillations, "strength"): (lambda v: optax.chain(
        talr.dampen_oscillations(_CENTERS, v), optax.sgd(0.05)), 0.5),
    (talr.freeze_oscillations, "threshold"): (lambda v: optax.chain(
        optax.sgd(0.05), talr.freeze_oscillations(_LEVELS, _CENTERS, v, ema_momentum=0.5)),
        0.1),
}


def _takes_schedule(factory, name) -> bool:
  """The argument is annotated as a float or a schedule (``optax.Schedule`` in its type)."""
  hint = typing.get_type_hints(factory)[name]
  return optax.Schedule in (typing.get_args(hint) or (hint,))


def test_every_argument_annotated_as_a_schedule_is_tested_with_one():
  """The table of the schedule test holds exactly the arguments annotated as schedules."""
  annotated = {(f, name) for f in STAGES for name in inspect.signature(f).parameters
               if _takes_schedule(f, name)}
  assert (talr.freeze_oscillations, "threshold") in annotated
  assert (talr.dampen_oscillations, "strength") in annotated
  assert annotated == set(_SCHEDULED)


def _schedule_problem():
  """Params with a quantized leaf ``w`` and a full-precision leaf ``b``, and a loss.

  Each weight of ``w`` starts 0.02 from a transition point of ``_LEVELS`` and the
  loss is its distance to that point: every optimizer here steps it back and
  forth across the point, so levels oscillate and the freezing has work.
  """
  points = jnp.array([[0.125, -0.125, -0.375], [-0.375, 0.125, -0.125]])
  params = {"w": points + jnp.array([[0.02, -0.02, 0.02], [-0.02, 0.02, -0.02]]),
            "b": jnp.array([0.5, -0.5])}
  loss = lambda p: jnp.sum(jnp.abs(p["w"] - points)) + jnp.sum((p["b"] - 1.0) ** 2)
  return params, loss


def _freeze_states(state):
  is_freeze = lambda x: isinstance(x, talr.FreezeOscillationsState)
  return [x for x in jax.tree.leaves(state, is_leaf=is_freeze) if is_freeze(x)]


@pytest.mark.parametrize("key", list(_SCHEDULED), ids=lambda k: f"{k[0].__name__}-{k[1]}")
def test_schedules_are_accepted_where_annotated(key):
  """A constant schedule gives the float's params and state, step for step (7 steps)."""
  make, value = _SCHEDULED[key]
  params, loss = _schedule_problem()
  scheduled, fixed = make(optax.constant_schedule(value)), make(value)

  @jax.jit
  def run(params):
    def step(carry, _):
      out = []
      for tx, (p, s) in zip((scheduled, fixed), carry):
        u, s = tx.update(jax.grad(loss)(p), s, p)
        out.append((optax.apply_updates(p, u), s))
      return tuple(out), None

    start = tuple((params, tx.init(params)) for tx in (scheduled, fixed))
    return jax.lax.scan(step, start, length=7)[0]

  (p1, s1), (p2, s2) = run(params)
  test_utils.assert_trees_all_close(p1, p2, rtol=1e-6, atol=1e-7)
  assert jax.tree.structure(s1) == jax.tree.structure(s2)
  test_utils.assert_trees_all_close(s1, s2, rtol=1e-6, atol=1e-7)
  assert not np.allclose(p1["w"], params["w"]), "the run does not move the weights"
  for f in _freeze_states(s1):  # the threshold is read: some weight is frozen
    assert bool(f.frozen["w"].any())


@pytest.mark.parametrize("name", ["sgdt", "adamt", "adamwt"])
def test_chain_structure_does_not_depend_on_hyperparameter_values(name):
  """``weight_decay=0.0`` keeps the decay stage (``None`` drops it), as in ``optax.adamw``."""
  make = lambda wd: getattr(talr, name)(1e-2, TARGET, _levels_fn, weight_decay=wd)
  params = jnp.ones(3)
  zero = make(0.0).init(params)
  some = make(1e-3).init(params)
  assert jax.tree.structure(zero) == jax.tree.structure(some)
  dropped = make(None).init(params)
  assert len(dropped) == len(zero) - 1


# ---------------------------------------------------------------------------
# Sharding: the stages on params sharded over a 2 x 4 mesh of host devices.

_MESH_SHAPE, _AXES = (2, 4), ("data", "model")
_SPECS = {"w1": ("model", None), "w2": ("data", "model")}
_STEPS = 3
_CONTEXTS = ("set_mesh", "no_mesh_context")
# Every stage and every setting that changes what is stored or counted
# (sampling, layer axes, freezing, inner); cases that differ from these only in
# hyperparameter values (weight decay 0, the additive rule) are left out.
SHARDED_IDS = [
    "sgdt-{}",
    "adamwt-{}",
    "adamt-{'freeze_threshold': 0.1, 'centers_fn': '_centers_fn', 'freeze_ema_momentum': 0.5}",
    "adamwt-{'freeze_threshold': 0.1, 'centers_fn': '_centers_fn', 'freeze_ema_momentum': 0.5,"
    " 'layer_axes': '_layer_axes', 'sample_size': 2}",
    "scale_by_talr-{}",
    "scale_by_talr-{'layer_axes': '_layer_axes', 'sample_size': 2}",
] + [i for i in IDS if not i.startswith(("sgdt", "adamt", "adamwt", "scale_by_talr"))]
SHARDED_CASES = [BY_ID[i] for i in SHARDED_IDS]


def _sharded_problem():
  rng = np.random.default_rng(0)
  params = {"w1": rng.normal(size=(16, 8)), "w2": rng.normal(size=(8, 12))}
  params = {k: v.astype(np.float32) for k, v in params.items()}
  # Large, alternating gradients: levels change, and change back.
  grads = [{k: ((-1) ** t * 30 * rng.normal(size=v.shape)).astype(np.float32)
            for k, v in params.items()} for t in range(_STEPS)]
  return params, grads


def _one_line(e: BaseException) -> str:
  lines = str(e).strip().splitlines() or [""]
  return f"{type(e).__name__}: {lines[0]}"[:400]


def _train(tx, params, grads, put):
  """``jax.jit(tx.init)`` then ``_STEPS`` jitted steps; on error, where it happened."""
  p = put(params)
  where = "jax.jit(tx.init)"
  try:
    s = jax.jit(tx.init)(p)
    where = "jitted update"
    step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(
        *tx.update(g, s, p)))
    for g in grads:
      p, s = step(p, s, put(g))
  except Exception as e:  # pylint: disable=broad-except
    return None, None, f"{where}: {_one_line(e)}"
  return p, s, None


def _sharded_case(case: Case, mesh) -> dict:
  """Each context's sharded run of ``case``, against the same run on one device."""
  params, grads = _sharded_problem()
  shardings = {k: NamedSharding(mesh, P(*s)) for k, s in _SPECS.items()}
  tx = case.make()
  p1, s1, error = _train(tx, params, grads, lambda t: jax.device_put(t, jax.devices()[0]))
  if error is not None:
    return {context: {"error": f"one device: {error}"} for context in _CONTEXTS}
  by_shape = {tuple(v.shape): k for k, v in params.items()}
  exact = lambda x: jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == jnp.bool_
  rel = lambda a, b: float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
                                  / np.maximum(np.abs(np.asarray(b, np.float64)), 1.0),
                                  initial=0.0))
  out = {}
  for context in _CONTEXTS:
    with jax.set_mesh(mesh) if context == "set_mesh" else contextlib.nullcontext():
      p, s, error = _train(
          tx, params, grads, lambda t: {k: jax.device_put(v, shardings[k]) for k, v in t.items()})
    if error is not None:
      out[context] = {"error": error}
      continue
    pairs = list(zip(jax.tree.leaves(s), jax.tree.leaves(s1)))
    per_weight = [(x, by_shape[tuple(x.shape)]) for x, _ in pairs if tuple(x.shape) in by_shape]
    out[context] = {
        "error": None,
        "same_tree": jax.tree.structure(s) == jax.tree.structure(s1),
        "integers_equal": all(np.array_equal(a, b) for a, b in pairs if exact(a)),
        "max_rel_diff_state": max((rel(a, b) for a, b in pairs if not exact(a)), default=0.0),
        "max_rel_diff_params": max(rel(p[k], p1[k]) for k in params),
        "params_keep_sharding": all(p[k].sharding.is_equivalent_to(shardings[k], 2)
                                    for k in params),
        "per_weight_sharded_like_params": all(
            x.sharding.is_equivalent_to(shardings[k], 2) for x, k in per_weight),
        "vectors_replicated": all(x.sharding.is_fully_replicated for x, _ in pairs
                                  if x.ndim <= 1),
        "moved": bool(np.any(np.asarray(p1["w1"]) != params["w1"])),
    }
  return out


def _sharded_report() -> dict:
  assert jax.device_count() == 8, jax.devices()
  mesh = jax.make_mesh(_MESH_SHAPE, _AXES)  # the default axis types: Explicit
  report = {"axis_types": [t.name for t in mesh.axis_types], "cases": {}}
  for case in SHARDED_CASES:
    for context, r in _sharded_case(case, mesh).items():
      report["cases"][f"{case.id}|{context}"] = r
  return report


_SUBPROCESS: dict[str, subprocess.Popen] = {}


@pytest.fixture(scope="module", autouse=True)
def _start_sharded_checks(request):
  """Starts the sharded subprocess with the module, if a selected test reads its report,
  so it runs while the single-device tests do; stops it if it is still running at the end."""
  if any(getattr(item, "module", None) is request.module
         and "sharded_report" in getattr(item, "fixturenames", ())
         for item in request.session.items):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    _SUBPROCESS["proc"] = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve())], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  yield
  proc = _SUBPROCESS.pop("proc", None)
  if proc is not None and proc.poll() is None:
    proc.kill()
    proc.communicate()


@pytest.fixture(scope="module")
def sharded_report():
  proc = _SUBPROCESS["proc"]
  stdout, stderr = proc.communicate(timeout=600)
  assert proc.returncode == 0, stderr[-3000:]
  line = next(l for l in stdout.splitlines() if l.startswith("REPORT "))
  return json.loads(line[len("REPORT "):])


def test_sharded_checks_run_on_eight_devices_of_an_explicit_mesh(sharded_report):
  """The subprocess has 8 devices, ``jax.make_mesh`` gives Explicit axes by default,
  and every stage is in the report."""
  assert sharded_report["axis_types"] == ["Explicit", "Explicit"]
  assert set(sharded_report["cases"]) == {f"{i}|{c}" for i in SHARDED_IDS for c in _CONTEXTS}
  assert {c.factory for c in SHARDED_CASES} == set(STAGES)


@pytest.mark.parametrize("case", SHARDED_CASES, ids=SHARDED_IDS)
@pytest.mark.parametrize("context", _CONTEXTS)
def test_sharded_params_jit_init_and_update(sharded_report, case, context):
  """On params sharded over an Explicit mesh (under ``jax.set_mesh`` or not),
  ``jax.jit(tx.init)`` and 3 jitted steps run and equal the same run on one
  device; state shaped like a param is sharded like it, vectors and scalars
  (rates, counts) are replicated."""
  r = sharded_report["cases"][f"{case.id}|{context}"]
  assert r["error"] is None, r["error"]
  assert r["moved"]
  assert r["same_tree"] and r["integers_equal"]
  assert r["max_rel_diff_state"] <= 1e-6 and r["max_rel_diff_params"] <= 1e-6
  assert r["params_keep_sharding"]
  assert r["per_weight_sharded_like_params"]
  assert r["vectors_replicated"]


if __name__ == "__main__":
  print("REPORT " + json.dumps(_sharded_report()))
