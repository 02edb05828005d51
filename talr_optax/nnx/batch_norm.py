"""Batch-norm re-estimation after quantization-aware training (Nagel et al., 2022).

During QAT the running statistics of a batch norm are EMAs over many steps
in which the quantized weights before it kept changing; a weight oscillating
between two levels leaves them describing neither level. Depthwise convs
(few weights per channel) suffer most. Re-estimating the statistics with the
final quantized weights, before evaluation, recovers much of that accuracy.
"""

from __future__ import annotations

import typing as tp
from collections.abc import Iterable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from talr_optax import _checks

__all__ = ["reestimate_batch_norm"]


def _call(model: nnx.Module, x: tp.Any) -> tp.Any:
  return model(x)


def _is_array(x: tp.Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray))


def _check_batches(batches: tp.Any) -> None:
  """Refuses what is not an iterable of batches, above all one batch on its own."""
  if _is_array(batches):
    # Iterating one array yields its rows: single examples taken for batches.
    raise TypeError(
        "reestimate_batch_norm: batches must be an iterable of batches, got one array of"
        f" shape {tuple(batches.shape)}; iterating it would pass its single examples as"
        " batches. To use it as one batch, pass [x].")
  if not isinstance(batches, Iterable):
    raise TypeError(
        "reestimate_batch_norm: batches must be an iterable of batches (a list, a"
        f" generator, a data loader), got batches of type {type(batches).__name__}.")


def _check_batch(index: int, batch: tp.Any) -> None:
  """Without ``forward`` a batch is the model's input: it must be an array."""
  if not _is_array(batch):
    kind = type(batch).__name__
    raise TypeError(
        f"reestimate_batch_norm: batch {index} is a {kind}, not an array, and no forward"
        f" was given, so the model would be called with the {kind} itself. For (inputs,"
        " labels) pairs, as a data loader yields, pass forward=lambda m, b: m(b[0]) (for a"
        " dict, e.g. forward=lambda m, b: m(b['image'])); if the model does take a"
        f" {kind}, pass forward=lambda m, b: m(b).")


# One compiled program per model structure; momentum 0 makes each batch norm
# store the statistics of this batch alone, which the caller averages.
@partial(nnx.jit, static_argnums=2)
def _batch_statistics(model: nnx.Module, x: tp.Any, forward: tp.Callable) -> nnx.State:
  forward(model, x)
  return nnx.state(model, nnx.BatchStat)


def reestimate_batch_norm(
    model: nnx.Module,
    batches: tp.Iterable[tp.Any],
    forward: tp.Callable[[nnx.Module, tp.Any], tp.Any] | None = None,
) -> int:
  """Replaces every batch norm's running statistics by averages over ``batches``.

  As Nagel et al.'s reference code: every ``nnx.BatchNorm`` normalises with
  the statistics of the current batch (train mode) while the rest of the
  model stays in eval mode (quantized layers use their frozen step sizes and
  the current quantized weights; dropout off). The new running mean and
  variance of each batch norm are the plain averages over the batches of
  the per-batch, per-channel mean and (biased, as Flax computes it) variance
  of its input; the old statistics and the batch norms' momentum play no
  part. Params, step sizes and the modules' modes are left as they were.

  If a batch fails (``forward`` or the model raises, the iterable raises,
  even ``KeyboardInterrupt``), the error passes through and the model is left
  exactly as it was: batch statistics, momenta and modes.

  Args:
    model: an NNX module with ``nnx.BatchNorm`` layers (modified in place).
    batches: an iterable of batches (e.g. 50 training batches, the reference
      code's default), each passed to ``forward``; not one array (wrap one
      batch in a list: ``[x]``).
    forward: ``forward(model, batch)`` if the model is not called as
      ``model(batch)``; needed when a batch is not an array, e.g.
      ``lambda m, b: m(b[0])`` for the ``(inputs, labels)`` pairs of a data
      loader, ``lambda m, b: m(b["image"])`` for dicts.

  Returns:
    The number of batches used.

  Raises:
    TypeError: ``model`` is not an ``nnx.Module``; ``batches`` is one array
      or not iterable; a batch is not an array and ``forward`` is ``None``.
    ValueError: ``model`` has no ``nnx.BatchNorm``; ``batches`` is empty;
      ``forward`` is not callable. The model is left as it was.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from talr_optax import nnx as tnnx
    >>> rngs = nnx.Rngs(0)
    >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=rngs), nnx.BatchNorm(4, rngs=rngs))
    >>> model.eval()
    >>> batches = [jnp.arange(24.0).reshape(8, 3) + i for i in range(3)]
    >>> tnnx.reestimate_batch_norm(model, batches)
    3
    >>> model.layers[1].use_running_average  # modes as they were
    True
    >>> loader = [(x, jnp.zeros(8, jnp.int32)) for x in batches]  # (inputs, labels)
    >>> tnnx.reestimate_batch_norm(model, loader, forward=lambda m, b: m(b[0]))
    3
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(
        "reestimate_batch_norm: model must be an nnx.Module, got model of type"
        f" {type(model).__name__}.")
  if forward is not None:
    _checks.check_callable("forward", forward, "None or a callable forward(model, batch)",
                           owner="reestimate_batch_norm")
  _check_batches(batches)
  norms = [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)]
  if not norms:
    raise ValueError(
        "reestimate_batch_norm: model has no nnx.BatchNorm layer: there are no"
        " statistics to re-estimate.")
  modes = [(module, name, getattr(module, name))
           for _, module in nnx.iter_modules(model)
           for name in ("deterministic", "use_running_average") if hasattr(module, name)]
  momenta = [(bn, bn.momentum) for bn in norms]
  old = nnx.as_pure(nnx.state(model, nnx.BatchStat))
  total, count = None, 0
  try:
    model.eval()
    for bn in norms:
      bn.use_running_average = False
      bn.momentum = 0.0
    for batch in batches:
      if forward is None:
        _check_batch(count, batch)
      stats = nnx.as_pure(_batch_statistics(model, batch, forward or _call))
      total = stats if total is None else jax.tree.map(jnp.add, total, stats)
      count += 1
  # BaseException: an interrupt between batches must not leave one batch's statistics.
  except BaseException:
    nnx.update(model, old)
    raise
  finally:
    for bn, momentum in momenta:
      bn.momentum = momentum
    for module, name, value in modes:
      setattr(module, name, value)
  if count == 0:
    nnx.update(model, old)
    raise ValueError("reestimate_batch_norm: batches is empty; pass at least one batch.")
  nnx.update(model, jax.tree.map(lambda s: s / count, total))
  return count
