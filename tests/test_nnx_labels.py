"""levels_fn_for, param_labels and layer_axes_for, on plain and stacked (scanned) layers."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import _nnx_testing as T
import talr_optax
from talr_optax import nnx as tnnx


def _recording_tx(levels_fn, lr=0.1):
  """SGD whose state is the last levels, computed by levels_fn in init and update."""

  def init(params):
    return levels_fn(params)

  def update(updates, state, params=None):
    del state
    return jax.tree.map(lambda g: -lr * g, updates), levels_fn(params)

  return optax.GradientTransformation(init, update)


def _state_levels(optimizer, name):
  return T.np_value(optimizer.opt_state[name]["kernel"])


def test_levels_fn_for_all_state_forms_before_and_after_calibration():
  model = T.TinyNet(1)
  levels_fn = tnnx.levels_fn_for(model)
  boxed = nnx.state(model, nnx.Param)
  # Before the first forward: the scale that forward will freeze, 3 std(w).
  fresh = {name: T.np_weight_scale(T.np_value(getattr(model, name).kernel))
           for name in ("conv2", "head")}
  for state in (boxed, nnx.as_pure(boxed), nnx.to_pure_dict(boxed)):
    levels = levels_fn(state)
    for name, bits in (("conv2", 2), ("head", 3)):
      got = levels[name]["kernel"]
      assert got.dtype == jnp.int8
      np.testing.assert_array_equal(
          got, T.np_levels(T.np_value(getattr(model, name).kernel), fresh[name], bits))
    assert levels["conv1"]["kernel"] is None and levels["head"]["bias"] is None
    assert levels["conv2"]["act_scale"] is None and levels["bn2"]["scale"] is None

  T.tiny_grads(model)  # the first training forward freezes the scales
  frozen = float(model.conv2.weight_scale[...])
  model.conv2.kernel[...] = model.conv2.kernel[...] * 2.0
  levels = levels_fn(nnx.as_pure(nnx.state(model, nnx.Param)))
  kernel = T.np_value(model.conv2.kernel)
  np.testing.assert_array_equal(levels["conv2"]["kernel"], T.np_levels(kernel, frozen, 2))
  assert not np.array_equal(  # the frozen scale, not a fresh 3 std(w)
      levels["conv2"]["kernel"], T.np_levels(kernel, T.np_weight_scale(kernel), 2))


def test_levels_fn_for_masked_nodes_and_traced_model():
  model = T.TinyNet(2)
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
  model.conv2.calibrated[...] = True
  np.testing.assert_array_equal(
      traced_levels(model)["conv2"]["kernel"],
      T.np_levels(T.np_value(model.conv2.kernel), 1e-3, 2))


def test_levels_fn_inside_nnx_optimizer_eager_and_jit():
  model = T.TinyNet(3)
  optimizer = nnx.Optimizer(model, _recording_tx(tnnx.levels_fn_for(model)), wrt=nnx.Param)
  # init saw Variable-boxed params and an uncalibrated model.
  k0 = T.np_value(model.conv2.kernel)
  s2 = T.np_weight_scale(k0)
  np.testing.assert_array_equal(_state_levels(optimizer, "conv2"), T.np_levels(k0, s2, 2))
  assert optimizer.opt_state["conv1"]["kernel"] is None

  optimizer.update(model, T.tiny_grads(model))  # eager update; the forward froze the scales
  np.testing.assert_allclose(float(model.conv2.weight_scale[...]), s2, rtol=1e-6)
  s2 = float(model.conv2.weight_scale[...])
  np.testing.assert_array_equal(_state_levels(optimizer, "conv2"), T.np_levels(k0, s2, 2))

  @nnx.jit
  def step(model, optimizer):
    optimizer.update(model, nnx.grad(T.tiny_loss)(model))

  for _ in range(2):
    k, kh = T.np_value(model.conv2.kernel), T.np_value(model.head.kernel)
    step(model, optimizer)
    # update saw the pre-update params as plain arrays.
    np.testing.assert_array_equal(_state_levels(optimizer, "conv2"), T.np_levels(k, s2, 2))
    np.testing.assert_array_equal(
        _state_levels(optimizer, "head"),
        T.np_levels(kh, float(model.head.weight_scale[...]), 3))
    assert not np.array_equal(T.np_value(model.conv2.kernel), k)
  assert float(model.conv2.weight_scale[...]) == s2


def test_levels_fn_under_jit_requires_calibration_first():
  model = T.TinyNet(4)
  optimizer = nnx.Optimizer(model, _recording_tx(tnnx.levels_fn_for(model)), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    optimizer.update(model, nnx.grad(T.tiny_loss)(model))

  with pytest.raises(RuntimeError, match="conv2/kernel.*calibrate"):
    step(model, optimizer)
  tnnx.calibrate(model, T.X)
  s2 = float(model.conv2.weight_scale[...])
  k = T.np_value(model.conv2.kernel)
  step(model, optimizer)
  np.testing.assert_array_equal(_state_levels(optimizer, "conv2"), T.np_levels(k, s2, 2))


def test_param_labels_route_groups_in_nnx_optimizer():
  model = T.TinyNet(6)
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
  grads = T.tiny_grads(model)  # also calibrates, so act_scale gets a gradient
  updates = optimizer.update(model, grads)
  flat_updates = dict(nnx.to_flat_state(updates))
  flat_grads = dict(nnx.to_flat_state(grads))
  for path, label in nnx.to_flat_state(labels):
    np.testing.assert_allclose(T.np_value(flat_updates[path]),
                               -rates[label] * T.np_value(flat_grads[path]), rtol=1e-6)
  # No stacked layer: no layer axis anywhere.
  assert all(a is None for _, a in nnx.to_flat_state(tnnx.layer_axes_for(model)))


def test_levels_fn_with_talr_optimizer_and_partition():
  model = T.TinyNet(5)
  tx = optax.partition(
      {tnnx.QUANTIZED: talr_optax.sgdt(0.1, 5e-3, tnnx.levels_fn_for(model)),
       tnnx.FULL_PRECISION: optax.sgd(0.1, 0.9),
       tnnx.ACTIVATION_SCALE: optax.sgd(0.01),
       tnnx.BATCH_NORM: optax.sgd(0.1)},
      tnnx.param_labels(model))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  tnnx.calibrate(model, T.X)

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(T.tiny_loss)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(3)]
  assert all(np.isfinite(losses))


# ---------------------------------------------------------------------------
# Stacked layers: created under nnx.vmap, applied with nnx.scan

L, D = 2, 6


class Block(nnx.Module):
  """A W2A4 linear layer without normalization (multiply_scale=True), then ReLU."""

  def __init__(self, rngs: nnx.Rngs):
    self.mlp = tnnx.QuantLinear(D, D, weight_bits=2, act_bits=4, multiply_scale=True,
                                kernel_init=T.ZEROS, bias_init=T.ZEROS, rngs=rngs)

  def __call__(self, x):
    return nnx.relu(self.mlp(x))


class Stacked(nnx.Module):
  """L Blocks as one module with (L, ...) variables, run with nnx.scan."""

  def __init__(self, rngs: nnx.Rngs):
    @nnx.split_rngs(splits=L)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return Block(rngs)

    self.blocks = make(rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def forward(x, block):
      return block(x)

    return forward(x, self.blocks)


class Unrolled(nnx.Module):
  """The same L Blocks as separate modules."""

  def __init__(self, stacked: Stacked):
    self.blocks = nnx.List([Block(nnx.Rngs(1)) for _ in range(L)])
    for i, block in enumerate(self.blocks):
      block.mlp.kernel[...] = stacked.blocks.mlp.kernel[i]
      block.mlp.bias[...] = stacked.blocks.mlp.bias[i]

  def __call__(self, x):
    for block in self.blocks:
      x = block(x)
    return x


@pytest.fixture
def stacked_pair():
  stacked = Stacked(nnx.Rngs(0))
  T.set_kernel(stacked.blocks.mlp)
  stacked.blocks.mlp.bias[...] = jnp.asarray([[0.0], [0.1]]) * jnp.ones((L, D))
  return stacked, Unrolled(stacked)


X_SEQ = jnp.abs(T.normal(11, (4, 3, D)))  # two batch axes
_forward = nnx.jit(lambda model, x: model(x))


def _levels(model):
  return tnnx.levels_fn_for(model)(nnx.state(model, nnx.Param))


def test_scanned_stack_matches_unrolled_layers(stacked_pair):
  stacked, unrolled = stacked_pair
  mlp = stacked.blocks.mlp
  assert mlp.kernel.shape == (L, D, D) and mlp.stack_shape == (L,)
  assert mlp.weight_scale.shape == mlp.act_scale.shape == mlp.calibrated.shape == (L,)
  # The first (training) forward calibrates every layer on its own input.
  np.testing.assert_array_equal(_forward(stacked, X_SEQ), _forward(unrolled, X_SEQ))
  assert bool(jnp.all(mlp.calibrated[...]))
  for i, block in enumerate(unrolled.blocks):
    assert float(mlp.weight_scale[i]) == float(block.mlp.weight_scale[...])
    assert float(mlp.act_scale[i]) == float(block.mlp.act_scale[...])
  np.testing.assert_allclose(float(mlp.weight_scale[1]),
                             T.np_weight_scale(T.np_value(mlp.kernel)[1]), rtol=1e-5)
  assert float(mlp.weight_scale[0]) != float(mlp.weight_scale[1])
  # Frozen scales: a second batch gives the same outputs in both forms too.
  x2 = 2.0 * X_SEQ
  np.testing.assert_array_equal(_forward(stacked, x2), _forward(unrolled, x2))

  levels = _levels(stacked)["blocks"]["mlp"]["kernel"]
  assert levels.shape == (L, D, D) and levels.dtype == jnp.int8
  unrolled_levels = _levels(unrolled)
  for i in range(L):
    np.testing.assert_array_equal(levels[i], unrolled_levels["blocks"][i]["mlp"]["kernel"])
    np.testing.assert_array_equal(
        levels[i], T.np_levels(T.np_value(mlp.kernel)[i], float(mlp.weight_scale[i]), 2))


def test_stacked_levels_before_calibration_use_each_layers_own_std(stacked_pair):
  stacked, unrolled = stacked_pair
  levels = _levels(stacked)["blocks"]["mlp"]["kernel"]
  kernel = T.np_value(stacked.blocks.mlp.kernel)
  for i in range(L):
    expected = T.np_levels(kernel[i], T.np_weight_scale(kernel[i]), 2)
    np.testing.assert_array_equal(levels[i], expected)
  np.testing.assert_array_equal(levels[1], _levels(unrolled)["blocks"][1]["mlp"]["kernel"])


def test_stacked_labels_and_layer_axes(stacked_pair):
  stacked, _ = stacked_pair
  labels = tnnx.param_labels(stacked)["blocks"]["mlp"]
  assert dict(labels) == {"kernel": "quantized", "act_scale": "activation_scale",
                          "bias": "full_precision"}
  axes = tnnx.layer_axes_for(stacked)
  assert dict(axes["blocks"]["mlp"]) == {"kernel": 0, "act_scale": None, "bias": None}
  # A prefix of both state forms, like the labels.
  params = nnx.state(stacked, nnx.Param)
  for form in (params, nnx.as_pure(params)):
    pairs = jax.tree.map(lambda a, p: (a, p.shape), axes, form,
                         is_leaf=lambda x: x is None or isinstance(x, int))
    assert pairs["blocks"]["mlp"]["kernel"] == (0, (L, D, D))


def test_stacked_conv_is_recognised():
  @nnx.split_rngs(splits=3)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def make(rngs):
    return tnnx.QuantConv(2, 4, (3, 3), weight_bits=4, act_bits=None, multiply_scale=False,
                          kernel_init=T.ZEROS, rngs=rngs)

  conv = T.set_kernel(make(nnx.Rngs(0)))
  assert conv.stack_shape == (3,) and conv.kernel_ndim == 4
  assert tnnx.layer_axes_for(conv)["kernel"] == 0
  levels = tnnx.levels_fn_for(conv)(nnx.state(conv, nnx.Param))["kernel"]
  kernel = T.np_value(conv.kernel)
  assert levels.shape == (3, 3, 3, 2, 4)
  for i in range(3):
    expected = T.np_levels(kernel[i], T.np_weight_scale(kernel[i]), 4)
    np.testing.assert_array_equal(levels[i], expected)


def test_stacked_calibrate_reset_and_optimizer_state_forms(stacked_pair):
  stacked, unrolled = stacked_pair
  tnnx.calibrate(stacked, X_SEQ)
  tnnx.calibrate(unrolled, X_SEQ)
  np.testing.assert_array_equal(
      stacked.blocks.mlp.act_scale[...],
      [float(b.mlp.act_scale[...]) for b in unrolled.blocks])
  scales = np.asarray(stacked.blocks.mlp.weight_scale[...])

  # Under optax.partition the other groups' leaves reach levels_fn as MaskedNode.
  tx = optax.partition(
      {tnnx.QUANTIZED: _recording_tx(tnnx.levels_fn_for(stacked)),
       tnnx.FULL_PRECISION: optax.sgd(0.1), tnnx.ACTIVATION_SCALE: optax.sgd(0.01)},
      tnnx.param_labels(stacked))
  optimizer = nnx.Optimizer(stacked, tx, wrt=nnx.Param)

  def levels_state():
    return optimizer.opt_state.inner_states[tnnx.QUANTIZED].inner_state["blocks"]["mlp"]

  kernel = T.np_value(stacked.blocks.mlp.kernel)
  expected = np.stack([T.np_levels(kernel[i], scales[i], 2) for i in range(L)])
  np.testing.assert_array_equal(T.np_value(levels_state()["kernel"]), expected)
  assert levels_state()["bias"] is None

  @nnx.jit
  def step(model, optimizer):
    grads = nnx.grad(lambda m: jnp.sum(m(X_SEQ) ** 2))(model)
    optimizer.update(model, grads)

  step(stacked, optimizer)
  np.testing.assert_array_equal(T.np_value(levels_state()["kernel"]), expected)
  assert not np.array_equal(T.np_value(stacked.blocks.mlp.kernel), kernel)
  np.testing.assert_array_equal(stacked.blocks.mlp.weight_scale[...], scales)

  tnnx.reset_calibration(stacked)
  np.testing.assert_array_equal(stacked.blocks.mlp.calibrated[...], [False] * L)


@pytest.mark.skipif("layer_axes" not in inspect.signature(talr_optax.sgdt).parameters,
                    reason="needs the core with layer_axes")
def test_stacked_sgdt_keeps_one_rate_per_layer(stacked_pair):
  stacked, _ = stacked_pair
  tnnx.calibrate(stacked, X_SEQ)
  tx = optax.partition(
      {tnnx.QUANTIZED: talr_optax.sgdt(0.1, 5e-3, tnnx.levels_fn_for(stacked),
                                       layer_axes=tnnx.layer_axes_for(stacked)),
       tnnx.FULL_PRECISION: optax.sgd(0.1), tnnx.ACTIVATION_SCALE: optax.sgd(0.01)},
      tnnx.param_labels(stacked))
  optimizer = nnx.Optimizer(stacked, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    grads = nnx.grad(lambda m: jnp.sum(m(X_SEQ) ** 2))(model)
    optimizer.update(model, grads)

  step(stacked, optimizer)
  names = [k for k in talr_optax.metrics(optimizer.opt_state) if k.startswith("talr/")]
  assert sorted(names) == ["talr/blocks/mlp/kernel[0]", "talr/blocks/mlp/kernel[1]"]
