"""How many Qwix level changes come only from the weight scale moving?

Qwix QAT recomputes the weight scale from the current weights in every forward
pass (``absmax`` per output channel by default). A weight's integer level then
changes either because the weight crossed a transition point or because the
scale moved under it. TALR means to schedule the first kind. This script
trains a small MLP on scikit-learn's digits with 2-bit Qwix weights and plain
SGD, and splits every level change of step ``t`` into

* weight-caused: ``Q(w_t; s_{t-1}) != Q(w_{t-1}; s_{t-1})`` (with the old
  scale, the new weight has another level), and
* scale-only: the level changed, ``Q(w_t; s_t) != Q(w_{t-1}; s_{t-1})``, but
  ``Q(w_t; s_{t-1}) == Q(w_{t-1}; s_{t-1})``: only the new scale moved it,

once with Qwix's default rules (``absmax``) and once with
``talr_optax.qwix.frozen_scale_rules`` (scale frozen at ``3 std(w)``).

    python benchmarks/qwix_scale_transitions.py          # 3 seeds, 200 steps
    python benchmarks/qwix_scale_transitions.py --quick  # 1 seed, 100 steps
    python benchmarks/qwix_scale_transitions.py --lr 0.1 --momentum 0 --quantize fc2
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
import qwix

from talr_optax.demo import data
import talr_optax.qwix as tq

# The model of examples/qwix_qat.py, so the measured share applies to it.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from qwix_qat import MLP  # pylint: disable=g-import-not-at-top,wrong-import-position

BITS = 2
QTYPE = "int2"
QMIN, QMAX = -(2 ** (BITS - 1)), 2 ** (BITS - 1) - 1
# First and last layer stay full precision, as in the paper.
DEFAULT_QUANTIZED = "fc2|fc3"


def _loss(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit
def _train_step(model, optimizer, x, y):
  optimizer.update(model, nnx.grad(_loss)(model, x, y))


def _batches(split, steps, seed):
  rng = np.random.default_rng(seed)
  for _ in range(steps):
    idx = rng.integers(0, len(split.labels), 64)
    yield split.images[idx], split.labels[idx]


def _pretrain(train, seed, steps, tx):
  """The full-precision model QAT starts from (as in the paper)."""
  model = MLP(rngs=nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  for x, y in _batches(train, steps, seed):
    _train_step(model, optimizer, x, y)
  return model


def _split_counts(weights):
  """Jitted ``(prev_params, params) -> {path: (changed, scale_only, size)}``."""

  def scale_of(w, spec):
    return qwix.quantize(
        w.astype(spec.dtype), spec.qtype, channelwise_axes=spec.channelwise_axes,
        calibration_method=spec.calibration_method,
    ).scale

  def q(w, scale):
    # Qwix's int2 rounding (half to even, then clip); scales broadcast as the
    # benchmark uses no tiles.
    return jnp.clip(jnp.round(w / scale), QMIN, QMAX).astype(jnp.int8)

  @jax.jit
  def fn(prev, params):
    out = {}
    for path, spec in weights.items():
      w0, w1 = prev[path], params[path]
      s0, s1 = scale_of(w0, spec), scale_of(w1, spec)
      l0, l1, l_cf = q(w0, s0), q(w1, s1), q(w1, s0)
      changed = l1 != l0
      out[path] = (
          jnp.sum(changed),
          jnp.sum(changed & (l_cf == l0)),
          # q() must be Qwix's quantization, or the split is meaningless.
          jnp.all(l1 == spec.levels(w1)),
      )
    return out

  return fn


def _flat(model, weights):
  params = nnx.to_flat_state(nnx.as_pure(nnx.state(model, nnx.Param)))
  by_path = {"/".join(map(str, p)): v for p, v in params}
  return {path: by_path[path] for path in weights}


def run(pretrained, rules, train, x_example, steps, seed, tx):
  """QAT with ``tx``; returns (changes, scale-only changes, quantized weights)."""
  qt_model = qwix.quantize_model(pretrained, qwix.QtProvider(rules), x_example)
  weights = tq.quantized_weights(qt_model, x_example)
  assert all(not w.tiled_axes for w in weights.values())
  split = _split_counts(weights)
  optimizer = nnx.Optimizer(qt_model, tx, wrt=nnx.Param)
  prev = _flat(qt_model, weights)
  changed = scale_only = 0
  for x, y in _batches(train, steps, seed + 1000):
    _train_step(qt_model, optimizer, x, y)
    params = _flat(qt_model, weights)
    for c, s, ok in split(prev, params).values():
      assert bool(ok), "the benchmark's quantizer differs from Qwix's"
      changed += int(c)
      scale_only += int(s)
    prev = params
  size = sum(int(np.prod(w.shape)) for w in weights.values())
  return changed, scale_only, size


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="1 seed, 100 steps")
  parser.add_argument("--steps", type=int, default=None)
  parser.add_argument("--seeds", type=int, default=None)
  parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (both phases)")
  parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (both phases)")
  parser.add_argument("--quantize", default=DEFAULT_QUANTIZED,
                      help="module_path regex of the int2 layers")
  args = parser.parse_args()
  steps = args.steps or (100 if args.quick else 200)
  seeds = args.seeds or (1 if args.quick else 3)

  start = time.perf_counter()
  digits = data.load_digits()
  x_example = digits.train.images[:8]
  rules = [qwix.QtRule(module_path=args.quantize, weight_qtype=QTYPE)]
  tx = optax.sgd(args.lr, momentum=args.momentum or None)
  print(f"Qwix {qwix.__version__}, W{BITS} ({args.quantize}), plain SGD (lr {args.lr}, "
        f"momentum {args.momentum}), {steps} QAT steps after {steps} full-precision steps")
  print(f"{'seed':>4}  {'rules':<8} {'changes':>8} {'mean k':>9} {'scale-only':>11} {'share':>7}")
  shares = {"absmax": [], "frozen": []}
  for seed in range(seeds):
    pretrained = _pretrain(digits.train, seed, steps, tx)
    for name, use in (("absmax", rules), ("frozen", tq.frozen_scale_rules(pretrained, rules))):
      changed, scale_only, size = run(pretrained, use, digits.train, x_example, steps, seed, tx)
      share = scale_only / changed if changed else 0.0
      shares[name].append(share)
      print(f"{seed:>4}  {name:<8} {changed:>8d} {changed / size / steps:>9.2e} "
            f"{scale_only:>11d} {share:>7.1%}")
  for name, values in shares.items():
    print(f"scale-only share of level changes, {name}: "
          f"{min(values):.1%} to {max(values):.1%} over {seeds} seed(s)")
  print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
  main()
