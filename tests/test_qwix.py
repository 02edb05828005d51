"""Tests of ``talr_optax.qwix.levels_fn_from_qwix``: levels of Qwix QAT models.

Stacked layers are in ``test_qwix_scan.py``, frozen-scale rules in
``test_qwix_rules.py``.
"""

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
import talr_optax.qwix as tq  # noqa: E402
from talr_optax.qwix import _internals  # noqa: E402
from _qwix_models import (  # noqa: E402
    CNN, IMAGES, X, Y, LinenMLP, Stacked, forward_levels, mlp, params, qt, qwix_levels, sgd_steps)


# --------------------------------------------------------------------------
# The private code we depend on.


def test_qwix_internals_guard():
  """Fails loudly when a Qwix or JAX release changes what talr_optax.qwix relies on."""
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
  assert calls[0].qvalue is not None and calls[0].scan_indices == ()

  qt_model = qt(mlp(), [qwix.QtRule(module_path="fc2", weight_qtype="int2", tile_size=8)], X)
  assert _internals.is_qwix_model(qt_model)
  assert not _internals.is_qwix_model(mlp())
  kernel = qt_model.fc2.kernel.get_value()
  calls = _internals.record_quantize_calls(lambda: qt_model(X))
  weight_calls = [c for c in calls if c.operand is kernel]
  assert len(weight_calls) == 1
  call = weight_calls[0]
  assert (call.qtype, call.channelwise_axes, call.tiled_axes, call.calibration_method) == (
      "int2", (1,), ((0, 8),), "absmax")
  assert call.qvalue is not None and call.qvalue.shape == kernel.shape

  # nnx.scan calls the public jax.lax.scan, which the recording pass unrolls:
  # each layer's weight reaches Qwix as a concrete slice, in layer order.
  scanned = qt(Stacked(rngs=nnx.Rngs(0)), [qwix.QtRule(module_path="blocks/q", weight_qtype="int2")], X)
  stacked_q = scanned.blocks.q.kernel.get_value()
  calls = _internals.record_quantize_calls(lambda: scanned(X))
  assert [c.scan_indices for c in calls] == [(0,), (1,), (2,)]
  for i, c in enumerate(calls):
    assert not isinstance(c.operand, jax.core.Tracer)
    np.testing.assert_array_equal(c.operand, stacked_q[i])

  # The patched functions are restored.
  assert qarray.calibrate.__name__ == "calibrate"
  assert qarray.quantize_with_scale_zero_point.__name__ == "quantize_with_scale_zero_point"
  assert jax.lax.scan.__name__ == "scan"


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
  qt_model = qt(mlp(), [rule], X)
  levels_fn = tq.levels_fn_from_qwix(qt_model, X)
  sgd_steps(qt_model)  # the levels follow the current weights, not those at construction

  levels = jax.jit(levels_fn)(params(qt_model))
  w = qt_model.fc2.kernel.get_value()
  how = dict(channelwise_axes=channelwise, tiled_axes=tiled,
             calibration_method=rule.weight_calibration_method)
  assert levels["fc2"]["kernel"].dtype == jnp.int8
  np.testing.assert_array_equal(levels["fc2"]["kernel"],
                                qwix_levels(w, rule.weight_qtype, jit=True, **how))
  # Eager calls (nnx.Optimizer's init) give the same levels as jitted ones.
  np.testing.assert_array_equal(levels_fn(nnx.state(qt_model, nnx.Param))["fc2"]["kernel"],
                                levels["fc2"]["kernel"])
  np.testing.assert_array_equal(forward_levels(qt_model, X)["fc2/kernel"],
                                qwix_levels(w, rule.weight_qtype, jit=False, **how))
  lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
  assert lo <= int(levels["fc2"]["kernel"].min()) and int(levels["fc2"]["kernel"].max()) <= hi
  for layer, name in (("fc1", "kernel"), ("fc3", "kernel"), ("fc2", "bias")):
    assert levels[layer][name] is None
  # Nothing is stacked: the core's layer_axes are None everywhere.
  assert jax.tree.leaves(levels_fn.layer_axes(params(qt_model))) == []


def test_levels_of_conv_and_low_precision_layer_equal_forward():
  cnn = qt(CNN(rngs=nnx.Rngs(0)), [qwix.QtRule(module_path="conv", weight_qtype="int4")], IMAGES)
  weights = tq.quantized_weights(cnn, IMAGES)
  assert list(weights) == ["conv/kernel"]
  assert weights["conv/kernel"].channelwise_axes == (3,)  # output channels of HWIO
  assert weights["conv/kernel"].layer_axis is None
  levels = jax.jit(tq.levels_fn_from_qwix(cnn, IMAGES))(params(cnn))
  np.testing.assert_array_equal(levels["conv"]["kernel"], forward_levels(cnn, IMAGES)["conv/kernel"])

  # fc2 computes in bfloat16: Qwix quantizes the cast weight.
  model = qt(mlp(dtype=jnp.bfloat16), [qwix.QtRule(module_path="fc2", weight_qtype="int4")], X)
  assert tq.quantized_weights(model, X)["fc2/kernel"].dtype == jnp.bfloat16
  levels = tq.levels_fn_from_qwix(model, X)(params(model))
  np.testing.assert_array_equal(levels["fc2"]["kernel"], forward_levels(model, X)["fc2/kernel"])


def test_levels_fn_accepts_boxed_pure_and_masked_params():
  qt_model = qt(mlp(), [qwix.QtRule(module_path="fc1|fc2", weight_qtype="int2")], X)
  levels_fn = tq.levels_fn_from_qwix(qt_model, X)
  assert isinstance(levels_fn, tq.QwixLevelsFn) and "fc2/kernel" in repr(levels_fn)
  boxed = nnx.state(qt_model, nnx.Param)
  assert isinstance(boxed["fc2"]["kernel"], nnx.Variable)
  from_boxed, from_pure = levels_fn(boxed), levels_fn(nnx.as_pure(boxed))
  np.testing.assert_array_equal(from_boxed["fc2"]["kernel"], from_pure["fc2"]["kernel"])
  assert jax.tree.structure(from_boxed) == jax.tree.structure(from_pure)

  masked = nnx.as_pure(boxed)
  masked["fc1"]["kernel"] = optax.MaskedNode()
  levels = levels_fn(masked)
  assert levels["fc1"]["kernel"] is None and levels["fc2"]["kernel"] is not None


def test_levels_fn_rejects_params_of_another_model_eager_and_jitted():
  qt_model = qt(mlp(), [qwix.QtRule(module_path="fc2", weight_qtype="int2")], X)
  levels_fn = tq.levels_fn_from_qwix(qt_model, X)
  wrong_shape = params(qt_model)
  wrong_shape["fc2"]["kernel"] = jnp.zeros((3, 3))
  other = {"conv": {"kernel": jnp.ones((3, 3))}}
  for fn in (levels_fn, jax.jit(levels_fn)):
    with pytest.raises(ValueError, match=r"params\['fc2/kernel'\] has shape \(3, 3\)"):
      fn(wrong_shape)
    with pytest.raises(ValueError, match="none of the weights Qwix quantizes"):
      fn(other)


def test_init_under_nnx_optimizer_gets_levels():
  qt_model = qt(mlp(), [qwix.QtRule(module_path="fc2", weight_qtype="int2")], X)
  levels_fn = tq.levels_fn_from_qwix(qt_model, X)
  seen = {}

  def init(params_):
    seen["params"], seen["levels"] = params_, levels_fn(params_)
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
                                levels_fn(params(qt_model))["fc2"]["kernel"])


def test_sgdt_under_nnx_jit_counts_transitions():
  qt_model = qt(mlp(), [qwix.QtRule(module_path="fc2", weight_qtype="int2")], X)
  levels_fn = tq.levels_fn_from_qwix(qt_model, X)
  optimizer = nnx.Optimizer(qt_model, talr_optax.sgdt(0.5, 0.01, levels_fn), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(X), Y).mean()
    optimizer.update(model, nnx.grad(loss)(model))

  rates = []
  for _ in range(4):
    before = levels_fn(params(qt_model))["fc2"]["kernel"]
    step(qt_model, optimizer)
    after = levels_fn(params(qt_model))["fc2"]["kernel"]
    rates.append(float(jnp.mean(after != before)))
  m = talr_optax.metrics(nnx.as_pure(optimizer.opt_state))
  assert set(m) == {f"{f}/fc2/kernel" for f in
                    ("talr", "transition_rate", "ema_transition_rate", "target_transition_rate",
                     "talr_scale", "initial_target_rate")}
  # k of the last update: the transitions that update itself caused.
  assert float(m["transition_rate/fc2/kernel"]) == pytest.approx(rates[-1])
  assert sum(rates) > 0


def test_not_a_qwix_qat_model_raises():
  with pytest.raises(ValueError, match="not a Qwix model"):
    tq.levels_fn_from_qwix(mlp(), X)
  with pytest.raises(TypeError, match="nnx.Module or flax.linen.Module"):
    tq.levels_fn_from_qwix({"w": jnp.ones(3)}, X)
  with pytest.raises(ValueError, match="quantized no weight"):
    nothing = [qwix.QtRule(module_path="nothing", weight_qtype="int2")]
    tq.levels_fn_from_qwix(qt(mlp(), nothing, X), X)
  with pytest.raises(ValueError, match="quantized no weight"):  # activations only
    tq.levels_fn_from_qwix(qt(mlp(), [qwix.QtRule(module_path="fc2", act_qtype=jnp.int8)], X), X)
  ptq_rules = [qwix.QtRule(module_path="fc2", weight_qtype=jnp.int8)]
  ptq = qwix.quantize_model(mlp(), qwix.PtqProvider(ptq_rules), X)
  with pytest.raises(ValueError, match="post-training"):
    tq.levels_fn_from_qwix(ptq, X)
  fp8 = qt(mlp(), [qwix.QtRule(module_path="fc2", weight_qtype=jnp.float8_e4m3fn)], X)
  with pytest.raises(NotImplementedError, match="fit int8"):
    tq.levels_fn_from_qwix(fp8, X)


def test_careless_calls_raise_clear_errors():
  qt_model = qt(mlp(), [qwix.QtRule(module_path="fc2", weight_qtype="int2")], X)
  # No example inputs: the model's own "missing argument" TypeError, explained.
  with pytest.raises(TypeError, match=r"without example inputs.*levels_fn_from_qwix\(qt_model, x\)"):
    tq.levels_fn_from_qwix(qt_model)
  with pytest.raises(TypeError, match="without example inputs"):
    tq.quantized_weights(qt_model)
  with pytest.raises(ValueError, match="only for Linen"):
    tq.levels_fn_from_qwix(qt_model, X, variables={"params": {}})
  with pytest.raises(ValueError, match="method must be None"):
    tq.levels_fn_from_qwix(qt_model, X, method="no_such_method")
  # Keyword example inputs count as example inputs.
  assert list(tq.quantized_weights(qt_model, x=X)) == ["fc2/kernel"]


def test_activation_quantization_is_not_taken_for_weights():
  rules = [qwix.QtRule(module_path="fc2", weight_qtype=jnp.int8, act_qtype=jnp.int8)]
  assert list(tq.quantized_weights(qt(mlp(), rules, X), X)) == ["fc2/kernel"]


# --------------------------------------------------------------------------
# Linen


def test_linen_levels():
  rules = [qwix.QtRule(module_path="hidden", weight_qtype="int2")]
  qt_model = qwix.quantize_model(LinenMLP(), qwix.QtProvider(rules))
  variables = qt_model.init(jax.random.key(0), X)
  with pytest.raises(ValueError, match="variables"):
    tq.levels_fn_from_qwix(qt_model, X)
  with pytest.raises(TypeError, match="without example inputs"):
    tq.levels_fn_from_qwix(qt_model, variables=variables)
  levels_fn = tq.levels_fn_from_qwix(qt_model, X, variables=variables)
  levels = jax.jit(levels_fn)(variables["params"])
  assert isinstance(variables["params"]["hidden"]["kernel"], nn.Partitioned)
  w = variables["params"]["hidden"]["kernel"].unbox()
  np.testing.assert_array_equal(
      levels["hidden"]["kernel"], qwix_levels(w, "int2", channelwise_axes=[1], jit=True))
  assert levels["Dense_0"]["kernel"] is None and levels["hidden"]["bias"] is None
  # The whole variables instead of the params collection: named, not all-None levels.
  with pytest.raises(ValueError, match=r"variables\['params'\]"):
    levels_fn(variables)
