"""A small TALR run that saves mid-run with the docs' Orbax recipe, and resumes.

Started by ``tests/test_checkpoint.py``, once per process:

  python _checkpoint_run.py FLAVOR full DIR OUT     # STEPS steps, checkpoint at SAVE_AT
  python _checkpoint_run.py FLAVOR resume DIR OUT   # restore the latest, finish the run

FLAVOR is ``functional`` (params + opt_state) or ``nnx`` (model +
``nnx.Optimizer``). The checkpoint functions are the code blocks of
``docs/checkpoints.md``, executed as written. Both modes write the final state
to OUT (.npz) for a bitwise comparison. Batches depend only on the step
number, so the resumed run sees the same data as the uninterrupted one.
"""

import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import talr_optax as talr

STEPS, SAVE_AT, BITS = 40, 17, 2
DOC = Path(__file__).resolve().parents[1] / "docs" / "checkpoints.md"


def recipe() -> dict:
  """The functions defined by the recipe's two code blocks of definitions."""
  blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
  names: dict = {}
  for block in blocks:
    if block.lstrip().startswith(("import", "from")):  # definitions, not usage
      exec(compile(block, str(DOC), "exec"), names)  # pylint: disable=exec-used
  for name in ("checkpoint_manager", "save", "restore", "nnx_state", "load_nnx_state"):
    assert callable(names.get(name)), f"{DOC} no longer defines {name}()"
  return names


def batch(step):
  rng = np.random.default_rng([1234, step])
  x = rng.normal(size=(32, 16)).astype(np.float32)
  return x, (x[:, :4].sum(-1) > 0).astype(np.int32) + 2 * (x[:, 4] > 0)


def loss_of(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_tx(levels_fn):
  return talr.sgdt(optax.cosine_decay_schedule(0.05, STEPS), talr.cosine_target(0.02, STEPS),
                   levels_fn, momentum=0.9, weight_decay=1e-4)


def functional_run():
  """``(state, step_fn, get, put)`` of a functional MLP trained with sgdt."""
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  he = lambda k, shape: jax.random.normal(k, shape) * jnp.sqrt(2.0 / shape[0])
  params = {"w1": he(k1, (16, 64)), "w2": he(k2, (64, 64)), "b2": jnp.zeros(64),
            "w3": he(k3, (64, 4))}
  scales = {"w1": None, "w2": float(talr.initial_weight_scale(params["w2"])),
            "b2": None, "w3": float(talr.initial_weight_scale(params["w3"]))}
  tx = make_tx(talr.levels_fn_from_scales(scales, bits=BITS))
  quant = lambda p, name: talr.fake_quant_weight(p[name], scales[name], BITS, multiply_scale=True)

  def forward(p, x):
    h = jax.nn.relu(x @ p["w1"])
    h = jax.nn.relu(h @ quant(p, "w2") + p["b2"])
    return h @ quant(p, "w3")

  @jax.jit
  def step(state, x, y):
    grads = jax.grad(lambda p: loss_of(forward(p, x), y))(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}

  box = {"state": {"params": params, "opt_state": tx.init(params)}}

  def train(x, y):
    box["state"] = step(box["state"], x, y)

  return train, (lambda: box["state"]), (lambda saved: box.update(state=saved))


def nnx_run(names):
  """The same, as an NNX model with two quantized layers and an ``nnx.Optimizer``."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from talr_optax import nnx as tnnx  # pylint: disable=import-outside-toplevel

  class MLP(nnx.Module):

    def __init__(self, rngs):
      self.fc1 = nnx.Linear(16, 64, rngs=rngs)
      self.fc2 = tnnx.QuantLinear(in_features=64, out_features=64, weight_bits=BITS,
                                  act_bits=None, multiply_scale=True, rngs=rngs)
      self.fc3 = tnnx.QuantLinear(in_features=64, out_features=4, weight_bits=BITS,
                                  act_bits=None, multiply_scale=True, rngs=rngs)

    def __call__(self, x):
      return self.fc3(jax.nn.relu(self.fc2(jax.nn.relu(self.fc1(x)))))

  model = MLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, make_tx(tnnx.levels_fn_for(model)), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x, y):
    grads = nnx.grad(lambda m: loss_of(m(x), y))(model)
    optimizer.update(model, grads)

  def train(x, y):
    if not model.fc2.calibrated[...]:
      tnnx.calibrate(model, jnp.asarray(x))
    step(model, optimizer, x, y)

  return (train, lambda: names["nnx_state"](model, optimizer),
          lambda saved: names["load_nnx_state"](model, optimizer, saved))


def write(state, out):
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  np.savez(out, **{jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves})


def levels(state):
  return jax.tree.leaves(optax.tree.get(state, "prev_levels"))


def main(flavor, mode, directory, out):
  names = recipe()
  train, get, put = functional_run() if flavor == "functional" else nnx_run(names)
  manager = names["checkpoint_manager"](directory)
  start = 0
  if mode == "resume":
    start, saved, meta = names["restore"](manager, like=get())
    assert meta == {"next_step": start}, meta
    put(saved)
    restored_levels = levels(get())
  for t in range(start, STEPS):
    train(*batch(t))
    if mode == "full" and t + 1 == SAVE_AT:
      names["save"](manager, t + 1, get(), {"next_step": t + 1})
  manager.close()
  write(get(), out)
  print(f"{flavor} {mode}: steps {start}..{STEPS}")
  if mode == "resume":
    moved = sum(int(np.sum(a != b)) for a, b in zip(levels(get()), restored_levels))
    print(f"levels changed since the checkpoint: {moved}")


if __name__ == "__main__":
  main(*sys.argv[1:])
