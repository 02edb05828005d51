"""Runs TALR on 8 simulated CPU devices and prints a JSON report.

Started by ``tests/test_sharding.py`` in a subprocess, because the number of
devices is fixed when JAX initialises (the rest of the suite keeps 1 device).
Each section trains on a 2 x 4 ("data", "model") mesh and again on a single
device, and reports how the two runs compare:

* ``per_tensor`` / ``global``: a small MLP whose kernels are sharded over one
  or both mesh axes, trained with ``sgdt``;
* ``explicit``: the optimizer alone on a mesh with Explicit axes;
* ``stacked``: a stacked (L, d, d) param with ``layer_axes``, its layer axis
  sharded over ``model``;
* ``sampled``: ``sample_size`` on sharded params (stacked one included), with
  the cross-device collectives of the compiled optimizer step.
"""

import json
import math
import os
import re

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import talr_optax as talr
from talr_optax.counting import sample_strides, take_sample

STEPS = 20
SPECS = {  # one layout per kind of sharding: columns, both axes, rows, vector
    "w1": P(None, "model"),
    "w2": P("data", "model"),
    "w3": P("model", None),
    "b2": P("model"),
}
COLLECTIVES = ("all-reduce", "all-gather", "collective-permute", "all-to-all",
               "reduce-scatter")


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
  fq = lambda k: talr.fake_quant_weight(params[k], scales[k], 2, multiply_scale=True)
  h = jax.nn.relu(x @ fq("w1"))
  h = jax.nn.relu(h @ fq("w2") + params["b2"])
  return h @ fq("w3")


def run(tx, params, loss, xs, ys, put_params, put_batch):
  """Trains STEPS steps; returns params, state, init state, params and states seen."""
  params = put_params(params)
  state = tx.init(params)
  init_state = state

  @jax.jit
  def step(params, state, x, y):
    grads = jax.grad(loss)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  history, states = [params], []
  for t in range(len(xs)):
    params, state = step(params, state, *put_batch(xs[t], ys[t]))
    history.append(params)
    states.append(state[-1])
  return params, state, init_state, history, states


def same_sharding(a, b):
  return a.sharding.is_equivalent_to(b.sharding, a.ndim)


def max_diff(a, b):
  return float(max(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)),
                          initial=0.0)
                   for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def host_levels(levels_fn, params):
  return {k: np.asarray(v) for k, v in levels_fn(jax.device_get(params)).items()
          if v is not None}


def host_k(levels, layer_axes=None, global_rate=False):
  """k of update n from the host: levels of params n and n + 1, per rate group."""
  out = []
  for old, new in zip(levels[:-1], levels[1:]):
    changed, sizes = [], []
    for key in sorted(old):
      axis = (layer_axes or {}).get(key)
      diff = old[key] != new[key]
      groups = [diff] if axis is None else [np.take(diff, i, axis) for i in
                                            range(diff.shape[axis])]
      changed += [int(np.sum(g)) for g in groups]
      sizes += [g.size for g in groups]
    out.append([sum(changed) / sum(sizes)] if global_rate else
               [c / s for c, s in zip(changed, sizes)])
  return np.array(out)


def compare(s_sharded, s_single, hist_sharded, hist_single):
  return {
      "max_abs_diff_U": max_diff([s.talr for s in s_sharded], [s.talr for s in s_single]),
      "max_abs_diff_K": max_diff([s.ema_transition_rate for s in s_sharded],
                                 [s.ema_transition_rate for s in s_single]),
      "max_abs_diff_k": max_diff([s.transition_rate for s in s_sharded],
                                 [s.transition_rate for s in s_single]),
      "max_abs_diff_params": max_diff(hist_sharded, hist_single),
      "levels_equal": all(
          np.array_equal(a, b) for a, b in zip(jax.tree.leaves(s_sharded[-1].prev_levels),
                                               jax.tree.leaves(s_single[-1].prev_levels))),
  }


def mlp_sections(mesh):
  shard = {k: NamedSharding(mesh, s) for k, s in SPECS.items()}
  batch = NamedSharding(mesh, P("data"))
  one = jax.devices()[0]
  params, scales, xs, ys = problem()
  levels_fn = talr.levels_fn_from_scales(scales, bits=2)
  put_sharded = lambda p: {k: jax.device_put(v, shard[k]) for k, v in p.items()}
  put_one = lambda p: jax.device_put(p, one)
  loss = lambda p, x, y: optax.softmax_cross_entropy_with_integer_labels(
      forward(p, scales, x), y).mean()
  quantized = [k for k in params if scales[k] is not None]
  out = {}
  for granularity in ("per_tensor", "global"):
    tx = talr.sgdt(0.05, talr.cosine_target(0.02, STEPS), levels_fn,
                   momentum=0.9, granularity=granularity)
    p_sh, _, s0_sh, hist, states = run(
        tx, params, loss, xs, ys, put_sharded,
        lambda x, y: (jax.device_put(x, batch), jax.device_put(y, batch)))
    _, _, _, hist_1, states_1 = run(tx, params, loss, xs, ys, put_one, lambda x, y: (x, y))
    t_sh = states[-1]
    r = compare(states, states_1, hist, hist_1)
    r["names"] = list(t_sh.rate_names.names)
    r["rate_shape"] = list(t_sh.talr.shape)
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
    # k of update n, from levels gathered to the host: those of the params
    # before and after update n.
    levels = [host_levels(levels_fn, p) for p in hist]
    k_host = host_k(levels, global_rate=granularity == "global")
    k_dev = np.array([np.asarray(s.transition_rate) for s in states])
    r["k_host_shape"] = list(k_host.shape)
    r["k_device_shape"] = list(k_dev.shape)
    r["max_abs_diff_k_host"] = float(np.max(np.abs(k_host - k_dev)))
    r["total_transitions"] = int(sum(
        np.sum(levels[t][k] != levels[t + 1][k]) for t in range(STEPS) for k in quantized))
    r["rate_is_replicated"] = all(
        getattr(t_sh, f).sharding.is_fully_replicated
        for f in ("talr", "transition_rate", "ema_transition_rate", "talr_scale"))
    out[granularity] = r
  out["explicit"] = explicit_axes(params, levels_fn)
  return out


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

    states = []
    for g in grads:
      p, state = step(p, state, put(g))
      states.append(state[-1])
    return p, states

  with jax.set_mesh(mesh):
    shard = {k: NamedSharding(mesh, s) for k, s in SPECS.items()}
    p_sh, s_sh = train(lambda t: {k: jax.device_put(v, shard[k]) for k, v in t.items()})
  p_1, s_1 = train(lambda t: jax.device_put(t, jax.devices()[0]))
  quantized = [k for k, v in s_sh[-1].prev_levels.items() if v is not None]
  r = compare(s_sh, s_1, p_sh, p_1)
  r["levels_sharded_like_params"] = all(
      same_sharding(s_sh[-1].prev_levels[k], p_sh[k]) for k in quantized)
  r["total_transitions"] = float(sum(np.sum(s.transition_rate) for s in s_sh))
  return r


# ---------------------------------------------------------------------------
# Stacked layers: one rate per layer, the layer axis sharded over "model".

L, D = 4, 32
STACK_SPECS = {"stack": P("model", None, "data"), "head": P(None, None)}
STACK_AXES = {"stack": 0, "head": None}


def stacked_problem():
  rng = np.random.default_rng(2)
  w = (rng.normal(size=(L, D, D)) / np.sqrt(D)).astype(np.float32)
  head = (rng.normal(size=(D, 8)) / np.sqrt(D)).astype(np.float32)
  scales = (3 * w.reshape(L, -1).std(axis=1)).astype(np.float32)
  x = rng.normal(size=(STEPS, 64, D)).astype(np.float32)
  y = rng.integers(0, 8, size=(STEPS, 64))
  return {"stack": w, "head": head}, scales, x, y


def stacked_section(mesh):
  params, scales, xs, ys = stacked_problem()
  s = jnp.asarray(scales)[:, None, None]
  levels_fn = lambda p: {"stack": talr.weight_levels(p["stack"], s, 2), "head": None}

  def loss(p, x, y):
    h = x
    for i in range(L):
      h = jnp.tanh(h @ talr.fake_quant_weight(p["stack"][i], scales[i], 2,
                                                multiply_scale=True))
    return optax.softmax_cross_entropy_with_integer_labels(h @ p["head"], y).mean()

  tx = talr.sgdt(0.2, talr.cosine_target(0.03, STEPS), levels_fn, momentum=0.9,
                 layer_axes=STACK_AXES)
  shard = {k: NamedSharding(mesh, sp) for k, sp in STACK_SPECS.items()}
  batch = NamedSharding(mesh, P("data"))
  p_sh, _, s0, hist, states = run(
      tx, params, loss, xs, ys, lambda p: {k: jax.device_put(v, shard[k]) for k, v in p.items()},
      lambda x, y: (jax.device_put(x, batch), jax.device_put(y, batch)))
  _, _, _, hist_1, states_1 = run(tx, params, loss, xs, ys,
                                  lambda p: jax.device_put(p, jax.devices()[0]),
                                  lambda x, y: (x, y))
  r = compare(states, states_1, hist, hist_1)
  r["names"] = list(states[-1].rate_names.names)
  r["rate_shape"] = list(states[-1].talr.shape)
  r["params_spec"] = str(p_sh["stack"].sharding.spec)
  r["levels_spec"] = str(states[-1].prev_levels["stack"].sharding.spec)
  r["levels_sharded_like_params_init"] = same_sharding(s0[-1].prev_levels["stack"],
                                                       p_sh["stack"])
  r["levels_sharded_like_params_step"] = same_sharding(states[-1].prev_levels["stack"],
                                                       p_sh["stack"])
  levels = [host_levels(levels_fn, p) for p in hist]
  k_host = host_k(levels, layer_axes=STACK_AXES)
  k_dev = np.array([np.asarray(st.transition_rate) for st in states])
  r["max_abs_diff_k_host"] = float(np.max(np.abs(k_host - k_dev)))
  r["transitions_per_layer"] = [float(x) for x in k_host.sum(axis=0)]
  r["U_per_layer"] = [float(x) for x in states[-1].talr]
  return r


# ---------------------------------------------------------------------------
# sample_size on sharded params, and the collectives of the compiled step.

SAMPLE_SIZE = 200
SAMPLED_SPECS = {"w1": P(None, "model"), "w2": P("data", "model"),
                 "stack": P("model", None, "data"), "b": P("model")}
SAMPLED_AXES = {"w1": None, "w2": None, "stack": 0, "b": None}


def sampled_problem():
  rng = np.random.default_rng(3)
  params = {"w1": rng.normal(size=(64, 256)), "w2": rng.normal(size=(256, 256)),
            "stack": rng.normal(size=(4, 64, 64)), "b": rng.normal(size=(256,))}
  params = {k: (0.1 * v).astype(np.float32) for k, v in params.items()}
  grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
           for _ in range(10)]
  return params, grads


def sampled_levels_fn(p):
  return {"w1": talr.weight_levels(p["w1"], 0.3, 2), "w2": talr.weight_levels(p["w2"], 0.3, 2),
          "stack": talr.weight_levels(p["stack"], 0.3, 2), "b": None}


def collectives(hlo_text):
  """Every cross-device collective in an HLO module: op name and result shape."""
  found = []
  pattern = re.compile(r"=\s*(.+?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
  for line in hlo_text.splitlines():
    m = pattern.search(line)
    if not m:
      continue
    shape = m.group(1)
    sizes = [math.prod(int(d) for d in dims.split(",") if d) for _, dims in
             re.findall(r"(\w+)\[([\d,]*)\]", shape)]
    found.append({"op": m.group(2), "shape": shape.split("{")[0] if "(" not in shape
                  else shape, "elements": max(sizes, default=0),
                  "line": line.strip()[:300]})
  return found


def sampled_section(mesh):
  params, grads = sampled_problem()
  shard = {k: NamedSharding(mesh, s) for k, s in SAMPLED_SPECS.items()}
  put_sharded = lambda t: {k: jax.device_put(v, shard[k]) for k, v in t.items()}
  put_one = lambda t: jax.device_put(t, jax.devices()[0])

  def make(sample_size):
    return talr.sgdt(0.05, 0.02, sampled_levels_fn, momentum=0.9,
                     layer_axes=SAMPLED_AXES, sample_size=sample_size)

  def train(tx, put):
    p = put(params)
    state = tx.init(p)
    step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(
        *tx.update(g, s, p)))
    hist, states = [p], []
    for g in grads:
      p, state = step(p, state, put(g))
      hist.append(p)
      states.append(state[-1])
    return hist, states, step, state

  tx = make(SAMPLE_SIZE)
  hist, states, step, state = train(tx, put_sharded)
  hist_1, states_1, _, _ = train(tx, put_one)
  r = compare(states, states_1, hist, hist_1)
  r["names"] = list(states[-1].rate_names.names)
  quantized = ("w1", "w2", "stack")
  r["sampled_levels_shapes"] = {k: list(states[-1].prev_levels[k].shape) for k in quantized}
  r["sampled_levels_specs"] = {k: str(states[-1].prev_levels[k].sharding.spec)
                               for k in quantized}
  # The sampled rates are the rates of the grid, counted on the host.
  strides = {k: sample_strides(params[k].shape, SAMPLE_SIZE, SAMPLED_AXES[k])
             for k in quantized}
  r["strides"] = {k: list(v) if v is not None else None for k, v in strides.items()}
  levels = [{k: np.asarray(take_sample(v, strides[k])) for k, v in
             host_levels(sampled_levels_fn, p).items()} for p in hist]
  k_host = host_k(levels, layer_axes=SAMPLED_AXES)
  k_dev = np.array([np.asarray(st.transition_rate) for st in states])
  k_one = np.array([np.asarray(st.transition_rate) for st in states_1])
  # k = count / counted, rounded to float32 (XLA may divide or multiply by
  # the reciprocal): the counts are exact.
  counted = np.array([math.prod(levels[0]["stack"].shape[1:])] * L
                     + [levels[0]["w1"].size, levels[0]["w2"].size])
  r["counted_per_rate"] = counted.tolist()
  count = lambda k: np.rint(k * counted)
  r["counts_equal_host"] = bool(np.array_equal(count(k_dev), count(k_host)))
  r["counts_equal_single"] = bool(np.array_equal(count(k_dev), count(k_one)))
  r["max_rel_diff_k_host"] = float(np.max(np.abs(k_host - k_dev) / np.maximum(k_host, 1e-30)))
  r["total_transitions"] = float(k_host.sum())
  # The compiled optimizer step: update + apply_updates on sharded arrays.
  g = put_sharded(grads[0])
  r["collectives_sampled"] = collectives(step.lower(hist[-1], state, g).compile().as_text())
  exact = make(None)
  exact_step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(
      *exact.update(g, s, p)))
  p0 = put_sharded(params)
  r["collectives_exact"] = collectives(
      exact_step.lower(p0, exact.init(p0), g).compile().as_text())
  plain = optax.sgd(0.05, momentum=0.9)
  plain_step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(
      *plain.update(g, s, p)))
  r["collectives_plain_sgd"] = collectives(
      plain_step.lower(p0, plain.init(p0), g).compile().as_text())
  return r


def explicit_default_mesh():
  """``jax.make_mesh``'s default (Explicit) axes: sample_size, and the oscillation
  monitor with ``jax.jit(tx.init)``, against the same runs on one device."""
  mesh = jax.make_mesh((2, 4), ("data", "model"))
  rng = np.random.default_rng(2)
  params = {"w1": rng.normal(size=(16, 32)), "w2": rng.normal(size=(32, 36)),
            "stack": rng.normal(size=(4, 32, 24))}
  params = {k: v.astype(np.float32) for k, v in params.items()}
  specs = {"w1": P(None, "model"), "w2": P("data", "model"), "stack": P("model", None, "data")}
  levels_fn = talr.levels_fn_from_scales({k: 3 * float(v.std()) for k, v in params.items()}, 2)
  axes = {"w1": None, "w2": None, "stack": 0}
  grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
           for _ in range(5)]
  arms = {
      "sampled": (lambda: talr.sgdt(0.05, 0.02, levels_fn, sample_size=50, layer_axes=axes),
                  False),
      "sampled_jit_init": (lambda: talr.sgdt(0.05, 0.02, levels_fn, sample_size=50), True),
      "oscillations_jit_init": (lambda: optax.chain(optax.sgd(0.1), talr.track_oscillations(
          levels_fn, ema_momentum=0.5, layer_axes=axes)), True),
      "oscillations_sampled_jit_init": (lambda: optax.chain(optax.sgd(0.1), talr.track_oscillations(
          levels_fn, ema_momentum=0.5, sample_size=50)), True),
  }

  def train(tx, put, jit_init):
    p = put(params)
    state = (jax.jit(tx.init) if jit_init else tx.init)(p)

    @jax.jit
    def step(p, state, g):
      u, state = tx.update(g, state, p)
      return optax.apply_updates(p, u), state

    for g in grads:
      p, state = step(p, state, put(g))
    return p, state

  report = {"axis_types": [t.name for t in mesh.axis_types]}
  for name, (make, jit_init) in arms.items():
    with jax.set_mesh(mesh):
      put = lambda t: {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in t.items()}
      p_sh, s_sh = train(make(), put, jit_init)
    p_1, s_1 = train(make(), lambda t: jax.device_put(t, jax.devices()[0]), jit_init)
    ints = [(a, b) for a, b in zip(jax.tree.leaves(s_sh), jax.tree.leaves(s_1))
            if jnp.issubdtype(a.dtype, jnp.integer)]
    floats = [(a, b) for a, b in zip(jax.tree.leaves(s_sh), jax.tree.leaves(s_1))
              if not jnp.issubdtype(a.dtype, jnp.integer)]
    last = s_sh[-1]
    moved = (last.transition_rate if hasattr(last, "transition_rate")
             else last.oscillation_rate)
    report[name] = {
        "integers_equal": all(np.array_equal(a, b) for a, b in ints),
        "max_abs_diff_floats": max(max_diff(a, b) for a, b in floats),
        "max_abs_diff_params": max(max_diff(p_sh[k], p_1[k]) for k in params),
        "moved": float(np.sum(moved)) + float(np.sum(getattr(last, "mean_oscillation_frequency", 0))),
    }
  return report


def main():
  assert jax.device_count() == 8, jax.devices()
  # Auto axes: jit propagates shardings (GSPMD), the usual training setup.
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  report = {"device_count": jax.device_count()}
  report.update(mlp_sections(mesh))
  report["stacked"] = stacked_section(mesh)
  report["sampled"] = sampled_section(mesh)
  report["explicit_default"] = explicit_default_mesh()
  print("REPORT " + json.dumps(report))


if __name__ == "__main__":
  main()
