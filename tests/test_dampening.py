"""dampen_oscillations and the centres functions against NumPy and the loss gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import talr_optax as talr
from reference import levels as ref_levels


def ref_centers(w, scale, bits):
  """Latent value of each weight's level; a weight past the outer levels is its own."""
  w = np.asarray(w, np.float64)
  level = ref_levels(w, scale, bits)
  if bits == 1:
    return np.where(np.abs(w) > scale, w, scale * (2.0 * level - 1.0))
  half = 2 ** (bits - 1)
  u = half * w / scale
  return np.where((u > half - 1) | (u < -half), w, level * scale / half)


@pytest.mark.parametrize("bits", [1, 2, 3, 8])
def test_centers_match_numpy(bits):
  rng = np.random.default_rng(bits)
  w = rng.normal(size=(4, 9)).astype(np.float32)
  scale = np.array([0.5, 1.0, 2.0, 0.7], np.float32)[:, None]  # per row
  centers_fn = talr.centers_fn_from_scales({"w": scale, "b": None}, bits)
  got = centers_fn({"w": jnp.asarray(w), "b": jnp.zeros(3)})
  assert got["b"] is None and got["w"].dtype == jnp.float32
  np.testing.assert_allclose(got["w"], ref_centers(w, scale, bits), rtol=1e-6, atol=1e-7)
  # A weight at its centre is its own centre, and has the same level.
  levels_fn = talr.levels_fn_from_scales({"w": scale, "b": None}, bits)
  again = centers_fn({"w": got["w"], "b": None})
  np.testing.assert_array_equal(again["w"], got["w"])
  np.testing.assert_array_equal(levels_fn({"w": got["w"], "b": None})["w"],
                                levels_fn({"w": jnp.asarray(w), "b": None})["w"])


def test_centers_of_given_levels_and_bf16():
  centers_fn = talr.centers_fn_from_scales({"w": 2.0}, 3)
  params = {"w": jnp.zeros(8, jnp.bfloat16)}
  levels = {"w": jnp.arange(-4, 4, dtype=jnp.int8)}
  got = centers_fn(params, levels)["w"]
  assert got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.arange(-4, 4) * 0.5)
  levels_fn = talr.levels_fn_from_scales({"w": 2.0}, 3)
  np.testing.assert_array_equal(levels_fn({"w": got})["w"], levels["w"])


def test_update_matches_numpy_and_schedule():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(5, 7)).astype(np.float32)
  params = {"w": jnp.asarray(w), "b": jnp.ones(3)}
  centers_fn = talr.centers_fn_from_scales({"w": 1.5, "b": None}, 2)
  schedule = lambda n: 0.1 * (n + 1)
  tx = talr.dampen_oscillations(centers_fn, schedule)
  state = tx.init(params)
  for n in range(3):
    g = {"w": jnp.asarray(rng.normal(size=w.shape).astype(np.float32)), "b": jnp.ones(3)}
    out, state = tx.update(g, state, params)
    want = np.asarray(g["w"]) + 2 * 0.1 * (n + 1) * (w - ref_centers(w, 1.5, 2))
    np.testing.assert_allclose(out["w"], want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out["b"], g["b"])
  assert int(state.dampening_count) == 3


def test_equals_the_regulariser_in_the_loss():
  rng = np.random.default_rng(1)
  params = {"w": jnp.asarray(rng.normal(size=(6, 4)).astype(np.float32)),
            "b": jnp.asarray(rng.normal(size=4).astype(np.float32))}
  x = jnp.asarray(rng.normal(size=(8, 6)).astype(np.float32))
  scales = {"w": talr.initial_weight_scale(params["w"], axis=0), "b": None}
  centers_fn = talr.centers_fn_from_scales(scales, 2)
  lam = 0.37

  def task_loss(p):
    return jnp.mean((x @ p["w"] + p["b"]) ** 2)

  def regularised(p):
    c = jax.lax.stop_gradient(centers_fn(p)["w"])
    return task_loss(p) + lam * jnp.sum((p["w"] - c) ** 2)

  tx = optax.chain(talr.dampen_oscillations(centers_fn, lam), optax.sgd(0.1))
  state = tx.init(params)
  want = optax.sgd(0.1).update(jax.grad(regularised)(params), optax.sgd(0.1).init(params))[0]
  got, _ = jax.jit(tx.update)(jax.grad(task_loss)(params), state, params)
  for k in params:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-7)


def test_dtype_jit_eval_shape_and_safe_schedule():
  centers_fn = talr.centers_fn_from_scales({"w": 1.0}, 2)
  params = {"w": jnp.linspace(-1, 1, 16).astype(jnp.bfloat16)}
  values = jnp.array([0.0, -1.0, jnp.nan])
  tx = talr.dampen_oscillations(centers_fn, lambda n: values[jnp.minimum(n, 2)])
  jax.eval_shape(tx.init, params)
  state = tx.init(params)
  g = {"w": jnp.ones(16, jnp.bfloat16)}
  update = jax.jit(tx.update)
  for _ in range(3):  # 0, then -1 and NaN, which count as 0
    out, state = update(g, state, params)
    assert out["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(out["w"], g["w"])
  assert update._cache_size() == 1


def test_bad_input():
  centers_fn = talr.centers_fn_from_scales({"w": 1.0}, 2)
  for bad in (-0.1, float("nan"), float("inf"), "0.1"):
    with pytest.raises(ValueError, match="strength"):
      talr.dampen_oscillations(centers_fn, bad)
  with pytest.raises(ValueError, match="strength.*step 0 is -1"):
    talr.dampen_oscillations(centers_fn, lambda n: -1.0)
  with pytest.raises(ValueError, match="centers_fn"):
    talr.dampen_oscillations(None, 0.1)
  params = {"w": jnp.ones((2, 3))}
  with pytest.raises(ValueError, match="structure"):  # tree does not match params
    talr.dampen_oscillations(lambda p: {"v": p["w"]}, 0.1).init(params)
  with pytest.raises(ValueError, match="shape"):
    talr.dampen_oscillations(lambda p: {"w": p["w"][0]}, 0.1).init(params)
  with pytest.raises(ValueError, match="no quantized leaf"):
    talr.dampen_oscillations(lambda p: {"w": None}, 0.1).init(params)
  tx = talr.dampen_oscillations(centers_fn, 0.1)
  with pytest.raises(ValueError, match="needs the params"):
    tx.update(params, tx.init(params))
  with pytest.raises(ValueError, match="structure of the scales"):
    centers_fn({"v": jnp.ones(2)})
  with pytest.raises(ValueError, match="step size"):
    talr.centers_fn_from_scales({"w": 0.0}, 2)


def _authors_term(w, w_q, aggregation):
  """The reference code's ``dampening_loss`` on a PyTorch-layout (out-first) kernel, NumPy.

  ``w`` is already clipped to the quantizer's range; ``w_q`` its quantized value.
  """
  loss = (w_q - w) ** 2
  if aggregation == "sum":
    return loss.sum()
  if aggregation == "mean":
    return loss.mean()
  return loss.sum(0).mean()  # kernel_mean


@pytest.mark.parametrize("aggregation", ["sum", "mean", "kernel_mean"])
def test_aggregations_are_the_authors_terms(aggregation):
  """The added gradient equals jax.grad of the authors' term (per layer when stacked)."""
  rng = np.random.default_rng(4)
  # A conv kernel (kh, kw, in, out), a dense kernel and 3 stacked dense layers (L, in, out).
  params = {"conv": jnp.asarray(rng.normal(size=(3, 3, 4, 6)), jnp.float32),
            "dense": jnp.asarray(rng.normal(size=(5, 7)), jnp.float32),
            "stack": jnp.asarray(rng.normal(size=(3, 5, 2)), jnp.float32)}
  scales = {k: 2.5 for k in params}  # no weight past the outer levels
  centers_fn = talr.centers_fn_from_scales(scales, 2)
  axes = None if aggregation == "sum" else {"conv": None, "dense": None, "stack": 0}
  lam = 0.3
  tx = talr.dampen_oscillations(centers_fn, lam, aggregation=aggregation, layer_axes=axes)
  zeros = jax.tree.map(jnp.zeros_like, params)
  out, _ = tx.update(zeros, tx.init(params), params)
  centers = jax.lax.stop_gradient(centers_fn(params))

  def term(p):
    total = 0.0
    for name in ("conv", "dense"):
      # Flax (..., in, out) -> PyTorch (out, in, ...): the output axis first.
      w = jnp.moveaxis(p[name], -1, 0)
      total += _authors_term(w, jnp.moveaxis(centers[name], -1, 0), aggregation)
    for layer in range(3):
      w, c = p["stack"][layer].T, centers["stack"][layer].T
      total += (_authors_term(w, c, aggregation) if aggregation != "sum"
                else _authors_term(w, c, "sum"))
    return lam * total

  want = jax.grad(term)(params)
  for name in params:
    np.testing.assert_allclose(out[name], want[name], rtol=1e-5, atol=1e-7)
  # kernel_mean is the sum divided by the fan-in: 36 for the conv, 5 for the others.
  if aggregation == "kernel_mean":
    plain = talr.dampen_oscillations(centers_fn, lam)
    summed, _ = plain.update(zeros, plain.init(params), params)
    np.testing.assert_allclose(out["conv"], summed["conv"] / 36, rtol=1e-6)
    np.testing.assert_allclose(out["stack"], summed["stack"] / 5, rtol=1e-6)


def test_aggregation_arguments_are_checked():
  centers_fn = talr.centers_fn_from_scales({"w": 1.0}, 2)
  levels_fn = talr.levels_fn_from_scales({"w": 1.0}, 2)
  with pytest.raises(ValueError, match="aggregation must be one of"):
    talr.dampen_oscillations(centers_fn, 0.1, aggregation="kernel")
  with pytest.raises(ValueError, match="with aggregation='sum' it would be ignored"):
    talr.dampen_oscillations(centers_fn, 0.1, layer_axes={"w": 0})
  params = {"w": jnp.ones((2, 3))}
  with pytest.raises(ValueError, match="returned int8 values at 'w'.*levels_fn passed as"):
    talr.dampen_oscillations(levels_fn, 0.1).init(params)
