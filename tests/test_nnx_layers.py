"""QuantConv and QuantLinear: parity with Flax's layers, quantized values, calibration.

References are Flax's own ``nnx.Conv`` / ``nnx.Linear`` and NumPy by hand.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import _nnx_testing as T
from talr_optax import nnx as tnnx
from talr_optax import quantizers

# (in_features, out_features, input shape, nnx.Conv keyword arguments)
CONV_CASES = {
    "stride 2 same": (4, 6, (2, 7, 7, 4), dict(kernel_size=(3, 3), strides=2)),
    "valid dilated": (4, 6, (2, 8, 8, 4), dict(kernel_size=(3, 3), padding="VALID",
                                               kernel_dilation=2)),
    "pairs input dilation": (3, 5, (2, 5, 6, 3), dict(
        kernel_size=(2, 3), strides=(1, 2), padding=((1, 0), (2, 1)), input_dilation=(2, 1))),
    "groups": (4, 6, (2, 6, 6, 4), dict(kernel_size=(3, 3), feature_group_count=2)),
    "depthwise x2": (4, 8, (2, 6, 6, 4), dict(kernel_size=(3, 3), feature_group_count=4,
                                              use_bias=True)),
    "circular bias": (3, 4, (2, 5, 5, 3), dict(kernel_size=(3, 3), padding="CIRCULAR",
                                               use_bias=True)),
    "1-D int kernel": (3, 4, (2, 9, 3), dict(kernel_size=3, strides=2, padding="CAUSAL")),
    "two batch axes": (3, 4, (2, 3, 5, 5, 3), dict(kernel_size=(3, 3))),
    "mask": (2, 3, (2, 5, 5, 2), dict(
        kernel_size=(3, 3), use_bias=False,
        mask=jnp.asarray(np.tril(np.ones((3, 3, 2, 3))), jnp.float32))),
}


# One compiled program per layer structure instead of one compilation per op.
_apply = nnx.jit(lambda layer, x: layer(x))
# Gradients of sum(layer(x)) with respect to the layer's params and to x.
_grads = nnx.jit(nnx.grad(lambda layer, x: jnp.sum(layer(x)), argnums=(0, 1)))


def _conv_pair(case, weight_bits, act_bits):
  """A QuantConv and an nnx.Conv built with the same arguments and weights."""
  in_features, out_features, shape, kwargs = CONV_CASES[case]
  kwargs = dict(kwargs, kernel_init=T.np_init(0), bias_init=T.np_init(1), rngs=nnx.Rngs(0))
  quant = tnnx.QuantConv(in_features, out_features, weight_bits=weight_bits, act_bits=act_bits,
                         multiply_scale=False, **kwargs)
  flax = nnx.Conv(in_features, out_features, **kwargs)
  return quant, flax, T.abs_normal(2, shape)


@pytest.mark.parametrize("case", tuple(CONV_CASES))
def test_full_precision_conv_is_flax_conv(case):
  quant, flax, x = _conv_pair(case, None, None)
  assert jax.tree.map(jnp.shape, nnx.state(quant)) == jax.tree.map(jnp.shape, nnx.state(flax))
  np.testing.assert_array_equal(quant.kernel[...], flax.kernel[...])
  np.testing.assert_array_equal(_apply(quant, x), _apply(flax, x))


@pytest.mark.parametrize("case", tuple(CONV_CASES))
def test_quantized_conv_is_flax_conv_on_quantized_input_and_kernel(case):
  quant, flax, x = _conv_pair(case, 2, 2)
  y = _apply(quant, x)  # training mode: calibrates from x and the kernel
  w = T.np_value(quant.kernel)
  s_w, s_a = T.np_weight_scale(w), T.np_act_scale(x)
  np.testing.assert_allclose(float(quant.weight_scale[...]), s_w, rtol=1e-5)
  np.testing.assert_allclose(float(quant.act_scale[...]), s_a, rtol=1e-5)
  flax.kernel[...] = jnp.asarray(T.np_levels(w, s_w, 2) / 2.0, jnp.float32)
  ref = _apply(flax, jnp.asarray(T.np_act_quant(x, s_a, 2), jnp.float32))
  assert y.shape == ref.shape and y.dtype == ref.dtype
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(5,), (3, 5), (2, 3, 5)], ids=["no batch", "1", "2"])
def test_full_precision_linear_is_flax_linear(shape):
  kwargs = dict(use_bias=True, kernel_init=T.np_init(0), bias_init=T.np_init(1),
                precision=jax.lax.Precision.HIGHEST)
  quant = tnnx.QuantLinear(5, 4, weight_bits=None, act_bits=None, rngs=nnx.Rngs(0), **kwargs)
  flax = nnx.Linear(5, 4, rngs=nnx.Rngs(0), **kwargs)
  x = T.normal(2, shape)
  np.testing.assert_array_equal(quant(x), flax(x))
  assert set(nnx.state(quant).keys()) == {"kernel", "bias"}


def test_quantized_linear_multiply_scale_over_batch_axes():
  layer = T.quant_linear(5, 3, weight_bits=3, act_bits=4, multiply_scale=True, use_bias=True)
  layer.bias[...] = jnp.asarray([0.5, -1.0, 2.0])
  x = T.abs_normal(3, (2, 4, 5))
  y = _apply(layer, x)
  w = T.np_value(layer.kernel)
  s_w, s_a = T.np_weight_scale(w), T.np_act_scale(x)
  # Multiplied back by the step sizes: x_q ~ x and w_q ~ w.
  x_q = T.np_act_quant(x, s_a, 4) * s_a
  w_q = T.np_levels(w, s_w, 3) / 4.0 * s_w
  assert y.shape == (2, 4, 3)
  np.testing.assert_allclose(y, x_q @ w_q + np.array([0.5, -1.0, 2.0]), rtol=1e-5, atol=1e-6)


def test_full_precision_layer_has_no_quantizer_state():
  layer = tnnx.QuantConv(2, 3, (3, 3), weight_bits=None, act_bits=None,
                         kernel_init=T.ZEROS, bias_init=T.ZEROS, rngs=nnx.Rngs(0))
  assert set(nnx.state(layer).keys()) == {"kernel", "bias"}
  assert not layer.is_quantized and tnnx.quantized_layers(layer) == []


def test_first_training_forward_freezes_weight_scale_and_levels():
  layer = T.quant_linear(6, 5, weight_bits=2, act_bits=None, use_bias=False)
  w0 = T.np_value(layer.kernel)
  # Placeholder until calibrated: a usable step size, so a forward stays finite.
  assert not bool(layer.calibrated[...]) and float(layer.weight_scale[...]) == 1.0
  _apply(layer, np.ones((1, 6), np.float32))
  s = T.np_weight_scale(w0)
  assert bool(layer.calibrated[...])
  np.testing.assert_allclose(float(layer.weight_scale[...]), s, rtol=1e-6)
  np.testing.assert_array_equal(layer.levels(), T.np_levels(w0, s, 2))
  # Frozen: moving the kernel neither moves the scale nor is it recomputed.
  layer.kernel[...] = layer.kernel[...] * 3.0 + 0.1
  x = jnp.arange(6.0)[None]
  y = _apply(layer, x)
  np.testing.assert_allclose(float(layer.weight_scale[...]), s, rtol=1e-6)
  levels = T.np_levels(T.np_value(layer.kernel), s, 2)
  np.testing.assert_array_equal(layer.levels(), levels)
  # Forward value: x @ (w_d / gamma), no multiplication by s.
  np.testing.assert_allclose(y, np.asarray(x) @ (levels / 2.0), rtol=1e-6)


def test_eval_forward_does_not_calibrate():
  layer = T.quant_linear(6, 5, weight_bits=2, act_bits=2)
  layer.eval()
  assert layer.deterministic
  _apply(layer, np.ones((1, 6), np.float32))
  assert not bool(layer.calibrated[...])
  assert float(layer.weight_scale[...]) == 1.0 and float(layer.act_scale[...]) == 1.0
  layer.train()
  _apply(layer, T.relu_batch(0, (3, 6)))
  assert bool(layer.calibrated[...])


def test_activation_scale_init_is_formula_on_first_batch():
  layer = tnnx.QuantConv(2, 3, (3, 3), weight_bits=4, act_bits=2, multiply_scale=False,
                         kernel_init=T.np_init(0), bias_init=T.ZEROS, rngs=nnx.Rngs(0))
  x1 = T.relu_batch(3, (2, 4, 4, 2))
  _apply(layer, x1)
  expected = T.np_act_scale(x1)
  np.testing.assert_allclose(float(layer.act_scale[...]), expected, rtol=1e-5)
  # A second batch with another spread leaves it alone (only the optimizer moves it).
  _apply(layer, 3.0 * x1)
  np.testing.assert_allclose(float(layer.act_scale[...]), expected, rtol=1e-5)
  assert isinstance(nnx.state(layer, nnx.Param)["act_scale"], tnnx.ActivationScale)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_weight_ste_gradient_is_one_over_s_inside_zero_outside(bits):
  k = np.random.default_rng(bits).normal(0.0, 0.3, 40)
  k[:2] = [-3.5, 3.5]  # beyond s = 3 std(k) ~ 2.5 on both sides
  layer = T.quant_linear(40, 1, weight_bits=bits, act_bits=None, use_bias=False)
  layer.kernel[...] = jnp.asarray(k[:, None], jnp.float32)
  s = 3.0 * float(np.std(k.astype(np.float32)))
  half = 2 ** (bits - 1)
  # Clip range of w: [-s, s * (half - 1) / half] ([-s, s/2] for 2 bits);
  # [-s, s] for binary weights.
  hi = 1.0 if bits == 1 else (half - 1) / half
  inside = (k / s > -1.0) & (k / s < hi)
  assert 0 < inside.sum() < 40
  expected = np.where(inside, 1.0 / s, 0.0)[:, None]
  x = np.ones((1, 40), np.float32)
  # The calibrating forward: the fresh scale is a constant for the gradient.
  np.testing.assert_allclose(_grads(layer, x)[0]["kernel"][...], expected, rtol=1e-5)
  assert bool(layer.calibrated[...])
  np.testing.assert_allclose(float(layer.weight_scale[...]), s, rtol=1e-6)
  layer.eval()
  np.testing.assert_allclose(_grads(layer, x)[0]["kernel"][...], expected, rtol=1e-5)


def _ones_linear(in_features, act_bits):
  return tnnx.QuantLinear(in_features, 1, weight_bits=None, act_bits=act_bits,
                          multiply_scale=False, use_bias=False, kernel_init=T.ONES,
                          rngs=nnx.Rngs(0))


def test_activation_ste_gradients():
  layer = _ones_linear(5, 2)
  s = 0.8
  layer.act_scale[...] = jnp.asarray(s)
  layer.calibrated[...] = True
  layer.eval()
  # 2-bit activations: round(clip(4 x / s, 0, 3)) / 4; inside is 0 < x < 3 s / 4.
  # u = 5 x = -1, 0.5, 1.75, 2.75, 4.5 -> levels 0, 0 (half to even), 2, 3, 3.
  x = jnp.asarray([[-0.2, 0.1, 0.35, 0.55, 0.9]])
  np.testing.assert_allclose(_apply(layer, x), [[(0 + 0 + 2 + 3 + 3) / 4.0]], rtol=1e-6)
  grads, gx = _grads(layer, x)
  inside = np.array([0.0, 1.0, 1.0, 1.0, 0.0])
  np.testing.assert_allclose(gx, inside[None] / s, rtol=1e-6)
  # Scale gradient: d/ds (4 x / s) / 4 = -x / s^2 inside, 0 when clipped (no LSQ factor).
  np.testing.assert_allclose(grads["act_scale"][...], -np.sum(np.asarray(x)[0] * inside) / s**2,
                             rtol=1e-6)


def test_activation_scale_gets_gradient_on_the_calibrating_forward():
  # As if the scale had been set before the first step (the reference sets it
  # inside the forward, then uses it): d/ds = -sum(x inside) / s^2.
  layer = _ones_linear(16, 2)
  x = jnp.asarray([[0.0, 0.1, 0.2, 0.4] + [0.05] * 11 + [3.0]])
  grads, _ = _grads(layer, x)
  s = T.np_act_scale(np.asarray(x))
  np.testing.assert_allclose(float(layer.act_scale[...]), s, rtol=1e-6)
  u = 4.0 * np.asarray(x)[0] / s
  inside = (u > 0) & (u < 3)
  assert inside.sum() == 14 and u[-1] > 3  # 0 sits on the edge, 3.0 is clipped
  np.testing.assert_allclose(float(grads["act_scale"][...]),
                             -np.sum(np.asarray(x)[0] * inside) / s**2, rtol=1e-5)


def test_binary_activation_levels_are_zero_one():
  layer = _ones_linear(5, 1)
  layer.eval()
  layer.act_scale[...] = jnp.asarray(1.0)
  layer.calibrated[...] = True
  # round(clip(2 x, 0, 1)) in {0, 1}; the value is level / 2.
  np.testing.assert_allclose(
      _apply(layer, jnp.asarray([[0.1, 0.3, 2.0, -1.0, 0.2]])), [[0.5 * (0 + 1 + 1 + 0 + 0)]])


def test_bfloat16_layer_calibrates_and_quantizes_like_float32():
  """param_dtype=bfloat16: a bf16 step size is accepted, levels are those of float32."""
  layer = tnnx.QuantLinear(64, 8, weight_bits=8, act_bits=8, multiply_scale=False,
                           param_dtype=jnp.bfloat16, kernel_init=T.np_init(0, 0.1),
                           bias_init=T.ZEROS, rngs=nnx.Rngs(0))
  x = T.relu_batch(3, (4, 64)).astype(jnp.bfloat16)

  @nnx.jit
  def forward_and_grad(m):  # the first training forward calibrates
    _, grads = nnx.value_and_grad(lambda m: jnp.sum(m(x).astype(jnp.float32)))(m)
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


# ---------------------------------------------------------------------------
# A first training batch that defines no step size (no calibrate call)


@pytest.mark.parametrize("first", ["all zero", "empty"])
def test_batch_without_spread_does_not_calibrate_under_jit(first):
  conv = tnnx.QuantConv(2, 3, (3, 3), weight_bits=2, act_bits=2, multiply_scale=False,
                        kernel_init=T.np_init(0), bias_init=T.ZEROS, rngs=nnx.Rngs(0))
  batch = jnp.asarray(np.zeros((4 if first == "all zero" else 0, 5, 5, 2)), jnp.float32)
  y = _apply(conv, batch)
  assert y.shape == (batch.shape[0], 5, 5, 3)
  # Stays uncalibrated with its finite placeholders; an all-zero input is level 0.
  np.testing.assert_array_equal(y, 0.0)
  assert not bool(conv.calibrated[...])
  assert float(conv.act_scale[...]) == 1.0 and float(conv.weight_scale[...]) == 1.0
  # The next batch with a spread calibrates, by the formula.
  x = T.relu_batch(5, (4, 5, 5, 2))
  y = _apply(conv, x)
  assert bool(conv.calibrated[...]) and bool(jnp.all(jnp.isfinite(y)))
  np.testing.assert_allclose(float(conv.act_scale[...]), T.np_act_scale(x), rtol=1e-5)
  np.testing.assert_allclose(float(conv.weight_scale[...]),
                             T.np_weight_scale(T.np_value(conv.kernel)), rtol=1e-5)


def test_all_zero_kernel_does_not_calibrate():
  layer = tnnx.QuantLinear(4, 2, weight_bits=2, act_bits=None, multiply_scale=False,
                           kernel_init=T.ZEROS, bias_init=T.ZEROS, rngs=nnx.Rngs(0))
  y = _apply(layer, np.ones((3, 4), np.float32))
  np.testing.assert_array_equal(y, 0.0)
  assert not bool(layer.calibrated[...]) and float(layer.weight_scale[...]) == 1.0
  np.testing.assert_array_equal(layer.levels(), 0)


def test_weight_scale_not_param_and_untouched_by_optimizer():
  model = T.TinyNet(0)
  grads = T.tiny_grads(model)  # the first training forward freezes the scales
  params = nnx.state(model, nnx.Param)
  assert "weight_scale" not in params["conv2"] and "calibrated" not in params["conv2"]
  assert "act_scale" in params["conv2"]
  assert isinstance(model.conv2.weight_scale, tnnx.WeightScale)
  assert not isinstance(model.conv2.weight_scale, nnx.Param)
  s2, s_head = float(model.conv2.weight_scale[...]), float(model.head.weight_scale[...])
  k2 = T.np_value(model.conv2.kernel)
  # Weight decay would shrink the scale too if the optimizer saw it.
  optimizer = nnx.Optimizer(
      model, optax.chain(optax.add_decayed_weights(0.5), optax.sgd(0.1)), wrt=nnx.Param)
  optimizer.update(model, grads)
  assert float(model.conv2.weight_scale[...]) == s2
  assert float(model.head.weight_scale[...]) == s_head
  np.testing.assert_allclose(
      T.np_value(model.conv2.kernel),
      k2 - 0.1 * (T.np_value(grads["conv2"]["kernel"]) + 0.5 * k2), rtol=1e-5)
