"""The two tasks of the QAT study: a byte-level transformer and a depthwise conv net.

Not a study itself (``qat_study.py`` is). A task trains one run of one arm from
its pretrained full-precision model and scores it; everything a run depends
on that is not a tuned value is here:

* ``lm``: the demo's ``TransformerLM`` on the standard library's bytes
  (``python -m talr_optax.demo --task lm``: same data, model family,
  pretraining), AdamW on the quantized kernels, validation bits per byte.
* ``conv``: the demo's ``MobileNetV2Tiny`` (depthwise convolutions, batch
  norm) on scikit-learn's digits with half the images held out for testing,
  SGD on the quantized kernels, the paper's regime (weights and activations
  quantized, ``WbAb``), test error in percent, scored as trained and after
  re-estimating the batch-norm statistics (Nagel et al.'s pipeline does so
  for every arm).

The arms' optimizers of the quantized weights are built by
:func:`quantized_optimizer` from traced values (learning rate, ``lambda``,
dampening strength, freezing threshold), so each (arm, bit width) compiles
one training step for all its runs. The remedies run as their authors run
them (Nagel et al.'s code): a warm start (no freezing and no dampening for
the first quarter), then a cosine of the freezing threshold from 0.1 to its
final value and of the dampening strength from 0 to its final value, in the
authors' ``kernel_mean`` units; the frequency EMA averages over a tenth of
the run (:func:`freeze_ema_momentum`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import talr_optax as talr
from talr_optax import nnx as tnnx

WEIGHT_DECAY = 1e-4
# The authors' schedules (utils/qat_utils.py, bash/train_mobilenetv2.sh).
ANNEAL_START = 0.25
FREEZE_INITIAL_THRESHOLD = 0.1
# The paper's lambda of R_0 = lambda sqrt(bits): the library's default.
DEFAULT_LAMBDA = 5e-3
# The measured-R_0 rule the measured arms run: chosen among RULES on the tuning
# seed of both tasks (``qat_study.py --rules``; docs/study.md says how).
MEASURED_RULE = "half"


def freeze_ema_momentum(steps: int) -> float:
  """The freezing's frequency EMA: ``1 - 1/h`` with ``h`` a tenth of the run.

  Nagel et al. use 0.999 (``h = 1000``) in runs of tens of thousands of steps
  and advise a threshold two to three times ``1 - m``. A tenth of our runs
  (200 steps of 2000, 56 of 560) keeps the average over many updates while
  letting a weight that oscillates in the second half freeze before the end.
  A run shorter than 10 steps (a smoke test) averages over one step: 0.
  """
  return 1.0 - 1.0 / max(steps / 10.0, 1.0)


@dataclasses.dataclass(frozen=True)
class Arm:
  """What a run's quantized optimizer is (static: one compiled step per arm and width).

  Attributes:
    base: ``"adamw"`` or ``"sgd"``, the task's optimizer.
    talr: TALR on the quantized weights.
    remedy: ``None``, ``"dampening"`` or ``"freezing"``.
    target: for TALR: ``"lambda"`` (``R_0 = lambda sqrt(bits)``, lambda traced)
      or a measured rule (:data:`RULES`).
  """

  base: str
  talr: bool = False
  remedy: Optional[str] = None
  target: str = "lambda"


# Rules for a measured R_0 (talr_optax.measured_target): per rate group, one
# pooled R_0, or half of each group's measured rate.
RULES = {
    "per_group": dict(measure_pooled=False, measure_fraction=1.0),
    "pooled": dict(measure_pooled=True, measure_fraction=1.0),
    "half": dict(measure_pooled=False, measure_fraction=0.5),
}


def target_schedule(arm: Arm, bits: int, steps: int, lam: Any) -> talr.TargetSchedule:
  """TALR's target: the cosine from ``lam sqrt(bits)`` (traced), or a measured rule."""
  if arm.target in RULES:  # the rule's fields, whatever measured_target's defaults
    return dataclasses.replace(talr.measured_target(steps), **RULES[arm.target])
  unit = optax.cosine_decay_schedule(1.0, steps)
  r0 = lam * math.sqrt(bits)
  return talr.TargetSchedule(lambda count: r0 * unit(count), steps)


def quantized_optimizer(arm: Arm, model: nnx.Module, bits: int, steps: int,
                        values: dict[str, jax.Array]) -> optax.GradientTransformation:
  """The optimizer of the quantized weights of ``model``, followed by the monitors.

  Args:
    arm: the arm.
    model: the (possibly traced) QAT model.
    bits: weight bits.
    steps: the run's length (the schedules end there).
    values: traced float32 scalars ``lr`` (peak of the cosine learning rate,
      TALR's base rate ``U_0``), ``lam`` (TALR's lambda), ``strength`` (the
      dampening's final value) and ``threshold`` (the freezing's final value).
  """
  levels_fn, axes = tnnx.levels_fn_for(model), tnnx.layer_axes_for(model)
  centers_fn = tnnx.centers_fn_for(model)
  unit = optax.cosine_decay_schedule(1.0, steps)
  lr = lambda count: values["lr"] * unit(count)
  threshold = talr.delayed_cosine_schedule(FREEZE_INITIAL_THRESHOLD, values["threshold"], steps,
                                           start_fraction=ANNEAL_START, value_before=0.0)
  m_freeze = freeze_ema_momentum(steps)
  if arm.talr:
    target = target_schedule(arm, bits, steps, values["lam"])
    freeze = {} if arm.remedy is None else dict(
        freeze_threshold=threshold, centers_fn=centers_fn, freeze_ema_momentum=m_freeze)
    if arm.base == "adamw":
      tx = talr.adamwt(lr, target, levels_fn, weight_decay=WEIGHT_DECAY, layer_axes=axes,
                       **freeze)
    else:
      tx = talr.sgdt(lr, target, levels_fn, momentum=0.9, weight_decay=WEIGHT_DECAY,
                     layer_axes=axes, **freeze)
  else:
    if arm.base == "adamw":
      stages = [optax.scale_by_adam(), optax.add_decayed_weights(WEIGHT_DECAY)]
    else:
      stages = [optax.add_decayed_weights(WEIGHT_DECAY), optax.trace(0.9)]
    stages.append(optax.scale_by_learning_rate(lr))
    if arm.remedy == "dampening":
      strength = talr.delayed_cosine_schedule(0.0, values["strength"], steps,
                                              start_fraction=ANNEAL_START)
      stages.insert(0, talr.dampen_oscillations(centers_fn, strength,
                                                aggregation="kernel_mean", layer_axes=axes))
    elif arm.remedy == "freezing":
      stages.append(talr.freeze_oscillations(levels_fn, centers_fn, threshold,
                                             ema_momentum=m_freeze, layer_axes=axes))
    # The baseline's K, against the library's default target.
    default = target_schedule(Arm(arm.base, talr=True), bits, steps, DEFAULT_LAMBDA)
    stages.append(talr.track_transitions(levels_fn, default, layer_axes=axes))
    tx = optax.chain(*stages)
  return optax.chain(tx, talr.track_oscillations(levels_fn, layer_axes=axes))


def frozen_fraction(opt_state: Any) -> Optional[jax.Array]:
  """Fraction of all quantized weights that are frozen (``None`` without freezing)."""
  is_freezing = lambda x: isinstance(x, talr.FreezeOscillationsState)
  states = [s for s in jax.tree.leaves(opt_state, is_leaf=is_freezing) if is_freezing(s)]
  masks = [m for s in states for m in jax.tree.leaves(s.frozen)]
  if not masks:
    return None
  return (sum(jnp.sum(m, dtype=jnp.float32) for m in masks)
          / float(sum(m.size for m in masks)))


def _step_metrics(opt_state: Any) -> dict[str, jax.Array]:
  from talr_optax.demo import runner  # pylint: disable=import-outside-toplevel
  m = runner.step_metrics(opt_state)
  frozen = frozen_fraction(opt_state)
  if frozen is not None:
    m["frozen"] = frozen
  return m


def _finite(x: float) -> float:
  return float(x) if math.isfinite(x) else float("nan")


# ---------------------------------------------------------------------------
# The language model.


@dataclasses.dataclass(frozen=True)
class LMSettings:
  """The language model's size, batches and run lengths (see ``qat_study.py``)."""

  steps: int = 2000
  fp_steps: int = 4000
  width: int = 80
  layers: int = 2
  heads: int = 2
  context: int = 64
  batch_size: int = 16
  lr: float = 3e-4  # the full-precision parameters' cosine learning rate in QAT
  fp_lr: float = 3e-3
  eval_every: int = 250
  eval_windows: int = 256


class LMTask:
  """``TransformerLM`` QAT with AdamW; the score is validation bits per byte."""

  name = "lm"
  metric = "bits_per_byte"
  metric_label = "validation bits per byte"
  base, talr_name = "adamw", "adamwt"
  base_label, talr_label = "AdamW", "AdamWT"

  def __init__(self, settings: LMSettings):
    self.settings = settings
    self.steps = settings.steps
    self.data = self.fp_model = None
    self.pretraining: dict[str, Any] = {}

  def _cfg(self) -> Any:
    from talr_optax.demo.lm_config import LMConfig  # pylint: disable=import-outside-toplevel
    s = self.settings
    return LMConfig(bits=(2,), seeds=1, steps=s.steps, fp_steps=s.fp_steps,
                    batch_size=s.batch_size, context=s.context, width=s.width,
                    layers=s.layers, heads=s.heads, lr=s.lr, fp_lr=s.fp_lr,
                    eval_every=s.eval_every, eval_windows=s.eval_windows)

  def prepare(self) -> None:
    """Loads the data and pretrains the full-precision model (seed 0)."""
    from talr_optax.demo import lm_train  # pylint: disable=import-outside-toplevel
    self.data = lm_train.load(self._cfg())
    self.fp_model, pretraining = lm_train.pretrain(self._cfg(), self.data, 0)
    self.pretraining = {"steps": self.settings.fp_steps,
                        "final_" + self.metric: pretraining["final_bits_per_byte"]}

  def facts(self) -> dict[str, Any]:
    s = self.settings
    model = nnx.eval_shape(lambda: self._model(2, 0))
    labels = jax.tree.leaves(tnnx.param_labels(model))
    sizes = [x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))]
    return {"data": None if self.data is None else self.data.corpus.facts,
            "model": {"width": s.width, "layers": s.layers, "heads": s.heads,
                      "context": s.context, "parameters": int(sum(sizes)),
                      "quantized_parameters": int(sum(
                          n for n, l in zip(sizes, labels) if l == tnnx.QUANTIZED))}}

  def _model(self, bits: Optional[int], seed: int) -> nnx.Module:
    from talr_optax.demo import lm_train  # pylint: disable=import-outside-toplevel
    return lm_train.make_model(self._cfg(), bits, seed)

  def _windows(self, length: int, rng: np.random.Generator) -> np.ndarray:
    from talr_optax.demo import lm_data  # pylint: disable=import-outside-toplevel
    return lm_data.random_windows(self.data.corpus.train, length, self.settings.batch_size, rng)

  def _score(self, model: nnx.Module) -> float:
    from talr_optax.demo import lm_train  # pylint: disable=import-outside-toplevel
    return _finite(lm_train.bits_per_byte(model, self.data.val))

  def run(self, arm: Optional[Arm], bits: Optional[int], seed: int,
          values: dict[str, float]) -> dict[str, Any]:
    """One QAT run (``arm=None``: the full-precision reference, lr ``values["lr"]``)."""
    s = self.settings
    model = self._model(bits, seed)
    tnnx.load_full_precision(model, self.fp_model)
    rng = np.random.default_rng(seed)
    if bits is not None:
      tnnx.calibrate(model, jnp.asarray(self._windows(s.context, rng)))
    traced = {k: jnp.asarray(v, jnp.float32) for k, v in values.items()}
    run = _LMRun(arm, bits, s.steps, s.lr)
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    opt_state = _lm_optimizer(run, model, traced).init(params)
    model.train()
    trace: dict[str, list[float]] = {}
    evals: dict[str, list[float]] = {"step": [], self.metric: []}
    done = 0
    while done < s.steps:
      chunk = min(s.eval_every, s.steps - done)
      pending = []
      for _ in range(chunk):
        w = jnp.asarray(self._windows(s.context + 1, rng))
        loss, opt_state, m = _lm_step(run, model, opt_state, traced, w)
        pending.append((loss, m))
      for loss, m in jax.device_get(pending):  # one transfer per chunk
        trace.setdefault("loss", []).append(float(loss))
        for key, value in m.items():
          trace.setdefault(key, []).append(float(value))
      done += chunk
      evals["step"].append(done)
      evals[self.metric].append(self._score(model))
    return {"final": evals[self.metric][-1], "evals": evals, "trace": trace}


@dataclasses.dataclass(frozen=True)
class _LMRun:
  """Static settings of a compiled step (``arm=None``: the full-precision reference)."""

  arm: Optional[Arm]
  bits: Optional[int]
  steps: int
  lr: float


def _lm_optimizer(run: _LMRun, model: nnx.Module, values: dict[str, jax.Array]
                  ) -> optax.GradientTransformation:
  unit = optax.cosine_decay_schedule(1.0, run.steps)
  if run.arm is None:  # the full-precision reference
    return optax.adamw(lambda c: values["lr"] * unit(c), weight_decay=WEIGHT_DECAY)
  full_precision = optax.adamw(lambda c: run.lr * unit(c), weight_decay=WEIGHT_DECAY)
  return optax.partition(
      {tnnx.QUANTIZED: quantized_optimizer(run.arm, model, run.bits, run.steps, values),
       tnnx.FULL_PRECISION: full_precision}, tnnx.param_labels(model))


@functools.partial(nnx.jit, static_argnums=0)
def _lm_step(run: _LMRun, model: nnx.Module, opt_state: Any, values: dict[str, jax.Array],
             windows: jax.Array) -> tuple[jax.Array, Any, dict[str, jax.Array]]:
  """One update of ``model`` (in place); as the demo's ``lm_train.train_step``."""
  from talr_optax.demo import lm_train  # pylint: disable=import-outside-toplevel
  loss, grads = nnx.value_and_grad(lambda m: lm_train.next_byte_loss(m, windows).mean())(model)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  updates, opt_state = _lm_optimizer(run, model, values).update(
      nnx.as_pure(grads), opt_state, params)
  nnx.update(model, optax.apply_updates(params, updates))
  return loss, opt_state, _step_metrics(opt_state) if run.bits is not None else {}


# ---------------------------------------------------------------------------
# The conv net.


@dataclasses.dataclass(frozen=True)
class ConvSettings:
  """The conv task's data split, batches and run lengths (see ``qat_study.py``)."""

  epochs: int = 20
  fp_epochs: int = 15
  batch_size: int = 32
  test_fraction: float = 0.5
  bn_batches: int = 50
  eval_every_epochs: int = 5


class ConvTask:
  """``MobileNetV2Tiny`` WbAb QAT with SGD on digits; the score is test error (%).

  The score of a run is its error after batch-norm re-estimation (the
  authors' pipeline); the error as trained is kept beside it.
  """

  name = "conv"
  metric = "test_error"
  metric_label = "test error (%) after batch-norm re-estimation"
  base, talr_name = "sgd", "sgdt"
  base_label, talr_label = "SGD", "SGDT"

  def __init__(self, settings: ConvSettings):
    self.settings = settings
    self.dataset = self.fp_model = None
    self.pretraining: dict[str, Any] = {}
    self.steps_per_epoch = 0
    self.steps = 0

  def _cfg(self) -> Any:
    from talr_optax.demo.config import DemoConfig  # pylint: disable=import-outside-toplevel
    s = self.settings
    return DemoConfig(model="mobilenet", bits=(2,), seeds=1, epochs=s.epochs,
                      fp_epochs=s.fp_epochs, batch_size=s.batch_size)

  def _demo(self):
    from talr_optax.demo import data, tasks, train  # pylint: disable=import-outside-toplevel
    return data, tasks, train

  def prepare(self) -> None:
    """Loads the digits (half held out) and pretrains the full-precision model (seed 0)."""
    data, tasks, train = self._demo()
    self.dataset = data.load_digits(test_fraction=self.settings.test_fraction, seed=0)
    self.steps_per_epoch = len(self.dataset.train.labels) // self.settings.batch_size
    self.steps = self.settings.epochs * self.steps_per_epoch
    self.fp_model = train.pretrain_full_precision(self._cfg(), tasks.TASKS["digits"],
                                                  self.dataset, 0)
    self.pretraining = {"epochs": self.settings.fp_epochs,
                        "final_" + self.metric: self._error(self.fp_model)}

  def facts(self) -> dict[str, Any]:
    model = nnx.eval_shape(lambda: self._model(2, 0))
    labels = jax.tree.leaves(tnnx.param_labels(model))
    sizes = [x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))]
    d = self.dataset
    return {"data": None if d is None else {
                "name": "scikit-learn digits (8x8)", "train_images": int(d.train.labels.size),
                "test_images": int(d.test.labels.size), "split_seed": 0},
            "model": {"name": "MobileNetV2Tiny", "parameters": int(sum(sizes)),
                      "quantized_parameters": int(sum(
                          n for n, l in zip(sizes, labels) if l == tnnx.QUANTIZED))},
            "steps_per_epoch": self.steps_per_epoch}

  def _model(self, bits: Optional[int], seed: int) -> nnx.Module:
    _, tasks, _ = self._demo()
    return tasks.make_model(self._cfg(), bits, seed, 10)

  def _error(self, model: nnx.Module) -> float:
    _, tasks, train = self._demo()
    return _finite(100.0 * (1.0 - train.evaluate(tasks.TASKS["digits"], model,
                                                 self.dataset.test)))

  def _batches(self, rng: np.random.Generator):
    data, tasks, _ = self._demo()
    return data.batches(self.dataset.train, self.settings.batch_size, rng=rng,
                        augment=tasks.TASKS["digits"].augment)

  def _bn_batches(self, seed: int) -> list[jax.Array]:
    """Augmented training batches, as training sees them (the authors use the train loader)."""
    rng = np.random.default_rng(20_000 + seed)
    out: list[jax.Array] = []
    while len(out) < self.settings.bn_batches:
      for x, _ in self._batches(rng):
        out.append(jnp.asarray(x))
        if len(out) == self.settings.bn_batches:
          break
    return out

  def run(self, arm: Arm, bits: int, seed: int, values: dict[str, float]) -> dict[str, Any]:
    """One QAT run: the error as trained and after batch-norm re-estimation."""
    data, _, _ = self._demo()
    s = self.settings
    model = self._model(bits, seed)
    tnnx.load_full_precision(model, self.fp_model)
    first, _ = next(data.batches(self.dataset.train, s.batch_size,
                                 rng=np.random.default_rng(seed)))
    tnnx.calibrate(model, jnp.asarray(first))
    traced = {k: jnp.asarray(v, jnp.float32) for k, v in values.items()}
    run = _ConvRun(arm, bits, self.steps)
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    opt_state = _conv_optimizer(run, model, traced).init(params)
    model.train()
    rng = np.random.default_rng(seed)
    trace: dict[str, list[float]] = {}
    evals: dict[str, list[float]] = {"epoch": [], "test_error_as_trained": []}
    for epoch in range(s.epochs):
      pending = []
      for x, y in self._batches(rng):
        loss, opt_state, m = _conv_step(run, model, opt_state, traced, jnp.asarray(x),
                                        jnp.asarray(y))
        pending.append((loss, m))
      for loss, m in jax.device_get(pending):  # one transfer per epoch
        trace.setdefault("loss", []).append(float(loss))
        for key, value in m.items():
          trace.setdefault(key, []).append(float(value))
      if (epoch + 1) % s.eval_every_epochs == 0 or epoch + 1 == s.epochs:
        evals["epoch"].append(epoch + 1)
        evals["test_error_as_trained"].append(self._error(model))
    as_trained = evals["test_error_as_trained"][-1]
    tnnx.reestimate_batch_norm(model, self._bn_batches(seed))
    model.train()
    return {"final": self._error(model), "final_as_trained": as_trained, "evals": evals,
            "trace": trace}


@dataclasses.dataclass(frozen=True)
class _ConvRun:
  """Static settings of a compiled step."""

  arm: Arm
  bits: int
  steps: int


def _conv_optimizer(run: _ConvRun, model: nnx.Module, values: dict[str, jax.Array]
                    ) -> optax.GradientTransformation:
  """The demo's four groups; only the quantized group differs between arms."""
  from talr_optax.demo import config  # pylint: disable=import-outside-toplevel
  lr = optax.cosine_decay_schedule(config.BASE_LR["sgd"], run.steps)
  groups = {
      tnnx.QUANTIZED: quantized_optimizer(run.arm, model, run.bits, run.steps, values),
      tnnx.FULL_PRECISION: optax.chain(optax.add_decayed_weights(WEIGHT_DECAY),
                                       optax.trace(config.MOMENTUM),
                                       optax.scale_by_learning_rate(lr)),
      tnnx.ACTIVATION_SCALE: optax.sgd(optax.cosine_decay_schedule(config.ACT_SCALE_LR,
                                                                   run.steps)),
      tnnx.BATCH_NORM: optax.scale_by_learning_rate(lr),
  }
  return optax.partition(groups, tnnx.param_labels(model))


@functools.partial(nnx.jit, static_argnums=0)
def _conv_step(run: _ConvRun, model: nnx.Module, opt_state: Any, values: dict[str, jax.Array],
               x: jax.Array, y: jax.Array) -> tuple[jax.Array, Any, dict[str, jax.Array]]:
  """One update of ``model`` (in place); as the demo's ``train.train_step``."""
  loss, grads = nnx.value_and_grad(
      lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean())(model)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  updates, opt_state = _conv_optimizer(run, model, values).update(
      nnx.as_pure(grads), opt_state, params)
  nnx.update(model, optax.apply_updates(params, updates))
  return loss, opt_state, _step_metrics(opt_state)
