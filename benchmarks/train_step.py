"""Figure 2: the whole training step of a W2A2 NNX model, SGDT vs SGD.

One step = forward, backward and optimizer on a batch of random inputs (the
time does not depend on their values), written as the README's NNX loop:
``nnx.Optimizer(model, optax.partition(groups, param_labels(model)),
wrt=nnx.Param)`` and an ``@nnx.jit`` step calling ``nnx.value_and_grad`` and
``optimizer.update(model, grads)``. Models (public ``talr_optax.nnx`` API only:
``SmallCNN``, ``ResNet20``, ``load_full_precision``, ``calibrate``,
``levels_fn_for``, ``param_labels``):

* ``cnn``: ``SmallCNN`` W2A2 on 8x8x1 inputs, batch 32 (2 quantized convs,
  13.8k quantized weights): a step of about a millisecond, where any per-call
  cost of the optimizer shows;
* ``resnet20``: ``ResNet20`` W2A2 on 32x32x3 inputs, batch 128 (18 quantized
  convs, 0.27M quantized weights).

The four groups of the README (``"quantized"``, ``"full_precision"``,
``"activation_scale"``, ``"batch_norm"``); only ``quantized`` differs:

* ``sgd``: ``chain(add_decayed_weights(1e-4), sgd(0.1, momentum=0.9))``;
* ``sgdt``: ``talr_optax.sgdt(0.1, R, levels_fn_for(model), weight_decay=1e-4)``
  (the same chain with ``scale_by_talr`` last), ``R`` a cosine target;
* ``sgd_track``: ``sgd`` followed by ``track_transitions(levels_fn, R)`` as the
  last stage of the group (monitoring only).

Both styles are timed: ``nnx`` (``@nnx.jit`` on ``(model, optimizer)``, which
walks both object graphs in Python on every call) and ``functional``
(``nnx.split((model, optimizer))`` once, then ``jax.jit`` over the pure state,
merging inside the traced function). Also reported: the number of graph nodes
the ``nnx.Optimizer`` holds (``len(list(nnx.iter_graph(optimizer)))``, which
the ``nnx`` style pays for on every call), the optimizer-state bytes, the
first-call (compile) time and the compilations while timing (must be 0).

Method as in ``_harness.py``: all variants of one model and style are built,
compiled and warmed up, then timed in interleaved rounds; each call ends with
``jax.block_until_ready`` on the loss (all outputs of one XLA execution are
ready together).

Usage:
  python benchmarks/train_step.py --quick      # SmallCNN batch 32, both styles, 20 rounds
  python benchmarks/train_step.py              # SmallCNN and ResNet-20, both styles, 25 rounds
  python benchmarks/train_step.py --models resnet20 --styles nnx --repeats 40
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
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # pylint: disable=wrong-import-position

import talr_optax as talr  # pylint: disable=wrong-import-position
import talr_optax.nnx as tnnx  # pylint: disable=wrong-import-position

LR = 0.1
WEIGHT_DECAY = 1e-4
ACT_SCALE_LR = 0.01
TOTAL_STEPS = 10_000
BASELINE = {"sgd": "sgd", "sgdt": "sgd", "sgd_track": "sgd"}
# model -> (input shape without batch, default batch)
MODELS = {"cnn": ((8, 8, 1), 32), "resnet20": ((32, 32, 3), 128)}


def make_model(model: str, seed: int, x=None):
  """The W2A2 model, started from a full-precision one and calibrated on ``x``."""
  rngs = lambda: nnx.Rngs(seed)
  cls = tnnx.ResNet20 if model == "resnet20" else tnnx.SmallCNN
  qat = cls(weight_bits=2, act_bits=2, rngs=rngs())
  tnnx.load_full_precision(qat, cls(weight_bits=None, act_bits=None, rngs=rngs()))
  if x is None:
    x = jnp.ones((8, *MODELS[model][0]), jnp.float32)
  tnnx.calibrate(qat, x)
  return qat


def make_tx(variant: str, model, total_steps: int = TOTAL_STEPS):
  """The README's four-group partition; only the ``quantized`` group differs."""
  levels_fn = tnnx.levels_fn_for(model)
  target = talr.cosine_target(talr.initial_target(2), total_steps)
  sgd = lambda: optax.chain(optax.add_decayed_weights(WEIGHT_DECAY), optax.sgd(LR, 0.9))
  if variant == "sgdt":
    quantized = talr.sgdt(LR, target, levels_fn, weight_decay=WEIGHT_DECAY)
  elif variant == "sgd_track":
    quantized = optax.chain(sgd(), talr.track_transitions(levels_fn, target))
  elif variant == "sgd":
    quantized = sgd()
  else:
    raise ValueError(f"unknown variant {variant!r}; choose from {sorted(BASELINE)}")
  return optax.partition({
      "quantized": quantized,
      "full_precision": sgd(),
      "activation_scale": optax.sgd(optax.cosine_decay_schedule(ACT_SCALE_LR, total_steps)),
      "batch_norm": optax.sgd(LR),
  }, tnnx.param_labels(model))


def _loss(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def make_step(donate: bool = False):
  """The README's ``@nnx.jit`` step."""
  def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(_loss)(model, x, y)
    optimizer.update(model, grads)
    return loss
  return nnx.jit(train_step, donate_argnums=(0, 1) if donate else ())


def make_functional_step(model, optimizer, donate: bool = False):
  """The same step as ``jax.jit`` over the state split once (no per-call graph walk)."""
  graphdef, state = nnx.split((model, optimizer))

  def train_step(state, x, y):
    model, optimizer = nnx.merge(graphdef, state)
    loss, grads = nnx.value_and_grad(_loss)(model, x, y)
    optimizer.update(model, grads)
    return loss, nnx.state((model, optimizer))

  return jax.jit(train_step, donate_argnums=(0,) if donate else ()), state


def model_info(model, optimizer) -> dict:
  """Machine-independent facts: quantized weights, state bytes, optimizer graph nodes."""
  sizes = jax.tree.map(lambda label, sub: (label, sum(int(np.size(x)) for x in jax.tree.leaves(sub))),
                       tnnx.param_labels(model), nnx.state(model, nnx.Param))
  pairs = jax.tree.leaves(sizes, is_leaf=lambda x: isinstance(x, tuple))
  quantized = [n for label, n in pairs if label == "quantized"]
  return dict(n_params=int(sum(n for _, n in pairs)), n_quantized=int(sum(quantized)),
              n_quantized_tensors=len(quantized),
              opt_state_bytes=H.tree_nbytes(optimizer.opt_state),
              optimizer_graph_nodes=len(list(nnx.iter_graph(optimizer))))


def run(model_name, variants, batch, repeats, warmup, donate, style, seed=0):
  key = jax.random.PRNGKey(seed)
  shape = MODELS[model_name][0]
  x = jax.random.normal(key, (batch, *shape), jnp.float32)
  y = jax.random.randint(jax.random.fold_in(key, 1), (batch,), 0, 10)
  runners, info = {}, {}
  for v in variants:
    model = make_model(model_name, seed, x)
    optimizer = nnx.Optimizer(model, make_tx(v, model), wrt=nnx.Param)
    info[v] = model_info(model, optimizer)
    if style == "nnx":
      step = make_step(donate)

      def call(model=model, optimizer=optimizer, step=step):
        jax.block_until_ready(step(model, optimizer, x, y))
    else:
      step, state = make_functional_step(model, optimizer, donate)
      holder = {"state": state}

      def call(holder=holder, step=step):
        loss, holder["state"] = step(holder["state"], x, y)
        jax.block_until_ready(loss)

    c0 = H.compile_counts()["backend"]
    t0 = time.perf_counter()
    call()
    info[v].update(first_step_s=time.perf_counter() - t0,
                   compiles_first_step=H.compile_counts()["backend"] - c0)
    for _ in range(warmup):
      call()
    runners[v] = call
  c0 = H.compile_counts()["backend"]
  load0 = H.loadavg()
  t0 = time.perf_counter()
  raw = H.time_interleaved(runners, repeats, seed)
  wall = time.perf_counter() - t0
  load1 = H.loadavg()
  recompiles = H.compile_counts()["backend"] - c0
  stats = H.summarize(raw, {v: BASELINE[v] for v in variants})
  rows, table = [], []
  for v in variants:
    s = stats[v]
    rows.append(dict(model=model_name, batch=batch, donate=donate, style=style, variant=v,
                     loadavg_before=load0, loadavg_after=load1,
                     times_ms=[t * 1e3 for t in raw[v]["t"]], minflt=raw[v]["faults"],
                     **info[v], **s))
    table.append([v, s["median_ms"], s["iqr_ms"], "" if s["baseline"] == v else H.ratio_cell(s),
                  s["minflt_median"], info[v]["optimizer_graph_nodes"],
                  info[v]["opt_state_bytes"], f"{info[v]['first_step_s']:.1f}"])
  H.print_table(
      f"train step, {model_name} W2A2, batch {batch}, {style} style, donate={donate},"
      f" {repeats} rounds in {wall:.1f} s, load {load0} -> {load1}, recompiles while"
      f" timing: {recompiles}",
      ["variant", "median ms", "IQR ms", "ratio [paired IQR]", "faults", "graph nodes",
       "opt state B", "compile+1st s"], table)
  return rows, recompiles


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true", help="SmallCNN only, 20 rounds")
  ap.add_argument("--models", default=None, help="comma list of " + ",".join(MODELS))
  ap.add_argument("--batch", type=int, default=None, help="default: 32 (cnn), 128 (resnet20)")
  ap.add_argument("--variants", default="sgd,sgdt,sgd_track",
                  help="comma list of " + ",".join(BASELINE))
  ap.add_argument("--styles", default="nnx,functional", help="comma list of nnx, functional")
  ap.add_argument("--repeats", type=int, default=None, help="timed rounds (>= 20 for reports)")
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--donate", action="store_true", help="donate model and optimizer state")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  variants = args.variants.split(",")
  for v in list(variants):
    if BASELINE[v] not in variants:
      variants.insert(0, BASELINE[v])
  models = (args.models or ("cnn" if args.quick else "cnn,resnet20")).split(",")
  repeats = args.repeats or (20 if args.quick else 25)
  out = H.results_path("train_step", args.quick, args.out)
  print(f"jax {jax.__version__}, {jax.default_backend()}, {os.cpu_count()} CPUs, load {H.loadavg()}")
  t0 = time.perf_counter()
  rows, recompiles = [], 0
  for model in models:
    batch = args.batch or MODELS[model][1]
    for style in args.styles.split(","):
      r, c = run(model, variants, batch, repeats, args.warmup, args.donate, style, args.seed)
      rows += r
      recompiles += c
  m = H.meta(sys.argv[1:] if argv is None else argv, repeats=repeats, warmup=args.warmup,
             recompiles_while_timing=recompiles, seconds=time.perf_counter() - t0)
  H.write_json(out, dict(meta=m, rows=rows))
  return rows


if __name__ == "__main__":
  main()
