"""Tests of ``export_integer_model`` and ``integer_model``: the served integers are the trained model.

Each layer test computes the layer from its export alone, in integers: input
levels times weight codes accumulated in int32 (NumPy for linear layers,
``lax.conv_general_dilated`` on int32 for convs), scaled once; or float inputs
times integer codes for weight-only layers. It must equal the QAT layer's
fake-quantized forward to float tolerance.

The tolerance is the classic worst-case bound of a float32 dot product of
``K`` terms (Higham, ``gamma_n``): the QAT forward rounds each quantized
operand once (times its step size), each product, and accumulates ``K``
products, so it differs from the exact sum by at most ``(K + 3) u sum|x_q
w_q|`` with ``u = 2^-24``; the integer side is exact up to its final scaling
(two more roundings). Hence ``|y_int - y_qat| <= (K + 5) u sum|x_q w_q|``,
computed per output from the absolute values.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from talr_optax import nnx as tnnx
from talr_optax import quantizers

U = 2.0**-24
BITS = (1, 2, 3, 4, 8)


def _calibrated(layer, x):
  layer.train()
  layer(x)
  layer.eval()
  return layer


def _levels(model, path):
  tree = tnnx.levels_fn_for(model)(nnx.state(model, nnx.Param))
  for key in path:
    tree = tree[key]
  return np.asarray(tree)


def _codes(entry):
  """Integer weight codes: binary codes {0, 1} stand for -1 and +1."""
  levels = entry["kernel_levels"].astype(np.int32)
  return 2 * levels - 1 if entry["weight_bits"] == 1 else levels


def _input_levels(entry, x):
  q = quantizers.activation_range(entry["act_bits"])
  u = np.clip(q.gamma * np.asarray(x, np.float32) / entry["act_step"], q.alpha, q.beta)
  return np.round(u).astype(np.int32)


def _scale(entry):
  scale = 1.0 / entry["weight_gamma"]
  if entry["multiply_scale"]:
    scale = scale * entry["weight_step"]
  if "act_bits" in entry:
    scale = scale / entry["act_gamma"] * (entry["act_step"] if entry["multiply_scale"] else 1)
  return np.float32(scale)


def _reference(entry, x, op):
  """The layer from its export: ``op(a, q)`` in int32 (or float for weight-only), scaled."""
  q = _codes(entry)
  if "act_bits" in entry:
    acc = op(_input_levels(entry, x), q)
    assert acc.dtype == np.int32
  else:
    acc = op(np.asarray(x, np.float32), q.astype(np.float32))
  return np.asarray(acc, np.float32) * _scale(entry)


def _tolerance(layer, x, op, k):
  """``(K + 5) u sum|x_q w_q|`` per output (see the module docstring)."""
  abs_x, abs_w = jnp.abs(layer._quantize(x)[0]), jnp.abs(layer._quantize(x)[1])
  return (k + 5) * U * np.asarray(op(np.asarray(abs_x), np.asarray(abs_w))) + 1e-30


def _linear_op(a, q):
  return np.matmul(a, q)


def _conv_op(layer):
  def op(a, q):
    out = jnp.int32 if a.dtype == np.int32 else jnp.float32
    return np.asarray(jax.lax.conv_general_dilated(
        a, q, layer.strides if isinstance(layer.strides, tuple) else (layer.strides,) * 2,
        layer.padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=layer.feature_group_count, preferred_element_type=out))
  return op


def _check_layer(layer, x, op, k):
  """Export a calibrated layer; its integer forward must be its QAT forward."""
  entry = tnnx.export_integer_model(layer)["params"]
  np.testing.assert_array_equal(entry["kernel_levels"], _levels(layer, ("kernel",)))
  assert entry["kernel_levels"].dtype == np.int8
  assert entry["weight_bits"] == layer.weight_bits and isinstance(entry["weight_bits"], int)
  expected = np.asarray(layer(x))
  got = _reference(entry, x, op)
  if layer.use_bias:
    got = got + entry["bias"]
  err = np.abs(got - expected)
  tol = _tolerance(layer, x, op, k)
  assert np.all(err <= tol), (err.max(), tol.min())
  return entry


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("multiply_scale", [True, False])
@pytest.mark.parametrize("act", [True, False], ids=["act", "weight_only"])
def test_quant_linear_integer_forward(bits, multiply_scale, act):
  layer = tnnx.QuantLinear(24, 7, weight_bits=bits, act_bits=bits if act else None,
                           multiply_scale=multiply_scale, rngs=nnx.Rngs(bits))
  x = jax.random.normal(jax.random.key(1), (5, 24))
  x = jax.nn.relu(x) if act else x
  _calibrated(layer, x)
  entry = _check_layer(layer, x, _linear_op, k=24)
  assert entry["multiply_scale"] == int(multiply_scale)
  assert ("act_step" in entry) == act
  if act:
    np.testing.assert_array_equal(entry["act_step"], np.asarray(layer.act_scale[...]))
    assert entry["act_gamma"] == 2**bits
  np.testing.assert_array_equal(entry["weight_step"], np.asarray(layer.weight_scale[...]))
  assert entry["weight_gamma"] == quantizers.weight_range(bits).gamma


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("multiply_scale", [True, False])
@pytest.mark.parametrize("kind", ["plain", "strided", "depthwise"])
def test_quant_conv_integer_forward(bits, multiply_scale, kind):
  channels = 6
  kwargs = {"plain": {}, "strided": {"strides": 2},
            "depthwise": {"feature_group_count": channels}}[kind]
  layer = tnnx.QuantConv(channels, channels, (3, 3), weight_bits=bits, act_bits=bits,
                         multiply_scale=multiply_scale, use_bias=False, rngs=nnx.Rngs(bits),
                         **kwargs)
  x = jax.nn.relu(jax.random.normal(jax.random.key(2), (2, 7, 7, channels)))
  _calibrated(layer, x)
  k = 9 * (1 if kind == "depthwise" else channels)
  _check_layer(layer, x, _conv_op(layer), k)


def _lm(bits, act_bits=None, seed=0):
  return tnnx.TransformerLM(context=8, width=16, num_layers=3, num_heads=2, weight_bits=bits,
                            act_bits=act_bits, rngs=nnx.Rngs(seed))


TOKENS = jax.random.randint(jax.random.key(3), (4, 8), 0, 256)
PROJECTIONS = (("attention", "query"), ("attention", "key"), ("attention", "value"),
               ("attention", "out"), ("mlp", "up"), ("mlp", "down"))


@pytest.mark.parametrize("bits", BITS)
def test_transformer_stacked_projections(bits):
  """Every layer slice of every stacked projection: its levels, step and integer forward."""
  model = _lm(bits, act_bits=4)
  tnnx.calibrate(model, TOKENS)
  exported = tnnx.export_integer_model(model)["params"]["blocks"]
  x = jax.nn.relu(jax.random.normal(jax.random.key(4), (3, 64)))
  for path in PROJECTIONS:
    entry, layer = exported[path[0]][path[1]], getattr(getattr(model.blocks, path[0]), path[1])
    np.testing.assert_array_equal(entry["kernel_levels"], _levels(model, ("blocks", *path, "kernel")))
    assert entry["weight_step"].shape == (3,) and entry["multiply_scale"] == 1
    np.testing.assert_array_equal(entry["weight_step"], np.asarray(layer.weight_scale[...]))
    assert ("act_step" in entry) == (path[1] == "down")
    kernel = np.asarray(layer.kernel[...])
    for i in range(3):
      one = {k: (v[i] if isinstance(v, np.ndarray) else v) for k, v in entry.items()}
      xi = x[:, : kernel.shape[1]]
      # The QAT forward of slice i, as QuantLinear computes it inside the scan.
      xq = xi
      if "act_step" in one:
        xq = quantizers.fake_quant_activation(xi, one["act_step"], 4) * one["act_step"]
      wq = quantizers.fake_quant_weight(kernel[i], one["weight_step"], bits, multiply_scale=True)
      expected = np.asarray(xq @ wq)
      got = _reference(one, xi, _linear_op)
      tol = (kernel.shape[1] + 5) * U * np.asarray(jnp.abs(xq) @ jnp.abs(wq)) + 1e-30
      assert np.all(np.abs(got - expected) <= tol)


def _max_relative_error(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize("bits", [1, 2, 8])
def test_integer_model_equals_qat_transformer(bits):
  """The whole (weight-only) LM served from its export, in a fresh model, gives the QAT logits.

  Through layer norms and attention rounding differences are no longer bounded
  per output as above; 1e-5 of the largest logit is ~100 float32 roundings.

  The QAT model runs op by op (``jax.disable_jit``), as ``levels_fn_for``
  computes levels: compiled inside ``nnx.scan``, XLA may evaluate ``w / s``
  differently, and a weight exactly on a rounding tie (``u = -50.5`` once in
  this model at 8 bits) then lands one level away.
  """
  model = _lm(bits)
  tnnx.calibrate(model, TOKENS)
  model.eval()
  serving = tnnx.integer_model(tnnx.export_integer_model(model), _lm(bits, seed=7))
  with jax.disable_jit():
    expected = model(TOKENS)
  assert _max_relative_error(serving(TOKENS), expected) < 1e-5
  assert isinstance(serving.blocks.mlp.down, tnnx.IntegerLayer)


def test_integer_model_transformer_with_activation_levels():
  """With quantized activations after float layers, a rounding difference upstream
  can move an input across a rounding boundary of the activation quantizer (one
  level, a discrete change): most positions agree to 1e-5, not all.
  """
  model = _lm(8, act_bits=2)
  tnnx.calibrate(model, TOKENS)
  model.eval()
  serving = tnnx.integer_model(tnnx.export_integer_model(model), _lm(8, act_bits=2, seed=7))
  with jax.disable_jit():
    expected = model(TOKENS)
  close = jnp.all(jnp.abs(serving(TOKENS) - expected) <= 1e-5 * jnp.max(jnp.abs(expected)), -1)
  assert float(jnp.mean(close)) >= 0.9


def _trained_cnn(cls, bits):
  """A calibrated CNN whose batch norms hold non-trivial statistics."""
  model = cls(weight_bits=bits, act_bits=bits, rngs=nnx.Rngs(0))
  x = jax.random.uniform(jax.random.key(5), (16, 8, 8, 1))
  model.train()
  for _ in range(3):  # updates the batch statistics (and calibrates)
    model(x)
  model.eval()
  return model, x


@pytest.mark.parametrize("cls", [tnnx.SmallCNN, tnnx.MobileNetV2Tiny])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_integer_model_equals_qat_cnn(cls, bits):
  """Convs (strided, depthwise, 1x1), batch norms and float layers from the export.

  Same tolerance as the transformer: batch norms divide by small variances.
  """
  model, x = _trained_cnn(cls, bits)
  exported = tnnx.export_integer_model(model)
  serving = tnnx.integer_model(exported, cls(weight_bits=bits, act_bits=bits, rngs=nnx.Rngs(9)))
  expected = model(x)
  assert float(jnp.max(jnp.abs(expected))) > 0.1
  assert _max_relative_error(serving(x), expected) < 1e-5
  # Float layers keep their params; batch norms their statistics.
  np.testing.assert_array_equal(exported["params"]["linear"]["kernel"],
                                np.asarray(model.linear.kernel[...]))
  np.testing.assert_array_equal(exported["params"]["bn2" if cls is tnnx.SmallCNN else "bn1"]
                                ["mean"], np.asarray((model.bn2 if cls is tnnx.SmallCNN
                                                      else model.bn1).mean[...]))


def test_orbax_round_trip(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  model, x = _trained_cnn(tnnx.MobileNetV2Tiny, 2)
  exported = tnnx.export_integer_model(model)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "export", exported)
  checkpointer.wait_until_finished()
  restored = checkpointer.restore(tmp_path / "export", exported)
  leaves = jax.tree_util.tree_leaves_with_path(exported)
  assert len(leaves) == len(jax.tree.leaves(restored))
  for path, leaf in leaves:
    got = restored
    for key in path:
      got = got[key.key]
    assert type(got) is type(leaf) and np.asarray(got).dtype == np.asarray(leaf).dtype
    np.testing.assert_array_equal(got, leaf)
  # Restored without a target (list indices come back as strings): still servable.
  untargeted = checkpointer.restore(tmp_path / "export")
  serving = tnnx.integer_model(untargeted, tnnx.MobileNetV2Tiny(weight_bits=2, act_bits=2,
                                                                 rngs=nnx.Rngs(3)))
  assert _max_relative_error(serving(x), model(x)) < 1e-5


_SERVE_WITHOUT_TALR = """
import sys
import numpy as np
import orbax.checkpoint as ocp
tree = ocp.StandardCheckpointer().restore(sys.argv[1])["params"]
x = np.load(sys.argv[2])
for name in ("fc1", "fc2"):
  e = tree[name]
  a = np.round(np.clip(e["act_gamma"] * x / e["act_step"], 0, 2 ** e["act_bits"] - 1))
  q = e["kernel_levels"].astype(np.int32)
  acc = a.astype(np.int32) @ (2 * q - 1 if e["weight_bits"] == 1 else q)
  x = acc * (e["act_step"] * e["weight_step"] / (e["act_gamma"] * e["weight_gamma"])) + e["bias"]
  x = np.maximum(x, 0) if name == "fc1" else x
assert not any(m.startswith("talr_optax") for m in sys.modules)
np.save(sys.argv[3], x)
"""


class _MLP(nnx.Module):
  """Two linear layers; ``fc2_bits`` sets the second one's bits (``None``: float)."""

  def __init__(self, bits, fc2_bits="same", seed=0):
    fc2_bits = bits if fc2_bits == "same" else fc2_bits
    self.fc1 = tnnx.QuantLinear(12, 16, weight_bits=bits, act_bits=bits, multiply_scale=True,
                                rngs=nnx.Rngs(seed))
    self.fc2 = tnnx.QuantLinear(16, 3, weight_bits=fc2_bits, act_bits=fc2_bits,
                                multiply_scale=True, rngs=nnx.Rngs(seed))

  def __call__(self, x):
    return self.fc2(nnx.relu(self.fc1(x)))


@pytest.mark.parametrize("bits", [1, 4])
def test_served_from_checkpoint_without_talr_optax(tmp_path, bits):
  """A NumPy program that never imports talr_optax serves the Orbax checkpoint."""
  ocp = pytest.importorskip("orbax.checkpoint")
  model = _MLP(bits)
  x = np.asarray(jax.nn.relu(jax.random.normal(jax.random.key(6), (5, 12))))
  model(jnp.asarray(x))  # the first training forward calibrates
  model.eval()
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "export", tnnx.export_integer_model(model))
  checkpointer.wait_until_finished()
  np.save(tmp_path / "x.npy", x)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  subprocess.run([sys.executable, "-c", _SERVE_WITHOUT_TALR, str(tmp_path / "export"),
                  str(tmp_path / "x.npy"), str(tmp_path / "y.npy")], check=True, env=env,
                 cwd=tmp_path)
  assert _max_relative_error(jnp.asarray(np.load(tmp_path / "y.npy")), model(jnp.asarray(x))) < 1e-5


def test_errors():
  with pytest.raises(TypeError, match="model must be an nnx.Module.*dict"):
    tnnx.export_integer_model({"kernel": np.ones(3)})
  with pytest.raises(ValueError, match="no quantized layer"):
    tnnx.export_integer_model(tnnx.SmallCNN(weight_bits=None, act_bits=None, rngs=nnx.Rngs(0)))
  fresh = tnnx.SmallCNN(weight_bits=2, act_bits=2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"2 quantized layer\(s\) are not calibrated.*'conv2'"):
    tnnx.export_integer_model(fresh)
  model, _ = _trained_cnn(tnnx.SmallCNN, 2)
  model.conv3.weight_scale[...] = jnp.float32(jnp.nan)
  with pytest.raises(ValueError, match="weight step size of 'conv3' is .*nan"):
    tnnx.export_integer_model(model)
  model, _ = _trained_cnn(tnnx.SmallCNN, 2)
  model.conv2.act_scale[...] = jnp.float32(0.0)
  with pytest.raises(ValueError, match="activation step size of 'conv2'"):
    tnnx.export_integer_model(model)
  lm = _lm(2)
  tnnx.calibrate(lm, TOKENS)
  lm.blocks.mlp.up.weight_scale[...] = jnp.asarray([1.0, jnp.inf, 1.0])
  with pytest.raises(ValueError, match="weight step size of 'blocks/mlp/up' is .*inf"):
    tnnx.export_integer_model(lm)
  with pytest.raises(ValueError, match="exported must be what export_integer_model"):
    tnnx.integer_model({"kernel": 1}, model)
  other = _trained_cnn(tnnx.MobileNetV2Tiny, 2)[0]
  with pytest.raises(ValueError,
                     match=r"'blocks/0/depthwise': model has no layer there.*; and 9 more\."):
    tnnx.integer_model(tnnx.export_integer_model(other), tnnx.SmallCNN(
        weight_bits=2, act_bits=2, rngs=nnx.Rngs(0)))


class _Conv(nnx.Module):
  """One QuantConv, as integer_model takes it (a layer inside a model)."""

  def __init__(self, seed, **kwargs):
    self.conv = tnnx.QuantConv(4, 5, rngs=nnx.Rngs(seed), **kwargs)

  def __call__(self, x):
    return self.conv(x)


def _train(model, x, steps=3):
  """A few SGD steps on a regression loss; returns the losses."""
  target = jax.random.normal(jax.random.key(8), model(x).shape)
  optimizer = nnx.Optimizer(model, optax.sgd(0.05), wrt=nnx.Param)
  losses = []
  for _ in range(steps):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - target) ** 2))(model)
    optimizer.update(model, grads)
    losses.append(float(loss))
  return losses


def _check_serves_like_qat(kwargs, x, k):
  """Trains a one-conv model, serves its export: equal to its QAT forward per output.

  Tolerance as in the module docstring, with the bound ``sum|x_q w_q|`` from
  ``nnx.Conv`` (same padding) on the absolute values, plus the two roundings
  of adding the bias.
  """
  model = _Conv(0, **kwargs)
  losses = _train(model, x)
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
  model.eval()
  serving = tnnx.integer_model(tnnx.export_integer_model(model), _Conv(1, **kwargs))
  assert isinstance(serving.conv, tnnx.IntegerLayer)
  expected = np.asarray(model(x))
  got = np.asarray(serving(x))
  xq, wq = model.conv._quantize(x)
  mask = kwargs.get("mask")
  bound = nnx.Conv(4, 5, kwargs["kernel_size"], use_bias=False, rngs=nnx.Rngs(0),
                   **{k_: v for k_, v in kwargs.items()
                      if k_ in ("padding", "strides", "kernel_dilation")})
  bound.kernel[...] = jnp.abs(wq if mask is None else wq * mask)
  tol = (k + 5) * U * np.asarray(bound(jnp.abs(xq))) + 2 * U * np.abs(expected) + 1e-30
  assert np.all(np.abs(got - expected) <= tol), np.max(np.abs(got - expected) - tol)


@pytest.mark.parametrize("padding", ["CIRCULAR", "REFLECT", "CAUSAL"])
@pytest.mark.parametrize("act", [True, False], ids=["act", "weight_only"])
def test_padding_modes_train_and_serve(padding, act):
  """Every padding nnx.Conv trains with serves (Flax pads causally in 1-D only)."""
  causal = padding == "CAUSAL"
  kwargs = dict(kernel_size=(3,) if causal else (3, 3), padding=padding,
                strides=1 if causal else 2, kernel_dilation=2 if causal else 1,
                weight_bits=2, act_bits=2 if act else None, multiply_scale=True)
  x = jax.random.normal(jax.random.key(7), (2, 9, 4) if causal else (2, 6, 6, 4))
  _check_serves_like_qat(kwargs, jax.nn.relu(x) if act else x, k=12 if causal else 36)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.float32])
def test_masked_conv_serves(dtype):
  """A kernel mask multiplies the weight codes, as it multiplies the QAT kernel
  (an integer mask in int32, a float one in float32)."""
  mask = jnp.tril(jnp.ones((3, 3, 4, 5), dtype))
  kwargs = dict(kernel_size=(3, 3), mask=mask, weight_bits=4, act_bits=4, multiply_scale=False)
  x = jax.nn.relu(jax.random.normal(jax.random.key(7), (2, 6, 6, 4)))
  _check_serves_like_qat(kwargs, x, k=36)


@pytest.fixture(scope="module")
def cnn_export():
  """A trained W2A2 SmallCNN's export, and a batch."""
  model, x = _trained_cnn(tnnx.SmallCNN, 2)
  return tnnx.export_integer_model(model), x


def test_integer_model_refuses_float_model(cnn_export):
  """A model built without bits would serve its own random kernels."""
  exported, _ = cnn_export
  model = tnnx.SmallCNN(weight_bits=None, act_bits=None, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"'conv2'.*not quantized.*weight_bits=2, act_bits=2"):
    tnnx.integer_model(exported, model)


@pytest.mark.parametrize("weight_bits,act_bits,name", [
    (4, 2, "weight_bits"), (2, 4, "act_bits"), (2, None, "act_bits")])
def test_integer_model_refuses_other_bits(cnn_export, weight_bits, act_bits, name):
  exported, _ = cnn_export
  model = tnnx.SmallCNN(weight_bits=weight_bits, act_bits=act_bits, rngs=nnx.Rngs(0))
  value = weight_bits if name == "weight_bits" else act_bits
  with pytest.raises(ValueError, match=rf"'conv2': {name} is {value} in model, 2 in exported"):
    tnnx.integer_model(exported, model)


class _OneLayer(nnx.Module):
  """``_MLP`` without its second layer."""

  def __init__(self, bits):
    self.fc1 = tnnx.QuantLinear(12, 16, weight_bits=bits, act_bits=bits, multiply_scale=True,
                                rngs=nnx.Rngs(1))

  def __call__(self, x):
    return self.fc1(x)


def _calibrated_export(model):
  model(jax.nn.relu(jax.random.normal(jax.random.key(6), (5, 12))))
  model.eval()
  return tnnx.export_integer_model(model)


def test_integer_model_refuses_missing_quantized_layer():
  exported = _calibrated_export(_MLP(2))
  with pytest.raises(ValueError, match=r"'fc2'.*model has no layer there"):
    tnnx.integer_model(exported, _OneLayer(2))
  plain = _MLP(2, seed=1)
  plain.fc2 = nnx.Linear(16, 3, rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match=r"'fc2': not quantized in model \(its Linear is not"):
    tnnx.integer_model(exported, plain)


def test_integer_model_refuses_extra_quantized_layer():
  """The model quantizes a layer the export keeps in float, or that it lacks."""
  with pytest.raises(ValueError, match=r"'fc2'.*not quantized in exported"):
    tnnx.integer_model(_calibrated_export(_MLP(2, fc2_bits=None)), _MLP(2, seed=1))
  with pytest.raises(ValueError, match=r"'fc2'.*exported has no layer there"):
    tnnx.integer_model(_calibrated_export(_OneLayer(2)), _MLP(2, seed=1))



def test_integer_model_refuses_other_layer_settings():
  """Another kernel shape, multiply_scale or bias: not the model that was exported."""
  settings = dict(weight_bits=2, act_bits=None)
  model = _Conv(0, kernel_size=(3, 3), multiply_scale=True, **settings)
  model(jax.random.normal(jax.random.key(7), (2, 6, 6, 4)))  # calibrates
  exported = tnnx.export_integer_model(model)
  with pytest.raises(ValueError, match=r"'conv': kernel shape \(1, 1, 4, 5\) in model, "
                                       r"\(3, 3, 4, 5\) in exported"):
    tnnx.integer_model(exported, _Conv(1, kernel_size=(1, 1), multiply_scale=True, **settings))
  with pytest.raises(ValueError, match="'conv': multiply_scale is False in model, True in"):
    tnnx.integer_model(exported, _Conv(1, kernel_size=(3, 3), multiply_scale=False, **settings))
  with pytest.raises(ValueError, match="'conv': a bias in exported, none in model"):
    tnnx.integer_model(exported, _Conv(1, kernel_size=(3, 3), multiply_scale=True,
                                       use_bias=False, **settings))


def test_export_refuses_non_finite_kernels():
  """A diverged run: NaN/Inf kernels with finite frozen step sizes."""
  model, _ = _trained_cnn(tnnx.SmallCNN, 2)
  model.conv2.kernel[...] = model.conv2.kernel[...].at[0, 0, 0, 0].set(jnp.nan)
  model.conv3.kernel[...] = jnp.full_like(model.conv3.kernel[...], jnp.inf)
  with pytest.raises(ValueError, match=r"'conv2', 'conv3'.*diverged"):
    tnnx.export_integer_model(model)
  lm = _lm(2)
  tnnx.calibrate(lm, TOKENS)
  lm.blocks.mlp.up.kernel[...] = lm.blocks.mlp.up.kernel[...].at[1].set(jnp.inf)
  with pytest.raises(ValueError, match=r"'blocks/mlp/up'.*diverged"):
    tnnx.export_integer_model(lm)
