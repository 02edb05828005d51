"""Runs TALR on 8 simulated CPU devices and prints a JSON report.

Started by ``tests/test_sharding.py`` in a subprocess, because the number of
devices is fixed when JAX initialises (the rest of the suite keeps 1 device).
Params of a small MLP are sharded over a 2x4 ("data", "model") mesh; the run
is compared with the same run on a single device.
"""

import json
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import talr_optax as talr

STEPS = 30
SPECS = {  # one layout per kind of sharding: columns, both axes, rows, vector
    "w1": P(None, "model"),
    "w2": P("data", "model"),
    "w3": P("model", None),
    "b2": P("model"),
}


def problem():
  rng = np.random.default_rng(0)
  params = {
      "w1": rng.normal(size=(16, 32)) / 4,
      "w2": rng.normal(size=(32, 32)) / 6,
      "w3": rng.normal(size=(32, 8)) / 6,
      "b2": np.zeros(32),
  }
  params = {k: v.astype(np.float32) for k, v in params.items()}
  scales = {k: (None if k == "b2" else float(3 * v.std())) for k, v in params.items()}
  x = rng.normal(size=(STEPS, 64, 16)).astype(np.float32)
  y = rng.integers(0, 8, size=(STEPS, 64))
  return params, scales, x, y


def forward(params, scales, x):
  h = jax.nn.relu(x @ talr.fake_quant_weight(params["w1"], scales["w1"], 2, multiply_scale=True))
  h = jax.nn.relu(h @ talr.fake_quant_weight(params["w2"], scales["w2"], 2, multiply_scale=True)
                  + params["b2"])
  return h @ talr.fake_quant_weight(params["w3"], scales["w3"], 2, multiply_scale=True)


def run(tx, params, scales, xs, ys, put_params, put_batch):
  """Trains STEPS steps; returns params, state and the levels seen at each step."""
  params = put_params(params)
  state = tx.init(params)
  init_state = state

  @jax.jit
  def step(params, state, x, y):
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
        forward(p, scales, x), y).mean()
    grads = jax.grad(loss)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  history, rates = [params], []
  for t in range(STEPS):
    params, state = step(params, state, *put_batch(xs[t], ys[t]))
    history.append(params)
    rates.append(state[-1].transition_rate)
  return params, state, init_state, history, rates


def same_sharding(a, b):
  return a.sharding.is_equivalent_to(b.sharding, a.ndim)


def main():
  assert jax.device_count() == 8, jax.devices()
  # Auto axes: jit propagates shardings (GSPMD), the usual training setup.
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  shard = {k: NamedSharding(mesh, s) for k, s in SPECS.items()}
  batch = NamedSharding(mesh, P("data"))
  one = jax.devices()[0]
  params, scales, xs, ys = problem()
  levels_fn = talr.levels_fn_from_scales(scales, bits=2)
  put_sharded = lambda p: {k: jax.device_put(v, shard[k]) for k, v in p.items()}
  put_one = lambda p: jax.device_put(p, one)
  report = {"device_count": jax.device_count()}

  for granularity in ("per_tensor", "global"):
    tx = talr.sgdt(0.05, talr.cosine_target(0.02, STEPS), levels_fn,
                   momentum=0.9, granularity=granularity)
    p_sh, s_sh, s0_sh, hist, k_sh = run(tx, params, scales, xs, ys, put_sharded,
                                  lambda x, y: (jax.device_put(x, batch), jax.device_put(y, batch)))
    p_1, s_1, _, _, _ = run(tx, params, scales, xs, ys, put_one, lambda x, y: (x, y))
    t_sh, t_1 = s_sh[-1], s_1[-1]
    r = {}
    quantized = [k for k in params if scales[k] is not None]
    # Levels live where their params live: after eager init and after jit.
    r["levels_sharded_like_params_init"] = all(
        same_sharding(s0_sh[-1].prev_levels[k], p_sh[k]) for k in quantized)
    r["levels_sharded_like_params_step"] = all(
        same_sharding(t_sh.prev_levels[k], p_sh[k]) for k in quantized)
    r["levels_specs"] = {k: str(t_sh.prev_levels[k].sharding.spec) for k in quantized}
    r["params_specs"] = {k: str(p_sh[k].sharding.spec) for k in quantized}
    jit_init = jax.jit(tx.init)(put_sharded(params))[-1]
    r["levels_sharded_like_params_jit_init"] = all(
        same_sharding(jit_init.prev_levels[k], p_sh[k]) for k in quantized)
    # The sharded run equals the single-device run.
    r["max_abs_diff_U"] = float(max(
        np.max(np.abs(np.asarray(a) - np.asarray(b)))
        for a, b in zip(jax.tree.leaves(t_sh.talr), jax.tree.leaves(t_1.talr))))
    r["max_abs_diff_K"] = float(max(
        np.max(np.abs(np.asarray(a) - np.asarray(b)))
        for a, b in zip(jax.tree.leaves(t_sh.ema_transition_rate),
                        jax.tree.leaves(t_1.ema_transition_rate))))
    r["max_abs_diff_params"] = float(max(
        np.max(np.abs(np.asarray(p_sh[k]) - np.asarray(p_1[k]))) for k in params))
    r["levels_equal"] = all(
        np.array_equal(t_sh.prev_levels[k], t_1.prev_levels[k]) for k in quantized)
    # k of every update, from the host: the update at step t received
    # hist[t] and compared its levels with those of hist[t - 1] (the params at
    # init for t = 0): the one-step lag of the method.
    lv = lambda p: {k: np.asarray(v) for k, v in levels_fn(jax.device_get(p)).items()
                    if v is not None}
    levels = [lv(p) for p in hist]
    k_host, k_dev = [], []
    for t in range(1, STEPS):
      changed = {k: int(np.sum(levels[t][k] != levels[t - 1][k])) for k in quantized}
      if granularity == "global":
        k_host.append(sum(changed.values()) / sum(levels[t][k].size for k in quantized))
        k_dev.append(float(k_sh[t]))
      else:
        k_host += [changed[k] / levels[t][k].size for k in quantized]
        k_dev += [float(k_sh[t][k]) for k in quantized]
    r["max_abs_diff_k_host"] = float(np.max(np.abs(np.array(k_host) - np.array(k_dev))))
    r["total_transitions"] = int(sum(
        np.sum(levels[t][k] != levels[t - 1][k]) for t in range(1, STEPS) for k in quantized))
    if granularity == "global":
      r["rate_is_replicated"] = bool(t_sh.talr.sharding.is_fully_replicated)
    report[granularity] = r
  report["explicit"] = explicit_axes(params, levels_fn)
  print("REPORT " + json.dumps(report))


def explicit_axes(params, levels_fn):
  """The optimizer alone on a mesh with Explicit axes (sharding in types)."""
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
  tx = talr.sgdt(0.05, 0.02, levels_fn, momentum=0.9)
  rng = np.random.default_rng(1)
  grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
           for _ in range(5)]

  def train(put):
    p = put(params)
    state = tx.init(p)

    @jax.jit
    def step(p, state, g):
      u, state = tx.update(g, state, p)
      return optax.apply_updates(p, u), state

    for g in grads:
      p, state = step(p, state, put(g))
    return p, state[-1]

  with jax.set_mesh(mesh):
    shard = {k: NamedSharding(mesh, s) for k, s in SPECS.items()}
    p_sh, t_sh = train(lambda t: {k: jax.device_put(v, shard[k]) for k, v in t.items()})
  p_1, t_1 = train(lambda t: jax.device_put(t, jax.devices()[0]))
  quantized = list(t_sh.prev_levels)
  quantized = [k for k in quantized if t_sh.prev_levels[k] is not None]
  return {
      "levels_sharded_like_params": all(
          same_sharding(t_sh.prev_levels[k], p_sh[k]) for k in quantized),
      "max_abs_diff_U": float(max(abs(float(t_sh.talr[k]) - float(t_1.talr[k]))
                                  for k in quantized)),
      "max_abs_diff_params": float(max(
          np.max(np.abs(np.asarray(p_sh[k]) - np.asarray(p_1[k]))) for k in params)),
  }


if __name__ == "__main__":
  main()
