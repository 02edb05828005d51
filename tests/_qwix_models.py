"""Models and helpers shared by the ``talr_optax.qwix`` tests (imported after qwix)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import qwix
from flax import linen as nn
from flax import nnx

from talr_optax.qwix import _internals

X = jax.random.normal(jax.random.key(0), (8, 16))
Y = jnp.arange(8) % 10
IMAGES = jax.random.normal(jax.random.key(1), (4, 6, 6, 2))
LAYERS = 3



class MLP(nnx.Module):

  def __init__(self, *, rngs: nnx.Rngs, dtype=None):
    self.fc1 = nnx.Linear(16, 32, rngs=rngs)
    self.fc2 = nnx.Linear(32, 24, rngs=rngs, dtype=dtype)
    self.fc3 = nnx.Linear(24, 10, rngs=rngs)

  def __call__(self, x):
    x = jax.nn.relu(self.fc1(x))
    return self.fc3(jax.nn.relu(self.fc2(x)))


class CNN(nnx.Module):

  def __init__(self, *, rngs: nnx.Rngs):
    self.conv = nnx.Conv(2, 8, (3, 3), rngs=rngs)
    self.head = nnx.Linear(8, 10, rngs=rngs)

  def __call__(self, x):
    return self.head(jax.nn.relu(self.conv(x)).mean(axis=(1, 2)))


class TwoKernels(nnx.Module):
  """One module with two weight matrices; only ``a`` is used in a matmul."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.a = nnx.Param(jax.random.normal(rngs.params(), (16, 8)))
    self.b = nnx.Param(jax.random.normal(rngs.params(), (4, 4)) * 5.0)

  def __call__(self, x):
    # lax.dot_general: Qwix intercepts it, not the jitted jnp.dot / @ in eager mode.
    y = jax.lax.dot_general(x, self.a.get_value(), (((1,), (0,)), ((), ())))
    return y + self.b.get_value().sum()


class Block(nnx.Module):
  """A residual block with three kernels of one shape (as q, k and an MLP)."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.q = nnx.Linear(16, 16, rngs=rngs)
    self.k = nnx.Linear(16, 16, rngs=rngs)
    self.mlp = nnx.Linear(16, 16, rngs=rngs)

  def __call__(self, x):
    return x + jax.nn.relu(self.mlp(self.q(x) * jax.nn.sigmoid(self.k(x))))


class Stacked(nnx.Module):
  """A transformer-like stack: ``LAYERS`` blocks with stacked parameters
  (created by ``nnx.vmap``, applied by ``nnx.scan``) between two plain layers.

  ``layer_axis`` is the axis of the layers in the stacked parameters.
  """

  def __init__(self, *, rngs: nnx.Rngs, layer_axis: int = 0):
    self.embed = nnx.Linear(16, 16, rngs=rngs)

    @nnx.split_rngs(splits=LAYERS)
    @nnx.vmap(in_axes=(0,), out_axes=layer_axis)
    def make(rngs):
      return Block(rngs=rngs)

    self.blocks = make(rngs)
    self.layer_axis = layer_axis
    self.head = nnx.Linear(16, 10, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, self.layer_axis), out_axes=nnx.Carry)
    def body(x, block):
      return block(x)

    return self.head(body(self.embed(x), self.blocks))


class LinenMLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(32)(x))
    # A boxed (sharding-annotated) kernel, as in partitioned Linen models.
    init = nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model"))
    x = nn.relu(nn.Dense(24, name="hidden", kernel_init=init)(x))
    return nn.Dense(10)(x)


def qt(model, rules, *inputs):
  return qwix.quantize_model(model, qwix.QtProvider(rules), *inputs)


def mlp(**kwargs):
  return MLP(rngs=nnx.Rngs(0), **kwargs)


def params(model):
  return nnx.as_pure(nnx.state(model, nnx.Param))


@nnx.jit
def _train_step(model, optimizer):
  loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(X), Y).mean()
  optimizer.update(model, nnx.grad(loss)(model))


def sgd_steps(model, steps=3, lr=0.5, optimizer=None):
  """A few plain-SGD steps under nnx.jit, so that weights differ from init."""
  optimizer = optimizer or nnx.Optimizer(model, optax.sgd(lr), wrt=nnx.Param)
  for _ in range(steps):
    _train_step(model, optimizer)
  return optimizer


def qwix_levels(w, qtype, *, jit, channelwise_axes=(), tiled_axes=None, **kwargs):
  """Qwix's own integers for ``w`` (int8): ``qwix.quantize``, op by op as in an
  eager forward pass, or compiled as in a jitted training step.

  The two can differ on a rounding tie (with absmax calibration, the negative
  extreme of each channel sits on one), so levels are compared with the
  compiled ones and the eager forward pass with the op-by-op ones.
  """
  how = (qtype, tuple(channelwise_axes), tuple(sorted((tiled_axes or {}).items())),
         tuple(sorted(kwargs.items())))
  return _quantize_fn(how, jit)(w)


@functools.lru_cache(maxsize=None)
def _quantize_fn(how, jit):
  # One function per configuration, so that jit compiles it once per shape.
  qtype, channelwise_axes, tiled_axes, kwargs = how
  fn = lambda w: qwix.quantize(w, qtype, channelwise_axes=channelwise_axes,
                               tiled_axes=dict(tiled_axes), **dict(kwargs)
                               ).qvalue.astype(jnp.int8)
  return jax.jit(fn) if jit else fn


def perturb(model, seed=1):
  """Moves every parameter by a small random step (cheaper than training)."""
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  nnx.update(model, jax.tree.unflatten(treedef, [
      v + 0.05 * jax.random.normal(k, v.shape, v.dtype) for v, k in zip(leaves, keys)]))


def forward_levels(model, *inputs):
  """The integers Qwix uses for each parameter in an eager forward pass.

  Found independently of the library's matching: a quantized operand is a
  parameter if it equals one, and layer ``i`` of a stacked parameter (layers
  on axis 0) if it equals that slice. Returns ``{"fc2/kernel": int8 array}``,
  the layers of a stacked parameter stacked back on axis 0.
  """
  values = {"/".join(map(str, p)): v.get_value()
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  out, layers = {}, {}
  for call in _internals.record_quantize_calls(lambda: model(*inputs)):
    if isinstance(call.operand, jax.core.Tracer):
      continue
    q = np.asarray(call.qvalue).astype(np.int8)
    for path, value in values.items():
      if call.operand is value or (
          call.operand.shape == value.shape
          and bool(jnp.array_equal(call.operand, value.astype(call.operand.dtype)))):
        out[path] = q
      elif value.shape[1:] == call.operand.shape:
        for i in range(value.shape[0]):
          if bool(jnp.array_equal(call.operand, value[i])):
            layers.setdefault(path, {})[i] = q
  for path, by_layer in layers.items():
    out[path] = np.stack([by_layer[i] for i in range(len(by_layer))])
  return out
