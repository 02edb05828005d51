"""Tests for talr_optax.nnx: layers, levels_fn_for, param_labels, models.

References are computed by hand with NumPy (3 * std, round(clip(...))), not
with the code under test.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from talr_optax import nnx as tnnx
from talr_optax.nnx import models as models_lib


def _np(x) -> np.ndarray:
  return np.asarray(x[...] if isinstance(x, nnx.Variable) else x)


def _np_levels(w: np.ndarray, s: float, bits: int) -> np.ndarray:
  """round(clip(gamma * w / s, alpha, beta)), or 1[w > 0] for one bit."""
  if bits == 1:
    return (w > 0).astype(np.int8)
  half = 2 ** (bits - 1)
  return np.round(np.clip(half * w / s, -half, half - 1)).astype(np.int8)


def _np_act_scale(x: np.ndarray) -> float:
  return 3.0 * float(np.std(x, dtype=np.float64)) / math.sqrt(1.0 - 2.0 / math.pi)


def _relu_batch(seed: int, shape: tuple[int, ...]) -> jax.Array:
  # NumPy draws: no PRNG compilation per shape.
  return jnp.asarray(np.maximum(np.random.default_rng(seed).normal(size=shape), 0.0),
                     jnp.float32)


class TinyNet(nnx.Module):
  """FP conv - BN - ReLU - W2A2 conv - BN - ReLU - pool - W3A4 linear."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = tnnx.QuantConv(in_features=1, out_features=3, kernel_size=3,
                                weight_bits=None, act_bits=None, rngs=rngs)
    self.bn1 = nnx.BatchNorm(3, rngs=rngs)
    self.conv2 = tnnx.QuantConv(in_features=3, out_features=4, kernel_size=3,
                                weight_bits=2, act_bits=2, rngs=rngs)
    self.bn2 = nnx.BatchNorm(4, rngs=rngs)
    self.head = tnnx.QuantLinear(in_features=4, out_features=2, weight_bits=3,
                                 act_bits=4, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = nnx.relu(self.bn2(self.conv2(x)))
    return self.head(jnp.mean(x, axis=(1, 2)))


X = jnp.asarray(np.random.default_rng(7).normal(size=(4, 5, 5, 1)), jnp.float32)
Y = jnp.array([0, 1, 1, 0])


def _loss(model):
  return optax.softmax_cross_entropy_with_integer_labels(model(X), Y).mean()


# Compiled once for all TinyNets; eager op-by-op steps cost more to compile.
_grads = nnx.jit(nnx.grad(_loss))
_update = nnx.jit(lambda model, optimizer, grads: optimizer.update(model, grads))


# ---------------------------------------------------------------------------
# Layers


def _layer(cls, seed: int = 0, **kwargs):
  """A layer whose kernel is drawn by NumPy (no per-shape PRNG compilation)."""
  layer = cls(kernel_init=nnx.initializers.zeros, rngs=nnx.Rngs(0), **kwargs)
  shape = layer.kernel[...].shape
  layer.kernel[...] = jnp.asarray(
      np.random.default_rng(seed).normal(0.0, 0.5, shape), jnp.float32)
  return layer


def _linear(in_features, out_features, weight_bits, act_bits, **kwargs):
  return _layer(tnnx.QuantLinear, in_features=in_features, out_features=out_features,
                weight_bits=weight_bits, act_bits=act_bits, **kwargs)


@pytest.mark.parametrize("name", ["weight_bits", "act_bits"])
@pytest.mark.parametrize("bad", [0, 5, 16, -2, 2.0, "2", True])
def test_bad_bits_raise_naming_argument(name, bad):
  kwargs = {"weight_bits": 2, "act_bits": 2, name: bad}
  message = f"{name} must be one of 1, 2, 3, 4, 8 or None"
  with pytest.raises(ValueError, match=message):
    tnnx.QuantLinear(in_features=2, out_features=2, rngs=nnx.Rngs(0), **kwargs)
  with pytest.raises(ValueError, match=message):
    tnnx.QuantConv(in_features=2, out_features=2, kernel_size=3, rngs=nnx.Rngs(0), **kwargs)
  with pytest.raises(ValueError, match=message):
    tnnx.SmallCNN(rngs=nnx.Rngs(0), **kwargs)
  with pytest.raises(ValueError, match=message):
    tnnx.ResNet20(rngs=nnx.Rngs(0), **kwargs)


def test_full_precision_layer_has_no_quantizer_state():
  layer = _layer(tnnx.QuantConv, in_features=2, out_features=3, kernel_size=3,
                 weight_bits=None, act_bits=None)
  assert set(nnx.state(layer).keys()) == {"kernel"}
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 4, 4, 2)), jnp.float32)
  ref = jax.lax.conv_general_dilated(x, layer.kernel[...], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(layer(x), ref, rtol=1e-6)


def test_first_training_forward_freezes_weight_scale_and_levels():
  layer = _linear(6, 5, weight_bits=2, act_bits=None, use_bias=False)
  w0 = _np(layer.kernel)
  assert not bool(layer.calibrated[...]) and float(layer.weight_scale[...]) == 0.0
  layer(jnp.ones((1, 6)))
  s = 3.0 * float(np.std(w0))
  assert bool(layer.calibrated[...])
  np.testing.assert_allclose(float(layer.weight_scale[...]), s, rtol=1e-6)
  np.testing.assert_array_equal(layer.levels(), _np_levels(w0, s, 2))
  # Frozen: moving the kernel neither moves the scale nor is it recomputed.
  layer.kernel[...] = layer.kernel[...] * 3.0 + 0.1
  x = jnp.arange(6.0)[None]
  y = layer(x)
  np.testing.assert_allclose(float(layer.weight_scale[...]), s, rtol=1e-6)
  levels = _np_levels(_np(layer.kernel), s, 2)
  np.testing.assert_array_equal(layer.levels(), levels)
  # Forward value: x @ (w_d / gamma), no multiplication by s.
  np.testing.assert_allclose(y, np.asarray(x) @ (levels / 2.0), rtol=1e-6)


def test_quant_conv_forward_value():
  layer = _layer(tnnx.QuantConv, in_features=2, out_features=3, kernel_size=3,
                 weight_bits=2, act_bits=2, use_bias=False)
  x = jnp.asarray(np.abs(np.random.default_rng(2).normal(size=(2, 4, 4, 2))), jnp.float32)
  y = layer(x)
  s_w = 3.0 * float(np.std(_np(layer.kernel)))
  s_a = _np_act_scale(np.asarray(x))
  x_q = np.round(np.clip(4.0 * np.asarray(x) / s_a, 0, 3)) / 4.0
  w_q = _np_levels(_np(layer.kernel), s_w, 2) / 2.0
  ref = jax.lax.conv_general_dilated(jnp.asarray(x_q, jnp.float32), jnp.asarray(w_q, jnp.float32),
                                     (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)


def test_eval_forward_does_not_calibrate():
  layer = _linear(6, 5, weight_bits=2, act_bits=2)
  layer.eval()
  assert layer.deterministic
  layer(jnp.ones((1, 6)))
  assert not bool(layer.calibrated[...])
  assert float(layer.weight_scale[...]) == 0.0 and float(layer.act_scale[...]) == 0.0
  layer.train()
  layer(jnp.ones((1, 6)))
  assert bool(layer.calibrated[...])


def test_activation_scale_init_is_formula_on_first_batch():
  layer = _layer(tnnx.QuantConv, in_features=2, out_features=3, kernel_size=3,
                 weight_bits=4, act_bits=2)
  x1 = np.maximum(np.random.default_rng(3).normal(size=(2, 4, 4, 2)), 0.0)
  layer(jnp.asarray(x1, jnp.float32))
  expected = _np_act_scale(x1)
  np.testing.assert_allclose(float(layer.act_scale[...]), expected, rtol=1e-5)
  # A second batch with another spread leaves it alone (only the optimizer moves it).
  layer(jnp.asarray(3.0 * x1, jnp.float32))
  np.testing.assert_allclose(float(layer.act_scale[...]), expected, rtol=1e-5)
  assert isinstance(nnx.state(layer, nnx.Param)["act_scale"], tnnx.ActivationScale)


def test_weight_scale_not_param_and_untouched_by_optimizer():
  model = TinyNet(nnx.Rngs(0))
  grads = _grads(model)  # the first training forward freezes the scales
  params = nnx.state(model, nnx.Param)
  assert "weight_scale" not in params["conv2"] and "calibrated" not in params["conv2"]
  assert "act_scale" in params["conv2"]
  assert isinstance(model.conv2.weight_scale, tnnx.WeightScale)
  assert not isinstance(model.conv2.weight_scale, nnx.Param)
  s2, s_head = float(model.conv2.weight_scale[...]), float(model.head.weight_scale[...])
  k2 = _np(model.conv2.kernel)
  # Weight decay would shrink the scale too if the optimizer saw it.
  optimizer = nnx.Optimizer(
      model, optax.chain(optax.add_decayed_weights(0.5), optax.sgd(0.1)), wrt=nnx.Param)
  _update(model, optimizer, grads)
  assert float(model.conv2.weight_scale[...]) == s2
  assert float(model.head.weight_scale[...]) == s_head
  np.testing.assert_allclose(
      _np(model.conv2.kernel), k2 - 0.1 * (_np(grads["conv2"]["kernel"]) + 0.5 * k2), rtol=1e-5)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_weight_ste_gradient_is_one_over_s_inside_zero_outside(bits):
  k = np.random.default_rng(bits).normal(0.0, 0.3, 40)
  k[:2] = [-3.5, 3.5]  # beyond s = 3 std(k) ~ 2.5 on both sides
  layer = _linear(40, 1, weight_bits=bits, act_bits=None, use_bias=False)
  layer.kernel[...] = jnp.asarray(k[:, None], jnp.float32)
  s = 3.0 * float(np.std(k.astype(np.float32)))
  half = 2 ** (bits - 1)
  # Clip range of w: [-s, s * (half - 1) / half] ([-s, s/2] for 2 bits);
  # [-s, s] for binary weights.
  hi = 1.0 if bits == 1 else (half - 1) / half
  inside = (k / s > -1.0) & (k / s < hi)
  assert 0 < inside.sum() < 40
  expected = np.where(inside, 1.0 / s, 0.0)[:, None]
  x = jnp.ones((1, 40))
  loss = lambda m: jnp.sum(m(x))
  # The calibrating forward: the fresh scale is a constant for the gradient.
  np.testing.assert_allclose(nnx.grad(loss)(layer)["kernel"][...], expected, rtol=1e-5)
  assert bool(layer.calibrated[...])
  np.testing.assert_allclose(float(layer.weight_scale[...]), s, rtol=1e-6)
  layer.eval()
  np.testing.assert_allclose(nnx.grad(loss)(layer)["kernel"][...], expected, rtol=1e-5)


def test_bfloat16_layer_calibrates_and_quantizes_like_float32():
  """param_dtype=bfloat16: a bf16 step size is accepted, levels are those of float32."""
  from talr_optax import quantizers

  layer = tnnx.QuantLinear(in_features=64, out_features=8, weight_bits=8, act_bits=8,
                           param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  x = _relu_batch(3, (4, 64)).astype(jnp.bfloat16)
  @nnx.jit
  def forward_and_grad(m):  # the first training forward calibrates
    y, grads = nnx.value_and_grad(lambda m: jnp.sum(m(x).astype(jnp.float32)))(m)
    return m(x), grads

  y, grads = forward_and_grad(layer)
  assert y.dtype == jnp.bfloat16
  assert grads["kernel"][...].dtype == jnp.bfloat16
  assert float(jnp.abs(grads["kernel"][...].astype(jnp.float32)).sum()) > 0
  s = layer.weight_scale[...]
  assert s.dtype == jnp.bfloat16 and bool(layer.calibrated[...])
  kernel = layer.kernel[...]
  np.testing.assert_array_equal(
      layer.levels(),
      quantizers.weight_levels(kernel.astype(jnp.float32), s.astype(jnp.float32), 8))
  levels_fn = tnnx.levels_fn_for(layer)
  np.testing.assert_array_equal(levels_fn(nnx.state(layer, nnx.Param))["kernel"], layer.levels())


def test_activation_ste_gradients():
  layer = tnnx.QuantLinear(in_features=5, out_features=1, weight_bits=None, act_bits=2,
                           use_bias=False, kernel_init=nnx.initializers.ones,
                           rngs=nnx.Rngs(0))
  layer(jnp.ones((1, 5)))
  s = 0.8
  layer.act_scale[...] = jnp.asarray(s)
  layer.eval()
  # 2-bit activations: round(clip(4 x / s, 0, 3)) / 4; inside is 0 < x < 3 s / 4.
  # u = 5 x = -1, 0.5, 1.75, 2.75, 4.5 -> levels 0, 0 (half to even), 2, 3, 3.
  x = jnp.asarray([[-0.2, 0.1, 0.35, 0.55, 0.9]])
  np.testing.assert_allclose(layer(x), [[(0 + 0 + 2 + 3 + 3) / 4.0]], rtol=1e-6)
  gx = jax.grad(lambda x: jnp.sum(layer(x)))(x)
  inside = np.array([0.0, 1.0, 1.0, 1.0, 0.0])
  np.testing.assert_allclose(gx, inside[None] / s, rtol=1e-6)
  # Scale gradient: d/ds (4 x / s) / 4 = -x / s^2 inside, 0 when clipped (no LSQ factor).
  gs = nnx.grad(lambda m: jnp.sum(m(x)))(layer)["act_scale"][...]
  np.testing.assert_allclose(gs, -np.sum(np.asarray(x)[0] * inside) / s**2, rtol=1e-6)


def test_activation_scale_gets_gradient_on_the_calibrating_forward():
  # As if the scale had been set before the first step (the reference sets it
  # inside the forward, then uses it): d/ds = -sum(x inside) / s^2.
  layer = tnnx.QuantLinear(in_features=16, out_features=1, weight_bits=None, act_bits=2,
                           use_bias=False, kernel_init=nnx.initializers.ones,
                           rngs=nnx.Rngs(0))
  x = jnp.asarray([[0.0, 0.1, 0.2, 0.4] + [0.05] * 11 + [3.0]])
  grads = nnx.grad(lambda m: jnp.sum(m(x)))(layer)
  s = _np_act_scale(np.asarray(x))
  np.testing.assert_allclose(float(layer.act_scale[...]), s, rtol=1e-6)
  u = 4.0 * np.asarray(x)[0] / s
  inside = (u > 0) & (u < 3)
  assert inside.sum() == 14 and u[-1] > 3  # 0 sits on the edge, 3.0 is clipped
  np.testing.assert_allclose(float(grads["act_scale"][...]),
                             -np.sum(np.asarray(x)[0] * inside) / s**2, rtol=1e-5)


def test_binary_activation_levels_are_zero_one():
  layer = tnnx.QuantLinear(in_features=5, out_features=1, weight_bits=None, act_bits=1,
                           use_bias=False, kernel_init=nnx.initializers.ones,
                           rngs=nnx.Rngs(0))
  layer(jnp.ones((1, 5)))
  layer.act_scale[...] = jnp.asarray(1.0)
  # round(clip(2 x, 0, 1)) in {0, 1}; the value is level / 2.
  np.testing.assert_allclose(
      layer(jnp.asarray([[0.1, 0.3, 2.0, -1.0, 0.2]])), [[0.5 * (0 + 1 + 1 + 0 + 0)]])


# ---------------------------------------------------------------------------
# levels_fn_for


def test_levels_fn_for_all_state_forms_before_and_after_calibration():
  model = TinyNet(nnx.Rngs(1))
  levels_fn = tnnx.levels_fn_for(model)
  boxed = nnx.state(model, nnx.Param)
  # Before the first forward: the scale that forward will freeze, 3 std(w).
  fresh = {name: 3.0 * float(np.std(_np(getattr(model, name).kernel)))
           for name in ("conv2", "head")}
  for state in (boxed, nnx.as_pure(boxed), nnx.to_pure_dict(boxed)):
    levels = levels_fn(state)
    for name, bits in (("conv2", 2), ("head", 3)):
      got = levels[name]["kernel"]
      assert got.dtype == jnp.int8
      np.testing.assert_array_equal(
          got, _np_levels(_np(getattr(model, name).kernel), fresh[name], bits))
    assert levels["conv1"]["kernel"] is None and levels["head"]["bias"] is None
    assert levels["conv2"]["act_scale"] is None and levels["bn2"]["scale"] is None

  model(X)
  frozen = float(model.conv2.weight_scale[...])
  model.conv2.kernel[...] = model.conv2.kernel[...] * 2.0
  levels = levels_fn(nnx.as_pure(nnx.state(model, nnx.Param)))
  np.testing.assert_array_equal(
      levels["conv2"]["kernel"], _np_levels(_np(model.conv2.kernel), frozen, 2))
  assert not np.array_equal(  # the frozen scale, not a fresh 3 std(w)
      levels["conv2"]["kernel"],
      _np_levels(_np(model.conv2.kernel), 3 * float(np.std(_np(model.conv2.kernel))), 2))


def test_levels_fn_for_masked_nodes_and_errors():
  model = TinyNet(nnx.Rngs(2))
  levels_fn = tnnx.levels_fn_for(model)
  pure = nnx.as_pure(nnx.state(model, nnx.Param))
  pure["conv2"]["kernel"] = optax.MaskedNode()
  levels = levels_fn(pure)
  assert levels["conv2"]["kernel"] is None and levels["head"]["kernel"].dtype == jnp.int8
  # Built inside jit from the traced model: reads the traced scales.
  @nnx.jit
  def traced_levels(model):
    return tnnx.levels_fn_for(model)(nnx.state(model, nnx.Param))

  eager = levels_fn(nnx.state(model, nnx.Param))
  np.testing.assert_array_equal(traced_levels(model)["conv2"]["kernel"],
                                eager["conv2"]["kernel"])
  model.conv2.weight_scale[...] = jnp.asarray(1e-3)
  model.conv2.calibrated[...] = jnp.array(True)
  np.testing.assert_array_equal(
      traced_levels(model)["conv2"]["kernel"], _np_levels(_np(model.conv2.kernel), 1e-3, 2))

  act_only = tnnx.QuantLinear(in_features=2, out_features=2, weight_bits=None, act_bits=2,
                              kernel_init=nnx.initializers.ones, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="no quantized kernel"):
    tnnx.levels_fn_for(act_only)


def _recording_tx(levels_fn, lr=0.1):
  """SGD whose state is the last levels, computed by levels_fn in init and update."""

  def init(params):
    return levels_fn(params)

  def update(updates, state, params=None):
    del state
    return jax.tree.map(lambda g: -lr * g, updates), levels_fn(params)

  return optax.GradientTransformation(init, update)


def _state_levels(optimizer, name):
  return _np(optimizer.opt_state[name]["kernel"])


def test_levels_fn_inside_nnx_optimizer_eager_and_jit():
  model = TinyNet(nnx.Rngs(3))
  optimizer = nnx.Optimizer(model, _recording_tx(tnnx.levels_fn_for(model)), wrt=nnx.Param)
  # init saw Variable-boxed params and an uncalibrated model.
  k0 = _np(model.conv2.kernel)
  np.testing.assert_array_equal(
      _state_levels(optimizer, "conv2"), _np_levels(k0, 3 * float(np.std(k0)), 2))
  assert optimizer.opt_state["conv1"]["kernel"] is None

  def step(model, optimizer):
    optimizer.update(model, nnx.grad(_loss)(model))

  optimizer.update(model, _grads(model))  # eager update; the forward froze the scales
  s2 = float(model.conv2.weight_scale[...])
  np.testing.assert_allclose(s2, 3 * float(np.std(k0)), rtol=1e-6)
  np.testing.assert_array_equal(_state_levels(optimizer, "conv2"), _np_levels(k0, s2, 2))
  jit_step = nnx.jit(step)
  for _ in range(2):
    k = _np(model.conv2.kernel)
    kh = _np(model.head.kernel)
    jit_step(model, optimizer)
    # update saw the pre-update params as plain arrays.
    np.testing.assert_array_equal(_state_levels(optimizer, "conv2"), _np_levels(k, s2, 2))
    np.testing.assert_array_equal(
        _state_levels(optimizer, "head"),
        _np_levels(kh, float(model.head.weight_scale[...]), 3))
    assert not np.array_equal(_np(model.conv2.kernel), k)
  assert float(model.conv2.weight_scale[...]) == s2


def test_levels_fn_under_jit_requires_calibration_first():
  model = TinyNet(nnx.Rngs(4))
  optimizer = nnx.Optimizer(model, _recording_tx(tnnx.levels_fn_for(model)), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    optimizer.update(model, nnx.grad(_loss)(model))

  with pytest.raises(RuntimeError, match="conv2/kernel.*calibrate"):
    step(model, optimizer)
  tnnx.calibrate(model, X)
  s2 = float(model.conv2.weight_scale[...])
  k = _np(model.conv2.kernel)
  step(model, optimizer)
  np.testing.assert_array_equal(_state_levels(optimizer, "conv2"), _np_levels(k, s2, 2))


def test_levels_fn_with_talr_optimizer_and_partition():
  talr_optax = pytest.importorskip("talr_optax")
  if not hasattr(talr_optax, "sgdt"):
    pytest.skip("talr_optax.sgdt not available")
  model = TinyNet(nnx.Rngs(5))
  tx = optax.partition(
      {tnnx.QUANTIZED: talr_optax.sgdt(0.1, 5e-3, tnnx.levels_fn_for(model)),
       tnnx.FULL_PRECISION: optax.sgd(0.1, 0.9),
       tnnx.ACTIVATION_SCALE: optax.sgd(0.01),
       tnnx.BATCH_NORM: optax.sgd(0.1)},
      tnnx.param_labels(model))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  tnnx.calibrate(model, X)

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(_loss)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(3)]
  assert all(np.isfinite(losses))


# ---------------------------------------------------------------------------
# param_labels


def test_param_labels_route_groups_in_nnx_optimizer():
  model = TinyNet(nnx.Rngs(6))
  labels = tnnx.param_labels(model)
  assert labels["conv2"]["kernel"] == "quantized" and labels["head"]["kernel"] == "quantized"
  assert labels["conv2"]["act_scale"] == "activation_scale"
  assert labels["head"]["act_scale"] == "activation_scale"
  assert labels["bn1"]["scale"] == "batch_norm" and labels["bn2"]["bias"] == "batch_norm"
  assert labels["conv1"]["kernel"] == "full_precision"
  assert labels["head"]["bias"] == "full_precision"
  rates = {"quantized": 1.0, "full_precision": 2.0, "activation_scale": 3.0, "batch_norm": 4.0}
  tx = optax.partition({k: optax.sgd(v) for k, v in rates.items()}, labels)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  grads = _grads(model)  # also calibrates, so act_scale gets a gradient
  updates = optimizer.update(model, grads)
  flat_updates = dict(nnx.to_flat_state(updates))
  for path, label in nnx.to_flat_state(labels):
    g = _np(dict(nnx.to_flat_state(grads))[path])
    np.testing.assert_allclose(_np(flat_updates[path]), -rates[label] * g, rtol=1e-6)


# ---------------------------------------------------------------------------
# Models


def test_option_a_shortcut():
  x = jnp.arange(2 * 4 * 4 * 2, dtype=jnp.float32).reshape(2, 4, 4, 2)
  y = models_lib._shortcut_a(x, 6, 2)
  assert y.shape == (2, 2, 2, 6)
  np.testing.assert_array_equal(y[..., 2:4], np.asarray(x)[:, ::2, ::2, :])
  np.testing.assert_array_equal(y[..., :2], 0.0)
  np.testing.assert_array_equal(y[..., 4:], 0.0)
  np.testing.assert_array_equal(models_lib._shortcut_a(x, 2, 1), x)


@pytest.fixture(scope="module")
def resnet():
  return tnnx.ResNet20(weight_bits=2, act_bits=2, num_classes=10, rngs=nnx.Rngs(0))


def test_resnet20_structure_labels_and_levels(resnet):
  layers = tnnx.quantized_layers(resnet)
  assert len(layers) == 18
  widths = sorted({layer.out_features for _, layer in layers})
  assert widths == [16, 32, 64]
  assert resnet.conv1.weight_bits is None and not resnet.conv1.is_quantized
  labels = [label for _, label in nnx.to_flat_state(tnnx.param_labels(resnet))]
  assert labels.count("quantized") == 18 and labels.count("activation_scale") == 18
  assert labels.count("batch_norm") == 2 * 19
  assert labels.count("full_precision") == 3  # first conv kernel, linear kernel + bias
  n_params = sum(
      np.size(v) for path, v in nnx.to_flat_state(nnx.as_pure(nnx.state(resnet, nnx.Param)))
      if path[-1] != "act_scale")
  assert 269_000 < n_params < 273_000  # ResNet-20 has 0.27M parameters

  levels_fn = tnnx.levels_fn_for(resnet)
  for state in (nnx.state(resnet, nnx.Param), nnx.as_pure(nnx.state(resnet, nnx.Param))):
    flat = dict(nnx.to_flat_state(levels_fn(state)))
    quantized = [p for p, v in flat.items() if v is not None]
    assert len(quantized) == 18 and all(p[-1] == "kernel" for p in quantized)
    for path in quantized:
      assert flat[path].dtype == jnp.int8
      assert set(np.unique(flat[path])) <= {-2, -1, 0, 1}
    assert flat[("conv1", "kernel")] is None and flat[("linear", "kernel")] is None


def test_resnet20_calibrate_and_jitted_train_step(resnet):
  x = _relu_batch(8, (2, 8, 8, 3))
  stats = nnx.as_pure(nnx.state(resnet, nnx.BatchStat))
  resnet.eval()
  tnnx.calibrate(resnet, x)
  assert resnet.blocks[0].bn1.use_running_average  # mode restored
  for path, v in nnx.to_flat_state(nnx.as_pure(nnx.state(resnet, nnx.BatchStat))):
    np.testing.assert_array_equal(v, dict(nnx.to_flat_state(stats))[path])
  block = resnet.blocks[4]
  np.testing.assert_allclose(float(block.conv2.weight_scale[...]),
                             3 * float(np.std(_np(block.conv2.kernel))), rtol=1e-5)
  # The first quantized conv sees relu(bn1(conv1(x))) with batch statistics.
  c = np.asarray(resnet.conv1(x))  # bn1 still has unit scale and zero bias
  h = np.maximum((c - c.mean(axis=(0, 1, 2))) / np.sqrt(c.var(axis=(0, 1, 2)) + 1e-5), 0.0)
  np.testing.assert_allclose(float(resnet.blocks[0].conv1.act_scale[...]),
                             _np_act_scale(h), rtol=1e-4)

  resnet.train()
  optimizer = nnx.Optimizer(resnet, _recording_tx(tnnx.levels_fn_for(resnet)), wrt=nnx.Param)
  y = jnp.array([1, 2])

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(
        lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean())(model)
    optimizer.update(model, grads)
    return loss

  kernels = {path: _np(layer.kernel) for path, layer in tnnx.quantized_layers(resnet)}
  s = float(block.conv2.weight_scale[...])
  assert np.isfinite(float(step(resnet, optimizer)))
  np.testing.assert_array_equal(
      _np(optimizer.opt_state["blocks"][4]["conv2"]["kernel"]),
      _np_levels(kernels[("blocks", 4, "conv2")], s, 2))
  assert float(block.conv2.weight_scale[...]) == s
  # The STE passes a gradient to every quantized kernel, so SGD moves each.
  for path, layer in tnnx.quantized_layers(resnet):
    assert not np.array_equal(_np(layer.kernel), kernels[path]), path


def test_full_precision_to_qat_handover():
  fp = tnnx.SmallCNN(weight_bits=None, act_bits=None, width=2, rngs=nnx.Rngs(10))
  fp_types = {type(v) for _, v in nnx.to_flat_state(nnx.state(fp))}
  assert not fp_types & {tnnx.WeightScale, tnnx.ActivationScale, tnnx.Calibrated}
  x = _relu_batch(11, (4, 8, 8, 1))
  fp.bn2.mean[...] = jnp.full((4,), 0.25)  # as if trained; must be copied too
  qat = tnnx.SmallCNN(weight_bits=2, act_bits=2, width=2, rngs=nnx.Rngs(99))
  # Levels for the SmallCNN: int8 for the two quantized convs only.
  levels = tnnx.levels_fn_for(qat)(nnx.state(qat, nnx.Param))
  assert [p for p, v in nnx.to_flat_state(levels) if v is not None] == [
      ("conv2", "kernel"), ("conv3", "kernel")]
  qat.conv2.calibrated[...] = jnp.array(True)  # calibrated on its own weights
  tnnx.load_full_precision(qat, fp)
  assert not bool(qat.conv2.calibrated[...])
  for name in ("conv1", "conv2", "conv3", "linear"):
    np.testing.assert_array_equal(_np(getattr(qat, name).kernel), _np(getattr(fp, name).kernel))
  np.testing.assert_array_equal(_np(qat.bn2.mean), 0.25)
  tnnx.calibrate(qat, x)
  np.testing.assert_allclose(float(qat.conv3.weight_scale[...]),
                             3 * float(np.std(_np(fp.conv3.kernel))), rtol=1e-5)
  np.testing.assert_array_equal(_np(qat.bn2.mean), 0.25)  # calibrate keeps BN stats

  bad = nnx.state(nnx.clone(fp))
  bad["conv2"]["kernel"] = nnx.Param(jnp.zeros((3, 3, 2, 5)))
  with pytest.raises(ValueError, match="shape mismatch at 'conv2/kernel'"):
    tnnx.load_full_precision(qat, bad)
  with pytest.raises(ValueError, match="source must be"):
    tnnx.load_full_precision(qat, {"conv1": 1})
  with pytest.raises(ValueError, match="nothing to copy|no nnx.Param"):
    tnnx.load_full_precision(qat, nnx.as_pure(nnx.state(fp)))
