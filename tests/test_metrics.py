"""talr_optax.metrics: its keys, and values equal to the state's rate vectors, in every wrapper."""

import typing

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import talr_optax

FIELDS = ("talr", "talr_scale", "transition_rate", "ema_transition_rate",
          "target_transition_rate", "initial_target_rate")
MONITOR_FIELDS = ("transition_rate", "ema_transition_rate")
Q_PATHS = ("layer1/w", "layer2/w")


def _params():
  return {
      "layer1": {"w": jnp.asarray([[0.30, -0.20, 0.05], [0.60, -0.70, 0.12]]),
                 "b": jnp.asarray([0.1, -0.2, 0.3])},
      "layer2": {"w": jnp.asarray([[0.2, -0.1], [0.4, 0.05], [-0.3, 0.6]])},
  }


SCALES = {"layer1": {"w": 0.5, "b": None}, "layer2": {"w": 0.25}}
LEVELS_FN = talr_optax.levels_fn_from_scales(SCALES, 2)
LABELS = {"layer1": {"w": "q", "b": "fp"}, "layer2": {"w": "q"}}
Q_MASK = {"layer1": {"w": True, "b": False}, "layer2": {"w": True}}


def _grads(params):
  """Large gradients of one sign so that levels change at every step."""
  return jax.tree.map(lambda p: jnp.full_like(p, 1.5) + p, params)


def _run(tx, n=3, jit=False, params=None):
  params = _params() if params is None else params
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  for _ in range(n):
    updates, state = update(_grads(params), state, params)
    params = optax.apply_updates(params, updates)
  return state


def _talr_tx(**kw):
  return talr_optax.scale_by_talr(0.05, LEVELS_FN, learning_rate=0.1,
                                  fallback_learning_rate=0.1, **kw)


def _expected_keys(paths=Q_PATHS, fields=FIELDS, suffix=""):
  return {f"{f}/{p}{suffix}" for f in fields for p in paths}


def _find(state, cls=(talr_optax.ScaleByTALRState, talr_optax.TrackTransitionsState)):
  found = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, cls))
           if isinstance(s, cls)]
  assert len(found) == 1
  return found[0]


def _pure(x):
  """The array inside an nnx Variable (opt_state of nnx.Optimizer), else x."""
  return x[...] if hasattr(x, "get_value") else x


def _check_values(m, state, fields=FIELDS, suffix=""):
  """Every entry of every rate vector of ``state`` is the metric of its name."""
  names = state.rate_names.names
  for f in fields:
    vector = np.asarray(_pure(getattr(state, f)))
    assert vector.shape == (len(names),)
    for i, name in enumerate(names):
      key = (f"{f}/{name}" if name else f) + suffix
      value = m[key]
      assert isinstance(value, jax.Array)
      assert value.shape == () and value.dtype == jnp.float32, key
      assert np.asarray(value) == vector[i], key


# ---------------------------------------------------------------------------


def test_keys_and_values_in_chain():
  state = _run(optax.chain(optax.trace(0.9), _talr_tx()))
  m = talr_optax.metrics(state)
  assert set(m) == _expected_keys()
  assert state[1].rate_names.names == Q_PATHS
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


def test_values_by_hand_after_one_update():
  # s = 0.25, 2 bits: levels round(clip(8 w, -2, 1)). A gradient of 1 with
  # lr 0.1 moves every weight by -0.1: levels [1, -1, 1, 0, -2, 1] become
  # [1, -2, 1, 0, -2, 1], so k = 1/6.
  params = {"w": jnp.asarray([0.2, -0.1, 0.4, 0.05, -0.3, 0.6])}
  tx = talr_optax.scale_by_talr(0.05, talr_optax.levels_fn_from_scales({"w": 0.25}, 2),
                                learning_rate=0.1, ema_momentum=0.9)
  state = tx.init(params)
  _, state = tx.update({"w": jnp.ones(6)}, state, params)
  k = 1 / 6
  K = 0.9 * 0.05 + 0.1 * k
  c = 0.9 + 0.1 * 0.05 / (K + 1e-8)
  m = talr_optax.metrics(state)
  assert set(m) == {f"{f}/w" for f in FIELDS}
  assert float(m["transition_rate/w"]) == pytest.approx(k, rel=1e-6)
  assert float(m["ema_transition_rate/w"]) == pytest.approx(K, rel=1e-6)
  assert float(m["talr/w"]) == pytest.approx(0.1 * c, rel=1e-6)
  assert float(m["target_transition_rate/w"]) == pytest.approx(0.05, rel=1e-6)


def test_list_params_paths_are_indices():
  params = [jnp.asarray([0.1, 0.7]), jnp.asarray([0.2, -0.3, 0.4])]
  fn = talr_optax.levels_fn_from_scales([1.0, 1.0], 2)
  state = talr_optax.scale_by_talr(0.05, fn, learning_rate=0.1).init(params)
  m = talr_optax.metrics(state)
  assert set(m) == {f"{f}/{i}" for f in FIELDS for i in (0, 1)}
  _check_values(m, state)


def test_global_granularity_keys_are_the_field_names():
  state = _run(optax.chain(optax.trace(0.9), _talr_tx(granularity="global")))
  m = talr_optax.metrics(state)
  assert set(m) == set(FIELDS)
  assert state[1].rate_names.names == ("",)
  _check_values(m, state[1])
  assert float(m["transition_rate"]) > 0


def test_layer_axes_name_every_layer():
  rng = np.random.default_rng(0)
  params = {"stack": jnp.asarray(rng.normal(size=(3, 4, 4)), jnp.float32),
            "head": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)}
  fn = talr_optax.levels_fn_from_scales({"stack": 1.0, "head": 1.0}, 2)
  tx = talr_optax.scale_by_talr(0.05, fn, learning_rate=0.1,
                                layer_axes={"stack": 0, "head": None})
  state = _run(tx, params=params)
  m = talr_optax.metrics(state)
  names = ("head", "stack[0]", "stack[1]", "stack[2]")
  assert state.rate_names.names == names
  assert set(m) == _expected_keys(paths=names)
  _check_values(m, state)
  # Each layer has its own rate: they are not all the same number.
  assert len({float(m[f"transition_rate/stack[{i}]"]) for i in range(3)}) > 1


def test_inside_masked():
  tx = optax.masked(optax.chain(optax.trace(0.9), _talr_tx()), Q_MASK)
  state = _run(tx)
  m = talr_optax.metrics(state)
  assert set(m) == _expected_keys()
  _check_values(m, _find(state))
  # Masking out layer2 removes its keys.
  mask = {"layer1": {"w": True, "b": False}, "layer2": {"w": False}}
  state = _run(optax.masked(optax.chain(optax.trace(0.9), _talr_tx()), mask))
  m = talr_optax.metrics(state)
  assert set(m) == _expected_keys(paths=("layer1/w",))
  _check_values(m, _find(state))


def test_inside_partition():
  tx = optax.partition(
      {"q": optax.chain(optax.trace(0.9), _talr_tx()), "fp": optax.sgd(0.1)}, LABELS)
  state = _run(tx)
  m = talr_optax.metrics(state)
  assert set(m) == _expected_keys()
  _check_values(m, _find(state))


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


def test_inside_multisteps():
  tx = optax.MultiSteps(optax.chain(optax.trace(0.9), _talr_tx()), every_k_schedule=2)
  state = _run(tx, n=4, jit=True)
  talr_state = state.inner_opt_state[1]
  assert int(talr_state.talr_count) == 2  # two real updates in four mini-steps
  m = talr_optax.metrics(state)
  assert set(m) == _expected_keys()
  _check_values(m, talr_state)


def test_monitor_reports_k_and_K_only():
  tx = optax.chain(optax.sgd(0.1), talr_optax.track_transitions(LEVELS_FN, 0.05))
  state = _run(tx)
  m = talr_optax.metrics(state)
  assert set(m) == _expected_keys(fields=MONITOR_FIELDS)
  _check_values(m, state[1], fields=MONITOR_FIELDS)
  assert any(float(m[f"transition_rate/{p}"]) > 0 for p in Q_PATHS)


def test_duplicate_names_get_a_suffix_in_state_order():
  tx = optax.chain(optax.trace(0.9), _talr_tx(), talr_optax.track_transitions(LEVELS_FN, 0.05))
  state = _run(tx)
  m = talr_optax.metrics(state)
  assert set(m) == _expected_keys() | _expected_keys(fields=MONITOR_FIELDS, suffix="#1")
  _check_values(m, state[1])
  _check_values(m, state[2], fields=MONITOR_FIELDS, suffix="#1")
  # Two monitors: the second one's keys get #2 (the key's third occurrence).
  tx = optax.chain(optax.trace(0.9), _talr_tx(),
                   talr_optax.track_transitions(LEVELS_FN, 0.05),
                   talr_optax.track_transitions(LEVELS_FN, 0.01, ema_momentum=0.5))
  state = _run(tx)
  m = talr_optax.metrics(state)
  assert set(m) == (_expected_keys() | _expected_keys(fields=MONITOR_FIELDS, suffix="#1")
                    | _expected_keys(fields=MONITOR_FIELDS, suffix="#2"))
  _check_values(m, state[3], fields=MONITOR_FIELDS, suffix="#2")


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


class _Box(typing.NamedTuple):
  value: jax.Array


@pytest.mark.parametrize("wrap", [lambda x: _Box(x), lambda x: {"value": x}, lambda x: [x]],
                         ids=["namedtuple", "dict", "list"])
def test_one_entry_containers_keep_their_path_entry(wrap):
  """A NamedTuple, dict or list with one entry is a real param path: it stays in the key."""
  params = wrap(jnp.asarray([0.3, -0.2, 0.05]))
  levels_fn = talr_optax.levels_fn_from_scales(wrap(0.5), 2)
  state = talr_optax.scale_by_talr(0.05, levels_fn, learning_rate=0.1).init(params)
  m = talr_optax.metrics(state)
  name = "0" if isinstance(params, list) else "value"
  assert set(m) == {f"{f}/{name}" for f in FIELDS}
  _check_values(m, state)


# ---------------------------------------------------------------------------
# Under nnx.Optimizer: its opt_state holds nnx Variables, and init sees
# Variable-boxed params. A tiny model of plain nnx.Linear layers whose kernels
# are fake-quantized in the forward pass, with a levels_fn written here.

S2, S3 = 0.6, 0.4  # frozen step sizes of fc2 (2 bits) and fc3 (4 bits)


def _nnx_setup(make_tx):
  nnx = pytest.importorskip("flax.nnx")

  class Tiny(nnx.Module):
    def __init__(self, rngs):
      self.fc1 = nnx.Linear(3, 4, rngs=rngs)  # full precision
      self.fc2 = nnx.Linear(4, 5, rngs=rngs)
      self.fc3 = nnx.Linear(5, 2, rngs=rngs)

    def __call__(self, x):
      h = nnx.relu(self.fc1(x))
      w2 = talr_optax.fake_quant_weight(self.fc2.kernel[...], S2, 2, multiply_scale=True)
      h = nnx.relu(h @ w2 + self.fc2.bias[...])
      w3 = talr_optax.fake_quant_weight(self.fc3.kernel[...], S3, 4, multiply_scale=True)
      return h @ w3 + self.fc3.bias[...]

  quantized = {("fc2", "kernel"): (S2, 2), ("fc3", "kernel"): (S3, 4)}

  def levels_fn(params):
    def leaf(path, x):
      key = tuple(str(getattr(p, "key", p)) for p in path)
      if key not in quantized:
        return None
      scale, bits = quantized[key]
      return talr_optax.weight_levels(x[...] if isinstance(x, nnx.Variable) else x,
                                      scale, bits)
    return jax.tree_util.tree_map_with_path(
        leaf, params, is_leaf=lambda x: isinstance(x, nnx.Variable))

  model = Tiny(nnx.Rngs(0))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
  y = jnp.asarray([0, 1] * 4)
  optimizer = nnx.Optimizer(model, make_tx(levels_fn, nnx, model), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    def loss(model):
      return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
    optimizer.update(model, nnx.grad(loss)(model))
    return talr_optax.metrics(optimizer.opt_state)

  m_jit = step(model, optimizer)
  return optimizer, m_jit


def _nnx_sgdt(levels_fn, nnx, model, **kw):
  del nnx, model
  return talr_optax.sgdt(0.5, 0.05, levels_fn, momentum=0.9, **kw)


def _nnx_partition(levels_fn, nnx, model):
  labels = jax.tree_util.tree_map_with_path(
      lambda path, _: "q" if str(getattr(path[-1], "key", "")) == "kernel"
      and str(getattr(path[0], "key", "")) != "fc1" else "fp",
      nnx.state(model, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable))
  return optax.partition({"q": _nnx_sgdt(levels_fn, nnx, model), "fp": optax.sgd(0.1)},
                         labels)


@pytest.mark.parametrize("make_tx", [_nnx_sgdt, _nnx_partition], ids=["chain", "partition"])
def test_nnx_optimizer_keys_are_param_paths(make_tx):
  optimizer, m_jit = _nnx_setup(make_tx)
  state = _find(optimizer.opt_state)
  m = talr_optax.metrics(optimizer.opt_state)
  expected = _expected_keys(paths=("fc2/kernel", "fc3/kernel"))
  assert set(m) == expected
  assert set(m_jit) == expected  # the same keys inside nnx.jit
  assert int(_pure(state.talr_count)) == 1
  _check_values(m, state)
  for key in expected:
    assert np.asarray(m_jit[key]) == np.asarray(m[key])
  # The step moved U away from its initial value (the base learning rate).
  assert any(float(m[f"talr/{layer}/kernel"]) != pytest.approx(0.5) for layer in ("fc2", "fc3"))


def test_nnx_optimizer_global_granularity_keys():
  optimizer, _ = _nnx_setup(lambda lf, nnx, model: _nnx_sgdt(lf, nnx, model,
                                                             granularity="global"))
  state = _find(optimizer.opt_state)
  m = talr_optax.metrics(optimizer.opt_state)
  assert set(m) == set(FIELDS)
  _check_values(m, state)


def test_every_value_of_twelve_stacked_layers_is_its_own_layer():
  # Layer i of a (12, 4, 5) stack moves exactly i + 1 of its 20 weights by one
  # level, so k_i = (i + 1) / 20: a key paired with another layer's value
  # (names sorted as strings: w[10] before w[2]) is wrong by at least 1 / 20.
  layers, lr, m, r = 12, 1.0, 0.5, 0.02
  params = {"w": jnp.zeros((layers, 4, 5))}
  moved = np.zeros((layers, 4, 5), np.float32)
  for i in range(layers):
    moved[i].reshape(-1)[: i + 1] = 1.0
  levels_fn = talr_optax.levels_fn_from_scales({"w": 1.0}, 2)
  tx = talr_optax.scale_by_talr(r, levels_fn, learning_rate=lr, ema_momentum=m,
                                layer_axes={"w": 0})
  monitor = talr_optax.track_oscillations(levels_fn, layer_axes={"w": 0})
  both = optax.chain(tx, monitor)
  state = both.init(params)
  _, state = both.update({"w": -jnp.asarray(moved)}, state, params)  # u = -lr * g = +1
  out = talr_optax.metrics(state)
  k = (np.arange(layers) + 1) / 20
  K = m * r + (1 - m) * k
  U = lr * (m + (1 - m) * r / (K + 1e-8))
  for i in range(layers):
    name = f"w[{i}]"
    np.testing.assert_allclose(out[f"transition_rate/{name}"], k[i], rtol=1e-6)
    np.testing.assert_allclose(out[f"ema_transition_rate/{name}"], K[i], rtol=1e-6)
    np.testing.assert_allclose(out[f"talr/{name}"], U[i], rtol=1e-5)
    np.testing.assert_allclose(out[f"target_transition_rate/{name}"], r, rtol=1e-6)
    # A first change is no oscillation: the monitor's rate is 0 in every layer.
    assert float(out[f"oscillation_rate/{name}"]) == 0.0
  assert len(out) == layers * (len(FIELDS) + 3)
  # Back by 2 U_1 > 1 (U_1 > 0.5): the same weights return below level 1, an
  # oscillation each.
  params = optax.apply_updates(params, {"w": jnp.asarray(moved)})
  _, state = both.update({"w": jnp.asarray(2 * moved)}, state, params)
  out = talr_optax.metrics(state)
  for i in range(layers):
    np.testing.assert_allclose(out[f"oscillation_rate/w[{i}]"], k[i], rtol=1e-6)
    np.testing.assert_allclose(out[f"transition_rate/w[{i}]"], k[i], rtol=1e-6)


def test_a_new_declared_state_is_reported_without_a_list_to_update():
  """metrics and check_restorable read each state's declaration of its fields."""
  from talr_optax import _stage  # pylint: disable=import-outside-toplevel

  @_stage.declare_state(per_weight=("probe_levels",), per_rate=("probe_rate",))
  class ProbeState(typing.NamedTuple):
    probe_levels: typing.Any
    probe_rate: jax.Array
    rate_names: talr_optax.RateNames

  try:
    state = (optax.EmptyState(), ProbeState({"w": jnp.zeros(4, jnp.int8)},
                                            jnp.asarray([0.25, 0.5]),
                                            talr_optax.RateNames(("a", "b[0]"))))
    assert talr_optax.metrics(state) == {"probe_rate/a": 0.25, "probe_rate/b[0]": 0.5}
    bigger = (state[0], state[1]._replace(probe_rate=jnp.zeros(3)))
    with pytest.raises(ValueError, match="layer_axes or granularity differs"):
      talr_optax.check_restorable(state, bigger)
    sampled = (state[0], state[1]._replace(probe_levels={"w": jnp.zeros(2, jnp.int8)}))
    with pytest.raises(ValueError, match="sample_size differs"):
      talr_optax.check_restorable(state, sampled)
  finally:
    _stage.STATE_CLASSES.remove(ProbeState)
