"""TransformerLM: shapes, causality, scanned vs unrolled layers, labels, per-layer QAT rates."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

pytest.importorskip("flax")

from flax import nnx  # pylint: disable=g-import-not-at-top

import talr_optax as talr  # pylint: disable=g-import-not-at-top
from talr_optax import nnx as tnnx  # pylint: disable=g-import-not-at-top

import _nnx_testing as T  # pylint: disable=g-import-not-at-top

CONTEXT, WIDTH, LAYERS, HEADS = 8, 16, 2, 2
KERNELS = ("attention/query", "attention/key", "attention/value", "attention/out", "mlp/up",
           "mlp/down")
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 256, (3, CONTEXT)), jnp.int32)


def _lm(weight_bits, seed=0, **kwargs):
  return tnnx.TransformerLM(context=CONTEXT, width=WIDTH, num_layers=LAYERS, num_heads=HEADS,
                            weight_bits=weight_bits, rngs=nnx.Rngs(seed), **kwargs)


@pytest.fixture(scope="module")
def fp_lm():
  return _lm(None)


@pytest.fixture
def w2_lm(fp_lm):
  lm = _lm(2, seed=1)
  tnnx.load_full_precision(lm, fp_lm)
  return lm


_forward = nnx.jit(lambda model, x: model(x))


def test_shapes_of_stacked_parameters_and_logits(fp_lm, w2_lm):
  for lm in (fp_lm, w2_lm):
    assert _forward(lm, TOKENS).shape == (3, CONTEXT, 256)
    assert _forward(lm, TOKENS[0, :5]).shape == (5, 256)  # no batch axis, shorter window
    assert _forward(lm, TOKENS.reshape(1, 3, CONTEXT)).shape == (1, 3, CONTEXT, 256)
  blocks = w2_lm.blocks
  assert blocks.attention.query.kernel.shape == (LAYERS, WIDTH, WIDTH)
  assert blocks.mlp.up.kernel.shape == (LAYERS, WIDTH, 4 * WIDTH)
  assert blocks.mlp.down.kernel.shape == (LAYERS, 4 * WIDTH, WIDTH)
  assert blocks.mlp.up.weight_scale.shape == (LAYERS,)
  assert blocks.attention.query.multiply_scale and blocks.mlp.down.act_bits is None
  assert fp_lm.blocks.mlp.up.weight_scale is None  # full precision: no quantizer state


def test_positions_see_only_the_past(w2_lm):
  changed = TOKENS.at[:, 5].set((TOKENS[:, 5] + 1) % 256)
  before, after = _forward(w2_lm, TOKENS), _forward(w2_lm, changed)
  np.testing.assert_array_equal(before[:, :5], after[:, :5])
  assert not np.allclose(before[:, 5:], after[:, 5:])


def _layer(stacked, i):
  """Layer ``i`` of a stacked module, as a module of its own."""
  graphdef, state = nnx.split(stacked)
  return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))


def test_scanned_layers_equal_the_layers_applied_one_by_one(w2_lm):
  expected_scales = [T.np_weight_scale(T.np_value(w2_lm.blocks.mlp.up.kernel)[i])
                     for i in range(LAYERS)]
  logits = _forward(w2_lm, TOKENS)  # the first training forward calibrates each layer
  up = w2_lm.blocks.mlp.up
  assert bool(jnp.all(up.calibrated[...]))
  np.testing.assert_allclose(up.weight_scale[...], expected_scales, rtol=1e-5)
  assert float(up.weight_scale[0]) != float(up.weight_scale[1])

  w2_lm.eval()
  x = w2_lm.embed(TOKENS) + w2_lm.position[...]
  for i in range(LAYERS):
    x = _layer(w2_lm.blocks, i)(x)
  unrolled = w2_lm.head(w2_lm.norm(x))
  w2_lm.train()
  np.testing.assert_allclose(unrolled, logits, rtol=1e-4, atol=1e-4)
  # Quantized: the kernels the layers use take four values per layer.
  layer = _layer(w2_lm.blocks, 1).attention.query
  _, w_q = layer._quantize(jnp.ones((1, WIDTH)))  # pylint: disable=protected-access
  assert len(np.unique(np.asarray(w_q))) <= 4


def test_labels_levels_and_layer_axes(w2_lm):
  labels = nnx.to_pure_dict(tnnx.param_labels(w2_lm))
  axes = nnx.to_pure_dict(tnnx.layer_axes_for(w2_lm))
  for name in KERNELS:
    group, layer = name.split("/")
    assert labels["blocks"][group][layer]["kernel"] == tnnx.QUANTIZED
    assert axes["blocks"][group][layer]["kernel"] == 0
  for path in (("embed", "embedding"), ("position",), ("norm", "scale"), ("head", "kernel"),
               ("head", "bias"), ("blocks", "attention_norm", "scale"),
               ("blocks", "mlp_norm", "bias")):
    leaf_label, leaf_axis = labels, axes
    for key in path:
      leaf_label, leaf_axis = leaf_label[key], leaf_axis[key]
    assert (leaf_label, leaf_axis) == (tnnx.FULL_PRECISION, None), path
  levels = tnnx.levels_fn_for(w2_lm)(nnx.state(w2_lm, nnx.Param))
  query = w2_lm.blocks.attention.query
  kernel = T.np_value(query.kernel)
  assert levels["blocks"]["attention"]["query"]["kernel"].shape == (LAYERS, WIDTH, WIDTH)
  for i in range(LAYERS):
    np.testing.assert_array_equal(
        levels["blocks"]["attention"]["query"]["kernel"][i],
        T.np_levels(kernel[i], T.np_weight_scale(kernel[i]), 2))
  assert levels["embed"]["embedding"] is None and levels["head"]["kernel"] is None


def test_full_precision_model_has_nothing_to_schedule(fp_lm):
  assert tnnx.quantized_layers(fp_lm) == []
  with pytest.raises(ValueError, match="no quantized kernel"):
    tnnx.levels_fn_for(fp_lm)


def test_qat_steps_keep_one_rate_per_layer_and_kernel(w2_lm):
  tnnx.calibrate(w2_lm, TOKENS)
  levels_fn, axes = tnnx.levels_fn_for(w2_lm), tnnx.layer_axes_for(w2_lm)
  quantized = optax.chain(talr.adamwt(1e-3, talr.cosine_target(talr.initial_target(2), 20),
                                      levels_fn, layer_axes=axes),
                          talr.track_oscillations(levels_fn, layer_axes=axes))
  tx = optax.partition({tnnx.QUANTIZED: quantized, tnnx.FULL_PRECISION: optax.adamw(1e-3)},
                       tnnx.param_labels(w2_lm))
  optimizer = nnx.Optimizer(w2_lm, tx, wrt=nnx.Param)
  before = T.np_value(w2_lm.blocks.mlp.up.kernel)

  @nnx.jit
  def step(model, optimizer):
    def loss(m):
      logits = m(TOKENS[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, TOKENS[:, 1:]).mean()
    value, grads = nnx.value_and_grad(loss)(model)
    optimizer.update(model, grads)
    return value

  losses = [float(step(w2_lm, optimizer)) for _ in range(3)]
  assert all(np.isfinite(losses)) and losses[-1] < losses[0]
  assert not np.array_equal(T.np_value(w2_lm.blocks.mlp.up.kernel), before)
  m = talr.metrics(optimizer.opt_state)
  expected = sorted(f"blocks/{name}/kernel[{i}]" for name in KERNELS for i in range(LAYERS))
  for field in ("talr", "ema_transition_rate", "mean_oscillation_frequency"):
    assert sorted(k.split("/", 1)[1] for k in m if k.startswith(field + "/")) == expected
  assert all(np.isfinite(float(v)) for v in m.values())


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_heads=3), "width must be divisible by num_heads"),
    (dict(num_layers=0), "num_layers must be an integer >= 1"),
    (dict(weight_bits=5), "weight_bits"),
    (dict(act_bits=6), "act_bits"),
    (dict(rngs=0), "rngs must be an nnx.Rngs"),
])
def test_bad_arguments_are_named(kwargs, match):
  args = dict(context=CONTEXT, width=WIDTH, num_layers=LAYERS, num_heads=HEADS, weight_bits=2,
              rngs=nnx.Rngs(0))
  with pytest.raises((ValueError, TypeError), match=match):
    tnnx.TransformerLM(**(args | kwargs))


def test_a_window_longer_than_the_context_is_refused(fp_lm):
  with pytest.raises(ValueError, match=f"length {CONTEXT + 1}, more than the model's context"):
    fp_lm(jnp.zeros((1, CONTEXT + 1), jnp.int32))


def test_act_bits_quantize_the_mlp_hidden_activations_only():
  lm = _lm(4, act_bits=4)
  assert lm.blocks.mlp.down.act_bits == 4 and lm.blocks.mlp.up.act_bits is None
  assert lm.blocks.attention.query.act_bits is None
  labels = nnx.to_pure_dict(tnnx.param_labels(lm))
  assert labels["blocks"]["mlp"]["down"]["act_scale"] == tnnx.ACTIVATION_SCALE
  assert _forward(lm, TOKENS).shape == (3, CONTEXT, 256)
