"""Figure 4: recompilations after the first step while the rates change.

Runs a jitted training step for 50 steps (``--steps``) and counts, with
``jax.monitoring`` listeners, every XLA backend compilation (and every jaxpr
trace) after the first step. The TALR rates (``k``, ``K``, ``c``, ``U``, and
``R`` from a cosine target schedule) are state values that change every step;
the script checks that they did change, so a count of 0 means the compiled
step is reused with new rate values, not that nothing moved.

Scenarios (the conv tensors of ``optimizer_step.py``: 1M weights, 0.1M with
``--quick``; params and state donated):

* ``sgdt`` / ``adamt``: ``jax.jit`` step, ``cosine_target`` and a cosine
  learning-rate schedule;
* ``inject_hyperparams``: ``optax.inject_hyperparams(talr_optax.sgdt,
  static_args=("levels_fn",))``; the step also writes a new learning rate and
  target (float32 arrays) into ``state.hyperparams`` every step, as a user
  changing them by hand would;
* ``layer_axes``: ``sgdt`` on the ten tensors stacked into one param of shape
  ``(10, ...)`` with ``layer_axes={"stack": 0}`` (ten rate groups);
* ``sample_size``: ``sgdt`` with ``sample_size=65536`` (2048 with ``--quick``,
  below the size of one tensor, so the count is sampled);
* ``nnx``: the README's ``@nnx.jit`` step of ``train_step.py`` on the NNX
  ResNet-20 W2A2 (batch 8; ``--quick``: SmallCNN), SGDT in the quantized group.

Usage:
  python benchmarks/recompiles.py --quick    # small tensors, SmallCNN
  python benchmarks/recompiles.py            # 1M tensors, ResNet-20, 50 steps each
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # pylint: disable=wrong-import-position

import talr_optax as talr  # pylint: disable=wrong-import-position

SCENARIOS = ("sgdt", "adamt", "inject_hyperparams", "layer_axes", "sample_size", "nnx")
QUICK_SAMPLE_SIZE = 2048


def _rates(state) -> np.ndarray:
  m = talr.metrics(state)
  return np.concatenate([np.ravel(np.asarray(m[k], np.float64)) for k in sorted(m)])


def _problem(name: str, size: str, steps: int, sample_size: int):
  """(params, grads, tx) of a functional scenario."""
  params, grads, scales = H.make_problem(size)
  target = talr.cosine_target(talr.initial_target(H.BITS), steps)
  lr = optax.cosine_decay_schedule(H.LR, steps)
  sgdt = lambda levels_fn, **kw: talr.sgdt(lr, target, levels_fn, momentum=H.MOMENTUM,
                                           weight_decay=H.WEIGHT_DECAY, **kw)
  if name == "layer_axes":
    keys = sorted(params)
    params = {"stack": jnp.stack([params[k] for k in keys])}
    grads = {"stack": jnp.stack([grads[k] for k in keys])}
    stacked_scales = np.asarray([scales[k] for k in keys], np.float32)
    stacked_scales = stacked_scales.reshape((-1,) + (1,) * (params["stack"].ndim - 1))
    levels_fn = talr.levels_fn_from_scales({"stack": stacked_scales}, bits=H.BITS)
    return params, grads, sgdt(levels_fn, layer_axes={"stack": 0})
  levels_fn = talr.levels_fn_from_scales(scales, bits=H.BITS)
  if name == "adamt":
    tx = talr.adamt(optax.cosine_decay_schedule(H.ADAM_LR, steps), target, levels_fn,
                    weight_decay=H.WEIGHT_DECAY)
  elif name == "inject_hyperparams":
    tx = optax.inject_hyperparams(talr.sgdt, static_args=("levels_fn",))(
        learning_rate=H.LR, target_transition_rate=talr.initial_target(H.BITS),
        levels_fn=levels_fn, momentum=H.MOMENTUM, weight_decay=H.WEIGHT_DECAY)
  elif name == "sample_size":
    tx = sgdt(levels_fn, sample_size=sample_size)
  else:
    tx = sgdt(levels_fn)
  return params, grads, tx


def functional(name: str, size: str, steps: int, sample_size: int) -> dict:
  params, grads, tx = _problem(name, size, steps, sample_size)
  step = H.jitted_step(tx, donate=True)
  params = H.copy_tree(params)
  state = tx.init(params)
  # Gradients that change every step (new values, same shapes and dtypes).
  grad_seq = [jax.tree.map(lambda g, i=i: g * (1.0 + 0.5 * np.sin(i)), grads) for i in range(4)]
  rates, counts = [], []
  for i in range(steps):
    if name == "inject_hyperparams":
      hp = dict(state.hyperparams)
      hp["learning_rate"] = jnp.asarray(H.LR * (1.0 - i / steps) + 1e-3, jnp.float32)
      hp["target_transition_rate"] = jnp.asarray(
          talr.initial_target(H.BITS) * (1.0 - i / steps), jnp.float32)
      state = state._replace(hyperparams=hp)
    params, state = step(params, state, grad_seq[i % len(grad_seq)])
    jax.block_until_ready(params)
    rates.append(_rates(state))
    counts.append(H.compile_counts())
  return _summary(name, size, steps, rates, counts,
                  sample_size=sample_size if name == "sample_size" else None)


def nnx_step(model_name: str, batch: int, steps: int) -> dict:
  from flax import nnx  # pylint: disable=import-outside-toplevel
  import train_step as TS  # pylint: disable=import-outside-toplevel
  key = jax.random.PRNGKey(0)
  shape = TS.MODELS[model_name][0]
  xs = [jax.random.normal(jax.random.fold_in(key, i), (batch, *shape)) for i in range(4)]
  y = jax.random.randint(key, (batch,), 0, 10)
  model = TS.make_model(model_name, 0, xs[0])
  optimizer = nnx.Optimizer(model, TS.make_tx("sgdt", model, total_steps=steps), wrt=nnx.Param)
  step = TS.make_step()
  rates, counts = [], []
  for i in range(steps):
    jax.block_until_ready(step(model, optimizer, xs[i % len(xs)], y))
    rates.append(_rates(optimizer.opt_state))
    counts.append(H.compile_counts())
  return _summary("nnx", f"{model_name}, batch {batch}", steps, rates, counts)


def _summary(name, size, steps, rates, counts, **extra) -> dict:
  first = counts[0]
  after = {k: counts[-1][k] - first[k] for k in first}
  rates = np.stack(rates)
  changed = int(np.sum(np.any(np.diff(rates, axis=0) != 0, axis=1)))
  return dict(scenario=name, size=size, steps=steps,
              recompiles_after_first_step=after["backend"],
              retraces_after_first_step=after["trace"],
              steps_with_changed_rates=changed, n_rate_values=int(rates.shape[1]), **extra)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--steps", type=int, default=50)
  ap.add_argument("--scenarios", default=",".join(SCENARIOS),
                  help="comma list of " + ",".join(SCENARIOS))
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  H.compile_counts()  # registers the listeners
  size = "0.1M" if args.quick else "1M"
  sample_size = QUICK_SAMPLE_SIZE if args.quick else H.SAMPLE_SIZE
  t0 = time.perf_counter()
  rows = []
  for name in args.scenarios.split(","):
    if name == "nnx":
      rows.append(nnx_step("cnn" if args.quick else "resnet20", 8, args.steps))
    elif name in SCENARIOS:
      rows.append(functional(name, size, args.steps, sample_size))
    else:
      raise SystemExit(f"unknown scenario {name!r}; choose from {','.join(SCENARIOS)}")
  H.print_table(
      f"recompiles after the first step, {args.steps} steps",
      ["scenario", "size", "recompiles", "retraces", "steps with new rates", "rate values"],
      [[r["scenario"], r["size"], r["recompiles_after_first_step"],
        r["retraces_after_first_step"], f"{r['steps_with_changed_rates']}/{r['steps'] - 1}",
        r["n_rate_values"]] for r in rows])
  out = H.results_path("recompiles", args.quick, args.out)
  H.write_json(out, dict(meta=H.meta(sys.argv[1:] if argv is None else argv,
                                     seconds=time.perf_counter() - t0), rows=rows))
  return rows


if __name__ == "__main__":
  main()
