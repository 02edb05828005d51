"""Tests of talr_optax.metrics: keys, values and wrappers it must see through."""

import typing

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import talr_optax
from talr_optax import quantizers

FIELDS = ("talr", "transition_rate", "ema_transition_rate", "target_transition_rate")
Q_PATHS = ("layer1/w", "layer2/w")


def _params():
  return {
      "layer1": {"w": jnp.asarray([[0.30, -0.20, 0.05], [0.60, -0.70, 0.12]]),
                 "b": jnp.asarray([0.1, -0.2, 0.3])},
      "layer2": {"w": jnp.asarray([[0.2, -0.1], [0.4, 0.05], [-0.3, 0.6]])},
  }


SCALES = {"layer1": {"w": 0.5, "b": None}, "layer2": {"w": 0.25}}
LEVELS_FN = quantizers.levels_fn_from_scales(SCALES, 2)
LABELS = {"layer1": {"w": "q", "b": "fp"}, "layer2": {"w": "q"}}
Q_MASK = {"layer1": {"w": True, "b": False}, "layer2": {"w": True}}


def _grads(params):
  """Large gradients of one sign so that levels change at every step."""
  return jax.tree.map(lambda p: jnp.full_like(p, 1.5) + p, params)


def _run(tx, n=3, jit=False):
  params = _params()
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  for t in range(n):
    updates, state = update(_grads(params), state, params)
    params = optax.apply_updates(params, updates)
  return state


def _talr_tx(**kw):
  return talr_optax.scale_by_talr(0.05, LEVELS_FN, learning_rate=0.1,
                                  fallback_learning_rate=0.1, **kw)


def _expected_keys(paths=Q_PATHS, fields=FIELDS):
  return {f"{f}/{p}" for f in fields for p in paths}


def _get(tree, path):
  for k in path.split("/"):
    tree = tree[k]
  return tree


def _check_values(m, state, paths=Q_PATHS, fields=FIELDS, suffix=""):
  for f in fields:
    for p in paths:
      value = m[f"{f}/{p}{suffix}"]
      assert value.shape == () and value.dtype == jnp.float32
      np.testing.assert_array_equal(np.asarray(value), np.asarray(_get(getattr(state, f), p)))


def _find(state, cls):
  found = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, cls))
           if isinstance(s, cls)]
  assert len(found) == 1
  return found[0]


# ---------------------------------------------------------------------------


def test_keys_and_values_in_chain():
  state = _run(optax.chain(optax.trace(0.9), _talr_tx()))
  m = talr_optax.metrics(state)
  assert set(m) == _expected_keys()
  _check_values(m, state[1])
  # The run moved something: rates and U are not all at their initial values.
  assert any(float(m[f"transition_rate/{p}"]) > 0 for p in Q_PATHS)
  assert any(abs(float(m[f"talr/{p}"]) - 0.1) > 1e-6 for p in Q_PATHS)


def test_values_by_hand_after_init():
  m = talr_optax.metrics(_talr_tx().init(_params()))
  assert set(m) == _expected_keys()
  for p in Q_PATHS:
    assert float(m[f"talr/{p}"]) == pytest.approx(0.1)
    assert float(m[f"transition_rate/{p}"]) == 0.0
    assert float(m[f"ema_transition_rate/{p}"]) == pytest.approx(0.05)  # K_0 = R_0
    assert float(m[f"target_transition_rate/{p}"]) == pytest.approx(0.05)


def test_list_params_paths_are_indices():
  params = [jnp.asarray([0.1, 0.7]), jnp.asarray([0.2, -0.3, 0.4])]
  fn = quantizers.levels_fn_from_scales([1.0, 1.0], 2)
  tx = talr_optax.scale_by_talr(0.05, fn, learning_rate=0.1)
  m = talr_optax.metrics(tx.init(params))
  assert set(m) == {f"{f}/{i}" for f in FIELDS for i in (0, 1)}


def test_global_granularity_keys():
  state = _run(optax.chain(optax.trace(0.9), _talr_tx(granularity="global")))
  m = talr_optax.metrics(state)
  assert set(m) == set(FIELDS)
  for f in FIELDS:
    assert m[f].shape == ()
    np.testing.assert_array_equal(np.asarray(m[f]), np.asarray(getattr(state[1], f)))


def test_inside_masked():
  tx = optax.masked(optax.chain(optax.trace(0.9), _talr_tx()), Q_MASK)
  state = _run(tx)
  m = talr_optax.metrics(state)
  assert set(m) == _expected_keys()
  _check_values(m, _find(state, talr_optax.ScaleByTALRState))
  # Masking out layer2 removes its keys.
  mask = {"layer1": {"w": True, "b": False}, "layer2": {"w": False}}
  state = _run(optax.masked(optax.chain(optax.trace(0.9), _talr_tx()), mask))
  assert set(talr_optax.metrics(state)) == _expected_keys(paths=("layer1/w",))


def test_inside_partition():
  tx = optax.partition(
      {"q": optax.chain(optax.trace(0.9), _talr_tx()), "fp": optax.sgd(0.1)}, LABELS)
  state = _run(tx)
  m = talr_optax.metrics(state)
  assert set(m) == _expected_keys()
  _check_values(m, _find(state, talr_optax.ScaleByTALRState))


def test_inside_inject_hyperparams():
  """inject_hyperparams needs static_args=('levels_fn',): it treats callables as schedules."""
  factory = optax.inject_hyperparams(talr_optax.scale_by_talr, static_args=("levels_fn",))
  tx = factory(target_transition_rate=0.05, levels_fn=LEVELS_FN, learning_rate=0.1,
               fallback_learning_rate=0.1)
  state = _run(tx, jit=True)
  m = talr_optax.metrics(state)
  assert set(m) == _expected_keys()  # hyperparams are not reported
  _check_values(m, state.inner_state)
  # Same numbers as without inject_hyperparams.
  m_ref = talr_optax.metrics(_run(_talr_tx(), jit=True))
  for k in m:
    np.testing.assert_allclose(np.asarray(m[k]), np.asarray(m_ref[k]), rtol=1e-6)


def test_inject_hyperparams_without_static_levels_fn_fails_clearly():
  tx = optax.inject_hyperparams(talr_optax.scale_by_talr)(
      target_transition_rate=0.05, levels_fn=LEVELS_FN, learning_rate=0.1,
      fallback_learning_rate=0.1)
  with pytest.raises(ValueError, match="static_args"):
    tx.init(_params())


def test_inside_multisteps():
  tx = optax.MultiSteps(optax.chain(optax.trace(0.9), _talr_tx()), every_k_schedule=2)
  state = _run(tx, n=4, jit=True)
  talr_state = state.inner_opt_state[1]
  assert int(talr_state.talr_count) == 2  # two real updates in four mini-steps
  m = talr_optax.metrics(state)
  assert set(m) == _expected_keys()
  _check_values(m, talr_state)


def test_track_transitions_fields():
  tx = optax.chain(talr_optax.track_transitions(LEVELS_FN), optax.sgd(0.1))
  state = _run(tx)
  m = talr_optax.metrics(state)
  fields = ("transition_rate", "ema_transition_rate")
  assert set(m) == _expected_keys(fields=fields)
  _check_values(m, state[0], fields=fields)
  assert any(float(m[f"transition_rate/{p}"]) > 0 for p in Q_PATHS)


def test_track_and_talr_together_get_suffix():
  tx = optax.chain(talr_optax.track_transitions(LEVELS_FN), optax.trace(0.9), _talr_tx())
  state = _run(tx)
  m = talr_optax.metrics(state)
  both = ("transition_rate", "ema_transition_rate")
  expected = _expected_keys() | {k + "#1" for k in _expected_keys(fields=both)}
  assert set(m) == expected
  _check_values(m, state[0], fields=both)
  _check_values(m, state[2], fields=both, suffix="#1")
  _check_values(m, state[2], fields=("talr", "target_transition_rate"))


def test_under_jit():
  state = _run(optax.chain(optax.trace(0.9), _talr_tx()))
  m = talr_optax.metrics(state)
  m_jit = jax.jit(talr_optax.metrics)(state)
  assert set(m_jit) == set(m)
  for k in m:
    np.testing.assert_array_equal(np.asarray(m_jit[k]), np.asarray(m[k]))
  # Inside a jitted train step too.
  tx = optax.chain(optax.trace(0.9), _talr_tx())

  @jax.jit
  def step(params, state):
    updates, state = tx.update(_grads(params), state, params)
    return optax.apply_updates(params, updates), state, talr_optax.metrics(state)

  params = _params()
  _, state, m = step(params, tx.init(params))
  _check_values(m, state[1])


def test_no_talr_state_gives_empty_dict():
  assert talr_optax.metrics(optax.sgd(0.1).init(_params())) == {}


# ---------------------------------------------------------------------------
# Under nnx.Optimizer: its opt_state holds nnx Variables (OptArray), whose own
# path entry (".value") must not end up in the keys.


def _nnx_setup(tx_fn):
  nnx = pytest.importorskip("flax.nnx")
  from talr_optax import nnx as tnnx

  class Tiny(nnx.Module):
    def __init__(self, rngs):
      self.fc1 = tnnx.QuantLinear(in_features=3, out_features=4, weight_bits=None,
                                  act_bits=None, rngs=rngs)
      self.fc2 = tnnx.QuantLinear(in_features=4, out_features=5, weight_bits=2,
                                  act_bits=2, rngs=rngs)
      self.fc3 = tnnx.QuantLinear(in_features=5, out_features=2, weight_bits=4,
                                  act_bits=None, rngs=rngs)

    def __call__(self, x):
      return self.fc3(nnx.relu(self.fc2(nnx.relu(self.fc1(x)))))

  model = Tiny(nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 3)), jnp.float32)
  y = jnp.asarray([0, 1] * 4)
  tnnx.calibrate(model, x)
  optimizer = nnx.Optimizer(model, tx_fn(model, tnnx), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    def loss(model):
      return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
    optimizer.update(model, nnx.grad(loss)(model))
    return talr_optax.metrics(optimizer.opt_state)

  m_jit = step(model, optimizer)
  return optimizer, m_jit


def _sgdt(model, tnnx, **kw):
  return talr_optax.sgdt(0.5, 0.05, tnnx.levels_fn_for(model), momentum=0.9, **kw)


def _partitioned(model, tnnx):
  return optax.partition(
      {tnnx.QUANTIZED: _sgdt(model, tnnx), tnnx.FULL_PRECISION: optax.sgd(0.1),
       tnnx.ACTIVATION_SCALE: optax.sgd(0.01), tnnx.BATCH_NORM: optax.sgd(0.1)},
      tnnx.param_labels(model))


def _value(x):
  return x[...] if hasattr(x, "__jax_array__") and not isinstance(x, jax.Array) else x


@pytest.mark.parametrize("tx_fn", [_sgdt, _partitioned], ids=["chain", "partition"])
def test_nnx_optimizer_keys_are_param_paths(tx_fn):
  optimizer, m_jit = _nnx_setup(tx_fn)
  state = _find(optimizer.opt_state, talr_optax.ScaleByTALRState)
  m = talr_optax.metrics(optimizer.opt_state)
  expected = _expected_keys(paths=("fc2/kernel", "fc3/kernel"))
  assert set(m) == expected
  assert set(m_jit) == expected  # same keys inside nnx.jit
  assert int(_value(state.talr_count)) == 1
  for f in FIELDS:
    for layer in ("fc2", "fc3"):
      key = f"{f}/{layer}/kernel"
      want = np.asarray(_value(getattr(state, f)[layer]["kernel"]))
      assert isinstance(m[key], jax.Array) and m[key].shape == ()
      assert m[key].dtype == jnp.float32
      np.testing.assert_array_equal(np.asarray(m[key]), want)
      np.testing.assert_array_equal(np.asarray(m_jit[key]), want)
  # The step moved U away from its initial value (the base learning rate).
  assert any(float(m[f"talr/{layer}/kernel"]) != pytest.approx(0.5) for layer in ("fc2", "fc3"))


def test_nnx_optimizer_global_granularity_keys():
  optimizer, _ = _nnx_setup(lambda model, tnnx: _sgdt(model, tnnx, granularity="global"))
  state = _find(optimizer.opt_state, talr_optax.ScaleByTALRState)
  m = talr_optax.metrics(optimizer.opt_state)
  assert set(m) == set(FIELDS)
  for f in FIELDS:
    np.testing.assert_array_equal(np.asarray(m[f]), np.asarray(_value(getattr(state, f))))


class _Box(typing.NamedTuple):
  value: jax.Array


@pytest.mark.parametrize("wrap", [lambda x: _Box(x), lambda x: {"value": x}, lambda x: [x]],
                         ids=["namedtuple", "dict", "list"])
def test_only_array_like_wrappers_lose_their_path_entry(wrap):
  """A NamedTuple, dict or list with one entry is a real param path: it stays in the key."""
  params = wrap(jnp.asarray([0.3, -0.2, 0.05]))
  levels_fn = quantizers.levels_fn_from_scales(wrap(0.5), 2)
  m = talr_optax.metrics(talr_optax.scale_by_talr(0.05, levels_fn, learning_rate=0.1).init(params))
  name = "0" if isinstance(params, list) else "value"
  assert set(m) == {f"{f}/{name}" for f in FIELDS}
