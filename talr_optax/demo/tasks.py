"""Tasks the demo trains: the data, the models that fit it, loss and score.

A task is what changes from one problem to another; the training loop, the
optimizer groups, the run store and the figures are shared. To add one, write
a :class:`Task` and put it in :data:`TASKS` (its name becomes a ``--dataset``
choice). A model is a factory in :data:`MODELS`, named by the tasks it fits.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from talr_optax.demo import data
from talr_optax.demo.config import DemoConfig, UsageError

# (weight and activation bits or None, seed, number of classes) -> nnx.Module
ModelFactory = Callable[[int | None, int, int], Any]
Augment = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def softmax_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean cross-entropy of integer labels (any leading shape)."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def correct_predictions(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """How many labels the arg-max of ``logits`` gets right."""
  return jnp.sum(jnp.argmax(logits, -1) == labels)


@dataclasses.dataclass(frozen=True)
class Defaults:
  """Run lengths and batch size when the command line does not set them."""

  epochs: int
  fp_epochs: int
  batch_size: int


@dataclasses.dataclass(frozen=True)
class Task:
  """One problem: how to load it, which models fit it, how to score them.

  Attributes:
    name: the ``--dataset`` value.
    help: one line for ``--help``.
    models: names in :data:`MODELS` that fit the data; the first is the default.
    load: ``load(cfg) -> data.Dataset``; raises ``FileNotFoundError`` or
      ``ValueError`` naming a missing or corrupt file.
    defaults: epochs, pretraining epochs and batch size.
    augment: ``augment(inputs, rng)`` applied to every training batch.
    data_dir: what ``--data-dir`` must hold, if the task needs it.
    loss: ``loss(logits, labels)`` minimised by training (traced under jit).
    hits: ``hits(logits, labels)``: labels predicted right; the test score is
      their fraction.
  """

  name: str
  help: str
  models: tuple[str, ...]
  load: Callable[[DemoConfig], data.Dataset]
  defaults: Defaults
  augment: Augment | None = None
  data_dir: str | None = None
  loss: Callable[[jax.Array, jax.Array], jax.Array] = softmax_loss
  hits: Callable[[jax.Array, jax.Array], jax.Array] = correct_predictions


def _small_cnn(bits: int | None, seed: int, num_classes: int):
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from talr_optax import nnx as tnnx  # pylint: disable=import-outside-toplevel
  return tnnx.SmallCNN(weight_bits=bits, act_bits=bits, num_classes=num_classes,
                       rngs=nnx.Rngs(seed))


def _resnet20(bits: int | None, seed: int, num_classes: int):
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from talr_optax import nnx as tnnx  # pylint: disable=import-outside-toplevel
  return tnnx.ResNet20(weight_bits=bits, act_bits=bits, num_classes=num_classes,
                       rngs=nnx.Rngs(seed))


def _mobilenet(bits: int | None, seed: int, num_classes: int):
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from talr_optax import nnx as tnnx  # pylint: disable=import-outside-toplevel
  return tnnx.MobileNetV2Tiny(weight_bits=bits, act_bits=bits, num_classes=num_classes,
                              rngs=nnx.Rngs(seed))


# Flax is imported by the factories only: parsing the command line stays light.
MODELS: dict[str, ModelFactory] = {"cnn": _small_cnn, "resnet20": _resnet20,
                                   "mobilenet": _mobilenet}

TASKS: dict[str, Task] = {
    "digits": Task(
        name="digits", help="8x8 digits; ships with scikit-learn", models=("cnn", "mobilenet"),
        load=lambda cfg: data.load_digits(seed=0), defaults=Defaults(60, 15, 32),
        augment=partial(data.random_shift, max_shift=1)),
    "cifar10": Task(
        name="cifar10", help="32x32 RGB images; needs --data-dir", models=("resnet20",),
        load=lambda cfg: data.load_cifar10(cfg.data_dir), defaults=Defaults(400, 200, 256),
        augment=partial(data.random_shift, max_shift=4, flip=True),
        data_dir="the CIFAR-10 python-pickle files (data_batch_1..5, test_batch)"),
}


def make_model(cfg: DemoConfig, bits: int | None, seed: int, num_classes: int):
  """``cfg.model`` with ``bits``-bit weights and activations (None: full precision)."""
  return MODELS[cfg.model](bits, seed, num_classes)


def check_batch_size(cfg: DemoConfig, dataset: data.Dataset) -> None:
  """Refuses a ``--batch-size`` that leaves no full batch in an epoch."""
  n = len(dataset.train.labels)
  if cfg.batch_size > n:
    raise UsageError(
        f"argument --batch-size: must be an integer in [1, {n}] (the size of the "
        f"{cfg.dataset} training set), got {cfg.batch_size}")
