"""A small QAT run that saves mid-run and resumes in a fresh process.

Started by ``tests/test_checkpoint.py``:

  python _checkpoint_run.py full DIR OUT     # STEPS steps, checkpoint at SAVE_AT
  python _checkpoint_run.py resume DIR OUT   # restore the latest, finish the run

Both write the final params and optimizer state to OUT (.npz) for a bitwise
comparison. Batches depend only on the step number, so the resumed run sees
the same data as the uninterrupted one.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import talr_optax as talr
from talr_optax.checkpoint import Checkpointer

STEPS, SAVE_AT, BITS = 40, 17, 2


def init_params():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  he = lambda k, shape: jax.random.normal(k, shape) * jnp.sqrt(2.0 / shape[0])
  return {"w1": he(k1, (16, 64)), "w2": he(k2, (64, 64)), "b2": jnp.zeros(64),
          "w3": he(k3, (64, 4))}


def batch(step):
  rng = np.random.default_rng([1234, step])
  x = rng.normal(size=(32, 16)).astype(np.float32)
  return x, (x[:, :4].sum(-1) > 0).astype(np.int32) + 2 * (x[:, 4] > 0)


def setup():
  params = init_params()
  scales = {"w1": None, "w2": float(talr.initial_weight_scale(params["w2"])),
            "b2": None, "w3": float(talr.initial_weight_scale(params["w3"]))}
  levels_fn = talr.levels_fn_from_scales(scales, bits=BITS)
  tx = talr.sgdt(optax.cosine_decay_schedule(0.05, STEPS), talr.cosine_target(0.02, STEPS),
                 levels_fn, momentum=0.9, weight_decay=1e-4)

  def forward(p, x):
    h = jax.nn.relu(x @ p["w1"])
    h = jax.nn.relu(h @ talr.fake_quant_weight(p["w2"], scales["w2"], BITS, multiply_scale=True)
                    + p["b2"])
    return h @ talr.fake_quant_weight(p["w3"], scales["w3"], BITS, multiply_scale=True)

  @jax.jit
  def step(state, x, y):
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(forward(p, x), y).mean()
    grads = jax.grad(loss)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}

  return {"params": params, "opt_state": tx.init(params)}, step


def write(state, out):
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  np.savez(out, **{jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves})


def main(mode, directory, out):
  state, step = setup()
  start = 0
  with Checkpointer(directory) as ckpt:
    if mode == "resume":
      start, state, meta = ckpt.restore(state)
      assert meta == {"next_step": start}, meta
      restored_levels = optax.tree.get(state["opt_state"], "prev_levels")
    for t in range(start, STEPS):
      state = step(state, *batch(t))
      if mode == "full" and t + 1 == SAVE_AT:
        ckpt.save(t + 1, state, meta={"next_step": t + 1})
  write(state, out)
  print(f"{mode}: steps {start}..{STEPS}, talr_count ="
        f" {int(optax.tree.get(state['opt_state'], 'talr_count'))}")
  if mode == "resume":
    levels = optax.tree.get(state["opt_state"], "prev_levels")
    moved = sum(int(np.sum(a != b)) for a, b in zip(jax.tree.leaves(levels),
                                                     jax.tree.leaves(restored_levels)))
    print(f"levels changed since the checkpoint: {moved}")


if __name__ == "__main__":
  main(*sys.argv[1:])
