"""The oscillation remedies on NNX models: centers_fn_for, nnx.Optimizer, BN re-estimation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import _nnx_testing as T
import talr_optax as talr
from talr_optax import nnx as tnnx


def _calibrated_tiny(seed=0):
  model = T.TinyNet(seed)
  tnnx.calibrate(model, T.X)
  return model


def test_centers_fn_for_matches_the_layers():
  model = _calibrated_tiny()
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  centers = tnnx.centers_fn_for(model)(params)
  for layer, name in ((model.conv2, "conv2"), (model.head, "head")):
    kernel = np.asarray(layer.kernel[...])
    s = float(layer.weight_scale[...])
    bits = layer.weight_bits
    half = 2 ** (bits - 1)
    u = half * kernel / s
    want = np.where((u > half - 1) | (u < -half), kernel, T.np_levels(kernel, s, bits) * s / half)
    np.testing.assert_allclose(centers[name]["kernel"], want, rtol=1e-6, atol=1e-7)
  assert centers["conv1"]["kernel"] is None and centers["head"]["bias"] is None
  # multiply_scale changes the layer's output, not the latent value of a level:
  # conv2 (False) and head (True) both come back to their own levels.
  levels_fn = tnnx.levels_fn_for(model)
  levels = levels_fn(params)
  at_centers = jax.tree.map(lambda c, p: p if c is None else c, centers, params,
                            is_leaf=lambda x: x is None)
  again = levels_fn(at_centers)
  for name in ("conv2", "head"):
    np.testing.assert_array_equal(again[name]["kernel"], levels[name]["kernel"])
  shifted = jax.tree.map(lambda x: None if x is None else jnp.clip(x + 1, -2, 1).astype(
      jnp.int8), levels, is_leaf=lambda x: x is None)
  values = tnnx.centers_fn_for(model)(params, shifted)
  np.testing.assert_allclose(
      values["conv2"]["kernel"],
      np.asarray(shifted["conv2"]["kernel"]) * float(model.conv2.weight_scale[...]) / 2,
      rtol=1e-6)


def test_centers_fn_for_bad_input():
  with pytest.raises(TypeError, match="nnx.Module"):
    tnnx.centers_fn_for(3)
  with pytest.raises(ValueError, match="no quantized kernel"):
    tnnx.centers_fn_for(T.build(tnnx.SmallCNN, weight_bits=None, act_bits=None))
  model = _calibrated_tiny()
  with pytest.raises(ValueError, match="none of the quantized kernels"):
    tnnx.centers_fn_for(model)({"other": jnp.ones(3)})


def test_remedies_train_under_nnx_optimizer():
  model = _calibrated_tiny()
  levels_fn, centers_fn = tnnx.levels_fn_for(model), tnnx.centers_fn_for(model)
  labels = tnnx.param_labels(model)
  quantized = talr.adamwt(1e-2, 0.02, levels_fn, freeze_threshold=0.05,
                          centers_fn=centers_fn, freeze_ema_momentum=0.9)
  tx = optax.partition({
      tnnx.QUANTIZED: optax.chain(talr.dampen_oscillations(centers_fn, 1e-3), quantized),
      tnnx.FULL_PRECISION: optax.adam(1e-2), tnnx.ACTIVATION_SCALE: optax.adam(1e-3),
      tnnx.BATCH_NORM: optax.adam(1e-2)}, labels)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(T.tiny_loss)(model)
    optimizer.update(model, grads)
    return loss

  for _ in range(5):
    step(model, optimizer)
  found = talr.metrics(optimizer.opt_state)
  assert {"frozen_fraction/conv2/kernel", "frozen_fraction/head/kernel",
          "talr/conv2/kernel"} <= set(found)
  assert all(np.isfinite(float(v)) for v in found.values())


@nnx.jit
def _recorded_bn_inputs(model, x):
  """Each batch norm's input in one forward pass (a list in call order)."""
  recorded = []
  original = nnx.BatchNorm.__call__

  def recording(self, x, *args, **kwargs):
    recorded.append(x)
    return original(self, x, *args, **kwargs)

  nnx.BatchNorm.__call__ = recording  # while tracing only
  try:
    model(x)
  finally:
    nnx.BatchNorm.__call__ = original
  return recorded


def _bn_inputs(model, batches):
  """Per batch norm (in call order), its inputs over ``batches`` with batch statistics."""
  model = nnx.clone(model)
  model.eval()
  for _, m in nnx.iter_modules(model):
    if isinstance(m, nnx.BatchNorm):
      m.use_running_average = False
  per_batch = [[np.asarray(x, np.float64) for x in _recorded_bn_inputs(model, b)]
               for b in batches]
  return list(zip(*per_batch))


_eval = nnx.jit(lambda model, x: model(x))


def test_reestimate_batch_norm_on_mobilenet():
  model = T.build(tnnx.MobileNetV2Tiny, weight_bits=2, act_bits=2)
  batches = [T.relu_batch(i, (6, 8, 8, 1)) for i in range(3)]
  tnnx.calibrate(model, batches[0])
  model.eval()
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  scales = [np.asarray(layer.weight_scale[...]) for _, layer in tnnx.quantized_layers(model)]
  before_eval = np.asarray(_eval(model, batches[0]))
  inputs = _bn_inputs(model, batches)

  assert tnnx.reestimate_batch_norm(model, batches) == 3

  # The batch norms in call order (the order the forward pass records them in).
  by_path = dict((p, m) for p, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm))
  order = [("bn1",)] + [("blocks", i, name) for i in range(4)
                        for name in ("bn_expand", "bn_depthwise", "bn_project")
                        if (i > 0 or name != "bn_expand")] + [("bn_last",)]
  assert sorted(order) == sorted(by_path) and len(order) == len(inputs) == 13
  for path, xs in zip(order, inputs):
    bn = by_path[path]
    assert len(xs) == 3 and xs[0].shape[-1] == bn.mean.shape[0]
    mean = np.mean([x.mean(axis=(0, 1, 2)) for x in xs], axis=0)
    var = np.mean([x.var(axis=(0, 1, 2)) for x in xs], axis=0)
    np.testing.assert_allclose(bn.mean[...], mean, rtol=1e-4, atol=1e-5, err_msg=str(path))
    np.testing.assert_allclose(bn.var[...], var, rtol=1e-4, atol=1e-5, err_msg=str(path))
    assert bn.use_running_average and bn.momentum == 0.9  # modes and momentum restored
  # Params and step sizes untouched; the eval output changes with the statistics.
  jax.tree.map(np.testing.assert_array_equal, params,
               jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param))))
  for s, (_, layer) in zip(scales, tnnx.quantized_layers(model)):
    np.testing.assert_array_equal(layer.weight_scale[...], s)
    assert layer.deterministic
  assert not np.allclose(np.asarray(_eval(model, batches[0])), before_eval)


def test_reestimate_batch_norm_bad_input():
  with pytest.raises(TypeError, match="nnx.Module"):
    tnnx.reestimate_batch_norm("model", [])
  model = _calibrated_tiny()
  stats = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))
  with pytest.raises(ValueError, match="batches is empty"):
    tnnx.reestimate_batch_norm(model, [])
  with pytest.raises(ValueError, match="forward"):
    tnnx.reestimate_batch_norm(model, [T.X], forward=3)
  with pytest.raises(Exception):
    tnnx.reestimate_batch_norm(model, [jnp.ones((2, 3))])  # does not fit the model
  jax.tree.map(np.testing.assert_array_equal, stats,
               jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))))
  with pytest.raises(ValueError, match="no nnx.BatchNorm"):
    tnnx.reestimate_batch_norm(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), [jnp.ones((1, 2))])


@pytest.mark.parametrize("to_array", [jnp.asarray, np.asarray], ids=["jax", "numpy"])
def test_reestimate_batch_norm_refuses_one_array_for_batches(to_array):
  model = _calibrated_tiny()
  stats = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))
  # Iterating one batch would pass single images: refuse it and say how to wrap it.
  with pytest.raises(TypeError, match=r"batches must be an iterable of batches, got one "
                     r"array of shape \(4, 5, 5, 1\).*\[x\]"):
    tnnx.reestimate_batch_norm(model, to_array(T.X))
  jax.tree.map(np.testing.assert_array_equal, stats,
               jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))))


@pytest.mark.parametrize("batch, kind", [((T.X, T.Y), "tuple"), ([T.X, T.Y], "list"),
                                         ({"image": T.X}, "dict")],
                         ids=["tuple", "list", "dict"])
def test_reestimate_batch_norm_names_a_loader_batch_without_forward(batch, kind):
  model = _calibrated_tiny()
  with pytest.raises(TypeError, match=rf"batch 0 is a {kind}, not an array.*forward=lambda "
                                      r"m, b: m\(b\[0\]\)"):
    tnnx.reestimate_batch_norm(model, [batch])
  # With forward, such batches are what it is for.
  forward = (lambda m, b: m(b["image"])) if kind == "dict" else (lambda m, b: m(b[0]))
  assert tnnx.reestimate_batch_norm(model, [batch, batch], forward=forward) == 2


def _modes(model):
  return [(path, name, getattr(module, name)) for path, module in nnx.iter_modules(model)
          for name in ("deterministic", "use_running_average", "momentum")
          if hasattr(module, name)]


def _failing_forward(fail_on):
  calls = []

  def forward(m, b):
    calls.append(1)
    if len(calls) == fail_on:
      raise RuntimeError(f"forward call {fail_on} fails")
    return m(b)

  return forward


def _batches_then(error):
  yield T.X
  yield 2.0 * T.X + 1.0
  raise error


@pytest.mark.parametrize("case", ["forward_raises", "iterator_raises", "interrupt"])
def test_reestimate_batch_norm_failing_later_batch_restores_the_model(case):
  model = _calibrated_tiny()
  model.train()  # modes the call changes (it runs in eval mode)
  model.bn1.momentum, model.bn2.momentum = 0.8, 0.7
  model.bn1.mean[...] = jnp.full((3,), 0.25)
  stats = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))
  modes = _modes(model)
  assert ("bn1",) in [p for p, name, _ in modes if name == "use_running_average"]
  if case == "forward_raises":
    # Each new batch shape traces forward again: its 2nd call is the 2nd batch.
    batches, forward, error = [T.X, T.X[:3], T.X[:2]], _failing_forward(2), RuntimeError
  else:
    error = KeyboardInterrupt if case == "interrupt" else OSError
    batches, forward = _batches_then(error("the loader fails at batch 3")), None
  with pytest.raises(error):
    tnnx.reestimate_batch_norm(model, batches, forward=forward)
  jax.tree.map(np.testing.assert_array_equal, stats,
               jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))))
  assert _modes(model) == modes
