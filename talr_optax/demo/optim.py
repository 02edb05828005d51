"""Optimizers of the demo: the reference setup's four parameter groups.

Quantized weights, full-precision weights (momentum 0.9, weight decay 1e-4),
activation step sizes (SGD 0.01, no momentum, no weight decay, cosine) and
batch-norm parameters (no momentum, no weight decay). Only the quantized
group differs between the baseline and TALR.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import optax

import talr_optax as talr
from talr_optax.demo.config import ACT_SCALE_LR, BASE_LR, MOMENTUM, WEIGHT_DECAY, DemoConfig

Schedule = Callable[[Any], Any]


def learning_rate(cfg: DemoConfig, total_steps: int) -> Schedule:
  """The cosine learning rate of every group but the activation step sizes."""
  return optax.cosine_decay_schedule(BASE_LR[cfg.optimizer], total_steps)


def target(cfg: DemoConfig, bits: int, total_steps: int) -> tuple[float, Schedule]:
  """``R_0 = lambda * sqrt(bits)`` and the cosine target transition rate from it."""
  r0 = talr.initial_target(bits, cfg.lam)
  return r0, talr.cosine_target(r0, total_steps)


def _base(cfg: DemoConfig, momentum: float) -> optax.GradientTransformation:
  """The base optimizer of a group, without its learning-rate stage."""
  if cfg.optimizer == "adam":
    return optax.scale_by_adam()
  return optax.trace(momentum) if momentum else optax.identity()


def _quantized_group(cfg: DemoConfig, method: str, levels_fn: Callable[[Any], Any],
                     lr: Schedule, r0: float, target_rate: Schedule
                     ) -> optax.GradientTransformation:
  if method == "talr":
    if cfg.optimizer == "sgd":
      return talr.sgdt(lr, target_rate, levels_fn, momentum=MOMENTUM,
                       weight_decay=WEIGHT_DECAY, rule=cfg.rule, sample_size=cfg.sample_size)
    return talr.adamt(lr, target_rate, levels_fn, weight_decay=WEIGHT_DECAY, rule=cfg.rule,
                      sample_size=cfg.sample_size)
  # The baseline: the same steps with the cosine learning rate; the last stage
  # counts the transitions they cause. K starts at R_0, as TALR's does.
  return optax.chain(optax.add_decayed_weights(WEIGHT_DECAY), _base(cfg, MOMENTUM),
                     optax.scale_by_learning_rate(lr),
                     # The target (not R_0 alone): K then has TALR's EMA momentum.
                     talr.track_transitions(levels_fn, initial_rate=target_rate,
                                            sample_size=cfg.sample_size))


def qat(cfg: DemoConfig, model: Any, method: str, bits: int, total_steps: int
        ) -> optax.GradientTransformation:
  """``optax.partition`` over the four groups of ``model`` (a ``talr_optax.nnx`` model).

  ``method`` is ``"sgd"`` (the baseline) or ``"talr"``.
  """
  from talr_optax import nnx as tnnx  # pylint: disable=import-outside-toplevel
  lr = learning_rate(cfg, total_steps)
  r0, target_rate = target(cfg, bits, total_steps)
  levels_fn = tnnx.levels_fn_for(model)
  groups = {
      # The oscillation monitor ends both arms' chains: it sees the final
      # updates and leaves them unchanged.
      tnnx.QUANTIZED: optax.chain(_quantized_group(cfg, method, levels_fn, lr, r0, target_rate),
                                  talr.track_oscillations(levels_fn,
                                                          sample_size=cfg.sample_size)),
      tnnx.FULL_PRECISION: optax.chain(optax.add_decayed_weights(WEIGHT_DECAY),
                                       _base(cfg, MOMENTUM), optax.scale_by_learning_rate(lr)),
      tnnx.ACTIVATION_SCALE: optax.sgd(optax.cosine_decay_schedule(ACT_SCALE_LR, total_steps)),
      tnnx.BATCH_NORM: optax.chain(_base(cfg, 0.0), optax.scale_by_learning_rate(lr)),
  }
  return optax.partition(groups, tnnx.param_labels(model))


def full_precision(cfg: DemoConfig, total_steps: int) -> optax.GradientTransformation:
  """The optimizer of the full-precision pretraining (one group)."""
  return _full_precision(cfg.optimizer, total_steps)


# One object per setting: the seeds' pretraining runs then share a compiled step.
@functools.lru_cache(maxsize=None)
def _full_precision(optimizer: str, total_steps: int) -> optax.GradientTransformation:
  lr = optax.cosine_decay_schedule(BASE_LR[optimizer], total_steps)
  inner = optax.sgd(lr, momentum=MOMENTUM) if optimizer == "sgd" else optax.adam(lr)
  return optax.chain(optax.add_decayed_weights(WEIGHT_DECAY), inner)
