"""Helpers shared by the ``talr_optax.nnx`` tests: NumPy references and a tiny net.

References are computed by hand with NumPy (3 * std, round(clip(...))), not
with the code under test.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from talr_optax import nnx as tnnx


def np_value(x) -> np.ndarray:
  """A Variable's value or an array, as NumPy."""
  return np.asarray(x[...] if isinstance(x, nnx.Variable) else x)


def np_levels(w: np.ndarray, s, bits: int) -> np.ndarray:
  """round(clip(gamma * w / s, alpha, beta)), or 1[w > 0] for one bit."""
  if bits == 1:
    return (w > 0).astype(np.int8)
  half = 2 ** (bits - 1)
  return np.round(np.clip(half * w / s, -half, half - 1)).astype(np.int8)


def np_weight_scale(w: np.ndarray) -> float:
  return 3.0 * float(np.std(np.asarray(w, np.float64)))


def np_act_scale(x: np.ndarray) -> float:
  return 3.0 * float(np.std(np.asarray(x, np.float64))) / math.sqrt(1.0 - 2.0 / math.pi)


def np_act_quant(x: np.ndarray, s: float, bits: int) -> np.ndarray:
  """Unsigned activation value a_d / gamma: round(clip(2^b x / s, 0, 2^b - 1)) / 2^b."""
  gamma = 2 ** bits
  return np.round(np.clip(gamma * np.asarray(x) / s, 0, gamma - 1)) / gamma


def normal(seed: int, shape: tuple[int, ...], std: float = 1.0) -> jnp.ndarray:
  # NumPy draws: no PRNG compilation per shape.
  return jnp.asarray(np.random.default_rng(seed).normal(0.0, std, shape), jnp.float32)


def relu_batch(seed: int, shape: tuple[int, ...]) -> jnp.ndarray:
  return jnp.asarray(np.maximum(np.random.default_rng(seed).normal(size=shape), 0.0),
                     jnp.float32)


def abs_normal(seed: int, shape: tuple[int, ...]) -> jnp.ndarray:
  return jnp.asarray(np.abs(np.random.default_rng(seed).normal(size=shape)), jnp.float32)


# Initializers that draw with NumPy: an eager jax.random draw or fill compiles
# a program per shape, which dominates these tests on CPU.
def np_init(seed: int = 0, std: float = 0.5):
  def init(key, shape, dtype=jnp.float32):
    del key
    return jnp.asarray(np.random.default_rng(seed).normal(0.0, std, shape), dtype)
  return init


def ZEROS(key, shape, dtype=jnp.float32):  # pylint: disable=invalid-name
  del key
  return jnp.asarray(np.zeros(shape), dtype)


def ONES(key, shape, dtype=jnp.float32):  # pylint: disable=invalid-name
  del key
  return jnp.asarray(np.ones(shape), dtype)


def set_kernel(layer, seed: int = 0, std: float = 0.5):
  """Overwrites ``layer.kernel`` with NumPy draws (no per-shape PRNG compilation)."""
  layer.kernel[...] = normal(seed, layer.kernel[...].shape, std)
  return layer


def quant_linear(in_features, out_features, weight_bits, act_bits, seed=0, **kwargs):
  kwargs = {"multiply_scale": False, "bias_init": ZEROS, **kwargs}
  return tnnx.QuantLinear(in_features, out_features, weight_bits=weight_bits,
                          act_bits=act_bits, kernel_init=np_init(seed),
                          rngs=nnx.Rngs(0), **kwargs)


class TinyNet(nnx.Module):
  """FP conv - BN - ReLU - W2A2 conv - BN - ReLU - pool - W3A4 linear.

  Kernels are NumPy draws from ``seed`` (no per-shape PRNG compilation).
  """

  def __init__(self, seed: int):
    rngs = nnx.Rngs(0)
    bn = dict(scale_init=ONES, bias_init=ZEROS, rngs=rngs)
    self.conv1 = nnx.Conv(1, 3, (3, 3), use_bias=False, kernel_init=ZEROS, rngs=rngs)
    self.bn1 = nnx.BatchNorm(3, **bn)
    self.conv2 = tnnx.QuantConv(3, 4, (3, 3), use_bias=False, weight_bits=2, act_bits=2,
                                multiply_scale=False, kernel_init=ZEROS, rngs=rngs)
    self.bn2 = nnx.BatchNorm(4, **bn)
    self.head = tnnx.QuantLinear(4, 2, weight_bits=3, act_bits=4, multiply_scale=True,
                                 kernel_init=ZEROS, bias_init=ZEROS, rngs=rngs)
    for i, layer in enumerate((self.conv1, self.conv2, self.head)):
      set_kernel(layer, seed=10 * seed + i)

  def __call__(self, x):
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = nnx.relu(self.bn2(self.conv2(x)))
    return self.head(jnp.mean(x, axis=(1, 2)))


X = normal(7, (4, 5, 5, 1))
Y = jnp.array([0, 1, 1, 0])


def tiny_loss(model):
  return optax.softmax_cross_entropy_with_integer_labels(model(X), Y).mean()


# Compiled once for all TinyNets; eager op-by-op steps cost more to compile.
tiny_grads = nnx.jit(nnx.grad(tiny_loss))


def build(cls, seed: int = 0, **kwargs):
  """``cls(**kwargs, rngs=...)`` with NumPy-drawn He-normal kernels.

  The model is traced abstractly and then filled, so no initializer is
  compiled (per-shape PRNG compilation dominates building a model on CPU).
  Batch-norm scales and variances are 1, biases and means 0, quantizer
  placeholders as the layers set them.
  """
  graphdef, state = nnx.split(nnx.eval_shape(lambda: cls(rngs=nnx.Rngs(0), **kwargs)))
  rng = np.random.default_rng(seed)

  def fill(path, var):
    shape = var.shape
    if path[-1] == "kernel":
      value = rng.normal(0.0, math.sqrt(2.0 / math.prod(shape[:-1])), shape)
    elif path[-1] in ("scale", "var", "weight_scale", "act_scale"):
      value = np.ones(shape)
    else:
      value = np.zeros(shape)
    return jnp.asarray(value, var.dtype)

  flat = [(path, var.replace(fill(path, var))) for path, var in nnx.to_flat_state(state)]
  return nnx.merge(graphdef, nnx.from_flat_state(flat))
