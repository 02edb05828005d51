"""Tests of ``talr_optax.qwix``: levels of Qwix QAT models and frozen-scale rules."""

import dataclasses
import inspect

import pytest

qwix = pytest.importorskip("qwix")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import linen as nn  # noqa: E402
from flax import nnx  # noqa: E402

import talr_optax  # noqa: E402
from talr_optax import quantizers  # noqa: E402
import talr_optax.qwix as tq  # noqa: E402
from talr_optax.qwix import _internals  # noqa: E402

X = jax.random.normal(jax.random.key(0), (8, 16))
Y = jnp.arange(8) % 10
IMAGES = jax.random.normal(jax.random.key(1), (4, 6, 6, 2))


class MLP(nnx.Module):

  def __init__(self, *, rngs: nnx.Rngs, dtype=None):
    self.fc1 = nnx.Linear(16, 32, rngs=rngs)
    self.fc2 = nnx.Linear(32, 24, rngs=rngs, dtype=dtype)
    self.fc3 = nnx.Linear(24, 10, rngs=rngs)

  def __call__(self, x):
    x = jax.nn.relu(self.fc1(x))
    return self.fc3(jax.nn.relu(self.fc2(x)))


class CNN(nnx.Module):

  def __init__(self, *, rngs: nnx.Rngs):
    self.conv = nnx.Conv(2, 8, (3, 3), rngs=rngs)
    self.head = nnx.Linear(8, 10, rngs=rngs)

  def __call__(self, x):
    return self.head(jax.nn.relu(self.conv(x)).mean(axis=(1, 2)))


class TwoKernels(nnx.Module):
  """One module with two weight matrices; only ``a`` is used in a matmul."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.a = nnx.Param(jax.random.normal(rngs.params(), (16, 8)))
    self.b = nnx.Param(jax.random.normal(rngs.params(), (4, 4)) * 5.0)

  def __call__(self, x):
    # lax.dot_general: Qwix intercepts it, not the jitted jnp.dot / @ in eager mode.
    y = jax.lax.dot_general(x, self.a.get_value(), (((1,), (0,)), ((), ())))
    return y + self.b.get_value().sum()


class Block(nnx.Module):

  def __init__(self, *, rngs: nnx.Rngs):
    self.fc = nnx.Linear(16, 16, rngs=rngs)

  def __call__(self, x):
    return jax.nn.relu(self.fc(x))


class ScannedBlocks(nnx.Module):
  """Three blocks with stacked parameters, run by nnx.scan (scan over layers)."""

  def __init__(self, *, rngs: nnx.Rngs):
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return Block(rngs=rngs)

    self.blocks = make(rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(x, block):
      return block(x)

    return body(x, self.blocks)


def _qt(model, rules, *inputs):
  return qwix.quantize_model(model, qwix.QtProvider(rules), *inputs)


def _mlp(**kwargs):
  return MLP(rngs=nnx.Rngs(0), **kwargs)


def _params(model):
  return nnx.as_pure(nnx.state(model, nnx.Param))


@nnx.jit
def _train_step(model, optimizer):
  loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(X), Y).mean()
  optimizer.update(model, nnx.grad(loss)(model))


def _sgd_steps(model, steps=3, lr=0.5, optimizer=None):
  """A few plain-SGD steps under nnx.jit, so that weights differ from init."""
  optimizer = optimizer or nnx.Optimizer(model, optax.sgd(lr), wrt=nnx.Param)
  for _ in range(steps):
    _train_step(model, optimizer)
  return optimizer


def _forward_levels(model, *inputs):
  """The integers Qwix uses for each parameter in an eager forward pass."""
  params = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  calls = _internals.record_quantize_calls(lambda: model(*inputs))
  out = {}
  for call in calls:
    for path, value in params.items():
      if call.operand is value or (
          call.operand.shape == value.shape
          and bool(jnp.array_equal(call.operand, value.astype(call.operand.dtype)))
      ):
        out[path] = np.asarray(call.qvalue).astype(np.int8)
  return out


# --------------------------------------------------------------------------
# The private Qwix code we depend on.


def test_qwix_internals_guard():
  """Fails loudly when a Qwix release changes what talr_optax.qwix relies on."""
  from qwix._src.core import qarray

  assert list(inspect.signature(qarray.calibrate).parameters)[:2] == ["array", "how"]
  assert list(inspect.signature(qarray.quantize_with_scale_zero_point).parameters)[:4] == [
      "array", "qtype", "scale", "zero_point"]
  fields = {f.name for f in dataclasses.fields(qarray.HowToQuantize)}
  assert {"qtype", "channelwise_axes", "tiled_axes", "calibration_method", "noise_fn"} <= fields
  # The public quantize goes through calibrate and quantize_with_scale_zero_point.
  calls = _internals.record_quantize_calls(
      lambda: qwix.quantize(jnp.ones((4, 2)), "int4", channelwise_axes=[1]))
  assert len(calls) == 1 and calls[0].channelwise_axes == (1,)
  assert calls[0].qvalue is not None

  qt_model = _qt(_mlp(), [qwix.QtRule(module_path="fc2", weight_qtype="int2", tile_size=8)], X)
  assert _internals.is_qwix_model(qt_model)
  assert not _internals.is_qwix_model(_mlp())
  kernel = qt_model.fc2.kernel.get_value()
  calls = _internals.record_quantize_calls(lambda: qt_model(X))
  weight_calls = [c for c in calls if c.operand is kernel]
  assert len(weight_calls) == 1
  call = weight_calls[0]
  assert (call.qtype, call.channelwise_axes, call.tiled_axes, call.calibration_method) == (
      "int2", (1,), ((0, 8),), "absmax")
  assert call.qvalue is not None and call.qvalue.shape == kernel.shape
  # The wrapped functions are restored.
  assert qarray.calibrate.__name__ == "calibrate"
  assert qarray.quantize_with_scale_zero_point.__name__ == "quantize_with_scale_zero_point"


# --------------------------------------------------------------------------
# levels_fn_from_qwix


@pytest.mark.parametrize(
    "rule_kwargs, channelwise, tiled, bits",
    [
        pytest.param(dict(weight_qtype="int2"), (1,), {}, 2, id="int2-per-channel"),
        pytest.param(dict(weight_qtype=jnp.int4, disable_channelwise_axes=True), (), {}, 4,
                     id="int4-per-tensor"),
        pytest.param(dict(weight_qtype=jnp.int8, tile_size=8), (1,), {0: 8}, 8,
                     id="int8-tiled"),
        pytest.param(dict(weight_qtype="int4", weight_calibration_method="rms,3"), (1,), {}, 4,
                     id="int4-rms"),
        pytest.param(dict(weight_qtype=jnp.int8, weight_calibration_method="minmax"), (1,), {},
                     8, id="int8-minmax"),
    ],
)
def test_levels_equal_qwix_quantization(rule_kwargs, channelwise, tiled, bits):
  rule = qwix.QtRule(module_path="fc2", **rule_kwargs)
  qt_model = _qt(_mlp(), [rule], X)
  levels_fn = tq.levels_fn_from_qwix(qt_model, X)
  _sgd_steps(qt_model)  # the levels follow the current weights, not those at construction

  levels = jax.jit(levels_fn)(_params(qt_model))
  w = qt_model.fc2.kernel.get_value()
  expected = qwix.quantize(
      w, rule.weight_qtype, channelwise_axes=channelwise, tiled_axes=tiled,
      calibration_method=rule.weight_calibration_method,
  ).qvalue.astype(jnp.int8)
  assert levels["fc2"]["kernel"].dtype == jnp.int8
  np.testing.assert_array_equal(levels["fc2"]["kernel"], expected)
  forward = _forward_levels(qt_model, X)
  np.testing.assert_array_equal(levels["fc2"]["kernel"], forward[("fc2", "kernel")])
  lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
  assert lo <= int(levels["fc2"]["kernel"].min()) and int(levels["fc2"]["kernel"].max()) <= hi
  for path in (("fc1", "kernel"), ("fc3", "kernel"), ("fc2", "bias")):
    assert levels[path[0]][path[1]] is None


def test_levels_of_conv_and_low_precision_layer_equal_forward():
  cnn = _qt(CNN(rngs=nnx.Rngs(0)), [qwix.QtRule(module_path="conv", weight_qtype="int4")], IMAGES)
  weights = tq.quantized_weights(cnn, IMAGES)
  assert list(weights) == [("conv", "kernel")]
  assert weights[("conv", "kernel")].channelwise_axes == (3,)  # output channels of HWIO
  levels = jax.jit(tq.levels_fn_from_qwix(cnn, IMAGES))(_params(cnn))
  forward = _forward_levels(cnn, IMAGES)
  np.testing.assert_array_equal(levels["conv"]["kernel"], forward[("conv", "kernel")])

  # fc2 computes in bfloat16: Qwix quantizes the cast weight.
  mlp = _qt(_mlp(dtype=jnp.bfloat16), [qwix.QtRule(module_path="fc2", weight_qtype="int4")], X)
  weights = tq.quantized_weights(mlp, X)
  assert weights[("fc2", "kernel")].dtype == jnp.bfloat16
  levels = tq.levels_fn_from_qwix(mlp, X)(_params(mlp))
  np.testing.assert_array_equal(levels["fc2"]["kernel"], _forward_levels(mlp, X)[("fc2", "kernel")])


def test_levels_fn_accepts_boxed_pure_and_masked_params():
  qt_model = _qt(_mlp(), [qwix.QtRule(module_path="fc1|fc2", weight_qtype="int2")], X)
  levels_fn = tq.levels_fn_from_qwix(qt_model, X)
  boxed = nnx.state(qt_model, nnx.Param)
  assert isinstance(boxed["fc2"]["kernel"], nnx.Variable)
  from_boxed, from_pure = levels_fn(boxed), levels_fn(nnx.as_pure(boxed))
  np.testing.assert_array_equal(from_boxed["fc2"]["kernel"], from_pure["fc2"]["kernel"])
  assert jax.tree.structure(from_boxed) == jax.tree.structure(from_pure)

  masked = nnx.as_pure(boxed)
  masked["fc1"]["kernel"] = optax.MaskedNode()
  levels = levels_fn(masked)
  assert levels["fc1"]["kernel"] is None and levels["fc2"]["kernel"] is not None

  wrong = nnx.as_pure(boxed)
  wrong["fc2"]["kernel"] = jnp.zeros((3, 3))
  with pytest.raises(ValueError, match="shape"):
    levels_fn(wrong)


def test_init_under_nnx_optimizer_gets_levels():
  qt_model = _qt(_mlp(), [qwix.QtRule(module_path="fc2", weight_qtype="int2")], X)
  levels_fn = tq.levels_fn_from_qwix(qt_model, X)
  seen = {}

  def init(params):
    seen["params"], seen["levels"] = params, levels_fn(params)
    return optax.EmptyState()

  nnx.Optimizer(qt_model, optax.GradientTransformation(init, lambda u, s, p=None: (u, s)),
                wrt=nnx.Param)
  assert isinstance(seen["params"]["fc2"]["kernel"], nnx.Variable)
  assert seen["levels"]["fc2"]["kernel"].dtype == jnp.int8
  assert seen["levels"]["fc2"]["bias"] is None

  optimizer = nnx.Optimizer(qt_model, talr_optax.sgdt(0.1, 0.01, levels_fn), wrt=nnx.Param)
  state = nnx.as_pure(optimizer.opt_state)
  talr_state = next(s for s in jax.tree.leaves(
      state, is_leaf=lambda s: isinstance(s, talr_optax.ScaleByTALRState))
      if isinstance(s, talr_optax.ScaleByTALRState))
  np.testing.assert_array_equal(talr_state.prev_levels["fc2"]["kernel"],
                                levels_fn(_params(qt_model))["fc2"]["kernel"])


def test_sgdt_under_nnx_jit_counts_transitions():
  qt_model = _qt(_mlp(), [qwix.QtRule(module_path="fc2", weight_qtype="int2")], X)
  levels_fn = tq.levels_fn_from_qwix(qt_model, X)
  optimizer = nnx.Optimizer(qt_model, talr_optax.sgdt(0.5, 0.01, levels_fn), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(X), Y).mean()
    optimizer.update(model, nnx.grad(loss)(model))
    return talr_optax.metrics(nnx.as_pure(optimizer.opt_state))

  rates = []
  for _ in range(4):
    before = levels_fn(_params(qt_model))["fc2"]["kernel"]
    step(qt_model, optimizer)
    after = levels_fn(_params(qt_model))["fc2"]["kernel"]
    rates.append(float(jnp.mean(after != before)))
  # k at update n counts the transitions of update n - 1 (one-step lag).
  m = talr_optax.metrics(nnx.as_pure(optimizer.opt_state))
  assert set(m) == {f"{f}/fc2/kernel" for f in
                    ("talr", "transition_rate", "ema_transition_rate", "target_transition_rate")}
  assert float(m["transition_rate/fc2/kernel"]) == pytest.approx(rates[-2])
  assert sum(rates) > 0


def test_not_a_qwix_qat_model_raises():
  with pytest.raises(ValueError, match="not a Qwix model"):
    tq.levels_fn_from_qwix(_mlp(), X)
  with pytest.raises(TypeError, match="nnx.Module or flax.linen.Module"):
    tq.levels_fn_from_qwix({"w": jnp.ones(3)}, X)
  with pytest.raises(ValueError, match="quantized no weight"):
    nothing = [qwix.QtRule(module_path="nothing", weight_qtype="int2")]
    tq.levels_fn_from_qwix(_qt(_mlp(), nothing, X), X)
  with pytest.raises(ValueError, match="quantized no weight"):  # activations only
    tq.levels_fn_from_qwix(_qt(_mlp(), [qwix.QtRule(module_path="fc2", act_qtype=jnp.int8)], X), X)
  ptq_rules = [qwix.QtRule(module_path="fc2", weight_qtype=jnp.int8)]
  ptq = qwix.quantize_model(_mlp(), qwix.PtqProvider(ptq_rules), X)
  with pytest.raises(ValueError, match="post-training"):
    tq.levels_fn_from_qwix(ptq, X)
  fp8 = _qt(_mlp(), [qwix.QtRule(module_path="fc2", weight_qtype=jnp.float8_e4m3fn)], X)
  with pytest.raises(NotImplementedError, match="fit int8"):
    tq.levels_fn_from_qwix(fp8, X)
  scanned = _qt(ScannedBlocks(rngs=nnx.Rngs(0)), [qwix.QtRule(weight_qtype="int2")], X)
  with pytest.raises(NotImplementedError, match="stacked layers"):
    tq.levels_fn_from_qwix(scanned, X)
  qt_model = _qt(_mlp(), [qwix.QtRule(module_path="fc2", weight_qtype="int2")], X)
  with pytest.raises(ValueError, match="only for Linen"):
    tq.levels_fn_from_qwix(qt_model, X, variables={"params": {}})


def test_activation_quantization_is_not_taken_for_weights():
  rules = [qwix.QtRule(module_path="fc2", weight_qtype=jnp.int8, act_qtype=jnp.int8)]
  qt_model = _qt(_mlp(), rules, X)
  assert list(tq.quantized_weights(qt_model, X)) == [("fc2", "kernel")]


# --------------------------------------------------------------------------
# frozen_scale_rules


def test_frozen_rules_reproduce_paper_quantizer_after_training():
  model = _mlp()
  rules = [qwix.QtRule(module_path="fc2", weight_qtype="int2"),
           qwix.QtRule(module_path="fc1", weight_qtype=jnp.int4)]
  frozen = tq.frozen_scale_rules(model, rules)
  bits = {"fc1": 4, "fc2": 2}
  steps = {}
  for rule in frozen[:2]:
    name = rule.module_path.strip("^$")
    steps[name] = tq.frozen_step_size(rule)
    w0 = getattr(model, name).kernel.get_value()
    assert steps[name] == pytest.approx(3.0 * float(jnp.std(w0)), rel=2.0 ** -(23 - bits[name]))
  assert frozen[2:] == rules

  qt_model = _qt(model, frozen, X)
  levels_fn = tq.levels_fn_from_qwix(qt_model, X)
  optimizer = None
  for _ in range(3):
    optimizer = _sgd_steps(qt_model, steps=2, optimizer=optimizer)
    forward = _forward_levels(qt_model, X)
    levels = jax.jit(levels_fn)(_params(qt_model))
    for name, b in bits.items():
      w = getattr(qt_model, name).kernel.get_value()
      paper = quantizers.weight_levels(w, steps[name], b)
      np.testing.assert_array_equal(forward[(name, "kernel")], paper)
      np.testing.assert_array_equal(levels[name]["kernel"], paper)


def test_frozen_rules_agree_with_paper_on_transition_points():
  model = _mlp()
  frozen = tq.frozen_scale_rules(model, [qwix.QtRule(module_path="fc2", weight_qtype="int2")])
  s = tq.frozen_step_size(frozen[0])
  qt_model = _qt(model, frozen, X)
  # Weights exactly on the transition points of u = 2 w / s and one ulp away.
  points = np.array([-1.5, -0.5, 0.5, -2.5, 1.5], np.float32) * np.float32(s / 2)
  values = np.concatenate([points, np.nextafter(points, np.inf), np.nextafter(points, -np.inf)])
  kernel = np.resize(values, qt_model.fc2.kernel.get_value().shape).astype(np.float32)
  qt_model.fc2.kernel.set_value(jnp.asarray(kernel))
  np.testing.assert_array_equal(
      _forward_levels(qt_model, X)[("fc2", "kernel")], quantizers.weight_levels(kernel, s, 2))


def test_frozen_rules_keep_everything_else():
  model = _mlp()
  rules = [
      qwix.QtRule(module_path="fc2", op_names=("dot_general",), weight_qtype="int2",
                  act_qtype=jnp.int8, tile_size=8, bwd_qtype=jnp.int8),
      qwix.QtRule(module_path="fc3", act_qtype=jnp.int8),
      qwix.QtRule(module_path="fc.*", weight_qtype=jnp.int4),
  ]
  frozen = tq.frozen_scale_rules(model, rules)
  assert frozen[-3:] == rules
  per_layer = {r.module_path: [] for r in frozen[:-3]}
  for r in frozen[:-3]:
    per_layer[r.module_path].append(r)
  assert set(per_layer) == {"^fc1$", "^fc2$", "^fc3$"}
  fc2_first, fc2_second = per_layer["^fc2$"]
  restored = dataclasses.replace(fc2_first, module_path="fc2", weight_calibration_method="absmax")
  assert restored == rules[0]
  assert fc2_first.weight_calibration_method.startswith("fixed,-")
  assert fc2_second.weight_qtype == jnp.int4
  # The activation-only rule keeps its precedence in fc3 and is not frozen.
  assert per_layer["^fc3$"][0] == dataclasses.replace(rules[1], module_path="^fc3$")
  assert per_layer["^fc3$"][1].weight_calibration_method.startswith("fixed,-")


def test_frozen_rules_errors_and_example_inputs():
  model = _mlp()
  with pytest.raises(ValueError, match="num_std"):
    tq.frozen_scale_rules(model, [qwix.QtRule(weight_qtype="int2")], num_std=0.0)
  with pytest.raises(ValueError, match="signed integer"):
    tq.frozen_scale_rules(model, [qwix.QtRule(weight_qtype=jnp.float8_e4m3fn)])
  with pytest.raises(ValueError, match="symmetric fixed"):
    tq.frozen_step_size(qwix.QtRule(weight_qtype="int2"))

  two = TwoKernels(rngs=nnx.Rngs(0))
  rules = [qwix.QtRule(module_path=".*", weight_qtype="int2")]
  with pytest.raises(ValueError, match="several weight matrices"):
    tq.frozen_scale_rules(two, rules)
  # With example inputs only the weight Qwix quantizes (a) sets the range.
  frozen = tq.frozen_scale_rules(two, rules, X)
  s = tq.frozen_step_size(frozen[0])
  assert s == pytest.approx(3.0 * float(jnp.std(two.a.get_value())), rel=1e-6)


# --------------------------------------------------------------------------
# Linen


class LinenMLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(32)(x))
    # A boxed (sharding-annotated) kernel, as in partitioned Linen models.
    init = nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model"))
    x = nn.relu(nn.Dense(24, name="hidden", kernel_init=init)(x))
    return nn.Dense(10)(x)


def test_linen_levels_and_frozen_rules():
  rules = [qwix.QtRule(module_path="hidden", weight_qtype="int2")]
  qt_model = qwix.quantize_model(LinenMLP(), qwix.QtProvider(rules))
  variables = qt_model.init(jax.random.key(0), X)
  with pytest.raises(ValueError, match="variables"):
    tq.levels_fn_from_qwix(qt_model, X)
  levels = jax.jit(tq.levels_fn_from_qwix(qt_model, X, variables=variables))(variables["params"])
  assert isinstance(variables["params"]["hidden"]["kernel"], nn.Partitioned)
  w = variables["params"]["hidden"]["kernel"].unbox()
  np.testing.assert_array_equal(
      levels["hidden"]["kernel"],
      qwix.quantize(w, "int2", channelwise_axes=[1]).qvalue.astype(jnp.int8))
  assert levels["Dense_0"]["kernel"] is None and levels["hidden"]["bias"] is None

  frozen = tq.frozen_scale_rules(variables["params"], rules)
  assert [r.module_path for r in frozen[:-1]] == ["^hidden$"]
  s = tq.frozen_step_size(frozen[0])
  frozen_model = qwix.quantize_model(LinenMLP(), qwix.QtProvider(frozen))
  levels = tq.levels_fn_from_qwix(frozen_model, X, variables=variables)(variables["params"])
  np.testing.assert_array_equal(levels["hidden"]["kernel"], quantizers.weight_levels(w, s, 2))
