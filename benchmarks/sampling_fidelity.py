"""Sampled transition counting: how far the sampled K is from the exact one.

``sample_size=N`` counts a rate group's transitions on a fixed strided grid
of at most ``N`` weights (``talr_optax.counting.sample_strides``). This
script measures what that costs on a real QAT run of the demo
(``talr_optax.demo``; default: digits, SmallCNN, W2A2, SGDT, 60 epochs):

* **one trajectory, two counts**: TALR is driven by the sampled count
  (``sgdt(..., sample_size=N)``) and ``talr_optax.track_transitions(levels_fn,
  R_0)`` is appended as the last stage of the whole optimizer, so it counts
  every weight of the same updates. Reported: the mean over steps (after a
  10 % warm-up) and over the sampled tensors of ``|K_sampled - K_exact| / R_0``
  per seed, and its signed mean (a bias that does not average out);
* **what a random sample would give**: counting ``n`` of a tensor's ``M``
  weights drawn at random each step has a per-step standard error
  ``sqrt(k (1 - k) / n)`` (times ``sqrt((M - n) / (M - 1))``, drawn without
  replacement), and the EMA ``K_(t+1) = m K_t + (1 - m) k_t`` shrinks
  independent errors by about ``sqrt((1 - m) / (1 + m))`` (0.071 for m = 0.99).
  Reported: that standard error at ``k = R_0``, and the mean ``|error|`` the
  variance recursion ``v_(t+1) = m^2 v_t + (1 - m)^2 var(k_t)`` predicts along
  the measured exact ``k`` (times ``sqrt(2 / pi)``, a normal's mean
  ``|x| / sigma``). A fixed grid is not a fresh random sample: the same weights
  are counted every step, so if they cross more (or less) often than the rest
  of the tensor, the error is a bias that the EMA does not average out;
* **replayed**: the exact runs record which weights changed in every update;
  on those, the grid, a fixed random subset of the same size and a fresh
  random subset per step are counted offline (no feedback into the run), to
  tell the cost of a fixed subset from that of the grid's structure;
* **accuracy**: the final test accuracy of TALR driven by the sampled count
  against TALR with exact counting (``sample_size=None``), same seeds, same
  pretrained models and data order (lm: validation bits per byte).

The tensors of the digits models are small (SmallCNN: 4,608 and 9,216
weights; MobileNetV2Tiny: 128 to 1,536 per tensor), so sampling applies
only at small ``N``; the table says which tensors are sampled at each ``N``
and how many of their weights are counted.

``--task lm`` (:func:`lm_trajectory`) runs the demo's language-model task
(``python -m talr_optax.demo --task lm``: byte-level transformer, W2
weight-only, AdamWT with one rate per layer slice, ``m = 0.95``, 1000 QAT
steps from one 2000-step pretrained model); its exact monitor, with the same
``layer_axes``, is the last stage of the quantized group's chain. Its rate
groups are layer slices of 4,096 (attention) and 16,384 (MLP) weights:
``N = 256, 1024`` sample all 12, ``N = 4096`` the 4 MLP slices.

Another task plugs in through :data:`RUNNERS`: a function that runs one
seed at one sample size and returns a :class:`Trajectory`; the demo's image
tasks (``talr_optax.demo.tasks.TASKS``) already fit :func:`demo_trajectory`.

Usage:
  python benchmarks/sampling_fidelity.py --quick     # 1 seed, 2 epochs, N = 256
  python benchmarks/sampling_fidelity.py             # 3 seeds, 60 epochs, N = 64, 256, 1024
  python benchmarks/sampling_fidelity.py --model mobilenet --sample-sizes 64,256
  python benchmarks/sampling_fidelity.py --task lm   # 3 seeds, 1000 steps, N = 256, 1024, 4096
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import _harness as H

import talr_optax as talr
from talr_optax import _tree
from talr_optax.counting import sample_strides, take_sample

# Steps left out at the start: K starts at R_0 and needs ~1/(1-m) steps.
WARMUP_FRACTION = 0.1
EMA_MOMENTUM = 0.99  # the demo's (and the paper's) m
# Per task: default model, run lengths (in the task's unit), sample sizes and
# the --quick settings. The digits tensors hold 128 to 9,216 weights; the LM's
# rate groups (one per layer slice of a kernel) 4,096 (attention, 64 x 64)
# and 16,384 (MLP, 64 x 256 and 256 x 64).
TASK_SETTINGS: dict[str, dict[str, Any]] = {
    "digits": dict(
        # models=None: those of the demo's TASKS["digits"].
        model="cnn", models=None, unit="epochs", length=60, fp_length=15,
        sample_sizes=(64, 256, 1024),
        quick=dict(seeds=1, length=2, fp_length=1, sample_sizes=(256,)),
        describe=lambda model, bits: f"{model} W{bits}A{bits}"),
    "lm": dict(
        model="transformer", models=("transformer",), unit="steps", length=1000,
        fp_length=2000, sample_sizes=(256, 1024, 4096),
        quick=dict(seeds=1, length=100, fp_length=100, sample_sizes=(1024,)),
        describe=lambda model, bits: f"{model} W{bits} (weights only), AdamWT"),
}
# Final metric: JSON scale (accuracy in percent), table label, table digits.
METRIC_SCALE = {"accuracy": 100.0, "bits_per_byte": 1.0}
METRIC_LABEL = {"accuracy": "acc", "bits_per_byte": "bits/byte"}
METRIC_DIGITS = {"accuracy": 2, "bits_per_byte": 4}


@dataclasses.dataclass
class Trajectory:
  """One run: per step and rate group, the sampled and the exact count.

  Arrays are ``(steps, groups)``; ``counted`` equals ``weights`` for a group
  counted exactly. Entry ``t`` is the state after update ``t``.
  """

  names: list[str]
  shapes: list[tuple[int, ...]]  # of each group's levels
  counted: list[int]  # n: weights the sampled count reads (M when exact)
  r0: float
  k_sampled: np.ndarray
  K_sampled: np.ndarray
  k_exact: np.ndarray
  K_exact: np.ndarray
  # The task's final quality: test accuracy (digits) or validation bits per
  # byte (lm), written to the JSON as ``final_<metric>``.
  final_metric: float
  metric: str = "accuracy"
  momentum: float = EMA_MOMENTUM  # m of K, both counts
  # Per group, (steps, M) bool: which weights changed level in each update
  # (only when asked for, and only if the runner can record it).
  changes: Optional[list[np.ndarray]] = None

  @property
  def weights(self) -> list[int]:
    """M: weights per rate group."""
    return [math.prod(shape) for shape in self.shapes]


# (task, model, bits, seed, sample_size or None, length, fp_length, record_changes);
# length and fp_length (QAT and pretraining) in the task's unit: digits
# epochs, lm steps (TASK_SETTINGS).
Runner = Callable[[str, str, int, int, Optional[int], int, int, bool], Trajectory]


# ---------------------------------------------------------------------------
# The demo's tasks.


def counted_weights(shape: Sequence[int], sample_size: Optional[int]) -> int:
  """Weights of a tensor of ``shape`` that ``sample_size`` counts (all if None)."""
  strides = None if sample_size is None else sample_strides(shape, sample_size)
  if strides is None:
    return math.prod(shape)
  return math.prod(-(-d // s) for d, s in zip(shape, strides))


def _pair(m: dict[str, jax.Array], field: str, names: Sequence[str]) -> jax.Array:
  """``(sampled, exact)`` rows of ``field``: TALR's state first, then the monitor's.

  ``talr.metrics`` gives the second state holding a key the suffix ``#1``.
  """
  exact = lambda n: m[f"{field}/{n}#1"]  # noqa: E731
  return jnp.stack([jnp.stack([m[f"{field}/{n}"] for n in names]),
                    jnp.stack([exact(n) for n in names])])


def _monitor_levels(opt_state: Any) -> dict[str, jax.Array]:
  """The exact monitor's stored levels (of the latest params), by rate name."""
  is_monitor = lambda x: isinstance(x, talr.TrackTransitionsState)  # noqa: E731
  (monitor,) = [x for x in jax.tree.leaves(opt_state, is_leaf=is_monitor) if is_monitor(x)]
  return {name: _tree.unbox(x) for name, x in _tree.leaves_with_paths(monitor.prev_levels)
          if _tree.unbox(x) is not None}


def demo_trajectory(task_name: str, model_name: str, bits: int, seed: int,
                    sample_size: Optional[int], epochs: int, fp_epochs: int,
                    record_changes: bool = False) -> Trajectory:
  """A TALR run of a demo task, its own count sampled, an exact monitor last.

  The run is the demo's TALR run (its optimizer groups, pretraining, first
  batch for calibration and data order), with
  ``track_transitions(levels_fn, R_0)`` chained after the whole optimizer.
  ``record_changes`` also keeps which weights changed level in each update.
  """
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from talr_optax import nnx as tnnx  # pylint: disable=import-outside-toplevel
  from talr_optax.demo import data, optim, train  # pylint: disable=import-outside-toplevel
  from talr_optax.demo.config import DemoConfig  # pylint: disable=import-outside-toplevel
  from talr_optax.demo.tasks import TASKS, make_model  # pylint: disable=import-outside-toplevel

  task = TASKS[task_name]
  cfg = DemoConfig(dataset=task_name, model=model_name, bits=(bits,), seeds=1, epochs=epochs,
                   fp_epochs=fp_epochs, batch_size=task.defaults.batch_size,
                   sample_size=sample_size)
  dataset = _load(task_name)
  fp_model = _pretrained(task_name, model_name, seed, fp_epochs)
  model = make_model(cfg, bits, seed, dataset.num_classes)
  tnnx.load_full_precision(model, fp_model)
  first_x, _ = next(data.batches(dataset.train, cfg.batch_size,
                                 rng=np.random.default_rng(seed)))
  tnnx.calibrate(model, jnp.asarray(first_x))
  total = epochs * train.steps_per_epoch(cfg, dataset)
  r0, _ = optim.target(cfg, bits, total)
  levels_fn = tnnx.levels_fn_for(model)
  # TALR's EMA momentum: the default for a run of this length.
  momentum = talr.ema_momentum_for(total)
  # The monitor is the last stage: it counts, on every weight, the
  # transitions of exactly the updates TALR's sampled count saw.
  tx = optax.chain(optim.qat(cfg, model, "talr", bits, total),
                   talr.track_transitions(levels_fn, r0, ema_momentum=momentum))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  names = sorted(k.split("/", 1)[1] for k in talr.metrics(optimizer.opt_state)
                 if k.startswith("transition_rate/") and "#" not in k)
  shapes = _level_shapes(levels_fn, nnx.state(model, nnx.Param))

  @nnx.jit
  def step(model, optimizer, x, y):
    loss_grads = nnx.value_and_grad(lambda m: task.loss(m(x), y))
    _, grads = loss_grads(model)
    optimizer.update(model, grads)
    m = talr.metrics(optimizer.opt_state)
    levels = _monitor_levels(optimizer.opt_state) if record_changes else {}
    return (_pair(m, "transition_rate", names), _pair(m, "ema_transition_rate", names),
            [levels[n].reshape(-1) for n in names if levels])

  rng = np.random.default_rng(seed)
  k, K = [], []
  prev = [np.asarray(x).reshape(-1) for x in
          map(_monitor_levels(optimizer.opt_state).get, names)] if record_changes else []
  changes: list[list[np.ndarray]] = [[] for _ in prev]
  model.train()
  for _ in range(epochs):
    pending = [step(model, optimizer, jnp.asarray(x), jnp.asarray(y))
               for x, y in data.batches(dataset.train, cfg.batch_size, rng=rng,
                                        augment=task.augment)]
    for k_t, K_t, levels in jax.device_get(pending):  # one transfer per epoch
      k.append(k_t)
      K.append(K_t)
      for g, new in enumerate(levels):
        changes[g].append(new != prev[g])
        prev[g] = new
  k, K = np.asarray(k), np.asarray(K)
  return Trajectory(
      names=names, shapes=[shapes[n] for n in names],
      counted=[counted_weights(shapes[n], sample_size) for n in names], r0=float(r0),
      k_sampled=k[:, 0], K_sampled=K[:, 0], k_exact=k[:, 1], K_exact=K[:, 1],
      final_metric=train.evaluate(task, model, dataset.test), momentum=momentum,
      changes=[np.stack(c) for c in changes] if record_changes else None)


def _level_shapes(levels_fn: Callable[[Any], Any], params: Any) -> dict[str, tuple[int, ...]]:
  """Shape of each quantized leaf's levels, by the name its rate has."""
  shapes = jax.eval_shape(levels_fn, params)
  return {name: tuple(x.shape) for name, x in _tree.leaves_with_paths(shapes, is_leaf_fn=None)}


# The data and each seed's pretrained model are shared by every sample size.
# (A task that needs --data-dir would pass it here.)
@functools.lru_cache(maxsize=None)
def _load(task_name: str) -> Any:
  from talr_optax.demo.config import DemoConfig  # pylint: disable=import-outside-toplevel
  from talr_optax.demo.tasks import TASKS  # pylint: disable=import-outside-toplevel
  return TASKS[task_name].load(DemoConfig(dataset=task_name))


@functools.lru_cache(maxsize=None)
def _pretrained(task_name: str, model_name: str, seed: int, fp_epochs: int) -> Any:
  from talr_optax.demo import train  # pylint: disable=import-outside-toplevel
  from talr_optax.demo.config import DemoConfig  # pylint: disable=import-outside-toplevel
  from talr_optax.demo.tasks import TASKS  # pylint: disable=import-outside-toplevel
  task = TASKS[task_name]
  cfg = DemoConfig(dataset=task_name, model=model_name, fp_epochs=fp_epochs,
                   batch_size=task.defaults.batch_size)
  return train.pretrain_full_precision(cfg, task, _load(task_name), seed)


# ---------------------------------------------------------------------------
# The language-model task (``python -m talr_optax.demo --task lm``).


def _lm_config(steps: int, fp_steps: int) -> Any:
  """The task's default settings (model, AdamWT, lambda, EMA momentum), these lengths."""
  from talr_optax.demo.lm_config import LMConfig  # pylint: disable=import-outside-toplevel
  return LMConfig(steps=steps, fp_steps=fp_steps)


@functools.lru_cache(maxsize=None)
def _lm_data(context: int, eval_windows: int) -> Any:
  """The corpus and the validation windows, as the demo loads them."""
  from talr_optax.demo import lm_train  # pylint: disable=import-outside-toplevel
  return lm_train.load(dataclasses.replace(_lm_config(1, 1), context=context,
                                           eval_windows=eval_windows))


@functools.lru_cache(maxsize=None)
def _lm_pretrained(fp_steps: int) -> Any:
  """The full-precision model every QAT run starts from (seed 0, as in the demo)."""
  from talr_optax.demo import lm_train  # pylint: disable=import-outside-toplevel
  cfg = _lm_config(1, fp_steps)
  model, _ = lm_train.pretrain(cfg, _lm_data(cfg.context, cfg.eval_windows), 0)
  return model


def _exact_monitor(arm: Any, model: Any) -> optax.GradientTransformation:
  """The stage appended to the demo's quantized chain: counts every weight of every layer slice.

  ``lm_train.optimizer(arm, model, then=(this,))`` is the demo's optimizer
  (AdamWT, then its oscillation monitor) followed by ``track_transitions(
  levels_fn, R_0, ema_momentum=m, layer_axes=...)`` on the same updates.
  """
  from talr_optax import nnx as tnnx  # pylint: disable=import-outside-toplevel
  levels_fn, axes = tnnx.levels_fn_for(model), tnnx.layer_axes_for(model)
  return talr.track_transitions(levels_fn, arm.r0, ema_momentum=arm.ema_momentum, layer_axes=axes)


def _rate_names(m: dict[str, jax.Array]) -> list[str]:
  return sorted(k.split("/", 1)[1] for k in m if k.startswith("transition_rate/") and "#" not in k)


def _lm_step_impl(arm: Any, record: bool, model: Any, opt_state: Any, windows: jax.Array
                  ) -> tuple[Any, jax.Array, jax.Array, dict[str, jax.Array]]:
  """The demo's ``lm_train.update`` with :func:`_exact_monitor`: ``(opt_state, k, K, levels)``.

  ``k`` and ``K`` are ``(2, groups)``: TALR's (sampled) row, then the
  monitor's (exact); ``levels`` the monitor's levels of the new params when
  ``record``.
  """
  from talr_optax.demo import lm_train  # pylint: disable=import-outside-toplevel
  _, opt_state = lm_train.update(arm, model, opt_state, 1.0, windows,
                                 then=(_exact_monitor(arm, model),))
  m = talr.metrics(opt_state)
  names = _rate_names(m)
  levels = _monitor_levels(opt_state) if record else {}
  return opt_state, _pair(m, "transition_rate", names), _pair(m, "ema_transition_rate", names), \
      levels


@functools.lru_cache(maxsize=None)
def _lm_step() -> Callable[..., Any]:
  """:func:`_lm_step_impl` under ``nnx.jit``, compiled once per (arm, record)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  return nnx.jit(_lm_step_impl, static_argnums=(0, 1))


def _slices(leaves: dict[str, Any], axes: dict[str, Optional[int]]) -> dict[str, Any]:
  """Per rate group: ``path[i]`` for layer ``i`` of a stacked leaf, ``path`` otherwise."""
  out = {}
  for path, x in leaves.items():
    x, axis = np.asarray(x), axes.get(path)
    if axis is None:
      out[path] = x
    else:
      out.update({f"{path}[{i}]": np.take(x, i, axis=axis) for i in range(x.shape[axis])})
  return out


def lm_trajectory(task_name: str, model_name: str, bits: int, seed: int,
                  sample_size: Optional[int], steps: int, fp_steps: int,
                  record_changes: bool = False) -> Trajectory:
  """An AdamWT run of the LM task, its own count sampled, an exact monitor last.

  As ``lm_train.run_qat(..., method="talr")`` with the task's defaults
  (``LMConfig``: model, ``lr``, ``lambda``, ``ema_momentum``, per-layer
  rates): the pretrained model of seed 0, calibration on the first windows
  of ``default_rng(seed)``, then the training windows of the same generator,
  so the runs of one seed see the same data whatever ``sample_size``. The
  quantized group's chain ends with an exact ``track_transitions`` with the
  same ``layer_axes`` (:func:`_exact_monitor`). A rate group is one layer
  slice of a stacked kernel (``blocks/mlp/up/kernel[1]``). Only the final
  validation bits per byte are evaluated (no evaluation during the run).
  """
  del task_name
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from talr_optax import nnx as tnnx  # pylint: disable=import-outside-toplevel
  from talr_optax.demo import lm_data, lm_train  # pylint: disable=import-outside-toplevel

  if model_name != "transformer":
    raise ValueError(f"the lm task has one model, 'transformer', got {model_name!r}")
  cfg = _lm_config(steps, fp_steps)
  corpus, val = _lm_data(cfg.context, cfg.eval_windows)
  fp_model = _lm_pretrained(fp_steps)
  model = lm_train.make_model(cfg, bits, seed)
  tnnx.load_full_precision(model, fp_model)
  rng = np.random.default_rng(seed)
  tnnx.calibrate(model, jnp.asarray(
      lm_data.random_windows(corpus.train, cfg.context, cfg.batch_size, rng)))
  arm = lm_train.Arm("talr", bits, cfg.steps, cfg.lr, cfg.lam, cfg.rule, cfg.ema_momentum,
                     sample_size)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  opt_state = lm_train.optimizer(arm, model, then=(_exact_monitor(arm, model),)).init(params)
  names = _rate_names(talr.metrics(opt_state))
  axes = {name: axis for name, axis in _tree.leaves_with_paths(tnnx.layer_axes_for(model))}
  levels_fn = tnnx.levels_fn_for(model)
  shapes = {}
  for path, shape in _level_shapes(levels_fn, params).items():
    axis = axes.get(path)
    shapes.update({path: shape} if axis is None else
                  {f"{path}[{i}]": shape[:axis] + shape[axis + 1:] for i in range(shape[axis])})
  counted = [counted_weights(shapes[n], sample_size) for n in names]
  # The sampled count's stored levels hold exactly the weights counted_weights says.
  is_talr = lambda x: isinstance(x, talr.ScaleByTALRState)  # noqa: E731
  (talr_state,) = [x for x in jax.tree.leaves(opt_state, is_leaf=is_talr) if is_talr(x)]
  stored = _slices({n: np.asarray(_tree.unbox(x)) for n, x in
                    _tree.leaves_with_paths(talr_state.prev_levels)
                    if _tree.unbox(x) is not None}, axes)
  assert [stored[n].size for n in names] == counted, (names, counted)

  step = _lm_step()
  prev = ([_slices(_monitor_levels(opt_state), axes)[n].reshape(-1) for n in names]
          if record_changes else [])
  changes: list[list[np.ndarray]] = [[] for _ in prev]
  k, K = [], []
  model.train()
  done = 0
  while done < steps:
    pending = []
    for _ in range(min(cfg.eval_every, steps - done)):
      windows = lm_data.random_windows(corpus.train, cfg.context + 1, cfg.batch_size, rng)
      opt_state, k_t, K_t, levels = step(arm, record_changes, model, opt_state,
                                         jnp.asarray(windows))
      pending.append((k_t, K_t, levels))
    done += len(pending)
    for k_t, K_t, levels in jax.device_get(pending):  # one transfer per chunk
      k.append(k_t)
      K.append(K_t)
      if record_changes:
        levels = _slices(levels, axes)
        for g, name in enumerate(names):
          new = levels[name].reshape(-1)
          changes[g].append(new != prev[g])
          prev[g] = new
  k, K = np.asarray(k), np.asarray(K)
  return Trajectory(
      names=names, shapes=[shapes[n] for n in names], counted=counted, r0=float(arm.r0),
      k_sampled=k[:, 0], K_sampled=K[:, 0], k_exact=k[:, 1], K_exact=K[:, 1],
      final_metric=lm_train.bits_per_byte(model, val), metric="bits_per_byte",
      momentum=cfg.ema_momentum,
      changes=[np.stack(c) for c in changes] if record_changes else None)


# Task name -> runner. A task whose model the demo's image tasks do not build
# (or that needs layer_axes for its monitor, like lm) adds its own runner here.
RUNNERS: dict[str, Runner] = {"digits": demo_trajectory, "lm": lm_trajectory}


# ---------------------------------------------------------------------------
# The measurement.


def expected_error(traj: Trajectory, group: int) -> tuple[float, float]:
  """What a fresh random sample of ``n`` weights per step would give, over ``R_0``.

  Returns:
    ``(se_at_r0, mean_abs)``: the standard error of ``K`` at ``k = R_0``,
    ``sqrt(R_0 (1 - R_0) / n * fpc) * sqrt((1 - m) / (1 + m))``, and the mean
    ``|K_sampled - K_exact|`` after the warm-up that the variance recursion
    predicts along the measured exact ``k``, both divided by ``R_0``.
  """
  n, M = traj.counted[group], traj.weights[group]
  if n >= M:
    return 0.0, 0.0
  momentum = traj.momentum
  fpc = (M - n) / (M - 1)  # drawn without replacement
  r0 = traj.r0
  se_at_r0 = math.sqrt(r0 * (1 - r0) / n * fpc * (1 - momentum) / (1 + momentum)) / r0
  k = traj.k_exact[:, group].astype(np.float64)
  var, sd = 0.0, np.empty_like(k)
  for t, k_t in enumerate(k):
    var = momentum**2 * var + (1 - momentum)**2 * k_t * (1 - k_t) / n * fpc
    sd[t] = math.sqrt(var)
  start = int(WARMUP_FRACTION * len(k))
  return se_at_r0, float(math.sqrt(2 / math.pi) * np.mean(sd[start:]) / r0)


def _ema(k: np.ndarray, start: float, momentum: float = EMA_MOMENTUM) -> np.ndarray:
  """``K`` after each step, ``K_(t+1) = m K_t + (1 - m) k_t`` along the last axis."""
  K, out = np.full(k.shape[:-1], start, np.float64), np.empty(k.shape, np.float64)
  for t in range(k.shape[-1]):
    K = momentum * K + (1 - momentum) * k[..., t]
    out[..., t] = K
  return out


def subset_errors(traj: Trajectory, sample_sizes: Sequence[int], draws: int = 20,
                  seed: int = 0) -> dict[int, dict[str, float]]:
  """Mean ``|K_subset - K_exact| / R_0`` of three ways to count ``n`` of ``M`` weights.

  On one recorded trajectory (no feedback of the count into the run): the
  core's fixed strided grid (``grid``), a fixed random subset of the same
  size drawn once (``fixed_random``, mean over ``draws`` subsets), and a
  fresh random subset every step (``fresh_random``, the case the standard
  error formula describes). Averaged over the groups sampled at each ``n``.
  """
  rng = np.random.default_rng(seed)
  start = int(WARMUP_FRACTION * len(traj.K_exact))
  out = {}
  for n_max in sample_sizes:
    errs: dict[str, list[float]] = {"grid": [], "fixed_random": [], "fresh_random": []}
    for g, shape in enumerate(traj.shapes):
      strides = sample_strides(shape, n_max)
      if strides is None:
        continue
      changed = traj.changes[g]
      M = changed.shape[1]
      K_exact = _ema(changed.mean(1), traj.r0, traj.momentum)
      # The recorded changes reproduce the monitor's K (float32 there).
      np.testing.assert_allclose(K_exact, traj.K_exact[:, g], rtol=1e-4, atol=1e-7)
      grid = take_sample(np.arange(M).reshape(shape), strides).ravel()
      n = grid.size
      fixed = np.stack([changed[:, rng.choice(M, n, replace=False)].mean(1)
                        for _ in range(draws)])
      c = changed.sum(1)
      fresh = rng.hypergeometric(c, M - c, n, size=(draws, len(c))) / n

      def err(k: np.ndarray) -> float:
        return float(np.mean(np.abs(_ema(k, traj.r0, traj.momentum) - K_exact)[..., start:])
                     / traj.r0)

      errs["grid"].append(err(changed[:, grid].mean(1)))
      errs["fixed_random"].append(err(fixed))
      errs["fresh_random"].append(err(fresh))
    if errs["grid"]:
      out[n_max] = {kind: float(np.mean(v)) for kind, v in errs.items()}
  return out


def compare(traj: Trajectory) -> dict[str, Any]:
  """Sampled against exact ``K`` after the warm-up, per rate group and pooled."""
  start = int(WARMUP_FRACTION * len(traj.K_exact))
  diff = (traj.K_sampled - traj.K_exact)[start:] / traj.r0
  groups = []
  for g, name in enumerate(traj.names):
    se, expected = expected_error(traj, g)
    groups.append({
        "name": name, "weights": traj.weights[g], "counted": traj.counted[g],
        "sampled": traj.counted[g] < traj.weights[g],
        "mean_abs_error": float(np.mean(np.abs(diff[:, g]))),
        "mean_signed_error": float(np.mean(diff[:, g])),
        "expected_se_at_r0": se, "expected_mean_abs_error": expected,
        "mean_k_exact": float(np.mean(traj.k_exact[start:, g])),
    })
  sampled = [g for g in groups if g["sampled"]]

  def mean(key: str, sel: list[dict[str, Any]]) -> float:
    return float(np.mean([g[key] for g in sel])) if sel else 0.0

  return {
      "groups": groups,
      "sampled_groups": [g["name"] for g in sampled],
      # Over the sampled groups (the others match exactly, by construction).
      "mean_abs_error": mean("mean_abs_error", sampled),
      "mean_signed_error": mean("mean_signed_error", sampled),
      "expected_se_at_r0": mean("expected_se_at_r0", sampled),
      "expected_mean_abs_error": mean("expected_mean_abs_error", sampled),
      "mean_abs_error_all_groups": mean("mean_abs_error", groups),
      f"final_{traj.metric}": traj.final_metric,
      "steps": len(traj.K_exact),
  }


def _final(row: dict[str, Any]) -> tuple[str, float]:
  """``(metric, value)`` of a row's ``final_<metric>``, accuracy in percent."""
  metric = next(m for m in METRIC_SCALE if f"final_{m}" in row)
  return metric, METRIC_SCALE[metric] * row[f"final_{metric}"]


def measure(task: str, *, model: Optional[str] = None, bits: int = 2, seeds: int = 3,
            sample_sizes: Optional[Sequence[int]] = None, length: Optional[int] = None,
            fp_length: Optional[int] = None) -> list[dict[str, Any]]:
  """One row per (sample size or exact, seed) of ``task`` (a key of :data:`RUNNERS`).

  ``length`` and ``fp_length`` are in the task's unit (``TASK_SETTINGS``:
  digits epochs, lm steps); ``None`` takes the task's defaults. The exact run
  of each seed also records which weights changed, and its row holds
  :func:`subset_errors` at every sample size (if the runner records them).
  """
  if task not in RUNNERS:
    raise SystemExit(f"--task must be one of {', '.join(RUNNERS)}, got {task!r}")
  settings = TASK_SETTINGS[task]
  model = model or settings["model"]
  sample_sizes = settings["sample_sizes"] if sample_sizes is None else sample_sizes
  length, fp_length = length or settings["length"], fp_length or settings["fp_length"]
  rows = []
  for seed in range(seeds):
    for n in (None, *sample_sizes):
      t0 = time.perf_counter()
      traj = RUNNERS[task](task, model, bits, seed, n, length, fp_length, n is None)
      row = {"task": task, "model": model, "bits": bits, "seed": seed, "sample_size": n,
             "r0": traj.r0, "ema_momentum": traj.momentum, **compare(traj),
             "seconds": time.perf_counter() - t0, "load": H.loadavg()}
      if traj.changes is not None:
        row["subset_errors"] = subset_errors(traj, sample_sizes)
      if n is None and row["mean_abs_error_all_groups"] > 1e-6:
        # Both count every weight of the same updates: they must agree.
        raise RuntimeError(f"exact TALR and the exact monitor disagree: {row}")
      rows.append(row)
      metric, value = _final(row)
      print(f"seed {seed} N={n}: |K_s-K_e|/R0 {row['mean_abs_error']:.4f}, "
            f"{metric} {value:.4f}, {row['seconds']:.0f} s", flush=True)
  return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Per sample size: errors per seed and mean, expected error, final metric vs exact.

  The final metric is the task's (``accuracy_*`` in percent for digits,
  ``bits_per_byte_*`` for lm).
  """
  exact = [r for r in rows if r["sample_size"] is None]
  metric = _final(rows[0])[0]
  out = []
  for n in sorted({r["sample_size"] for r in rows if r["sample_size"] is not None}):
    sel = sorted((r for r in rows if r["sample_size"] == n), key=lambda r: r["seed"])
    groups = sel[0]["groups"]
    sampled = [g for g in groups if g["sampled"]]
    out.append({
        "sample_size": n,
        "sampled_tensors": [f"{g['name']} ({g['counted']}/{g['weights']})" for g in sampled],
        # Weights the sampled count reads, over the sampled groups and over all.
        "counted_weights_sampled_groups": sum(g["counted"] for g in sampled),
        "weights_sampled_groups": sum(g["weights"] for g in sampled),
        "counted_weights": sum(g["counted"] for g in groups),
        "weights": sum(g["weights"] for g in groups),
        "mean_abs_error_per_seed": [r["mean_abs_error"] for r in sel],
        "mean_abs_error": float(np.mean([r["mean_abs_error"] for r in sel])),
        "mean_signed_error": float(np.mean([r["mean_signed_error"] for r in sel])),
        "expected_se_at_r0": sel[0]["expected_se_at_r0"],
        "expected_mean_abs_error": float(np.mean([r["expected_mean_abs_error"] for r in sel])),
        f"{metric}_sampled": [_final(r)[1] for r in sel],
        f"{metric}_exact": [_final(r)[1] for r in exact],
        # The same counts replayed on the exact runs' recorded transitions.
        "replayed_on_exact_runs": {
            kind: float(np.mean([r["subset_errors"][n][kind] for r in exact]))
            for kind in ("grid", "fixed_random", "fresh_random")
        } if all(n in r.get("subset_errors", {}) for r in exact) and exact else None,
    })
  return out


def _tensors_cell(r: dict[str, Any], groups: int) -> str:
  """The sampled groups by name if few (the JSON always lists them), else a count."""
  sampled = r["sampled_tensors"]
  if len(sampled) <= 3:
    return ", ".join(sampled) or "none"
  return (f"{len(sampled)} of {groups} groups "
          f"({r['counted_weights_sampled_groups']}/{r['weights_sampled_groups']})")


def _mean_std(xs: Sequence[float], digits: int = 2) -> str:
  return f"{np.mean(xs):.{digits}f} ± {np.std(xs):.{digits}f}" if xs else "-"


def _lengths(args: argparse.Namespace, ap: argparse.ArgumentParser) -> tuple[Optional[int], ...]:
  """``(length, fp_length)`` from the flags of the task's unit; the other unit's are refused."""
  unit = TASK_SETTINGS[args.task]["unit"]
  for flag in ("epochs", "fp_epochs", "steps", "fp_steps"):
    if getattr(args, flag) is not None and not flag.endswith(unit):
      ap.error(f"--{flag.replace('_', '-')} is not used with --task {args.task} "
               f"(its runs are measured in {unit})")
  return getattr(args, unit), getattr(args, f"fp_{unit}")


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true",
                  help="smoke run: 1 seed, short runs, one N (digits: 2 epochs, N = 256; "
                       "lm: 100 + 100 steps, N = 1024)")
  ap.add_argument("--task", default="digits", choices=tuple(RUNNERS))
  ap.add_argument("--model", default=None,
                  help="a model of the task (digits: cnn (default), mobilenet; lm: transformer)")
  ap.add_argument("--bits", type=int, default=2)
  ap.add_argument("--seeds", type=int, default=None, help="default 3")
  ap.add_argument("--epochs", type=int, default=None, help="digits: QAT epochs (default 60)")
  ap.add_argument("--fp-epochs", type=int, default=None,
                  help="digits: pretraining epochs (default 15)")
  ap.add_argument("--steps", type=int, default=None, help="lm: QAT steps (default 1000)")
  ap.add_argument("--fp-steps", type=int, default=None,
                  help="lm: pretraining steps (default 2000)")
  ap.add_argument("--sample-sizes", default=None,
                  help="comma list of N (default digits " +
                       ",".join(map(str, TASK_SETTINGS["digits"]["sample_sizes"])) + "; lm " +
                       ",".join(map(str, TASK_SETTINGS["lm"]["sample_sizes"])) + ")")
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  settings = TASK_SETTINGS[args.task]
  quick = settings["quick"] if args.quick else dict(
      seeds=3, length=settings["length"], fp_length=settings["fp_length"],
      sample_sizes=settings["sample_sizes"])
  length, fp_length = _lengths(args, ap)
  sizes = (tuple(int(x) for x in args.sample_sizes.split(","))
           if args.sample_sizes else quick["sample_sizes"])
  if any(n < 1 for n in sizes):
    raise SystemExit(f"--sample-sizes must be integers >= 1, got {args.sample_sizes!r}")
  model = args.model or settings["model"]
  models = settings["models"]
  if models is None:
    from talr_optax.demo.tasks import TASKS  # pylint: disable=import-outside-toplevel
    models = tuple(TASKS[args.task].models)
  if model not in models:
    raise SystemExit(f"--model must be one of {', '.join(models)} with "
                     f"--task {args.task}, got {model!r}")
  t0, load = time.perf_counter(), H.loadavg()
  rows = measure(args.task, model=model, bits=args.bits,
                 seeds=args.seeds or quick["seeds"], sample_sizes=sizes,
                 length=length or quick["length"], fp_length=fp_length or quick["fp_length"])
  table = summarize(rows)
  metric = _final(rows[0])[0]
  H.print_table(
      f"sampled vs exact K, {args.task} {settings['describe'](model, args.bits)} "
      f"(errors / R_0, after a {WARMUP_FRACTION:.0%} warm-up)",
      ["N", "sampled groups (counted/weights)", "|Ks-Ke| per seed", "mean", "signed",
       "random-sample SE", "random-sample E|err|", f"{METRIC_LABEL[metric]} sampled",
       f"{METRIC_LABEL[metric]} exact"],
      [[r["sample_size"], _tensors_cell(r, len(rows[0]["groups"])),
        " ".join(f"{e:.3f}" for e in r["mean_abs_error_per_seed"]), r["mean_abs_error"],
        r["mean_signed_error"], r["expected_se_at_r0"], r["expected_mean_abs_error"],
        _mean_std(r[f"{metric}_sampled"], METRIC_DIGITS[metric]),
        _mean_std(r[f"{metric}_exact"], METRIC_DIGITS[metric])] for r in table])
  name = f"sampling_fidelity_{args.task}" + (f"_{model}" if len(models) > 1 else "")
  out = H.results_path(name, args.quick, args.out)
  result = dict(meta=H.meta(sys.argv[1:] if argv is None else argv,
                            seconds=time.perf_counter() - t0, load_before=load,
                            load_after=H.loadavg(), warmup_fraction=WARMUP_FRACTION,
                            ema_momentum=rows[0]["ema_momentum"]),
                summary=table, rows=rows)
  replayed = [r for r in table if r["replayed_on_exact_runs"]]
  if replayed:
    H.print_table(
        "the same counts replayed on the exact runs: mean |K_subset - K_exact| / R_0",
        ["N", "strided grid", "fixed random subset", "fresh random subset per step"],
        [[r["sample_size"], *r["replayed_on_exact_runs"].values()] for r in replayed])
  H.write_json(out, result)
  return result


if __name__ == "__main__":
  main()
