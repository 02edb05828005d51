"""Quickstart: 2-bit QAT of an MLP on scikit-learn's digits, SGD vs SGDT.

Plain JAX + Optax: the hidden weights are fake-quantized to 2 bits with a frozen
step size s = 3 std(w); `sgdt` moves them by the transition-adaptive learning
rate so that their transition rate follows a cosine target. It prints, at a
few steps, the target R, the smoothed transition rate K of both runs and
SGDT's learning rate U of w2 (docs/method.md, "What a correct run shows",
reads them). Needs scikit-learn for the data:

    pip install -e . scikit-learn
    python examples/quickstart.py
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import talr_optax as talr

BITS, STEPS, LR = 2, 600, 0.05
CHECKPOINTS = (150, 300, 450)


def load():
  x, y = load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)
  order = np.random.default_rng(0).permutation(len(x))
  x, y = x[order], y[order]
  return (x[:1400], y[:1400]), (x[1400:], y[1400:])


def init_params(key):
  k1, k2, k3 = jax.random.split(key, 3)
  he = lambda k, shape: jax.random.normal(k, shape) * jnp.sqrt(2.0 / shape[0])
  return {"w1": he(k1, (64, 256)), "w2": he(k2, (256, 256)), "w3": he(k3, (256, 10))}


def forward(params, scales, x):
  # First and last layer stay full precision, as in the paper.
  h = jax.nn.relu(x @ params["w1"])
  h = jax.nn.relu(h @ talr.fake_quant_weight(params["w2"], scales["w2"], BITS, multiply_scale=True))
  return h @ params["w3"]


def train(make_tx, params, scales, data, seed=0):
  (x, y), (xt, yt) = data
  tx = make_tx()
  state = tx.init(params)

  @jax.jit
  def step(params, state, xb, yb):
    loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(
        forward(p, scales, xb), yb).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  rng = np.random.default_rng(seed)
  # Metrics of w2 after some updates (the state after update n holds K_(n+1), U_(n+1)).
  log = {}
  for n in range(STEPS):
    idx = rng.integers(0, len(x), 64)
    params, state, loss = step(params, state, x[idx], y[idx])
    if (n + 1) in CHECKPOINTS:
      log[n + 1] = {k: float(v) for k, v in talr.metrics(state).items() if k.endswith("/w2")}
  acc = float(jnp.mean(jnp.argmax(forward(params, scales, xt), -1) == yt))
  return acc, state, log


def main():
  data = load()
  params = init_params(jax.random.key(0))
  scales = {"w1": None, "w2": float(talr.initial_weight_scale(params["w2"])), "w3": None}
  levels_fn = talr.levels_fn_from_scales(scales, bits=BITS)
  target = talr.cosine_target(talr.initial_target(BITS), STEPS)

  # The baseline measures its transition rate with the monitor, the last
  # stage of the chain: it counts the transitions of the final updates.
  sgd = lambda: optax.chain(optax.sgd(LR, momentum=0.9), talr.track_transitions(levels_fn, target))
  sgdt = lambda: talr.sgdt(LR, target, levels_fn, momentum=0.9)
  acc_sgd, _, log_sgd = train(sgd, params, scales, data)
  acc_sgdt, state, log_sgdt = train(sgdt, params, scales, data)
  m = talr.metrics(state)
  print(f"W{BITS} MLP on digits, {STEPS} steps")
  print(f"  test accuracy  SGD: {acc_sgd:.3f}   SGDT: {acc_sgdt:.3f}")
  print("  transition rate of w2 (EMA K) against the target R, and SGDT's U:")
  for n in CHECKPOINTS:
    k = "ema_transition_rate/w2"
    print(f"    step {n:4d}  R {float(target(n)):.2e}   SGD K {log_sgd[n][k]:.2e}"
          f"   SGDT K {log_sgdt[n][k]:.2e}   U {log_sgdt[n]['talr/w2']:.3g}")
  print(f"  TALR U of w2: start {LR:.3g}, end {float(m['talr/w2']):.3g}")


if __name__ == "__main__":
  main()
