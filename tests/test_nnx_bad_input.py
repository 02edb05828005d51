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

from talr_optax import nnx as tnnx


def _rngs():
  return nnx.Rngs(0)


def _linear(**kw):
  args = dict(in_features=2, out_features=3, weight_bits=2, act_bits=2, rngs=_rngs())
  return tnnx.QuantLinear(**{**args, **kw})


def _conv(**kw):
  args = dict(in_features=2, out_features=3, kernel_size=3, weight_bits=2, act_bits=2,
              rngs=_rngs())
  return tnnx.QuantConv(**{**args, **kw})


def _cnn(**kw):
  return tnnx.SmallCNN(**{**dict(weight_bits=2, act_bits=2, width=2, rngs=_rngs()), **kw})


def _resnet(**kw):
  return tnnx.ResNet20(**{**dict(weight_bits=2, act_bits=2, rngs=_rngs()), **kw})


def _block(**kw):
  args = dict(in_features=2, out_features=4, stride=2, weight_bits=2, act_bits=2,
              rngs=_rngs())
  return tnnx.BasicBlock(**{**args, **kw})


POSITIVE = r"must be an integer >= 1"

# (thunk, exception, regex the message must match)
LAYER_CASES = {
    # QuantLinear / QuantConv sizes
    "linear in_features 0": (lambda: _linear(in_features=0), ValueError,
                             rf"QuantLinear: in_features {POSITIVE}, got in_features = 0"),
    "linear out_features -1": (lambda: _linear(out_features=-1), ValueError,
                               rf"out_features {POSITIVE}, got out_features = -1"),
    "linear in_features float": (lambda: _linear(in_features=2.0), ValueError,
                                 rf"in_features {POSITIVE}, got in_features = 2.0"),
    "linear in_features str": (lambda: _linear(in_features="2"), ValueError,
                               rf"in_features {POSITIVE}"),
    "linear in_features bool": (lambda: _linear(in_features=True), ValueError,
                                rf"in_features {POSITIVE}"),
    "conv out_features 0": (lambda: _conv(out_features=0), ValueError,
                            rf"QuantConv: out_features {POSITIVE}"),
    "conv in_features None": (lambda: _conv(in_features=None), ValueError,
                              rf"in_features {POSITIVE}"),
    # kernel_size, strides, padding
    "kernel_size 0": (lambda: _conv(kernel_size=0), ValueError,
                      r"kernel_size must be an integer >= 1 or a non-empty sequence"),
    "kernel_size empty": (lambda: _conv(kernel_size=()), ValueError, r"kernel_size = \(\)"),
    "kernel_size negative entry": (lambda: _conv(kernel_size=(3, -1)), ValueError,
                                   r"kernel_size = \(3, -1\)"),
    "kernel_size float": (lambda: _conv(kernel_size=3.0), ValueError, r"kernel_size = 3.0"),
    "kernel_size str": (lambda: _conv(kernel_size="3"), ValueError, r"kernel_size = '3'"),
    "strides 0": (lambda: _conv(strides=0), ValueError,
                  r"strides must be an integer >= 1 or 2 integers >= 1, got strides = 0"),
    "strides too many": (lambda: _conv(strides=(1, 1, 1)), ValueError,
                         r"strides must be .* 2 integers >= 1, got strides = \(1, 1, 1\)"),
    "strides float": (lambda: _conv(strides=1.5), ValueError, r"strides = 1.5"),
    "strides 1-D kernel": (lambda: _conv(kernel_size=(3,), strides=(1, 1)), ValueError,
                           r"strides must be .* 1 integers >= 1"),
    "padding unknown string": (lambda: _conv(padding="FULL"), ValueError,
                               r"padding must be one of 'SAME', 'SAME_LOWER', 'VALID'.*"
                               r"got padding = 'FULL'"),
    "padding negative": (lambda: _conv(padding=-1), ValueError, r"padding = -1"),
    "padding wrong pair count": (lambda: _conv(padding=[(1, 1)]), ValueError,
                                 r"2 \(low, high\) pairs.*got padding = \[\(1, 1\)\]"),
    "padding not pairs": (lambda: _conv(padding=(1, 1)), ValueError, r"padding = \(1, 1\)"),
    # bits (also covered in test_nnx.py for every model)
    "weight_bits 5": (lambda: _conv(weight_bits=5), ValueError,
                      r"weight_bits must be one of 1, 2, 3, 4, 8 or None"),
    "act_bits 2.0": (lambda: _linear(act_bits=2.0), ValueError,
                     r"act_bits must be one of 1, 2, 3, 4, 8 or None"),
    # flags, dtypes, initializers
    "use_bias str": (lambda: _linear(use_bias="no"), ValueError,
                     r"use_bias must be True or False, got use_bias = 'no'"),
    "multiply_scale int": (lambda: _conv(multiply_scale=1), ValueError,
                           r"multiply_scale must be True or False"),
    "deterministic None": (lambda: _conv(deterministic=None), ValueError,
                           r"deterministic must be True or False"),
    "param_dtype int": (lambda: _linear(param_dtype=jnp.int32), ValueError,
                        r"param_dtype must be a floating dtype"),
    "param_dtype junk": (lambda: _conv(param_dtype="bogus"), ValueError,
                         r"param_dtype must be a floating dtype"),
    "dtype int": (lambda: _conv(dtype=jnp.int8), ValueError,
                  r"dtype must be a floating dtype .*or None"),
    "kernel_init not callable": (lambda: _linear(kernel_init=0.1), TypeError,
                                 r"kernel_init must be an initializer"),
    "bias_init not callable": (lambda: _conv(use_bias=True, bias_init="zeros"), TypeError,
                               r"bias_init must be an initializer"),
    # rngs
    "linear rngs int": (lambda: _linear(rngs=0), TypeError,
                        r"QuantLinear: rngs must be an nnx.Rngs, e.g. rngs=nnx.Rngs\(0\), "
                        r"got rngs of type int"),
    "linear rngs None": (lambda: _linear(rngs=None), TypeError,
                         r"rngs must be an nnx.Rngs.*NoneType"),
    "conv rngs key": (lambda: _conv(rngs=jax.random.key(0)), TypeError,
                      r"QuantConv: rngs must be an nnx.Rngs"),
    # models
    "SmallCNN width 0": (lambda: _cnn(width=0), ValueError, rf"SmallCNN: width {POSITIVE}"),
    "SmallCNN num_classes 0": (lambda: _cnn(num_classes=0), ValueError,
                               rf"SmallCNN: num_classes {POSITIVE}, got num_classes = 0"),
    "SmallCNN in_channels float": (lambda: _cnn(in_channels=1.5), ValueError,
                                   rf"SmallCNN: in_channels {POSITIVE}"),
    "SmallCNN rngs": (lambda: _cnn(rngs=0), TypeError, r"SmallCNN: rngs must be an nnx.Rngs"),
    "SmallCNN bits": (lambda: _cnn(weight_bits=7), ValueError,
                      r"weight_bits must be one of 1, 2, 3, 4, 8 or None"),
    "ResNet20 num_classes -1": (lambda: _resnet(num_classes=-1), ValueError,
                                rf"ResNet20: num_classes {POSITIVE}, got num_classes = -1"),
    "ResNet20 in_channels 0": (lambda: _resnet(in_channels=0), ValueError,
                               rf"ResNet20: in_channels {POSITIVE}"),
    "ResNet20 rngs": (lambda: _resnet(rngs="seed"), TypeError,
                      r"ResNet20: rngs must be an nnx.Rngs"),
    "BasicBlock stride 0": (lambda: _block(stride=0), ValueError,
                            rf"BasicBlock: stride {POSITIVE}"),
    "BasicBlock shrinking channels": (lambda: _block(in_features=4, out_features=2), ValueError,
                                      r"out_features must be >= in_features"),
    "BasicBlock rngs": (lambda: _block(rngs=1), TypeError, r"BasicBlock: rngs must be"),
}


@pytest.mark.parametrize("case", tuple(LAYER_CASES))
def test_layer_and_model_arguments(case):
  thunk, exc, match = LAYER_CASES[case]
  with pytest.raises(exc, match=match):
    thunk()


def test_arguments_are_checked_before_any_random_number_is_drawn():
  rngs = nnx.Rngs(0)
  with pytest.raises(ValueError):
    tnnx.QuantConv(in_features=2, out_features=3, kernel_size=3, strides=0,
                   weight_bits=2, act_bits=2, rngs=rngs)
  with pytest.raises(ValueError):
    tnnx.SmallCNN(weight_bits=2, act_bits=2, num_classes=0, rngs=rngs)
  assert int(rngs.params.count[...]) == 0


def test_accepted_spellings_still_build_and_run():
  # NumPy integers, lower-case padding strings, explicit pairs, tuples.
  fp = dict(weight_bits=None, act_bits=None, kernel_init=nnx.initializers.zeros, rngs=_rngs())
  conv = tnnx.QuantConv(in_features=np.int64(2), out_features=np.int32(3),
                        kernel_size=(3, 1), strides=(2, np.int64(1)), padding="same",
                        **{**fp, "weight_bits": np.int64(2)})
  assert conv.kernel[...].shape == (3, 1, 2, 3) and conv.weight_bits == 2
  assert type(conv.weight_bits) is int and type(conv.in_features) is int
  assert conv.padding == "SAME" and conv.strides == (2, 1)
  x = jnp.ones((1, 6, 6, 2))
  assert tnnx.QuantConv(in_features=2, out_features=3, kernel_size=(3, 1), strides=(2, 1),
                        padding="same", **fp)(x).shape == (1, 3, 6, 3)
  pairs = tnnx.QuantConv(in_features=2, out_features=3, kernel_size=3,
                         padding=[(1, 1), (0, 0)], **fp)
  assert pairs(x).shape == (1, 6, 4, 3)
  assert tnnx.QuantConv(in_features=2, out_features=3, kernel_size=3, padding=0,
                        **fp)(x).shape == (1, 4, 4, 3)
  lin = tnnx.QuantLinear(in_features=2, out_features=3, use_bias=np.bool_(False),
                         param_dtype="float32", **fp)
  assert lin(np.ones((4, 2), np.float32)).shape == (4, 3)  # a NumPy batch is fine


CALL_CASES = {
    "conv rank": (lambda: _conv()(jnp.ones((2, 4, 4))), ValueError,
                  r"QuantConv: inputs must have shape \(batch, 2 spatial axes, features\) "
                  r"with in_features = 2, got inputs of shape \(2, 4, 4\)"),
    "conv channels": (lambda: _conv()(jnp.ones((2, 4, 4, 5))), ValueError,
                      r"in_features = 2, got inputs of shape \(2, 4, 4, 5\)"),
    "conv list": (lambda: _conv()([[1.0]]), TypeError,
                  r"QuantConv: inputs must be an array .*got inputs of type list"),
    "linear features": (lambda: _linear()(jnp.ones((2, 5))), ValueError,
                        r"QuantLinear: inputs must have shape \(\.\.\., in_features\) with "
                        r"in_features = 2, got inputs of shape \(2, 5\)"),
    "linear scalar": (lambda: _linear()(jnp.ones(())), ValueError, r"got inputs of shape \(\)"),
    "linear list": (lambda: _linear(act_bits=None)([[1.0, 2.0]]), TypeError,
                    r"QuantLinear: inputs must be an array"),
}


@pytest.mark.parametrize("case", tuple(CALL_CASES))
def test_layer_call_with_bad_inputs(case):
  thunk, exc, match = CALL_CASES[case]
  with pytest.raises(exc, match=match):
    thunk()


# ---------------------------------------------------------------------------
# levels_fn_for, param_labels


@pytest.fixture(scope="module")
def cnn():
  return _cnn()


@pytest.mark.parametrize("model", [None, {"conv2": 1}, "model"], ids=["None", "dict", "str"])
def test_levels_fn_for_and_param_labels_need_a_module(model):
  with pytest.raises(TypeError, match="levels_fn_for: model must be an nnx.Module"):
    tnnx.levels_fn_for(model)
  with pytest.raises(TypeError, match="param_labels: model must be an nnx.Module"):
    tnnx.param_labels(model)


def test_levels_fn_for_a_state_instead_of_the_model(cnn):
  with pytest.raises(TypeError, match="got model of type State"):
    tnnx.levels_fn_for(nnx.state(cnn, nnx.Param))


def test_levels_fn_for_model_without_quantized_kernel():
  with pytest.raises(ValueError, match="no quantized kernel"):
    tnnx.levels_fn_for(_cnn(weight_bits=None, act_bits=2))


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
    "x rank": (lambda m: tnnx.calibrate(m, jnp.ones((8, 8, 1))), ValueError,
               r"calibrate: the batch x of shape \(8, 8, 1\) and dtype float32 does not fit "
               r"the model: QuantConv: inputs must have shape"),
    "x channels": (lambda m: tnnx.calibrate(m, np.ones((2, 8, 8, 3), np.float32)), ValueError,
                   r"batch x of shape \(2, 8, 8, 3\).*in_features = 1, got inputs of shape"),
    "forward not callable": (lambda m: tnnx.calibrate(m, jnp.ones((2, 8, 8, 1)), forward=3),
                             TypeError, r"calibrate: forward must be None or a callable"),
}


@pytest.mark.parametrize("case", tuple(CALIBRATE_CASES))
def test_calibrate_bad_input_leaves_model_unchanged(case):
  model = _cnn()
  model.conv2.calibrated[...] = jnp.array(True)
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
  return _cnn(**{**dict(weight_bits=None, act_bits=None), **kw})


def _zero_state(**kw):
  """nnx.state of a full-precision SmallCNN(**kw), zero-filled (no initializer to compile)."""
  abstract = nnx.state(nnx.eval_shape(lambda: _fp(**kw)))
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
  qat = _cnn()
  before = nnx.to_pure_dict(nnx.state(qat))
  thunk, exc, match = LOAD_CASES[case]
  with pytest.raises(exc, match=match):
    thunk(qat)
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(qat)), before)
