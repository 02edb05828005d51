"""The oscillation remedies on a Qwix QAT model: ``levels_fn.centers``."""

from __future__ import annotations

import pytest

qwix = pytest.importorskip("qwix")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import talr_optax as talr  # noqa: E402
from talr_optax import qwix as tq  # noqa: E402
from _qwix_models import X, mlp, params, qt  # noqa: E402

RULE = dict(module_path="fc2", weight_qtype="int2", weight_calibration_method="fixed,-0.3,0.3")


def test_centers_are_qwix_dequantized_levels():
  qt_model = qt(mlp(), [qwix.QtRule(**RULE)], X)
  levels_fn = tq.levels_fn_from_qwix(qt_model, X)
  p = params(qt_model)
  w = np.asarray(qt_model.fc2.kernel.get_value())
  q = qwix.quantize(jnp.asarray(w), "int2", channelwise_axes=(1,),
                    calibration_method="fixed,-0.3,0.3")
  value = np.asarray(qwix.dequantize(q))
  step = np.asarray(q.scale) * np.ones_like(w)
  beyond = np.abs(w - value) > step / 2
  assert beyond.any() and not beyond.all(), "the draw must have weights past the range"
  centers = jax.jit(levels_fn.centers)(p)
  assert centers["fc1"]["kernel"] is None and centers["fc2"]["bias"] is None
  np.testing.assert_allclose(centers["fc2"]["kernel"], np.where(beyond, w, value), rtol=1e-6)
  # A weight at its centre keeps its level.
  moved = jax.tree.map(lambda c, x: x if c is None else c, centers, p,
                       is_leaf=lambda x: x is None)
  np.testing.assert_array_equal(levels_fn(moved)["fc2"]["kernel"], levels_fn(p)["fc2"]["kernel"])
  # Given levels: their dequantized values.
  levels = levels_fn(p)
  ones = jax.tree.map(lambda x: None if x is None else jnp.ones_like(x), levels,
                      is_leaf=lambda x: x is None)
  np.testing.assert_allclose(levels_fn.centers(p, ones)["fc2"]["kernel"], step, rtol=1e-6)
  with pytest.raises(ValueError, match="levels at 'fc2/kernel'"):
    levels_fn.centers(p, {"fc2": {"kernel": jnp.ones(3)}})


def test_freezing_and_dampening_train_a_qwix_model():
  qt_model = qt(mlp(), [qwix.QtRule(**RULE)], X)
  levels_fn = tq.levels_fn_from_qwix(qt_model, X)
  tx = optax.chain(
      talr.dampen_oscillations(levels_fn.centers, 1e-3),
      talr.adamwt(0.05, 0.05, levels_fn, freeze_threshold=0.05,
                  centers_fn=levels_fn.centers, freeze_ema_momentum=0.8))
  optimizer = nnx.Optimizer(qt_model, tx, wrt=nnx.Param)
  y = jnp.arange(8) % 10

  @nnx.jit
  def step(model, optimizer):
    loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(X), y).mean()
    optimizer.update(model, nnx.grad(loss)(model))

  for _ in range(12):
    before = levels_fn(params(qt_model))["fc2"]["kernel"]
    step(qt_model, optimizer)
    after = levels_fn(params(qt_model))["fc2"]["kernel"]
    found = talr.metrics(optimizer.opt_state)
    # TALR inside the freezing counts the level changes that were applied.
    assert float(found["transition_rate/fc2/kernel"]) == pytest.approx(
        float(jnp.mean(before != after)), abs=1e-7)
  assert "frozen_fraction/fc2/kernel" in found
