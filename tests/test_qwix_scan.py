"""Tests of ``talr_optax.qwix`` with stacked layers (``nnx.vmap`` + ``nnx.scan``, ``nn.scan``)."""

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
    LAYERS, X, Y, Block, Stacked, forward_levels, params, perturb, qt, qwix_levels)

STACKED = ("blocks/q/kernel", "blocks/k/kernel", "blocks/mlp/kernel")


def _stacked(**kwargs):
  return Stacked(rngs=nnx.Rngs(0), **kwargs)


def _leaf(tree, path):
  for key in path.split("/"):
    tree = tree[key]
  return tree


@pytest.mark.parametrize(
    "rule_kwargs, channelwise, tiled",
    [
        pytest.param(dict(weight_qtype="int2"), (1,), {}, id="int2-per-channel"),
        pytest.param(dict(weight_qtype=jnp.int4, tile_size=8), (1,), {0: 8}, id="int4-tiled"),
        pytest.param(dict(weight_qtype=jnp.int8, disable_channelwise_axes=True), (), {},
                     id="int8-per-tensor"),
    ],
)
def test_stacked_levels_equal_qwix_for_every_layer(rule_kwargs, channelwise, tiled):
  rule = qwix.QtRule(module_path="blocks/.*|head", **rule_kwargs)
  qt_model = qt(_stacked(), [rule], X)
  levels_fn = tq.levels_fn_from_qwix(qt_model, X)
  assert {p: w.layer_axis for p, w in levels_fn.weights.items()} == {
      **{p: 0 for p in STACKED}, "head/kernel": None}
  # The levels follow the current weights, not those at construction.
  perturb(qt_model)

  state = params(qt_model)
  levels = jax.jit(levels_fn)(state)
  forward = forward_levels(qt_model, X)
  how = dict(qtype=rule.weight_qtype, channelwise_axes=channelwise, tiled_axes=tiled)
  for path in STACKED:
    w, got = _leaf(state, path), _leaf(levels, path)
    assert got.shape == (LAYERS, 16, 16) and got.dtype == jnp.int8
    # Eager calls (nnx.Optimizer's init) give the same levels as jitted ones.
    np.testing.assert_array_equal(_leaf(levels_fn(nnx.state(qt_model, nnx.Param)), path), got)
    for layer in range(LAYERS):
      # Qwix's own quantization of this layer's slice, compiled as in training
      # and op by op as in the eager forward pass.
      np.testing.assert_array_equal(got[layer], qwix_levels(w[layer], jit=True, **how))
      np.testing.assert_array_equal(forward[path][layer], qwix_levels(w[layer], jit=False, **how))
  np.testing.assert_array_equal(levels["head"]["kernel"],
                                qwix_levels(state["head"]["kernel"], jit=True, **how))
  assert levels["embed"]["kernel"] is None and levels["blocks"]["q"]["bias"] is None

  # The core's layer_axes: 0 for the stacked quantized kernels, None elsewhere,
  # for the boxed state nnx.Optimizer gives init and the plain one of update.
  for tree in (state, nnx.state(qt_model, nnx.Param)):
    axes = levels_fn.layer_axes(tree)
    assert {p: _leaf(axes, p) for p in STACKED} == {p: 0 for p in STACKED}
    for path in ("head/kernel", "embed/kernel", "blocks/q/bias"):
      assert _leaf(axes, path) is None


def test_recording_pass_computes_what_the_scan_computes():
  qt_model = qt(_stacked(), [qwix.QtRule(module_path="blocks/.*", weight_qtype="int2")], X)
  outputs = []
  _internals.record_quantize_calls(lambda: outputs.append(qt_model(X)))
  jitted = nnx.jit(lambda m, x: m(x))(qt_model, X)
  np.testing.assert_allclose(outputs[0], jitted, rtol=1e-5, atol=1e-5)
  assert jax.lax.scan.__name__ == "scan"


def test_layers_on_another_axis():
  qt_model = qt(_stacked(layer_axis=1), [qwix.QtRule(module_path="blocks/q", weight_qtype="int2")], X)
  levels_fn = tq.levels_fn_from_qwix(qt_model, X)
  assert levels_fn.weights["blocks/q/kernel"].layer_axis == 1
  w = qt_model.blocks.q.kernel.get_value()
  assert w.shape == (16, LAYERS, 16)
  levels = levels_fn(params(qt_model))["blocks"]["q"]["kernel"]
  for layer in range(LAYERS):
    np.testing.assert_array_equal(
        levels[:, layer], qwix_levels(w[:, layer], "int2", channelwise_axes=[1], jit=True))
  assert levels_fn.layer_axes(params(qt_model))["blocks"]["q"]["kernel"] == 1


class Repeated(nnx.Module):
  """One block applied ``LAYERS`` times by nnx.scan (its state broadcast)."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.block = Block(rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, None), out_axes=nnx.Carry, length=LAYERS)
    def body(x, block):
      return block(x)

    return body(x, self.block)


def test_layer_repeated_by_scan_is_not_stacked():
  qt_model = qt(Repeated(rngs=nnx.Rngs(0)), [qwix.QtRule(module_path="block/q", weight_qtype="int2")], X)
  levels_fn = tq.levels_fn_from_qwix(qt_model, X)
  assert {p: w.layer_axis for p, w in levels_fn.weights.items()} == {"block/q/kernel": None}
  state = params(qt_model)
  np.testing.assert_array_equal(
      levels_fn(state)["block"]["q"]["kernel"],
      qwix_levels(state["block"]["q"]["kernel"], "int2", channelwise_axes=[1], jit=True))


class LinenBlock(nn.Module):

  @nn.compact
  def __call__(self, x, _):
    return x + nn.relu(nn.Dense(16)(x)), None


class LinenStacked(nn.Module):

  @nn.compact
  def __call__(self, x):
    blocks = nn.scan(LinenBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                     length=LAYERS)
    x, _ = blocks(name="blocks")(x, None)
    return nn.Dense(10, name="head")(x)


def test_linen_nn_scan():
  rule = qwix.QtRule(module_path=".*", weight_qtype="int2")
  qt_model = qwix.quantize_model(LinenStacked(), qwix.QtProvider([rule]))
  variables = qt_model.init(jax.random.key(0), X)
  levels_fn = tq.levels_fn_from_qwix(qt_model, X, variables=variables)
  assert {p: w.layer_axis for p, w in levels_fn.weights.items()} == {
      "blocks/Dense_0/kernel": 0, "head/kernel": None}
  w = variables["params"]["blocks"]["Dense_0"]["kernel"]
  levels = jax.jit(levels_fn)(variables["params"])["blocks"]["Dense_0"]["kernel"]
  for layer in range(LAYERS):
    np.testing.assert_array_equal(
        levels[layer], qwix_levels(w[layer], "int2", channelwise_axes=[1], jit=True))
  axes = levels_fn.layer_axes(variables["params"])
  assert axes["blocks"]["Dense_0"]["kernel"] == 0 and axes["head"]["kernel"] is None


class RematStacked(nnx.Module):
  """The scan over layers under nnx.remat: its weights stay traced."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.inner = Stacked(rngs=rngs)

  def __call__(self, x):
    return nnx.remat(lambda inner, x: inner(x))(self.inner, x)


def test_scan_that_cannot_be_unrolled_raises():
  qt_model = qt(RematStacked(rngs=nnx.Rngs(0)),
                [qwix.QtRule(module_path=".*blocks/q", weight_qtype="int2")], X)
  with pytest.raises(NotImplementedError, match=r"one layer of stacked.*inner/blocks/q/kernel"):
    tq.levels_fn_from_qwix(qt_model, X)


def test_sgdt_gives_each_layer_its_own_rate():
  qt_model = qt(_stacked(), [qwix.QtRule(module_path="blocks/(q|mlp)", weight_qtype="int2")], X)
  levels_fn = tq.levels_fn_from_qwix(qt_model, X)
  tx = talr_optax.sgdt(0.5, 0.01, levels_fn, layer_axes=levels_fn.layer_axes)
  optimizer = nnx.Optimizer(qt_model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(X), Y).mean()
    optimizer.update(model, nnx.grad(loss)(model))

  before = jax.jit(levels_fn)(params(qt_model))
  step(qt_model, optimizer)
  after = jax.jit(levels_fn)(params(qt_model))
  m = talr_optax.metrics(nnx.as_pure(optimizer.opt_state))
  for path in ("blocks/q/kernel", "blocks/mlp/kernel"):
    changed = _leaf(after, path) != _leaf(before, path)
    for layer in range(LAYERS):
      assert float(m[f"transition_rate/{path}[{layer}]"]) == pytest.approx(
          float(jnp.mean(changed[layer])))
  assert not any("blocks/k/" in key for key in m)


def test_inject_hyperparams_with_the_qwix_layer_axes_names_static_args():
  qt_model = qt(_stacked(), [qwix.QtRule(module_path="blocks/(q|mlp)", weight_qtype="int2")], X)
  levels_fn = tq.levels_fn_from_qwix(qt_model, X)
  p = params(qt_model)
  make = lambda static: optax.inject_hyperparams(talr_optax.sgdt, static_args=static)(
      learning_rate=0.5, target_transition_rate=0.01, levels_fn=levels_fn,
      layer_axes=levels_fn.layer_axes)
  # inject_hyperparams calls a callable layer_axes with the step count.
  with pytest.raises(ValueError, match=r"layer_axes was called with a step count.*"
                                       r"static_args=\('layer_axes',\)"):
    make(("levels_fn",)).init(p)
  state = make(("levels_fn", "layer_axes")).init(p)
  assert f"blocks/q/kernel[{LAYERS - 1}]" in state.inner_state[-1].rate_names.names
