"""Figure 2: full training step of the NNX ResNet-20 W2A2, SGDT vs SGD.

One step = forward, backward and optimizer on a batch of CIFAR-shaped images
(``(batch, 32, 32, 3)``, random values: the time does not depend on them),
written the way a user of ``talr_optax.nnx`` writes it (as in
``talr_optax/demo.py``): ``nnx.Optimizer(model, optax.partition(groups,
param_labels(model)), wrt=nnx.Param)`` and an ``@nnx.jit`` train step
calling ``nnx.value_and_grad`` and ``optimizer.update(model, grads)``.

The four parameter groups of the reference setup:

* ``quantized`` (the 18 kernels of the quantized convs, 0.27M weights):
  ``sgd`` = ``chain(add_decayed_weights(5e-4), trace(0.9), scale_by_learning_rate(lr))``
  or ``sgdt`` = ``talr_optax.sgdt(lr, R, levels_fn_for(model), momentum=0.9,
  weight_decay=5e-4)`` -- the only difference between the two sides;
* ``full_precision`` (first conv, last linear): the same SGD on both sides;
* ``activation_scale``: ``optax.sgd(0.01)``; ``batch_norm``: ``scale_by_learning_rate(lr)``.

TALR computes the levels with ``levels_fn_for(model)`` inside the step (the
natural usage; nothing is passed to ``update``). The full run also times the
same step in the *functional* style (``graphdef, state = nnx.split((model,
optimizer))`` once, then ``jax.jit`` over the pure state, merging inside),
which removes the per-call Python work of ``nnx.jit`` (flattening the model
and optimizer graphs, whose size grows with the number of state leaves).
Optional extra variants:
``sgd_track`` (SGD with ``track_transitions``, the monitoring-only stage),
``adam`` / ``adamt``.

Method as in ``_harness.py``: both models compiled and warmed up, then timed in
interleaved rounds, each step ended with ``jax.block_until_ready`` on the loss
and the updated params and optimizer state.

Usage:
  python benchmarks/train_step.py --quick      # batch 128, nnx style, 10 rounds (~1 min)
  python benchmarks/train_step.py              # batch 128, nnx and functional styles, 25 rounds
  python benchmarks/train_step.py --variants sgd,sgdt,sgd_track,adam,adamt
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
ADAM_LR = 1e-3
WEIGHT_DECAY = 5e-4
ACT_SCALE_LR = 0.01
BASELINE = {"sgd": "sgd", "sgdt": "sgd", "sgd_track": "sgd", "adam": "adam", "adamt": "adam"}


def make_model(model: str, seed: int):
  rngs = nnx.Rngs(seed)
  if model == "resnet20":
    return tnnx.ResNet20(weight_bits=2, act_bits=2, rngs=rngs), (32, 32, 3)
  return tnnx.SmallCNN(weight_bits=2, act_bits=2, rngs=rngs), (8, 8, 1)


def make_tx(variant: str, model, total_steps: int = 10_000):
  levels_fn = tnnx.levels_fn_for(model)
  target = talr.cosine_target(talr.initial_target(2), total_steps)
  decay = optax.add_decayed_weights(WEIGHT_DECAY)
  adam = variant.startswith("adam")
  lr = ADAM_LR if adam else LR
  base = optax.scale_by_adam() if adam else optax.trace(0.9)
  plain = optax.chain(decay, base, optax.scale_by_learning_rate(lr))
  if variant == "sgdt":
    quantized = talr.sgdt(lr, target, levels_fn, momentum=0.9, weight_decay=WEIGHT_DECAY)
  elif variant == "adamt":
    quantized = talr.adamt(lr, target, levels_fn, weight_decay=WEIGHT_DECAY)
  elif variant == "sgd_track":
    quantized = optax.chain(talr.track_transitions(levels_fn), plain)
  else:
    quantized = plain
  groups = {
      tnnx.QUANTIZED: quantized,
      tnnx.FULL_PRECISION: optax.chain(decay, base, optax.scale_by_learning_rate(lr)),
      tnnx.ACTIVATION_SCALE: optax.sgd(ACT_SCALE_LR),
      tnnx.BATCH_NORM: optax.scale_by_learning_rate(lr),
  }
  return optax.partition(groups, tnnx.param_labels(model))


def _loss(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def make_step(donate: bool):
  def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(_loss)(model, x, y)
    optimizer.update(model, grads)
    return loss
  return nnx.jit(train_step, donate_argnums=(0, 1) if donate else ())


def make_functional_step(model, optimizer, donate: bool):
  """The same step as pure jax.jit over the split state (no per-call nnx graph work)."""
  graphdef, state = nnx.split((model, optimizer))

  def train_step(state, x, y):
    model, optimizer = nnx.merge(graphdef, state)
    loss, grads = nnx.value_and_grad(_loss)(model, x, y)
    optimizer.update(model, grads)
    return loss, nnx.state((model, optimizer))

  return jax.jit(train_step, donate_argnums=(0,) if donate else ()), state


def opt_state_bytes(optimizer) -> int:
  return H.tree_nbytes(optimizer.opt_state)


def run(model_name, variants, batch, repeats, warmup, donate, seed=0, style="nnx"):
  key = jax.random.PRNGKey(seed)
  runners, info = {}, {}
  for v in variants:
    model, shape = make_model(model_name, seed)
    x = jax.random.normal(key, (batch, *shape), jnp.float32)
    y = jax.random.randint(jax.random.fold_in(key, 1), (batch,), 0, 10)
    tnnx.calibrate(model, x)
    optimizer = nnx.Optimizer(model, make_tx(v, model), wrt=nnx.Param)
    if style == "nnx":
      step = make_step(donate)

      def call(model=model, optimizer=optimizer, step=step, x=x, y=y):
        loss = step(model, optimizer, x, y)
        jax.block_until_ready((loss, nnx.state(model, nnx.Param), nnx.state(optimizer.opt_state)))
    else:
      step, state = make_functional_step(model, optimizer, donate)
      holder = {"state": state}

      def call(holder=holder, step=step, x=x, y=y):
        loss, holder["state"] = step(holder["state"], x, y)
        jax.block_until_ready((loss, holder["state"]))

    c0 = H.compile_counts()["backend"]
    t0 = time.perf_counter()
    call()
    first = time.perf_counter() - t0

    for _ in range(warmup):
      call()
    quantized = [lv for lv in jax.tree.leaves(tnnx.levels_fn_for(model)(nnx.state(model, nnx.Param)))]
    info[v] = dict(first_step_s=first, compiles_first_step=H.compile_counts()["backend"] - c0,
                   opt_state_bytes=opt_state_bytes(optimizer),
                   n_quantized=int(sum(np.size(l) for l in quantized)),
                   n_quantized_tensors=len(quantized),
                   n_params=int(sum(np.size(p) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))))
    runners[v] = call
  c0 = H.compile_counts()["backend"]
  load0 = H.loadavg()
  t0 = time.perf_counter()
  raw = H.time_interleaved(runners, repeats, seed)
  wall = time.perf_counter() - t0
  recompiles = H.compile_counts()["backend"] - c0
  stats = H.summarize(raw, {v: BASELINE[v] for v in variants})
  rows, table = [], []
  for v in variants:
    s = stats[v]
    rows.append(dict(model=model_name, batch=batch, donate=donate, style=style, variant=v,
                     loadavg_before=load0, loadavg_after=H.loadavg(),
                     times_ms=[t * 1e3 for t in raw[v]["t"]], minflt=raw[v]["faults"],
                     **info[v], **s))
    table.append([v, s["median_ms"], s["iqr_ms"], "" if s["baseline"] == v else H.ratio_cell(s),
                  s["minflt_median"], info[v]["opt_state_bytes"], f"{info[v]['first_step_s']:.1f}"])
  H.print_table(
      f"train step, {model_name} W2A2, batch {batch}, {style} style, donate={donate}, {repeats} rounds in"
      f" {wall:.0f} s, load {load0}, recompiles while timing: {recompiles}",
      ["variant", "median ms", "IQR ms", "ratio [paired IQR]", "faults", "opt state B",
       "compile+1st s"], table)
  return rows, recompiles


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true", help="10 rounds")
  ap.add_argument("--model", choices=["resnet20", "cnn"], default="resnet20",
                  help="cnn (SmallCNN on 8x8 images) only for smoke tests")
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--variants", default="sgd,sgdt",
                  help="comma list of " + ",".join(BASELINE))
  ap.add_argument("--repeats", type=int, default=None)
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--donate", action="store_true", help="donate model and optimizer state")
  ap.add_argument("--style", default=None, help="comma list of nnx (the @nnx.jit step users"
                  " write) and functional (jax.jit over nnx.split state); default both,"
                  " --quick: nnx")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  variants = args.variants.split(",")
  for v in list(variants):
    if BASELINE[v] not in variants:
      variants.insert(0, BASELINE[v])
  repeats = args.repeats or (10 if args.quick else 25)
  out = H.results_path("train_step", args.quick, args.out)
  print(f"jax {jax.__version__}, {jax.default_backend()}, {os.cpu_count()} CPUs, load {H.loadavg()}")
  t0 = time.perf_counter()
  rows, recompiles = [], 0
  styles = args.style or ("nnx" if args.quick else "nnx,functional")
  for style in styles.split(","):
    r, c = run(args.model, variants, args.batch, repeats, args.warmup, args.donate, args.seed,
               style)
    rows += r
    recompiles += c
  m = H.meta(sys.argv[1:] if argv is None else argv, repeats=repeats, warmup=args.warmup,
             recompiles_while_timing=recompiles, seconds=time.perf_counter() - t0)
  H.write_json(out, dict(meta=m, rows=rows))
  return rows


if __name__ == "__main__":
  main()
