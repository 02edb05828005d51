"""Data + model parallel QAT of an NNX MLP with SGDT on a 2 x 4 device mesh.

    python examples/sharded_training.py             # 8 simulated CPU devices
    python examples/sharded_training.py --steps 400

The batch is split over the mesh axis ``data``; the hidden layer's kernels are
split over ``model`` (the first layer by columns, the quantized middle layer by
rows and columns, the last by rows), with Flax's ``nnx.with_partitioning``
annotations. Nothing in the optimizer is sharding-specific: ``sgdt``'s int8
levels take the sharding of their kernels, its rates are small replicated
float32 vectors (one entry per quantized tensor, named by ``rate_names``), and
``jit`` inserts the cross-device sums that count transitions.

On a machine without 8 accelerators the script asks XLA for 8 CPU devices; it
must do that before JAX initialises, hence the flag at the top. On a
multi-host cluster, run the same script on every host after
``jax.distributed.initialize()`` (see docs/sharding.md, "Several processes";
``examples/multiprocess_training.py`` does it). Needs the ``nnx`` extra:
``pip install -e ".[nnx]"``.
"""

import argparse
import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import talr_optax as talr
from talr_optax import nnx as tnnx

BITS, IN, HIDDEN, CLASSES = 2, 32, 256, 8


class MLP(nnx.Module):
  """Full-precision first and last layers around a 2-bit quantized layer."""

  def __init__(self, rngs: nnx.Rngs):
    lecun, zeros = nnx.initializers.lecun_normal(), nnx.initializers.zeros_init()
    shard = nnx.with_partitioning
    self.fc1 = nnx.Linear(IN, HIDDEN, kernel_init=shard(lecun, (None, "model")),
                          bias_init=shard(zeros, ("model",)), rngs=rngs)
    self.fc2 = tnnx.QuantLinear(
        in_features=HIDDEN, out_features=HIDDEN, weight_bits=BITS, act_bits=None,
        multiply_scale=True,  # no batch norm after it to absorb the step size
        kernel_init=shard(lecun, ("data", "model")), bias_init=shard(zeros, ("model",)),
        rngs=rngs)
    self.fc3 = nnx.Linear(HIDDEN, CLASSES, kernel_init=shard(lecun, ("model", None)),
                          rngs=rngs)

  def __call__(self, x):
    return self.fc3(nnx.relu(self.fc2(nnx.relu(self.fc1(x)))))


def teacher_data(n, seed=0):
  """Labels from a random linear teacher: a learnable task without a download."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, IN)).astype(np.float32)
  return x, np.argmax(x @ rng.normal(size=(IN, CLASSES)), axis=-1).astype(np.int32)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--lr", type=float, default=0.05)
  args = parser.parse_args(argv)
  if args.steps < 1 or args.batch < 1 or not args.lr > 0:
    parser.error("--steps and --batch must be >= 1 and --lr > 0")
  if jax.device_count() < 8:
    raise SystemExit(f"needs 8 devices, found {jax.device_count()} (set XLA_FLAGS before JAX starts)")

  # Auto axes: jit propagates the shardings (GSPMD).
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  if args.batch % mesh.shape["data"]:
    parser.error(f"--batch must be a multiple of {mesh.shape['data']}")
  data = NamedSharding(mesh, P("data"))
  x, y = teacher_data(22000)
  (x_train, y_train), (x_test, y_test) = (x[:-2000], y[:-2000]), (x[-2000:], y[-2000:])

  with jax.set_mesh(mesh):
    model = MLP(nnx.Rngs(0))  # variables are created sharded (Flax eager sharding)
    # Freeze the weight step size s = 3 std(w) before the first jitted step.
    tnnx.calibrate(model, jax.device_put(x_train[: args.batch], data))
    target = talr.cosine_target(talr.initial_target(BITS), args.steps)
    tx = talr.sgdt(args.lr, target, tnnx.levels_fn_for(model), momentum=0.9)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, xb, yb):
      loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(xb), yb).mean()
      loss, grads = nnx.value_and_grad(loss_fn)(model)
      optimizer.update(model, grads)
      return loss

    @nnx.jit
    def accuracy(model, xb, yb):
      return jnp.mean(jnp.argmax(model(xb), -1) == yb)

    rng = np.random.default_rng(0)
    for step in range(args.steps):
      idx = rng.integers(0, len(x_train), args.batch)
      loss = train_step(model, optimizer, jax.device_put(x_train[idx], data),
                        jax.device_put(y_train[idx], data))
      if step == 0:
        first_loss = float(loss)
    model.eval()
    acc = float(accuracy(model, jax.device_put(x_test, data), jax.device_put(y_test, data)))

  kernel = model.fc2.kernel[...]
  opt_state = nnx.as_pure(optimizer.opt_state)  # arrays instead of nnx Variables
  talr_state = opt_state[-1]  # sgdt: chain(trace, scale_by_talr)
  levels = talr_state.prev_levels["fc2"]["kernel"]  # shaped and sharded like the kernel
  same = levels.sharding.is_equivalent_to(kernel.sharding, kernel.ndim)
  m = {k: float(v) for k, v in talr.metrics(opt_state).items()}
  print(f"devices: {jax.device_count()} on mesh {dict(mesh.shape)}")
  print(f"fc2 kernel sharding {kernel.sharding.spec}, its int8 levels {levels.sharding.spec}"
        f" (same: {same})")
  # Rates: one entry per quantized tensor, in the order of rate_names.
  print(f"rates {talr_state.rate_names.names}: shape {talr_state.talr.shape},"
        f" replicated: {talr_state.talr.sharding.is_fully_replicated}")
  print(f"loss: first {first_loss:.3f}, last {float(loss):.3f}; test accuracy {acc:.3f}")
  print(f"fc2: U = {m['talr/fc2/kernel']:.3g}, K = {m['ema_transition_rate/fc2/kernel']:.2e},"
        f" R = {m['target_transition_rate/fc2/kernel']:.2e}")
  return {"levels_sharded_like_kernel": bool(same), "first_loss": first_loss,
          "last_loss": float(loss), "accuracy": acc}


if __name__ == "__main__":
  main()
