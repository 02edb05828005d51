"""SmallCNN, ResNet20, MobileNetV2Tiny; calibrate and load_full_precision on them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import _nnx_testing as T
from talr_optax import nnx as tnnx
from talr_optax.nnx import models as models_lib


def _n_params(model):
  return sum(np.size(v) for path, v in nnx.to_flat_state(nnx.as_pure(nnx.state(model, nnx.Param)))
             if path[-1] != "act_scale")


def _label_counts(model):
  labels = [label for _, label in nnx.to_flat_state(tnnx.param_labels(model))]
  return {label: labels.count(label) for label in tnnx.LABELS}


def _quantized_kernel_levels(model, state):
  flat = dict(nnx.to_flat_state(tnnx.levels_fn_for(model)(state)))
  return {path: v for path, v in flat.items() if v is not None}


@pytest.mark.parametrize("bad", [0, 5, 16, -2, 2.0, "2", True])
@pytest.mark.parametrize("name", ["weight_bits", "act_bits"])
@pytest.mark.parametrize("cls", [tnnx.SmallCNN, tnnx.ResNet20, tnnx.MobileNetV2Tiny])
def test_models_reject_bad_bits_naming_the_argument(cls, name, bad):
  kwargs = {"weight_bits": 2, "act_bits": 2, name: bad}
  with pytest.raises(ValueError, match=rf"{cls.__name__}: {name} must be"):
    cls(rngs=nnx.Rngs(0), **kwargs)


def test_option_a_shortcut():
  x = jnp.arange(2 * 4 * 4 * 2, dtype=jnp.float32).reshape(2, 4, 4, 2)
  y = models_lib._shortcut_a(x, 6, 2)
  assert y.shape == (2, 2, 2, 6)
  np.testing.assert_array_equal(y[..., 2:4], np.asarray(x)[:, ::2, ::2, :])
  np.testing.assert_array_equal(y[..., :2], 0.0)
  np.testing.assert_array_equal(y[..., 4:], 0.0)
  np.testing.assert_array_equal(models_lib._shortcut_a(x, 2, 1), x)


# ---------------------------------------------------------------------------
# ResNet20


def test_resnet20_structure_labels_and_levels():
  resnet = T.build(tnnx.ResNet20, weight_bits=2, act_bits=2, num_classes=10)
  layers = tnnx.quantized_layers(resnet)
  assert len(layers) == 18
  assert sorted({layer.out_features for _, layer in layers}) == [16, 32, 64]
  assert all(not layer.use_bias and not layer.multiply_scale for _, layer in layers)
  assert not isinstance(resnet.conv1, tnnx.QuantLayer)  # the stem stays full precision
  assert _label_counts(resnet) == {"quantized": 18, "activation_scale": 18,
                                   "batch_norm": 2 * 19, "full_precision": 3}
  assert 269_000 < _n_params(resnet) < 273_000  # ResNet-20 has 0.27M parameters
  levels = _quantized_kernel_levels(resnet, nnx.as_pure(nnx.state(resnet, nnx.Param)))
  assert len(levels) == 18 and all(path[-1] == "kernel" for path in levels)
  for path, v in levels.items():
    kernel = T.np_value(getattr(resnet.blocks[path[1]], path[2]).kernel)
    np.testing.assert_array_equal(v, T.np_levels(kernel, T.np_weight_scale(kernel), 2))


# ---------------------------------------------------------------------------
# MobileNetV2Tiny


def test_mobilenet_structure_quantizes_depthwise_and_pointwise_convs():
  model = T.build(tnnx.MobileNetV2Tiny, weight_bits=2, act_bits=2)
  assert 8_000 < _n_params(model) < 12_000
  layers = dict(tnnx.quantized_layers(model))
  # Block 0 (expand ratio 1): depthwise + project; blocks 1-3: expand + both; last 1x1.
  assert len(layers) == 2 + 3 * 3 + 1
  assert model.blocks[0].expand is None and not model.blocks[0].residual
  assert model.blocks[2].residual and not model.blocks[3].residual
  for i, block in enumerate(model.blocks):
    dw = block.depthwise
    channels = dw.in_features
    assert dw.feature_group_count == channels == dw.out_features
    assert dw.kernel.shape == (3, 3, 1, channels)
    assert dw.strides == (2 if i in (1, 3) else 1)
    # Inputs after a ReLU6 are quantized; a linear bottleneck input is not.
    assert dw.act_bits == 2 and block.project.act_bits == 2
    if block.expand is not None:
      assert block.expand.act_bits is None and block.expand.weight_bits == 2
  assert model.conv_last.act_bits is None and model.conv_last.weight_bits == 2
  assert _label_counts(model) == {"quantized": 12, "activation_scale": 8,
                                  "batch_norm": 2 * (1 + 2 + 3 * 3 + 1), "full_precision": 3}
  kernels = [path for path, label in nnx.to_flat_state(tnnx.param_labels(model))
             if label == "quantized"]
  assert sorted(kernels) == sorted((*path, "kernel") for path in layers)


def test_mobilenet_calibrate_and_qat_steps_reduce_the_loss():
  fp = T.build(tnnx.MobileNetV2Tiny, seed=1, weight_bits=None, act_bits=None)
  assert tnnx.quantized_layers(fp) == []
  model = T.build(tnnx.MobileNetV2Tiny, seed=2, weight_bits=2, act_bits=2)
  tnnx.load_full_precision(model, fp)
  x = T.relu_batch(3, (32, 8, 8, 1))
  y = jnp.arange(32) % 10
  tnnx.calibrate(model, x)
  for path, layer in tnnx.quantized_layers(model):
    assert bool(layer.calibrated[...]), path
    np.testing.assert_allclose(float(layer.weight_scale[...]),
                               T.np_weight_scale(T.np_value(layer.kernel)), rtol=1e-5)
  dw = model.blocks[1].depthwise
  np.testing.assert_array_equal(dw.kernel[...], fp.blocks[1].depthwise.kernel[...])
  # Calibrated, so levels_fn can be traced: one compilation for all 12 kernels.
  levels = jax.jit(tnnx.levels_fn_for(model))(nnx.as_pure(nnx.state(model, nnx.Param)))
  np.testing.assert_array_equal(
      levels["blocks"][1]["depthwise"]["kernel"],
      T.np_levels(T.np_value(dw.kernel), float(dw.weight_scale[...]), 2))
  assert levels["blocks"][1]["bn_depthwise"]["scale"] is None

  optimizer = nnx.Optimizer(model, optax.sgd(0.05, 0.9), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(
        lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean())(model)
    optimizer.update(model, grads)
    return loss

  s = float(dw.weight_scale[...])
  kernels = {path: T.np_value(layer.kernel) for path, layer in tnnx.quantized_layers(model)}
  losses = [float(step(model, optimizer)) for _ in range(15)]
  assert all(np.isfinite(losses)) and losses[-1] < losses[0]
  assert float(dw.weight_scale[...]) == s  # frozen through training
  # The STE passes a gradient to every quantized kernel, so each one moves.
  for path, layer in tnnx.quantized_layers(model):
    assert not np.array_equal(T.np_value(layer.kernel), kernels[path]), path


# ---------------------------------------------------------------------------
# full precision -> QAT


def test_full_precision_to_qat_handover():
  fp = T.build(tnnx.SmallCNN, seed=10, weight_bits=None, act_bits=None, width=2)
  fp_types = {type(v) for _, v in nnx.to_flat_state(nnx.state(fp))}
  assert not fp_types & {tnnx.WeightScale, tnnx.ActivationScale, tnnx.Calibrated}
  x = T.relu_batch(11, (4, 8, 8, 1))
  fp.bn2.mean[...] = jnp.full((4,), 0.25)  # as if trained; must be copied too
  qat = T.build(tnnx.SmallCNN, seed=99, weight_bits=2, act_bits=2, width=2)
  # Levels for the SmallCNN: int8 for the two quantized convs only.
  levels = tnnx.levels_fn_for(qat)(nnx.state(qat, nnx.Param))
  assert [p for p, v in nnx.to_flat_state(levels) if v is not None] == [
      ("conv2", "kernel"), ("conv3", "kernel")]
  qat.conv2.calibrated[...] = True  # calibrated on its own weights
  tnnx.load_full_precision(qat, fp)
  assert not bool(qat.conv2.calibrated[...])
  for name in ("conv1", "conv2", "conv3", "linear"):
    np.testing.assert_array_equal(T.np_value(getattr(qat, name).kernel),
                                  T.np_value(getattr(fp, name).kernel))
  np.testing.assert_array_equal(T.np_value(qat.bn2.mean), 0.25)
  qat.eval()
  tnnx.calibrate(qat, x)
  assert qat.conv2.deterministic and qat.bn1.use_running_average  # mode restored
  np.testing.assert_allclose(float(qat.conv3.weight_scale[...]),
                             T.np_weight_scale(T.np_value(fp.conv3.kernel)), rtol=1e-5)
  np.testing.assert_array_equal(T.np_value(qat.bn2.mean), 0.25)  # calibrate keeps BN stats
  np.testing.assert_array_equal(T.np_value(qat.bn1.mean), 0.0)
  # conv2 sees relu(bn1(conv1(x))) with batch statistics, in training mode.
  c = np.asarray(qat.conv1(x))  # bn1 has unit scale and zero bias
  h = np.maximum((c - c.mean(axis=(0, 1, 2))) / np.sqrt(c.var(axis=(0, 1, 2)) + 1e-5), 0.0)
  np.testing.assert_allclose(float(qat.conv2.act_scale[...]), T.np_act_scale(h), rtol=1e-4)

  bad = nnx.state(nnx.clone(fp))
  bad["conv2"]["kernel"] = nnx.Param(jnp.zeros((3, 3, 2, 5)))
  with pytest.raises(ValueError, match="shape mismatch at 'conv2/kernel'"):
    tnnx.load_full_precision(qat, bad)
