"""Bad input to talr_optax.nnx: a clear error naming the argument and its accepted values.

Every case checks the exception type and that the message names the argument
(and, where there is one, the accepted range), so that a user never sees a
ZeroDivisionError from an initializer or a shape error from deep inside JAX.
Models are tiny and errors are raised before any compilation, so this file runs
in a few seconds.
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


def _rngs():
  return nnx.Rngs(0)


def _linear(**kw):
  args = dict(in_features=2, out_features=3, weight_bits=2, act_bits=2, multiply_scale=False,
              rngs=_rngs())
  return tnnx.QuantLinear(**{**args, **kw})


def _conv(**kw):
  args = dict(in_features=2, out_features=4, kernel_size=(3, 3), weight_bits=2, act_bits=2,
              multiply_scale=False, rngs=_rngs())
  return tnnx.QuantConv(**{**args, **kw})


def _cnn(**kw):
  return tnnx.SmallCNN(**{**dict(weight_bits=2, act_bits=2, width=2, rngs=_rngs()), **kw})


def _mobilenet(**kw):
  return tnnx.MobileNetV2Tiny(**{**dict(weight_bits=2, act_bits=2, rngs=_rngs()), **kw})


def _block(**kw):
  args = dict(in_features=2, out_features=4, stride=2, weight_bits=2, act_bits=2,
              rngs=_rngs())
  return tnnx.BasicBlock(**{**args, **kw})


def _inverted(**kw):
  args = dict(in_features=2, out_features=4, stride=1, expand_ratio=2, weight_bits=2,
              act_bits=2, rngs=_rngs())
  return tnnx.InvertedResidual(**{**args, **kw})


POSITIVE = r"must be an integer >= 1"

# (thunk, exception, regex the message must match)
LAYER_CASES = {
    # sizes (Flax would build an empty kernel or fail inside an initializer)
    "linear in_features 0": (lambda: _linear(in_features=0), ValueError,
                             rf"QuantLinear: in_features {POSITIVE}, got in_features = 0"),
    "linear out_features -1": (lambda: _linear(out_features=-1), ValueError,
                               rf"out_features {POSITIVE}, got out_features = -1"),
    "linear in_features float": (lambda: _linear(in_features=2.0), ValueError,
                                 rf"in_features {POSITIVE}, got in_features = 2.0"),
    "linear in_features bool": (lambda: _linear(in_features=True), ValueError,
                                rf"in_features {POSITIVE}"),
    "conv out_features 0": (lambda: _conv(out_features=0), ValueError,
                            rf"QuantConv: out_features {POSITIVE}"),
    "conv in_features None": (lambda: _conv(in_features=None), ValueError,
                              rf"in_features {POSITIVE}"),
    "kernel_size 0": (lambda: _conv(kernel_size=0), ValueError,
                      rf"QuantConv: kernel_size {POSITIVE}, got kernel_size = 0"),
    "kernel_size empty": (lambda: _conv(kernel_size=()), ValueError,
                          r"kernel_size must not be empty"),
    "kernel_size negative entry": (lambda: _conv(kernel_size=(3, -1)), ValueError,
                                   r"kernel_size = -1"),
    "kernel_size str": (lambda: _conv(kernel_size="3"), ValueError, r"kernel_size = '3'"),
    # groups: Flax would fail at the first call with an assertion
    "groups not dividing in": (lambda: _conv(feature_group_count=3), ValueError,
                               r"feature_group_count must divide in_features and "
                               r"out_features .*got feature_group_count = 3, in_features = 2"),
    "groups not dividing out": (lambda: _conv(in_features=4, out_features=6,
                                              feature_group_count=4), ValueError,
                                r"feature_group_count = 4, in_features = 4, out_features = 6"),
    "groups 0": (lambda: _conv(feature_group_count=0), ValueError,
                 rf"feature_group_count {POSITIVE}"),
    # bits and the weight-scale choice
    "weight_bits 5": (lambda: _conv(weight_bits=5), ValueError,
                      r"QuantConv: weight_bits must be one of \(1, 2, 3, 4, 8\), got "
                      r"weight_bits = 5"),
    "act_bits 2.0": (lambda: _linear(act_bits=2.0), ValueError,
                     r"QuantLinear: act_bits must be an integer in \[1, 8\]"),
    "act_bits True": (lambda: _linear(act_bits=True), ValueError, r"act_bits must be"),
    "multiply_scale missing": (lambda: _linear(multiply_scale=None), ValueError,
                               r"QuantLinear: multiply_scale must be given \(True or False\)"
                               r" for a quantized layer: False when a batch norm follows"),
    "multiply_scale missing, act only": (
        lambda: _conv(weight_bits=None, multiply_scale=None), ValueError,
        r"QuantConv: multiply_scale must be given"),
    "multiply_scale int": (lambda: _conv(multiply_scale=1), ValueError,
                           r"multiply_scale must be True or False"),
    "deterministic None": (lambda: _conv(deterministic=None), ValueError,
                           r"deterministic must be True or False"),
    # rngs
    "linear rngs int": (lambda: _linear(rngs=0), TypeError,
                        r"QuantLinear: rngs must be an nnx.Rngs, e.g. rngs=nnx.Rngs\(0\), "
                        r"got rngs of type int"),
    "conv rngs key": (lambda: _conv(rngs=jax.random.key(0)), TypeError,
                      r"QuantConv: rngs must be an nnx.Rngs"),
    # models
    "SmallCNN width 0": (lambda: _cnn(width=0), ValueError, rf"SmallCNN: width {POSITIVE}"),
    "SmallCNN num_classes 0": (lambda: _cnn(num_classes=0), ValueError,
                               rf"SmallCNN: num_classes {POSITIVE}, got num_classes = 0"),
    "SmallCNN in_channels float": (lambda: _cnn(in_channels=1.5), ValueError,
                                   rf"SmallCNN: in_channels {POSITIVE}"),
    "SmallCNN rngs": (lambda: _cnn(rngs=0), TypeError, r"SmallCNN: rngs must be an nnx.Rngs"),
    "MobileNetV2Tiny num_classes 0": (lambda: _mobilenet(num_classes=0), ValueError,
                                      rf"MobileNetV2Tiny: num_classes {POSITIVE}"),
    "MobileNetV2Tiny rngs": (lambda: _mobilenet(rngs=None), TypeError,
                             r"MobileNetV2Tiny: rngs must be an nnx.Rngs.*NoneType"),
    "BasicBlock stride 0": (lambda: _block(stride=0), ValueError,
                            rf"BasicBlock: stride {POSITIVE}"),
    "BasicBlock shrinking channels": (lambda: _block(in_features=4, out_features=2), ValueError,
                                      r"out_features must be >= in_features"),
    "InvertedResidual expand_ratio 0": (lambda: _inverted(expand_ratio=0), ValueError,
                                        rf"InvertedResidual: expand_ratio {POSITIVE}"),
}


@pytest.mark.parametrize("case", tuple(LAYER_CASES))
def test_layer_and_model_arguments(case):
  thunk, exc, match = LAYER_CASES[case]
  with pytest.raises(exc, match=match):
    thunk()


def test_arguments_are_checked_before_any_random_number_is_drawn():
  rngs = nnx.Rngs(0)
  with pytest.raises(ValueError):
    tnnx.QuantConv(2, 3, (3, 3), feature_group_count=2, weight_bits=2, act_bits=2,
                   multiply_scale=False, rngs=rngs)
  with pytest.raises(ValueError):
    tnnx.SmallCNN(weight_bits=2, act_bits=2, num_classes=0, rngs=rngs)
  with pytest.raises(ValueError):
    tnnx.MobileNetV2Tiny(weight_bits=2, act_bits=7, rngs=rngs)
  assert int(rngs.params.count[...]) == 0


def test_accepted_spellings_still_build():
  # NumPy integers and bools; a full-precision layer needs no multiply_scale.
  conv = tnnx.QuantConv(np.int64(2), np.int32(4), (np.int64(3), 1), strides=(2, 1),
                        feature_group_count=np.int64(2), weight_bits=np.int64(2),
                        act_bits=None, multiply_scale=np.bool_(False),
                        kernel_init=nnx.initializers.zeros, rngs=_rngs())
  assert conv.kernel.shape == (3, 1, 1, 4) and conv.weight_bits == 2
  assert type(conv.weight_bits) is int and type(conv.in_features) is int
  assert conv.multiply_scale is False
  lin = tnnx.QuantLinear(2, 3, weight_bits=None, act_bits=None, use_bias=False,
                         kernel_init=nnx.initializers.zeros, rngs=_rngs())
  assert not lin.is_quantized and lin.bias is None


# ---------------------------------------------------------------------------
# levels_fn_for, param_labels


@pytest.fixture(scope="module")
def cnn():
  return T.build(tnnx.SmallCNN, weight_bits=2, act_bits=2, width=2)


@pytest.mark.parametrize("model", [None, {"conv2": 1}, "model"], ids=["None", "dict", "str"])
def test_levels_fn_for_and_param_labels_need_a_module(model):
  with pytest.raises(TypeError, match="levels_fn_for: model must be an nnx.Module"):
    tnnx.levels_fn_for(model)
  with pytest.raises(TypeError, match="param_labels: model must be an nnx.Module"):
    tnnx.param_labels(model)
  with pytest.raises(TypeError, match="layer_axes_for: model must be an nnx.Module"):
    tnnx.layer_axes_for(model)


def test_levels_fn_for_a_state_instead_of_the_model(cnn):
  with pytest.raises(TypeError, match="got model of type State"):
    tnnx.levels_fn_for(nnx.state(cnn, nnx.Param))


def test_levels_fn_for_model_without_quantized_kernel():
  with pytest.raises(ValueError, match="no quantized kernel"):
    tnnx.levels_fn_for(T.build(tnnx.SmallCNN, weight_bits=None, act_bits=2, width=2))


def test_levels_fn_rejects_params_of_another_model(cnn):
  levels_fn = tnnx.levels_fn_for(cnn)
  other = {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}  # a QuantLinear's params
  with pytest.raises(ValueError, match=r"params hold none of the quantized kernels.*"
                                       r"expected paths such as 'conv2/kernel'.*got 'bias', "
                                       r"'kernel'"):
    levels_fn(other)
  wider = nnx.to_pure_dict(nnx.state(cnn, nnx.Param))
  wider["conv2"]["kernel"] = jnp.zeros((3, 3, 3, 6))  # as in SmallCNN(width=3)
  with pytest.raises(ValueError, match=r"params at 'conv2/kernel' have shape \(3, 3, 3, 6\)"
                                       r".*has shape \(3, 3, 2, 4\)"):
    levels_fn(wider)
  # A step count (optax.inject_hyperparams without static_args): says what to do.
  with pytest.raises(ValueError, match=r"static_args=\('levels_fn',\)"):
    levels_fn(jnp.asarray(0, jnp.int32))
  # All quantized kernels masked out is not an error: levels are None there.
  pure = nnx.as_pure(nnx.state(cnn, nnx.Param))
  masked = jax.tree.map(lambda _: optax.MaskedNode(), pure)
  assert all(v is None for _, v in nnx.to_flat_state(levels_fn(masked)))


@pytest.mark.parametrize("wrt", [3, 2.5, object()], ids=["int", "float", "object"])
def test_param_labels_bad_filter(cnn, wrt):
  with pytest.raises(TypeError, match="param_labels: wrt must be an nnx filter"):
    tnnx.param_labels(cnn, wrt=wrt)
  with pytest.raises(TypeError, match="layer_axes_for: wrt must be an nnx filter"):
    tnnx.layer_axes_for(cnn, wrt=wrt)


def test_layers_stacked_over_two_axes_are_refused():
  @nnx.vmap(in_axes=0, out_axes=0, axis_size=2)
  @nnx.vmap(in_axes=0, out_axes=0, axis_size=3)
  def make(_):
    return tnnx.QuantLinear(2, 2, weight_bits=2, act_bits=None, multiply_scale=True,
                            kernel_init=nnx.initializers.zeros, rngs=nnx.Rngs(0))

  layer = make(jnp.zeros((2, 3)))
  assert layer.kernel.shape == (2, 3, 2, 2)
  for fn in (tnnx.levels_fn_for, tnnx.layer_axes_for, tnnx.param_labels):
    with pytest.raises(ValueError, match=r"'kernel' has shape \(2, 3, 2, 2\), 2 axes more "
                                         r"than one layer's kernel"):
      fn(layer)


# ---------------------------------------------------------------------------
# calibrate


CALIBRATE_CASES = {
    "model dict": (lambda m: tnnx.calibrate({"a": 1}, jnp.ones((2, 8, 8, 1))), TypeError,
                   r"calibrate: model must be an nnx.Module"),
    "x list": (lambda m: tnnx.calibrate(m, [[1.0]]), TypeError,
               r"calibrate: x must be a batch as a jax.Array or numpy.ndarray, got x of type list"),
    "x None": (lambda m: tnnx.calibrate(m, None), TypeError, r"got x of type NoneType"),
    "x bool": (lambda m: tnnx.calibrate(m, np.ones((2, 8, 8, 1), bool)), ValueError,
               r"calibrate: x must hold numbers, got x of dtype bool"),
    "x scalar": (lambda m: tnnx.calibrate(m, jnp.ones(())), ValueError,
                 r"x must be a non-empty batch .*got x of shape \(\)"),
    "x empty": (lambda m: tnnx.calibrate(m, jnp.ones((0, 8, 8, 1))), ValueError,
                r"x must be a non-empty batch .*got x of shape \(0, 8, 8, 1\)"),
    "x nan": (lambda m: tnnx.calibrate(m, jnp.full((2, 8, 8, 1), jnp.nan)), ValueError,
              r"calibrate: x holds NaN or Inf"),
    "x all zero": (lambda m: tnnx.calibrate(m, jnp.zeros((2, 8, 8, 1))), ValueError,
                   r"calibrate: the batch x defines no step size for 2 quantized layer\(s\): "
                   r"'conv2', 'conv3'.*all-zero"),
    "x rank": (lambda m: tnnx.calibrate(m, jnp.ones((8, 8, 1))), TypeError,
               r"calibrate: the batch x of shape \(8, 8, 1\) and dtype float32 does not fit "
               r"the model: "),
    "x channels": (lambda m: tnnx.calibrate(m, np.ones((2, 8, 8, 3), np.float32)), ValueError,
                   r"batch x of shape \(2, 8, 8, 3\).* does not fit the model: "
                   r"conv_general_dilated lhs feature dimension"),
    "forward not callable": (lambda m: tnnx.calibrate(m, jnp.ones((2, 8, 8, 1)), forward=3),
                             ValueError, r"calibrate: forward must be None or a callable"),
}


@pytest.mark.parametrize("case", tuple(CALIBRATE_CASES))
def test_calibrate_bad_input_leaves_model_unchanged(case):
  model = T.build(tnnx.SmallCNN, weight_bits=2, act_bits=2, width=2)
  model.conv2.calibrated[...] = True
  model.eval()
  before = nnx.to_pure_dict(nnx.state(model))
  thunk, exc, match = CALIBRATE_CASES[case]
  with pytest.raises(exc, match=match):
    thunk(model)
  after = nnx.to_pure_dict(nnx.state(model))
  jax.tree.map(np.testing.assert_array_equal, after, before)
  assert model.conv2.deterministic and model.bn1.use_running_average  # mode restored


# ---------------------------------------------------------------------------
# load_full_precision


def _fp(**kw):
  return T.build(tnnx.SmallCNN, **{**dict(weight_bits=None, act_bits=None, width=2), **kw})


def _zero_state(**kw):
  """nnx.state of a full-precision SmallCNN(**kw), zero-filled (no initializer to compile)."""
  abstract = nnx.state(nnx.eval_shape(
      lambda: tnnx.SmallCNN(**{**dict(weight_bits=None, act_bits=None, width=2), **kw},
                            rngs=_rngs())))
  return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract)


LOAD_CASES = {
    "target dict": (lambda q: tnnx.load_full_precision({"conv1": 1}, _fp()), TypeError,
                    r"load_full_precision: target must be an nnx.Module"),
    "source list": (lambda q: tnnx.load_full_precision(q, [1, 2]), ValueError,
                    r"source must be an nnx.Module or an nnx.State, got list"),
    "other architecture": (lambda q: tnnx.load_full_precision(q, _linear()), ValueError,
                           r"target has no variable at 'bias' \(source and target must be the "
                           r"same architecture"),
    "other width": (lambda q: tnnx.load_full_precision(q, _zero_state(width=3)),
                    ValueError, r"shape mismatch at 'bn1/bias': source \(3,\), target \(2,\)"),
    "other num_classes": (lambda q: tnnx.load_full_precision(q, _zero_state(num_classes=3)),
                          ValueError, r"shape mismatch at 'linear/bias'"),
    "partial source": (
        lambda q: tnnx.load_full_precision(
            q, nnx.filter_state(nnx.state(_fp()), nnx.PathContains("conv1"))),
        ValueError,
        r"source has no value for 16 weight\(s\) of target: 'bn1/bias', .* and 11 more"),
    "pure source": (lambda q: tnnx.load_full_precision(q, nnx.as_pure(nnx.state(_fp()))),
                    ValueError, r"no nnx.Param or nnx.BatchStat to copy"),
}


@pytest.mark.parametrize("case", tuple(LOAD_CASES))
def test_load_full_precision_mismatch_copies_nothing(case):
  qat = T.build(tnnx.SmallCNN, weight_bits=2, act_bits=2, width=2)
  before = nnx.to_pure_dict(nnx.state(qat))
  thunk, exc, match = LOAD_CASES[case]
  with pytest.raises(exc, match=match):
    thunk(qat)
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(qat)), before)
