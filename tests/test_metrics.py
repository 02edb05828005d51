"""Tests of talr_optax.metrics: keys, values and wrappers it must see through."""

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
